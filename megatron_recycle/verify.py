"""Prove a grown checkpoint is what its plan says, independently of how it was grown.

The expectation is restated here from the plan alone (layer map, expert map, zero-init and
optimizer policies), not with the load hook's mapping: for every grown tensor piece, the
source box it must equal. Copies that get noise are checked exactly: the noise is a fixed
function of (seed, tensor, target layer, target expert, block), so it is drawn again here, on
the whole unit, scaled by α·σ of the source unit (σ computed here), and every element must
match bit for bit; the noise's std and mean are checked too, as a second line. The common
state is checked against the tensors: the grown args (layers, experts, top-k, MoE pattern),
the iteration and the growth record. Checkpoints are read piece by piece, so memory stays
bounded like `grow`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from . import companions, consistency, hybrid, indexing, manifest, merge, ops, policy, upcycling
from .errors import GrowthError
from .io.checkpoint import CheckpointInfo, iteration_dir
from .io.iteration_files import IterationFiles
from .mapping import INIT_STREAM, Box
from .plan import GrowthPlan


@dataclass(frozen=True)
class Expectation:
    """What one grown piece must be: its source box, and what was done to it."""

    source: Optional[Box]  # the source box (whole rows of all source experts for router rows)
    layer: int  # target layer, -1 outside the decoder stack
    expert: Optional[int]  # target expert of an expert unit
    rows: Optional[tuple[int, ...]]  # router rows: source row per target row
    row_experts: tuple[int, ...]  # router rows: target expert per local row
    copy_rows: tuple[int, ...]  # router rows: local rows that are copies
    zero: bool
    zero_rows: tuple[int, ...]  # router moments under the `zero` policy: the copied rows
    noisy: bool  # a copy of an expert (or router rows) that gets noise
    noise_name: str  # the noise stream's tensor name
    sigma_key: str  # whose σ scales the noise
    scale: float = 1.0  # upcycled output projections: the source times this
    noise_unit: tuple[int, ...] = ()  # the whole unit one expert's noise covers
    noise_offset: tuple[int, ...] = ()  # the piece's place in it
    scale_rows: Optional[tuple[int, ...]] = None  # router rows: the local rows `scale` applies to
    noise_factor: float = 1.0  # --grow-weight-multiplier on the copies' α·σ
    drawn: bool = False  # the piece drawn afresh (source None): a baseline's N(0, init_std²)
    drawn_rows: tuple[int, ...] = ()  # router rows drawn afresh (the rest copied)
    second: Optional[Box] = None  # router rows of --grow-from-second: rows >= E index its rows


def expectation(plan: GrowthPlan, piece: manifest.Piece, source_shapes, moment_policy: str) -> Expectation:
    box = piece.box
    prepend = len(box.index)
    layout = indexing.parse_key(box.key, prepend)
    index = list(box.index)
    layer = -1
    source_layer = source_expert = expert = None
    layer_copy = expert_copy = 0
    if layout.decoder and layout.has_layer:
        layer = index[layout.layer_axis] if layout.layer_axis is not None else layout.layer_in_key
        source_layer, layer_copy = plan.layer_map[layer], plan.layer_copy[layer]
        if layout.layer_axis is not None:
            index[layout.layer_axis] = source_layer
    if layout.expert_axis is not None or layout.expert_in_key is not None:
        expert = index[layout.expert_axis] if layout.expert_axis is not None else layout.expert_in_key
        source_expert, expert_copy = plan.expert_source(expert)
        if layout.expert_axis is not None:
            index[layout.expert_axis] = source_expert
    if layer >= 0 and plan.upcycled(source_layer) and upcycling.role(layout.tail) is not None:
        return _upcycled_expectation(plan, piece, layout, layer, source_layer, layer_copy, expert,
                                     source_shapes, moment_policy)
    source_key, stored_index = indexing.as_stored(source_shapes, layout.with_indices(source_layer, source_expert),
                                                  tuple(index))
    index = list(stored_index)
    offset, shape = list(box.offset), list(box.shape)
    rows, targets, copy_rows = None, (), ()
    if layout.expert_rows and plan.source.is_moe:
        targets = tuple(range(box.offset[0], box.offset[0] + box.shape[0]))
        rows = tuple(plan.expert_source(r)[0] for r in targets)
        copy_rows = tuple(i for i, r in enumerate(targets) if plan.expert_source(r)[1] > 0)
        offset[0], shape[0] = 0, plan.source.num_experts
    init, moment = plan.init, layout.is_optimizer_moment
    router_weight = rows is not None and layout.model_key.endswith(".router.weight")
    reinit_unit = init.reinit_expert_copies and expert_copy > 0
    random_router = init.random_router and rows is not None
    zero_moments = moment and moment_policy == "zero"
    zero = ((plan.depth.zero_copy_outputs and layer_copy > 0 and layout.decoder and layout.is_output_projection)
            or (zero_moments and (layer_copy > 0 or expert_copy > 0))
            or (moment and (reinit_unit or random_router))  # a fresh unit has no moments
            or (random_router and not router_weight)  # its biases start at zero
            or (init.zero_expert_bias and layout.model_key.endswith(".router.expert_bias")))
    drawn = not zero and (reinit_unit or random_router)
    reinit_rows = copy_rows if init.reinit_expert_copies and not zero else ()
    zero_rows = reinit_rows or (copy_rows if zero_moments and not zero else ())
    drawn_rows = reinit_rows if router_weight and not moment else ()
    copied = layer_copy > 0 or expert_copy > 0 or bool(copy_rows)
    scale = init.weight_multiplier if copied and not moment and not drawn else 1.0
    scale_rows = copy_rows if rows is not None and layer_copy == 0 else None
    noisy = (plan.width.noise_alpha > 0 and not zero and not moment and not drawn and not reinit_rows
             and (expert_copy > 0 or bool(copy_rows)))
    sigma_key = source_key
    weight_key = source_key[len(layout.prefix):]
    if layout.is_master_param and source_shapes.get(weight_key) == source_shapes.get(source_key):
        sigma_key = weight_key  # master params get the weight's noise
    source = None if zero or drawn else Box(source_key, tuple(source_shapes[source_key]), tuple(index),
                                            tuple(offset), tuple(shape))
    second = None  # --grow-from-second: an expert copy, or the copies' router rows, from the second
    if init.from_second and source is not None and expert_copy > 0:
        source = source.in_second()
    elif init.from_second and source is not None and copy_rows and not zero_moments:
        second = source.in_second()
        rows = tuple(r + plan.source.num_experts if i in copy_rows else r for i, r in enumerate(rows))
    return Expectation(source, layer, expert, rows, targets, copy_rows, zero, zero_rows, noisy,
                       layout.canonical_name(), sigma_key, scale, box.unit_shape, box.offset, scale_rows,
                       init.weight_multiplier, drawn, drawn_rows, second)


def _upcycled_expectation(plan: GrowthPlan, piece: manifest.Piece, layout: indexing.KeyLayout, layer: int,
                          source_layer: int, layer_copy: int, expert: Optional[int], source_shapes,
                          moment_policy: str) -> Expectation:
    """A piece of an upcycled layer, restated: zero routers; experts a slice of the dense MLP
    (expert e: slice e mod G, copy e // G; GLU fc1 sliced in both halves), the output
    projections scaled by G (and by 1/2 for the routed and shared halves with a shared expert)."""
    box, up = piece.box, plan.upcycle
    role = upcycling.role(layout.tail)
    name = layout.canonical_name()
    if role.kind == "router":
        return Expectation(None, layer, None, None, (), (), True, (), False, name, "")

    def stored(tail):
        return indexing.as_stored(source_shapes, indexing.layer_key(layout.prefix, tail, source_layer), ())

    if role.kind == "norm":
        tail = upcycling.NORM[role.fc]
        key, index = stored(tail if stored(tail)[0] in source_shapes else upcycling.FUSED_NORM[role.fc])
        return Expectation(Box(key, tuple(source_shapes[key]), index, box.offset, box.shape), layer, None,
                           None, (), (), False, (), False, name, key)
    key, index = stored(upcycling.DENSE_FC[role.fc])
    hidden = source_shapes[stored(upcycling.DENSE_FC["fc2"])[0]][-1]
    routed = role.kind == "expert"
    piece_index, copy = (expert % up.granularity, expert // up.granularity) if routed else (0, 0)
    width = hidden // up.granularity if routed else hidden
    offset = list(box.offset)
    if role.fc == "fc2":
        offset[1] += piece_index * width
    elif routed:
        glu = source_shapes[key][len(index)] == 2 * hidden
        half = 1 if glu and box.offset[0] >= width else 0
        offset[0] = half * hidden + piece_index * width + box.offset[0] - half * width
    moment = layout.is_optimizer_moment
    zero = (plan.depth.zero_copy_outputs and layer_copy > 0 and role.fc == "fc2") or (
        moment and moment_policy == "zero" and (layer_copy > 0 or copy > 0))
    scale = 1.0 if role.fc == "fc1" or moment else (
        up.granularity * (0.5 if up.shared_expert else 1.0) if routed else 0.5)
    noisy = plan.width.noise_alpha > 0 and copy > 0 and not zero and not moment
    weight_key = key[len(layout.prefix):]
    sigma_key = weight_key if layout.is_master_param and weight_key in source_shapes else key
    return Expectation(Box(key, tuple(source_shapes[key]), index, tuple(offset), box.shape), layer, expert,
                       None, (), (), zero, (), noisy, name, sigma_key, scale, box.unit_shape, box.offset)


def unit_noise(seed: int, name: str, layer: int, expert: int, unit_shape, scale: float) -> torch.Tensor:
    """The noise of one whole copied unit, drawn block by block from the seed's definition
    (`ops.noise_seed`, `ops.NOISE_BLOCK`): scale·N(0, 1) in fp32, shaped like the unit."""
    numel = math.prod(unit_shape)
    out = torch.empty(numel, dtype=torch.float32)
    for block, lo in enumerate(range(0, numel, ops.NOISE_BLOCK)):
        gen = torch.Generator().manual_seed(ops.noise_seed(seed, name, layer, expert, block))
        n = min(ops.NOISE_BLOCK, numel - lo)
        out[lo:lo + n] = torch.randn(n, generator=gen, dtype=torch.float32).mul_(scale)
    return out.view(tuple(unit_shape))


@dataclass
class Report:
    pieces: int = 0
    tensors: int = 0
    noisy: int = 0
    ratios: list[float] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def summary(self, limit: int = 10) -> str:
        noise = ""
        if self.ratios:
            noise = (f"; {self.noisy} noisy copies equal their regenerated noise bit for bit, "
                     f"noise std / (alpha*sigma) in [{min(self.ratios):.3f}, {max(self.ratios):.3f}]")
        if self.ok:
            return (f"verify: OK: {self.pieces} pieces of {self.tensors} tensors and the common "
                    f"state match the plan{noise}")
        lines = [f"verify: FAILED: {len(self.mismatches)} mismatch(es) in {self.pieces} pieces"]
        lines += [f"  {m}" for m in self.mismatches[:limit]]
        if len(self.mismatches) > limit:
            lines.append(f"  ... and {len(self.mismatches) - limit} more")
        return "\n".join(lines)


def verify(source, grown, plan: Optional[GrowthPlan] = None, optimizer: Optional[str] = None,
           step: Optional[int] = None, batch_bytes: int = 1 << 30, second=None) -> Report:
    """`second`: the checkpoint of `--grow-from-second` (default: the one the record names)."""
    src = CheckpointInfo.read(source, step, "--source")
    dst = CheckpointInfo.read(grown, None, "--grown")
    provenance = dst.provenance
    if plan is None:
        if provenance is None:
            raise GrowthError(f"--grown {dst.path} has no growth record (common-state key "
                              "'megatron_recycle'); pass the --grow-* options it was grown with")
        plan = provenance.growth_plan()
    if plan.init.from_second and second is None:
        if provenance is None or provenance.second is None:
            raise GrowthError(f"--grown {dst.path}: its plan reads expert copies from a second "
                              f"checkpoint, but its record names none; pass {merge.FLAG} CKPT")
        second = provenance.second.path
    second_info = merge.read_second(src, second) if plan.init.from_second else None
    optimizer = optimizer or (provenance.optimizer_policy if provenance else "copy")
    keep_optimizer = policy.grows_optimizer(optimizer) and manifest.keeps_optimizer(src, dst.format)
    if plan.source != src.architecture():
        raise GrowthError(f"--source {src.path} is not the plan's source: its architecture is "
                          f"{src.architecture()}, the plan grows {plan.source}")

    report = Report()
    _check_common(src, dst, plan, report)
    recorded = None if provenance is None else provenance.second
    if second_info is not None and recorded is not None and recorded != merge.reference(second_info):
        report.mismatches.append(f"common state: the growth record names the second checkpoint "
                                 f"{recorded}, {merge.FLAG} is {merge.reference(second_info)}")
    want = manifest.target_tensors(src, plan, keep_optimizer)
    have = {k: (s, dst.dtypes[k]) for k, s in dst.shapes.items()}
    for key in sorted(want.keys() - have.keys()):
        report.mismatches.append(f"{key}: missing from the grown checkpoint")
    for key in sorted(have.keys() - want.keys()):
        report.mismatches.append(f"{key}: in the grown checkpoint but not in the plan")
    for key in sorted(want.keys() & have.keys()):
        if want[key] != have[key]:
            report.mismatches.append(f"{key}: shape/dtype {have[key]}, the plan makes {want[key]}")
    report.tensors = len(want.keys() & have.keys())
    wanted_objects = {o.storage_key for o in manifest.target_objects(src, plan, keep_optimizer)}
    for key in sorted(wanted_objects - set(dst.objects)):
        report.mismatches.append(f"object {key}: missing from the grown checkpoint")
    pieces = [p for p in manifest.target_pieces(src, plan, max(batch_bytes // 4, 1), keep_optimizer)
              if p.box.key in have and want[p.box.key] == have[p.box.key]]
    for batch in manifest.batches(pieces, [], batch_bytes):
        _check_batch(src, dst, plan, batch.pieces, optimizer, report, second_info)
    return report


def _check_common(src: CheckpointInfo, dst: CheckpointInfo, plan: GrowthPlan, report: Report) -> None:
    """The grown common state against the plan and the grown tensors."""
    shapes = dst.model_shapes()
    layers, experts = indexing.decoder_layer_count(shapes), indexing.expert_count(shapes)
    target = plan.target
    if (layers, experts) != (target.num_layers, target.num_experts):
        report.mismatches.append(f"tensors hold {layers} layers x {experts} experts, the plan makes "
                                 f"{target.num_layers} x {target.num_experts}")
    args = dst.args
    report.mismatches += [f"common state: {p}" for p in consistency.problems(shapes, args)]
    if args is not None:
        for name, value in (("num_layers", target.num_layers), ("num_experts", target.num_experts),
                            ("moe_router_topk", target.topk)):
            if src.args is not None and getattr(src.args, name, None) is None:
                continue  # the source did not record it either
            if getattr(args, name, None) != value:
                report.mismatches.append(f"common state: args.{name} is {getattr(args, name, None)}, "
                                         f"the grown model has {value}")
        pattern = getattr(args, "hybrid_layer_pattern", None) or getattr(args, "hybrid_override_pattern", None)
        if target.is_hybrid and pattern and "".join(hybrid.split(pattern)) != target.hybrid_pattern:
            report.mismatches.append(f"common state: args.hybrid_layer_pattern is {pattern!r}, the "
                                     f"grown model has {target.hybrid_pattern!r}")
        freq = None if target.is_hybrid else target.moe_layer_freq()
        if freq is not None and list(getattr(args, "moe_layer_freq", None) or []) != freq:
            report.mismatches.append(f"common state: args.moe_layer_freq is "
                                     f"{getattr(args, 'moe_layer_freq', None)}, the grown model has {freq}")
    if dst.iteration != src.iteration:
        report.mismatches.append(f"common state: iteration {dst.iteration}, the source's is {src.iteration}")
    if dst.path.name != "release" and (not isinstance(dst.iteration, int)
                                       or dst.path.name != iteration_dir(dst.path.parent, dst.iteration).name):
        report.mismatches.append(f"{dst.path.name}: the iteration directory's name disagrees with "
                                 f"the common state's iteration {dst.iteration}")
    framework_files = companions.of(src)  # e.g. Megatron-Bridge's run_config.yaml, train state
    if framework_files is not None:
        report.mismatches += framework_files.mismatches(dst, plan, src.dense_hidden())
    report.mismatches += IterationFiles.of(src.path).mismatches(dst.path)  # tokenizer, integrity.json
    record = dst.provenance
    if record is not None:
        report.mismatches += [f"common state: the growth record disagrees with itself: {p}"
                              for p in record.disagreements()]
        if record.growth_plan() != plan:
            report.mismatches.append("common state: the growth record's plan differs from the plan checked")
        if record.source.iteration != src.iteration:
            report.mismatches.append(f"common state: the growth record names source iteration "
                                     f"{record.source.iteration}, --source is at {src.iteration}")


def _check_batch(src: CheckpointInfo, dst: CheckpointInfo, plan: GrowthPlan, pieces, moment_policy,
                 report: Report, second: Optional[CheckpointInfo] = None) -> None:
    from .io.reader import box_request

    if not pieces:
        return
    expectations = [expectation(plan, p, src.shapes, moment_policy) for p in pieces]
    grown = dst.read_boxes({i: box_request(p.box, p.dtype) for i, p in enumerate(pieces)})
    boxes = {e.source for e in expectations if e.source is not None}
    boxes |= {e.second for e in expectations if e.second is not None}
    boxes |= {_sigma_unit(src, e) for e in expectations if e.noisy}
    merge.check_reads(boxes, second)
    source = src.read_boxes({b: box_request(b, src.dtypes[b.key]) for b in boxes if not b.second})
    if second is not None:
        source.update(second.read_boxes({b: box_request(b, second.dtypes[b.key]) for b in boxes if b.second}))
    for i, (piece, exp) in enumerate(zip(pieces, expectations)):
        report.pieces += 1
        problem = _check_piece(grown[i], source, exp, plan, src, report)
        if problem:
            report.mismatches.append(f"{piece.box.key} at {piece.box.global_offset}{_where(exp)}: {problem}")


def _check_piece(got: torch.Tensor, source: dict, exp: Expectation, plan: GrowthPlan,
                 src: CheckpointInfo, report: Report) -> Optional[str]:
    if got.is_floating_point() and not bool(torch.isfinite(got).all()):
        return f"NaN or Inf at element {_first(~torch.isfinite(got))}"
    if exp.zero:
        return None if not got.any() else f"should be zero (zero-init copy / moments / router), element {_first(got != 0)} is not"
    if exp.drawn:
        return _compare(got, _drawn(exp, plan, torch.zeros(got.shape), range(got.shape[0]) if exp.rows else ())
                        .to(got.dtype), f"its fresh N(0, {plan.init.init_std:g}^2) draw")
    base = source[exp.source]
    if exp.rows is not None:
        if exp.second is not None:
            base = torch.cat([base, source[exp.second]])
        base = base[list(exp.rows)]  # a fresh tensor: safe to write below
        base[list(exp.zero_rows)] = 0
    if not exp.noisy and exp.scale == 1.0 and not exp.drawn_rows:
        return _compare(got, base, f"{exp.source.key} at {exp.source.global_offset}")
    # As growth computes it: in fp32, scaled, then the noise added, then rounded once.
    expected = base.to(torch.float32, copy=True)  # never the source buffer itself
    if exp.scale != 1.0 and exp.scale_rows is None:
        expected.mul_(exp.scale)
    elif exp.scale != 1.0:
        expected[list(exp.scale_rows)] = expected[list(exp.scale_rows)] * exp.scale
    if exp.drawn_rows:
        return _compare(got, _drawn(exp, plan, expected, exp.drawn_rows).to(got.dtype),
                        "its source rows with the copies' rows drawn afresh")
    scaled = expected.to(base.dtype, copy=True)
    if not exp.noisy:
        return _compare(got, scaled, f"{exp.source.key} at {exp.source.global_offset} x {exp.scale:g}")
    scale = plan.width.noise_alpha * _sigma(source[_sigma_unit(src, exp)]) * exp.noise_factor
    for row in ([slice(None)] if exp.rows is None else list(exp.copy_rows)):
        if exp.rows is None:
            noise = unit_noise(plan.width.seed, exp.noise_name, exp.layer, exp.expert, exp.noise_unit,
                               scale)[ops.box(exp.noise_offset, tuple(expected.shape))]
        else:
            noise = unit_noise(plan.width.seed, exp.noise_name, exp.layer, exp.row_experts[row],
                               tuple(expected[row].shape), scale)
        expected[row] += noise
    problem = _compare(got, expected.to(got.dtype), "its regenerated noisy copy")
    if problem:
        return problem
    return _check_noise_statistics(got, scaled, exp, scale, report)


def _drawn(exp: Expectation, plan: GrowthPlan, out: torch.Tensor, rows) -> torch.Tensor:
    """`out` (fp32) plus the baselines' fresh draws, N(0, init_std²) from their own stream
    (INIT_STREAM before the tensor's name): on `rows` (router rows), or the whole unit's box."""
    name, std = INIT_STREAM + exp.noise_name, plan.init.init_std
    if not rows:
        out += unit_noise(plan.width.seed, name, exp.layer, exp.expert, exp.noise_unit,
                          std)[ops.box(exp.noise_offset, tuple(out.shape))]
    for row in rows:
        out[row] += unit_noise(plan.width.seed, name, exp.layer, exp.row_experts[row], tuple(out[row].shape), std)
    return out


def _compare(got: torch.Tensor, want: torch.Tensor, what: str) -> Optional[str]:
    if torch.equal(got, want):
        return None
    differs = got != want
    at = _first(differs)
    diff = (got.double() - want.double()).abs().max().item()
    return (f"differs from {what}: {int(differs.sum())} element(s), first at {at} "
            f"({got[at].item():.6g} vs {want[at].item():.6g}), max |diff| {diff:.3g}")


def _check_noise_statistics(got, want, exp: Expectation, scale: float, report: Report) -> Optional[str]:
    """Noise = got - want should be N(0, scale²) plus the storage dtype's rounding."""
    rows = [slice(None)] if exp.rows is None else list(exp.copy_rows)
    noise = torch.cat([(got[r].double() - want[r].double()).reshape(-1) for r in rows])
    n = noise.numel()
    expected = math.sqrt(scale**2 + _rounding_variance(want))
    std, mean = noise.std().item(), noise.mean().item()
    report.noisy += 1
    if expected == 0:  # a constant source unit (e.g. a zero expert bias) gets no noise
        return None if not noise.any() else f"noise {std:.3g} on a constant source unit (sigma 0)"
    ratio = std / expected
    report.ratios.append(ratio)
    tolerance = 6 / math.sqrt(2 * n) + 0.02  # 6 standard errors of a sample std, plus slack
    if abs(ratio - 1) > tolerance:
        return f"noise std is {ratio:.3f} x alpha*sigma (expected 1 +- {tolerance:.3f})"
    if abs(mean) > 6 * expected / math.sqrt(n):
        return f"noise mean {mean:.3g} is not ~0 (std {std:.3g}, {n} values)"
    return None


def _rounding_variance(values: torch.Tensor) -> float:
    """Variance of rounding x + noise back to the storage dtype: ulp(x)² / 12 on average."""
    if values.dtype in (torch.float32, torch.float64):
        return 0.0
    exponent = torch.floor(torch.log2(values.double().abs().clamp_min(torch.finfo(values.dtype).tiny)))
    ulp = torch.finfo(values.dtype).eps * torch.pow(2.0, exponent)
    return (ulp.pow(2) / 12).mean().item()


def _sigma(unit: torch.Tensor) -> float:
    """The std of a whole source unit as growth defines σ: float64, rounded to float32."""
    return float(torch.tensor(unit.double().std().item(), dtype=torch.float32))


def _sigma_unit(src: CheckpointInfo, exp: Expectation) -> Box:
    """The whole source unit (one layer/expert slab) whose σ scales `exp`'s noise: the second
    checkpoint's where the copies come from it."""
    read_from = exp.second or exp.source
    return Box.whole_unit(exp.sigma_key, src.shapes[exp.sigma_key], read_from.index, read_from.second)


def _first(mask: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in torch.nonzero(mask)[0])


def _where(exp: Expectation) -> str:
    parts = [f"layer {exp.layer}"] if exp.layer >= 0 else []
    if exp.expert is not None:
        parts.append(f"expert {exp.expert}")
    return f" ({', '.join(parts)})" if parts else ""
