"""Plan → mapping: for one target shard, which source region fills it and what is done to it.

A target shard is described by Megatron-Core's own ShardedTensor/ShardedObject metadata (key,
global shape, global offset, prepended axes): that metadata is the single source of truth for
the target layout, so any TP/EP/PP/VPP layout maps the same way. The result is plain data
(`Fill`), consumed by the tensor operators in `ops.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from . import keys
from .plan import GrowthError, GrowthPlan


@dataclass(frozen=True)
class Unit:
    """One source layer/expert slab of a checkpoint tensor (its prepended indices)."""

    key: str
    index: tuple[int, ...]  # source prepended-axis indices
    global_shape: tuple[int, ...]  # the source tensor's global shape

    @property
    def shape(self) -> tuple[int, ...]:
        return self.global_shape[len(self.index):]

    def whole(self) -> "Region":
        return Region(self, (0,) * len(self.shape), self.shape)


@dataclass(frozen=True)
class Region:
    """A box inside a unit: what one read request returns."""

    unit: Unit
    offset: tuple[int, ...]
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Noise:
    """Noise on one target shard: per target expert (or router row), seeded layout-free."""

    name: str  # canonical tensor name (no layer/expert indices, no optimizer prefix)
    layer: int  # target layer (decoder) or -1
    experts: tuple[tuple[int, int], ...]  # (target expert, local row or -1 for whole shard)
    unit_shape: tuple[int, ...]  # full shape one seed covers (an expert matrix or a router row)
    offset: tuple[int, ...]  # the shard's offset inside that shape
    sigma_unit: Unit  # whose std scales the noise


@dataclass(frozen=True)
class Fill:
    """How to build one target shard from the source."""

    region: Region
    rows: Optional[tuple[int, ...]] = None  # router: source row for each local target row
    zero: bool = False  # zeroed output projection / moments of a copy
    zero_rows: tuple[int, ...] = ()  # router moments: the local rows that are copies
    noise: Optional[Noise] = None


def _source_key_shape(info_shapes, key: str) -> tuple[int, ...]:
    try:
        return info_shapes[key]
    except KeyError:
        raise GrowthError(
            f"key {key!r} is not in the source checkpoint; the target model has a tensor the "
            "source does not (different architecture flags?), or the key layout is unknown"
        ) from None


def map_shard(
    plan: GrowthPlan,
    source_shapes: dict[str, tuple[int, ...]],
    key: str,
    global_shape: tuple[int, ...],
    global_offset: tuple[int, ...],
    local_shape: tuple[int, ...],
    prepend_axis_num: int,
    moment_policy: str = "copy",
) -> Fill:
    """Map one target shard (ShardedTensor metadata) to its source region and transforms."""
    lay = keys.parse_key(key, prepend_axis_num)
    p = prepend_axis_num
    src_offset = list(global_offset)
    layer_t, layer_copy = -1, 0
    layer_s = None
    if lay.decoder and lay.has_layer:
        if lay.layer_axis is not None:
            _expect(key, "layers", global_shape[lay.layer_axis], plan.target_num_layers)
            layer_t = global_offset[lay.layer_axis]
        else:
            layer_t = lay.layer_in_key
            if layer_t >= plan.target_num_layers:
                _expect(key, "layers", layer_t + 1, plan.target_num_layers)
        layer_s, layer_copy = plan.layer_source(layer_t)
        if lay.layer_axis is not None:
            src_offset[lay.layer_axis] = layer_s

    expert_t = expert_s = None
    expert_copy = 0
    if lay.expert_axis is not None or lay.expert_in_key is not None:
        if lay.expert_axis is not None:
            _expect(key, "experts", global_shape[lay.expert_axis], plan.target_num_experts)
            expert_t = global_offset[lay.expert_axis]
        else:
            expert_t = lay.expert_in_key
        expert_s, expert_copy = plan.expert_source(expert_t)
        if lay.expert_axis is not None:
            src_offset[lay.expert_axis] = expert_s

    src_key = lay.with_indices(layer_s, expert_s)
    src_shape = _source_key_shape(source_shapes, src_key)
    unit = Unit(src_key, tuple(src_offset[:p]), src_shape)
    offset, shape = tuple(global_offset[p:]), tuple(local_shape)

    rows = None
    if lay.expert_rows and plan.source.is_moe:
        _expect(key, "experts (router rows)", global_shape[p], plan.target_num_experts)
        target_rows = range(global_offset[p], global_offset[p] + local_shape[0])
        rows = tuple(plan.expert_source(r)[0] for r in target_rows)
        offset = (0,) + offset[1:]
        shape = (src_shape[p],) + shape[1:]

    expected = _expected_source_shape(plan, lay, global_shape, p if rows is not None else None)
    if tuple(src_shape) != expected:
        raise GrowthError(
            f"key {key!r}: the target's global shape {tuple(global_shape)} maps to {expected} in "
            f"the source, but the source checkpoint has {tuple(src_shape)}; the target model's "
            "hidden sizes, heads or TP-independent shapes must match the source"
        )
    region = Region(unit, offset, shape)

    copy_rows = () if rows is None else tuple(
        i for i, r in enumerate(target_rows) if plan.expert_source(r)[1] > 0)
    zero_moments = lay.is_optimizer_moment and moment_policy == "zero"
    zero = (
        (plan.depth.zero_copy_outputs and layer_copy > 0 and lay.decoder and lay.is_output_projection)
        or (zero_moments and (layer_copy > 0 or expert_copy > 0))
    )
    zero_rows = copy_rows if zero_moments and not zero else ()
    noise = None
    wants_noise = plan.width.noise_alpha > 0 and not zero and not lay.is_optimizer_moment
    if wants_noise and copy_rows:
        copies = tuple((target_rows[i], i) for i in copy_rows)
        noise = Noise(lay.canonical_name(), layer_t, copies, tuple(global_shape[p + 1:]),
                      tuple(global_offset[p + 1:]), _sigma_unit(lay, unit, source_shapes))
    elif wants_noise and expert_copy > 0:
        noise = Noise(lay.canonical_name(), layer_t, ((expert_t, -1),), tuple(global_shape[p:]),
                      tuple(global_offset[p:]), _sigma_unit(lay, unit, source_shapes))
    return Fill(region=region, rows=rows, zero=zero, zero_rows=zero_rows, noise=noise)


def map_object(plan: GrowthPlan, key: str, global_shape, global_offset) -> tuple[str, tuple, tuple]:
    """Map a ShardedObject (e.g. `_extra_state`): its offsets are the prepended axes only."""
    lay = keys.parse_key(key, len(global_shape))
    shape, offset = list(global_shape), list(global_offset)
    layer_s = expert_s = None
    if lay.decoder and lay.has_layer:
        layer_t = offset[lay.layer_axis] if lay.layer_axis is not None else lay.layer_in_key
        layer_s = plan.layer_source(layer_t)[0]
        if lay.layer_axis is not None:
            shape[lay.layer_axis], offset[lay.layer_axis] = plan.source.num_layers, layer_s
    if lay.expert_axis is not None or lay.expert_in_key is not None:
        expert_t = offset[lay.expert_axis] if lay.expert_axis is not None else lay.expert_in_key
        expert_s = plan.expert_source(expert_t)[0]
        if lay.expert_axis is not None:
            shape[lay.expert_axis], offset[lay.expert_axis] = plan.source.num_experts, expert_s
    return lay.with_indices(layer_s, expert_s), tuple(shape), tuple(offset)


def _expected_source_shape(plan, lay, global_shape, row_dim) -> tuple[int, ...]:
    shape = list(global_shape)
    if lay.layer_axis is not None and lay.decoder:
        shape[lay.layer_axis] = plan.source.num_layers
    if lay.expert_axis is not None:
        shape[lay.expert_axis] = plan.source.num_experts
    if row_dim is not None:
        shape[row_dim] = plan.source.num_experts
    return tuple(shape)


def _sigma_unit(lay: keys.KeyLayout, unit: Unit, source_shapes) -> Unit:
    """Noise on an fp32 master param uses the weight's σ, so both get the same noise."""
    if lay.is_master_param:
        weight_key = unit.key[len(lay.prefix):]
        if source_shapes.get(weight_key) == unit.global_shape:
            return Unit(weight_key, unit.index, unit.global_shape)
    return unit


def _expect(key: str, what: str, got: Optional[int], want: Optional[int]) -> None:
    if got != want:
        flag = "--num-layers" if what == "layers" else "--num-experts"
        raise GrowthError(
            f"key {key!r}: the target model has {got} {what} but the growth plan makes {want}; "
            f"set {flag} {want} (or change the growth factors)"
        )
