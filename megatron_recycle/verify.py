"""Prove a grown checkpoint is what its plan says, independently of how it was grown.

The expectation is restated here from the plan alone (layer map, expert map, zero-init and
optimizer policies): for every grown tensor piece, the source slice it must equal, and where
copies get noise, the noise must have std α·σ(source unit) within statistical bounds and
zero mean. Nothing here uses the growth operators (`ops.py`) or the load hook; checkpoints
are read piece by piece, so memory stays bounded like `grow`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from . import keys, offline
from .checkpoint import CheckpointInfo
from .plan import GrowthError, GrowthPlan


@dataclass
class Expectation:
    """Where a grown piece comes from and what was done to it."""

    source_key: str
    source_offset: tuple[int, ...]
    source_shape: tuple[int, ...]  # prepended axes included
    rows: Optional[list[int]]  # router: source row per target row
    copy_rows: list[int]  # router: local rows that are copies
    zero: bool
    zero_rows: list[int]  # router moments under the `zero` policy: the copied rows
    noisy: bool  # a copy of an expert (or router rows) that gets noise
    sigma_key: str  # whose σ scales the noise


def expectation(plan: GrowthPlan, piece: offline.TensorPiece, source_shapes, moment_policy: str) -> Expectation:
    p = piece.prepend
    lay = keys.parse_key(piece.key, p)
    offset = list(piece.offset)
    layer = expert = None
    layer_copy = expert_copy = 0
    if lay.decoder and lay.has_layer:
        t = offset[lay.layer_axis] if lay.layer_axis is not None else lay.layer_in_key
        layer, layer_copy = plan.layer_source(t)
        if lay.layer_axis is not None:
            offset[lay.layer_axis] = layer
    if lay.expert_axis is not None or lay.expert_in_key is not None:
        e = offset[lay.expert_axis] if lay.expert_axis is not None else lay.expert_in_key
        expert, expert_copy = plan.expert_source(e)
        if lay.expert_axis is not None:
            offset[lay.expert_axis] = expert
    shape = [1] * p + list(piece.shape)
    rows, copy_rows = None, []
    if lay.expert_rows and plan.source.is_moe:
        targets = range(piece.offset[p], piece.offset[p] + piece.shape[0])
        rows = [plan.expert_source(r)[0] for r in targets]
        copy_rows = [i for i, r in enumerate(targets) if plan.expert_source(r)[1] > 0]
        offset[p], shape[p] = 0, plan.source.num_experts
    source_key = lay.with_indices(layer, expert)
    zero_moments = lay.is_optimizer_moment and moment_policy == "zero"
    zero = (plan.depth.zero_copy_outputs and layer_copy > 0 and lay.decoder and lay.is_output_projection) or (
        zero_moments and (layer_copy > 0 or expert_copy > 0))
    zero_rows = copy_rows if zero_moments and not zero else []
    noisy = (plan.width.noise_alpha > 0 and not zero and not lay.is_optimizer_moment
             and (expert_copy > 0 or bool(copy_rows)))
    sigma_key = source_key
    if lay.is_master_param and source_shapes.get(source_key[len(lay.prefix):]) == source_shapes.get(source_key):
        sigma_key = source_key[len(lay.prefix):]  # master params get the weight's noise
    return Expectation(source_key, tuple(offset), tuple(shape), rows, copy_rows, zero, zero_rows,
                       noisy, sigma_key)


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
            noise = (f"; {self.noisy} noisy copies, noise std / (alpha*sigma) in "
                     f"[{min(self.ratios):.3f}, {max(self.ratios):.3f}]")
        if self.ok:
            return f"verify: OK: {self.pieces} pieces of {self.tensors} tensors match the plan{noise}"
        lines = [f"verify: FAILED: {len(self.mismatches)} mismatch(es) in {self.pieces} pieces{noise}"]
        lines += [f"  {m}" for m in self.mismatches[:limit]]
        if len(self.mismatches) > limit:
            lines.append(f"  ... and {len(self.mismatches) - limit} more")
        return "\n".join(lines)


def verify(source, grown, plan: Optional[GrowthPlan] = None, optimizer: Optional[str] = None,
           step: Optional[int] = None, batch_bytes: int = 1 << 30) -> Report:
    src = CheckpointInfo.read(source, step, "--source")
    dst = CheckpointInfo.read(grown, None, "--grown")
    provenance = dst.provenance or {}
    if plan is None:
        if "plan" not in provenance:
            raise GrowthError(f"--grown {dst.path} has no growth provenance (common.pt key "
                              "'megatron_recycle'); pass the --grow-* options it was grown with")
        plan = GrowthPlan.from_description(provenance["plan"])
    optimizer = optimizer or provenance.get("optimizer_policy", "copy")
    keep_optimizer = optimizer != "reset" and offline.keeps_optimizer(src)
    if plan.source != src.architecture():
        raise GrowthError(f"--source {src.path} is not the plan's source: its architecture is "
                          f"{src.architecture()}, the plan grows {plan.source}")

    report = Report()
    want = offline.target_tensors(src, plan, keep_optimizer)
    have = {k: (s, dst.dtypes[k]) for k, s in dst.shapes.items()}
    for key in sorted(want.keys() - have.keys()):
        report.mismatches.append(f"{key}: missing from the grown checkpoint")
    for key in sorted(have.keys() - want.keys()):
        report.mismatches.append(f"{key}: in the grown checkpoint but not in the plan")
    for key in sorted(want.keys() & have.keys()):
        if want[key] != have[key]:
            report.mismatches.append(f"{key}: shape/dtype {have[key]}, the plan makes {want[key]}")
    report.tensors = len(want.keys() & have.keys())
    pieces = [p for p in offline.target_units(src, plan, max(batch_bytes // 4, 1), keep_optimizer)
              if p.key in have and want[p.key] == have[p.key]]
    for batch in offline.batches(pieces, [], batch_bytes):
        _check_batch(src, dst, plan, batch.tensors, optimizer, report)
    return report


def _check_batch(src: CheckpointInfo, dst: CheckpointInfo, plan, pieces, moment_policy, report: Report):
    from .reading import box_request, read_boxes

    expectations = [expectation(plan, p, src.shapes, moment_policy) for p in pieces]
    grown = read_boxes(dst.path, {i: box_request(p.key, p.global_shape, p.offset, p.shape, p.prepend, p.dtype)
                                  for i, p in enumerate(pieces)})
    regions = {(e.source_key, e.source_offset, e.source_shape) for e in expectations}
    regions |= {_whole(src, e.sigma_key, e) for e in expectations if e.noisy}
    source = read_boxes(src.path, {r: box_request(r[0], src.shapes[r[0]], r[1], r[2], 0, src.dtypes[r[0]])
                                   for r in regions})
    for i, (piece, exp) in enumerate(zip(pieces, expectations)):
        report.pieces += 1
        got = grown[i]
        where = f"{piece.key} at {piece.offset}"
        if got.is_floating_point() and not bool(torch.isfinite(got).all()):
            report.mismatches.append(f"{where}: NaN or Inf")
            continue
        want = source[(exp.source_key, exp.source_offset, exp.source_shape)].reshape(
            exp.source_shape[piece.prepend:])
        if exp.rows is not None:
            want = want[exp.rows]  # a fresh tensor: safe to write below
            want[exp.zero_rows] = 0
        if exp.zero:
            if bool(got.any()):
                report.mismatches.append(f"{where}: should be zero (zero-init copy / moments)")
            continue
        copies = _copy_mask(got, exp)
        if not torch.equal(got[~copies], want[~copies]):
            diff = (got[~copies].double() - want[~copies].double()).abs().max().item()
            report.mismatches.append(f"{where}: differs from {exp.source_key} at {exp.source_offset} "
                                     f"(max |diff| {diff:.3g})")
            continue
        if exp.noisy:
            sigma = source[_whole(src, exp.sigma_key, exp)].double().std().item()
            problem = _check_noise(got[copies], want[copies], plan.width.noise_alpha * sigma, report)
            if problem:
                report.mismatches.append(f"{where}: {problem}")


def _check_noise(got: torch.Tensor, want: torch.Tensor, scale: float, report: Report) -> Optional[str]:
    """Noise = got - want should be N(0, scale²) plus the storage dtype's rounding."""
    noise = got.double() - want.double()
    n = noise.numel()
    rounding = _rounding_variance(want)
    expected = math.sqrt(scale**2 + rounding)
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


def _copy_mask(got: torch.Tensor, exp: Expectation) -> torch.Tensor:
    mask = torch.zeros_like(got, dtype=torch.bool)
    if exp.noisy and exp.rows is None:
        mask[...] = True
    elif exp.noisy:
        mask[exp.copy_rows] = True
    return mask


def _whole(src: CheckpointInfo, key: str, exp: Expectation) -> tuple:
    """The whole source unit (one layer/expert slab) holding `exp`'s region, for σ."""
    global_shape = src.shapes[key]
    p = offline.stacked_axes(key)
    return key, tuple(exp.source_offset[:p]) + (0,) * (len(global_shape) - p), (1,) * p + tuple(global_shape[p:])
