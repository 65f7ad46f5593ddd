"""Offline growth of a Hugging Face checkpoint into a Hugging Face checkpoint that
`AutoModelForCausalLM.from_pretrained` loads (`grow`), or into memory (`prepare` then
`grown_state_dict`: what `grow` writes, for `evaluation.py`).

The plan is the engine's (`GrowthPlan` from the config), each grown tensor is made by the
engine's mapping and operators (`mapping.map_shard` → `ops.fill_shard`) on the
Megatron-equivalent view of the HF tensors (`view.py`), so layer and expert maps, zero-init
copies, skips, top-k, upcycling and the noise are the Megatron path's. Tensors are grown and
written in batches of `--batch-size-mb` (one safetensors shard each), reading only the boxes
each needs: memory is bounded by the batch, not the model. The output is written through
`io/destination.py` (private staging, lock, atomic rename, `--overwrite` rules), with the
grown `config.json`, the source's tokenizer and generation files, and a growth record.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from .. import __version__, merge, ops
from ..cost import human
from ..errors import GrowthError
from ..io import hf as hf_io
from ..io.destination import Destination, RootKind, tree_bytes
from ..mapping import map_shard
from ..options import Growth
from ..plan import Architecture, GrowthPlan
from ..provenance import Provenance, SourceRef
from . import families
from .view import LAYER, SourceView, TargetTensor, target_tensors, to_hf

Log = Callable[[str], None]
HF_ROOT = RootKind("a Hugging Face checkpoint (config.json, no Megatron tracker)", hf_io.hf_members,
                   hf_io.CONFIG)


@dataclass
class Source:
    """An HF source checkpoint with everything growth derives from it."""

    ckpt: hf_io.HFCheckpoint
    family: families.Family  # the family of the grown checkpoint
    architecture: Architecture
    view: SourceView


def read_source(path, upcycle: bool, flag: str = "--load") -> Source:
    ckpt = hf_io.HFCheckpoint.read(path, flag)
    config = ckpt.config
    family = families.upcycle_target(config, flag) if upcycle else families.family_of(config, flag)
    layers = int(config.get("num_hidden_layers") or 0)
    indices = {int(m.group(1)) for n in ckpt.shapes if (m := LAYER.match(n))}
    if not layers or sorted(indices) != list(range(layers)):
        extra = sorted(indices - set(range(layers)))
        what = (f"holds layers {extra[:3]} beyond num_hidden_layers {layers} (multi-token-prediction "
                "layers, which transformers does not load and growth does not place); drop them"
                if extra else f"has tensors for layers {sorted(indices)[:8]}..., config.json says "
                f"num_hidden_layers {layers}")
        raise GrowthError(f"{flag} {ckpt.path}: {what}")
    if upcycle:
        arch = Architecture(num_layers=layers)
    else:
        groups, selected, score = families.routing(family, config)
        pattern = families.moe_layers(family, config)
        arch = Architecture(num_layers=layers, num_experts=families.num_experts(family, config),
                            topk=int(config["num_experts_per_tok"]),
                            moe_layers=None if all(pattern) else pattern, router_num_groups=groups,
                            router_group_topk=selected, score_function=score)
    return Source(ckpt, family, arch, SourceView(ckpt, family))


def read_second(source: Source, path, upcycle: bool) -> Source:
    """The second checkpoint of `--grow-from-second`, checked to be `source`'s model: the same
    family and architecture, the same tensor names, shapes and dtypes (copies are not cast)."""
    second = read_source(path, upcycle, merge.FLAG)
    if (second.family.name, second.architecture) != (source.family.name, source.architecture):
        raise GrowthError(f"{merge.FLAG} {second.ckpt.path}: not the source's model: "
                          f"{second.family.name} {second.architecture} there, {source.family.name} "
                          f"{source.architecture} in the source {source.ckpt.path}")
    merge.check_same_tensors(merge.FLAG, second.ckpt.path, source.ckpt.path, _tensors(second.ckpt),
                             _tensors(source.ckpt))
    return second


def _tensors(ckpt: hf_io.HFCheckpoint) -> dict:
    return {name: (shape, ckpt.dtypes[name]) for name, shape in ckpt.shapes.items()}


def reader(source: Source, second: Optional[Source]) -> Callable:
    """Box → data, from the second checkpoint's view where the box is the second's."""
    return lambda box: (second if box.second else source).view.read(box)


def dense_hidden(source: Source) -> int:
    return int(source.ckpt.config["intermediate_size"])


def grown_config(source: Source, plan: GrowthPlan, notes: list[str]) -> dict:
    if plan.upcycle.active:
        return families.upcycled_config(source.family, source.ckpt.config, plan, dense_hidden(source))
    return families.grown_config(source.family, source.ckpt.config, plan, notes)


def record(source: Source, plan: GrowthPlan, notes: list[str], second: Optional[Source] = None) -> dict:
    """The growth record (`megatron_recycle.json`): the growth record of a Megatron checkpoint
    (naming the `--grow-from-second` checkpoint), and the family, format and notes."""
    previous = None if source.ckpt.record is None else Provenance.from_dict(source.ckpt.record)
    merged = None if second is None else SourceRef(os.path.realpath(second.ckpt.path), None)
    provenance = Provenance(source=SourceRef(os.path.realpath(source.ckpt.path), None), plan=plan.describe(),
                            optimizer_policy="reset", optimizer="none", grown_by="offline",
                            version=__version__, previous=previous, second=merged)
    return {**provenance.to_dict(), "format": "huggingface", "family": source.family.name, "notes": notes}


def batches(tensors: list[TargetTensor], max_bytes: int) -> list[list[TargetTensor]]:
    """Consecutive tensors up to `max_bytes` per batch (a larger tensor is a batch alone)."""
    out: list[list[TargetTensor]] = [[]]
    size = 0
    for t in tensors:
        if out[-1] and size + t.nbytes > max_bytes:
            out.append([])
            size = 0
        out[-1].append(t)
        size += t.nbytes
    return out


def grow_tensors(source: Source, plan: GrowthPlan, batch: list[TargetTensor],
                 second: Optional[Source] = None) -> dict[str, torch.Tensor]:
    """Make one batch of grown tensors with the engine's mapping and operators; `second`: the
    checkpoint of `--grow-from-second`, which the boxes marked `second` are read from."""
    sigmas: dict = {}
    read = reader(source, second)

    def sigma_of(unit_box):
        if unit_box not in sigmas:
            sigmas[unit_box] = ops.sigma(read(unit_box))
        return sigmas[unit_box]

    out = {}
    for tensor in batch:
        data = torch.empty(tensor.shape, dtype=tensor.dtype)
        for unit in tensor.units:
            fill = map_shard(plan, source.view.shapes, unit.key, unit.global_shape, unit.global_offset,
                             unit.local_shape, unit.prepend, "copy")
            region = data if unit.expert is None else data[unit.expert]
            values = None if fill.source is None or fill.zero else read(fill.source)
            rows = None if fill.second is None or fill.zero else read(fill.second)
            made = torch.empty(unit.local_shape, dtype=tensor.dtype) if unit.layout else region
            ops.fill_shard(made, fill, values, sigma_of, plan.width.noise_alpha, plan.width.seed, rows)
            if unit.layout:
                region.copy_(to_hf(unit.layout, made))
        out[tensor.name] = data
    for checkpoint in (source, second):  # unmaps their files: the pages do not pile up batch after batch
        if checkpoint is not None:
            checkpoint.ckpt.close()
    return out


@dataclass
class Prepared:
    """A source, its plan and everything the plan makes of it, before any tensor is grown."""

    source: Source
    plan: GrowthPlan
    notes: list[str]
    config: dict  # the grown config.json
    tensors: list[TargetTensor]
    second: Optional[Source] = None  # --grow-from-second

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def prepare(load, growth: Growth, flag: str = "--load") -> Prepared:
    source = read_source(load, growth.upcycle.active, flag)
    plan = growth.plan(source.architecture)
    second = None if growth.second is None else read_second(source, growth.second, growth.upcycle.active)
    notes = list(plan.exactness_notes())
    config = grown_config(source, plan, notes)
    return Prepared(source, plan, notes, config, target_tensors(source.view, plan, source.family), second)


def grown_state_dict(prepared: Prepared) -> dict[str, torch.Tensor]:
    """Every grown tensor, in memory, under its Hugging Face name: what `grow` writes."""
    return grow_tensors(prepared.source, prepared.plan, prepared.tensors, prepared.second)


def describe(prepared: Prepared) -> str:
    plan = prepared.plan
    return (f"{prepared.source.ckpt.path} ({prepared.source.family.name}, Hugging Face): "
            f"{plan.source.num_layers}->{plan.target_num_layers} layers, {plan.source.num_experts}->"
            f"{plan.target_num_experts} experts; {len(prepared.tensors)} tensors, "
            f"{human(prepared.nbytes, 'B')}")


@dataclass
class GrowResult:
    path: Path
    plan: GrowthPlan
    tensors: int
    bytes: int
    seconds: float
    notes: list[str]


def grow(load, save, growth: Growth = Growth(), overwrite: bool = False, batch_bytes: int = 1 << 30,
         remove_stale_staging: bool = False,
         log: Log = lambda s: print(s, file=sys.stderr, flush=True)) -> GrowResult:
    start = time.monotonic()
    prepared = prepare(load, growth)
    source, plan, notes, tensors = prepared.source, prepared.plan, prepared.notes, prepared.tensors
    work = batches(tensors, batch_bytes)
    total = prepared.nbytes
    destination = Destination(save, overwrite, log=lambda s: log(f"grow: {s}"), kind=HF_ROOT)
    destination.check_overlap(source.ckpt.path, include_parent=False)
    plan.require_growth()  # as offline.grow: after the destination's checks, before anything is written
    log(f"grow: {describe(prepared)} in {len(work)} shard(s) -> {destination.given}")
    with destination:
        stale = destination.stale_staging()
        if stale and remove_stale_staging:
            destination.remove_stale_staging(lambda s: log(f"grow: {s}"))
        elif stale:
            log(f"grow: note: {len(stale)} staging directories of interrupted runs beside "
                f"{destination.given} ({human(sum(tree_bytes(p) for p in stale), 'B')}); remove them "
                "with --remove-stale-staging")
        destination.check_space(total)
        weight_map = {}
        for number, batch in enumerate(work):
            grown = grow_tensors(source, plan, batch, prepared.second)
            name = hf_io.write_shard(destination.staging, number, len(work), grown)
            weight_map.update({t: name for t in grown})
            del grown
            log(f"grow: shard {number + 1}/{len(work)} written, {time.monotonic() - start:.0f} s elapsed")
        hf_io.finish(destination.staging, source.ckpt, weight_map, total, prepared.config,
                     record(source, plan, notes, prepared.second))
        destination.commit()
    source.ckpt.close()
    for note in notes:
        log(f"grow: note: {note}")
    seconds = time.monotonic() - start
    log(f"grow: wrote {destination.given} ({human(total, 'B')}) in {seconds:.1f} s")
    return GrowResult(destination.path, plan, len(tensors), total, seconds, notes)


def plan_of_record(grown: hf_io.HFCheckpoint) -> Optional[GrowthPlan]:
    return None if grown.record is None else Provenance.from_dict(grown.record).growth_plan()
