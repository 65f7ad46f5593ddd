"""`verify`, `inspect` and `plan` on Hugging Face checkpoints.

`verify` restates every grown tensor with `verify.expectation` (the plan restated on its own,
not the mapping that grew it) on the Megatron-equivalent view, and checks it with
`verify`'s own piece check: originals equal their source slices, noisy copies equal source +
noise drawn again bit for bit (std and mean checked too), zero-init copies are zero, nothing
is NaN/Inf. Beside the tensors: the grown tensor set, shapes and dtypes, `config.json` equal to
the plan's, the copied tokenizer and generation files equal to the source's.
"""

from __future__ import annotations

import math
import os
from types import SimpleNamespace
from typing import Optional

from .. import cost, merge, verify
from ..errors import GrowthError
from ..io import hf as hf_io
from ..manifest import Piece
from ..options import Growth
from ..plan import GrowthPlan
from . import grow as hf_grow
from .view import target_tensors, to_megatron, view_shapes


def verify_grown(source_path, grown_path, growth: Optional[Growth] = None) -> verify.Report:
    grown = hf_io.HFCheckpoint.read(grown_path, "--grown")
    recorded = hf_grow.plan_of_record(grown)
    if growth is None and recorded is None:
        raise GrowthError(f"--grown {grown.path} has no growth record ({hf_io.RECORD}); pass the "
                          "--grow-* options it was grown with")
    upcycle = (growth.upcycle if growth is not None else recorded.upcycle).active
    source = hf_grow.read_source(source_path, upcycle, "--source")
    plan = growth.plan(source.architecture) if growth is not None else recorded
    if plan.source != source.architecture:
        raise GrowthError(f"--source {source.ckpt.path} is not the plan's source: its architecture is "
                          f"{source.architecture}, the plan grows {plan.source}")
    report = verify.Report()
    if recorded is not None and recorded != plan:
        report.mismatches.append(f"{hf_io.RECORD}: the growth record's plan differs from the plan checked")
    second = _second(source, grown, plan, growth, report)
    read = hf_grow.reader(source, second)
    _check_files(source, grown, plan, report)
    tensors = target_tensors(source.view, plan, source.family)
    want = {t.name: (t.shape, t.dtype) for t in tensors}
    have = {n: (grown.shapes[n], grown.dtypes[n]) for n in grown.shapes}
    for name in sorted(want.keys() - have.keys()):
        report.mismatches.append(f"{name}: missing from the grown checkpoint")
    for name in sorted(have.keys() - want.keys()):
        report.mismatches.append(f"{name}: in the grown checkpoint but not in the plan")
    for name in sorted(want.keys() & have.keys()):
        if want[name] != have[name]:
            report.mismatches.append(f"{name}: shape/dtype {have[name]}, the plan makes {want[name]}")
    report.tensors = len(want.keys() & have.keys())
    shapes = SimpleNamespace(shapes=source.view.shapes)  # what verify's checks ask of a source
    for tensor in tensors:
        if want[tensor.name] != have.get(tensor.name):
            continue
        data = grown.read_box(tensor.name, (0,) * len(tensor.shape), tensor.shape)
        for unit in tensor.units:
            exp = verify.expectation(plan, Piece(unit.box(), tensor.dtype, ()), source.view.shapes, "copy")
            boxes = ({exp.source} if exp.source is not None else set()) | (
                {exp.second} if exp.second is not None else set()) | (
                {verify._sigma_unit(shapes, exp)} if exp.noisy else set())
            sources = {b: read(b) for b in boxes}
            got = to_megatron(unit.layout, data if unit.expert is None else data[unit.expert])
            report.pieces += 1
            problem = verify._check_piece(got, sources, exp, plan, shapes, report)
            if problem:
                where = "" if unit.expert is None else f" (expert {unit.expert})"
                report.mismatches.append(f"{tensor.name}{where}{verify._where(exp)}: {problem}")
    grown.close()
    source.ckpt.close()
    if second is not None:
        second.ckpt.close()
    return report


def _second(source, grown: hf_io.HFCheckpoint, plan: GrowthPlan, growth: Optional[Growth],
            report: verify.Report):
    """The second checkpoint the plan reads expert copies from: `--grow-from-second`, else
    the one the growth record names; a record naming another is reported."""
    if not plan.init.from_second:
        return None
    named = None if grown.record is None else (grown.record.get("second") or {}).get("path")
    given = None if growth is None else growth.second
    if given is None and named is None:
        raise GrowthError(f"--grown {grown.path}: its plan reads expert copies from a second checkpoint "
                          f"and its record names none; pass {merge.FLAG}")
    second = hf_grow.read_second(source, given or named, plan.upcycle.active)
    if named is not None and named != os.path.realpath(second.ckpt.path):
        report.mismatches.append(f"{hf_io.RECORD}: the growth record names the second checkpoint {named}, "
                                 f"{merge.FLAG} is {os.path.realpath(second.ckpt.path)}")
    return second


def _check_files(source, grown: hf_io.HFCheckpoint, plan: GrowthPlan, report: verify.Report) -> None:
    config = hf_grow.grown_config(source, plan, [])
    for key in sorted(set(config) | set(grown.config)):
        if key != "transformers_version" and config.get(key) != grown.config.get(key):
            report.mismatches.append(f"config.json: {key} is {grown.config.get(key)!r}, the plan makes "
                                     f"{config.get(key)!r}")
    for name in hf_io.side_files(source.ckpt.path):
        copied = grown.path / name
        if not copied.is_file() or copied.read_bytes() != (source.ckpt.path / name).read_bytes():
            report.mismatches.append(f"{name}: not copied from the source unchanged")


def summarize(path) -> dict:
    """What `inspect` shows of an HF checkpoint (no tensor is read)."""
    ckpt = hf_io.HFCheckpoint.read(path, "CKPT")
    config = ckpt.config
    dense = config.get("model_type") in hf_grow.families.dense_types()
    source = hf_grow.read_source(path, dense, "CKPT")
    arch = source.architecture
    counts = cost.count_params(source.view.shapes, arch.topk, arch.num_experts)
    mla = any(".q_a_proj." in n or ".kv_a_proj_with_mqa." in n for n in ckpt.shapes)
    heads, kv = config.get("num_attention_heads"), config.get("num_key_value_heads")
    attention = "MLA" if mla else (f"GQA ({kv} groups)" if kv and heads and kv < heads else "MHA")
    record = ckpt.record
    return {
        "path": str(ckpt.path),
        "format": "huggingface",
        "model_type": config.get("model_type"),
        "family": "dense" if dense else source.family.name,
        "architecture": {"num_layers": arch.num_layers, "num_experts": arch.num_experts, "topk": arch.topk,
                         "router_num_groups": arch.router_num_groups, "score_function": arch.score_function},
        "layer_pattern": "".join("M" if m else "D" for m in (arch.moe_layers or [arch.is_moe] * arch.num_layers)),
        "hidden_size": config.get("hidden_size"),
        "attention": attention,
        "shared_experts": config.get("n_shared_experts"),
        "params": counts.total,
        "active_params": counts.active,
        "dtypes": sorted({str(d).replace("torch.", "") for d in ckpt.dtypes.values()}),
        "files": len(set(ckpt.files.values())),
        "checkpoint_bytes": sum(math.prod(s) * ckpt.dtypes[n].itemsize for n, s in ckpt.shapes.items()),
        "provenance": None if record is None else {k: record.get(k) for k in ("source", "family", "version", "notes")}
        | {"layer_map": record["plan"]["layer_map"], "width": record["plan"]["width"],
           "depth": record["plan"]["depth"]},
    }


def table(s: dict) -> str:
    a = s["architecture"]
    rows = [("path", s["path"]), ("format", f"Hugging Face ({s['model_type']}: {s['family']})"),
            ("layers", f"{a['num_layers']} ({s['layer_pattern']})"), ("experts", a["num_experts"] or "dense"),
            ("top-k", a["topk"]), ("router", f"{a['score_function']}, groups {a['router_num_groups'] or 1}"),
            ("shared experts", s["shared_experts"] or 0), ("hidden size", s["hidden_size"]),
            ("attention", s["attention"]), ("parameters", cost.human(s["params"])),
            ("active parameters / token", cost.human(s["active_params"])), ("dtypes", ", ".join(s["dtypes"])),
            ("checkpoint size", f"{cost.human(s['checkpoint_bytes'], 'B')} in {s['files']} file(s)")]
    p = s["provenance"]
    rows.append(("grown by megatron-recycle", "no") if p is None else
                ("grown from", f"{p['source']['path']} ({p['family']}), megatron-recycle {p['version']}"))
    if p is not None:
        rows += [("growth", f"depth {p['depth']}, width {p['width']}"),
                 ("layer map", " ".join(map(str, p["layer_map"])))]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{name:{width}}  {value}" for name, value in rows)


def plan_report(path, growth: Growth, layout: cost.Layout) -> dict:
    """`plan` on an HF checkpoint: the Megatron report, from the Megatron-equivalent shapes."""
    source = hf_grow.read_source(path, growth.upcycle.active)
    plan = growth.plan(source.architecture)
    plan.check_target(expert_parallel=layout.ep, pipeline_parallel=layout.pp)
    notes = list(plan.exactness_notes())
    hf_grow.grown_config(source, plan, notes)
    config = source.ckpt.config
    args = SimpleNamespace(num_attention_heads=config.get("num_attention_heads"),
                           kv_channels=config.get("head_dim"), hidden_size=config.get("hidden_size"),
                           seq_length=None)  # training sequence length: not in an HF config
    shapes, dtypes = view_shapes(target_tensors(source.view, plan, source.family))
    return {
        "source": str(source.ckpt.path),
        "layout": {"tp": layout.tp, "ep": layout.ep, "pp": layout.pp, "dp": layout.data_parallel()},
        "before": cost.model_cost(source.view.shapes, source.view.dtypes, plan.source, args, layout),
        "after": cost.model_cost(shapes, dtypes, plan.target, args, layout),
        "layers": [plan.source.num_layers, plan.target_num_layers],
        "experts": [plan.source.num_experts, plan.target_num_experts],
        "topk": [plan.source.topk, plan.target_topk],
        "layer_map": list(plan.layer_map),
        "expert_map": [list(x) for x in plan.expert_map()],
        "hybrid_pattern": None,
        "notes": notes,
    }
