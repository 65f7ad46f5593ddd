"""Plan → mapping: for one target shard, which source box fills it and what is done to it.

A target shard is described by Megatron-Core's own ShardedTensor/ShardedObject metadata (key,
global shape, global offset, prepended axes): that metadata is the single source of truth for
the target layout, so any TP/EP/PP/VPP layout maps the same way. The result is plain data
(`Fill`), consumed by the tensor operators in `ops.py`. Pure Python, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from . import indexing
from .plan import GrowthError, GrowthPlan


@dataclass(frozen=True)
class Box:
    """A box of one checkpoint tensor: `shape` at `offset` inside the slab (the *unit*) at
    prepended index `index` — one layer/expert of a stacked tensor, or the whole tensor."""

    key: str
    global_shape: tuple[int, ...]
    index: tuple[int, ...] = ()  # prepended-axis indices (layer, expert)
    offset: tuple[int, ...] = ()  # inside the unit
    shape: tuple[int, ...] = ()  # inside the unit

    @property
    def unit_shape(self) -> tuple[int, ...]:
        return self.global_shape[len(self.index):]

    @property
    def global_offset(self) -> tuple[int, ...]:
        return self.index + self.offset

    def unit(self) -> "Box":
        """The whole unit this box lies in."""
        return Box(self.key, self.global_shape, self.index, (0,) * len(self.unit_shape), self.unit_shape)

    @classmethod
    def whole_unit(cls, key: str, global_shape, index) -> "Box":
        global_shape, index = tuple(global_shape), tuple(index)
        unit_shape = global_shape[len(index):]
        return cls(key, global_shape, index, (0,) * len(unit_shape), unit_shape)


@dataclass(frozen=True)
class Noise:
    """Noise on one target shard: per target expert (or router row), seeded layout-free."""

    name: str  # canonical tensor name (no layer/expert indices, no optimizer prefix)
    layer: int  # target layer (decoder) or -1
    experts: tuple[tuple[int, int], ...]  # (target expert, local row or -1 for whole shard)
    unit_shape: tuple[int, ...]  # full shape one seed covers (an expert matrix or a router row)
    offset: tuple[int, ...]  # the shard's offset inside that shape
    sigma_unit: Box  # the source unit whose std scales the noise


@dataclass(frozen=True)
class Fill:
    """How to build one target shard from the source."""

    source: Box
    rows: Optional[tuple[int, ...]] = None  # router: source row for each local target row
    zero: bool = False  # zeroed output projection / moments of a copy
    zero_rows: tuple[int, ...] = ()  # router moments: the local rows that are copies
    noise: Optional[Noise] = None


def map_shard(
    plan: GrowthPlan,
    source_shapes: dict[str, tuple[int, ...]],
    key: str,
    global_shape: tuple[int, ...],
    global_offset: tuple[int, ...],
    local_shape: tuple[int, ...],
    prepend_axis_num: int,
    optimizer_policy: str = "copy",
) -> Fill:
    """Map one target shard (ShardedTensor metadata) to its source box and transforms."""
    layout = indexing.parse_key(key, prepend_axis_num)
    prepend = prepend_axis_num
    _check_target_axes(plan, layout, key, global_shape)
    came_from = indexing.origin(plan, layout, tuple(global_offset[:prepend]))
    source_shape = _source_shape(source_shapes, came_from.key)
    offset, shape = tuple(global_offset[prepend:]), tuple(local_shape)

    rows = target_rows = None
    if layout.expert_rows and plan.source.is_moe:
        _expect(key, "experts (router rows)", global_shape[prepend], plan.target_num_experts)
        target_rows = range(global_offset[prepend], global_offset[prepend] + local_shape[0])
        rows = tuple(plan.expert_source(r)[0] for r in target_rows)
        offset = (0,) + offset[1:]
        shape = (source_shape[prepend],) + shape[1:]

    expected = indexing.resized(plan, layout, tuple(global_shape),
                                prepend if rows is not None else None, to_target=False)
    if tuple(source_shape) != expected:
        raise GrowthError(
            f"key {key!r}: the target's global shape {tuple(global_shape)} maps to {expected} in "
            f"the source, but the source checkpoint has {tuple(source_shape)}; the target model's "
            "hidden sizes, heads or TP-independent shapes must match the source"
        )
    source = Box(came_from.key, tuple(source_shape), came_from.index, offset, shape)

    copy_rows = () if rows is None else tuple(
        i for i, r in enumerate(target_rows) if plan.expert_source(r)[1] > 0)
    zero_moments = layout.is_optimizer_moment and optimizer_policy == "zero"
    is_copy = came_from.layer_copy > 0 or came_from.expert_copy > 0
    zero = (
        (plan.depth.zero_copy_outputs and came_from.layer_copy > 0 and layout.decoder
         and layout.is_output_projection)
        or (zero_moments and is_copy)
    )
    zero_rows = copy_rows if zero_moments and not zero else ()
    noise = None
    wants_noise = plan.width.noise_alpha > 0 and not zero and not layout.is_optimizer_moment
    if wants_noise and copy_rows:
        copies = tuple((target_rows[i], i) for i in copy_rows)
        noise = Noise(layout.canonical_name(), came_from.layer, copies,
                      tuple(global_shape[prepend + 1:]), tuple(global_offset[prepend + 1:]),
                      _sigma_unit(layout, source, source_shapes))
    elif wants_noise and came_from.expert_copy > 0:
        noise = Noise(layout.canonical_name(), came_from.layer, ((came_from.expert, -1),),
                      tuple(global_shape[prepend:]), tuple(global_offset[prepend:]),
                      _sigma_unit(layout, source, source_shapes))
    return Fill(source=source, rows=rows, zero=zero, zero_rows=zero_rows, noise=noise)


def map_object(plan: GrowthPlan, key: str, global_shape, global_offset) -> tuple[str, tuple, tuple]:
    """Map a ShardedObject (e.g. `_extra_state`): its offsets are the prepended axes only.
    Returns the source object's (key, global shape, global offset)."""
    layout = indexing.parse_key(key, len(global_shape))
    came_from = indexing.origin(plan, layout, tuple(global_offset))
    shape = indexing.resized(plan, layout, tuple(global_shape), None, to_target=False)
    return came_from.key, shape, came_from.index


def _check_target_axes(plan: GrowthPlan, layout: indexing.KeyLayout, key: str, global_shape) -> None:
    """The target model's layer and expert counts must be the plan's."""
    if layout.decoder and layout.layer_axis is not None:
        _expect(key, "layers", global_shape[layout.layer_axis], plan.target_num_layers)
    elif layout.decoder and layout.layer_in_key is not None and layout.layer_in_key >= plan.target_num_layers:
        _expect(key, "layers", layout.layer_in_key + 1, plan.target_num_layers)
    if layout.expert_axis is not None:
        _expect(key, "experts", global_shape[layout.expert_axis], plan.target_num_experts)


def _source_shape(source_shapes, key: str) -> tuple[int, ...]:
    try:
        return source_shapes[key]
    except KeyError:
        raise GrowthError(
            f"key {key!r} is not in the source checkpoint; the target model has a tensor the "
            "source does not (different architecture flags?), or the key layout is unknown"
        ) from None


def _sigma_unit(layout: indexing.KeyLayout, source: Box, source_shapes) -> Box:
    """Noise on an fp32 master param uses the weight's σ, so both get the same noise."""
    unit = source.unit()
    if layout.is_master_param:
        weight_key = unit.key[len(layout.prefix):]
        if source_shapes.get(weight_key) == unit.global_shape:
            return Box(weight_key, unit.global_shape, unit.index, unit.offset, unit.shape)
    return unit


def _expect(key: str, what: str, got: Optional[int], want: Optional[int]) -> None:
    if got != want:
        flag = "--num-layers" if what == "layers" else "--num-experts"
        raise GrowthError(
            f"key {key!r}: the target model has {got} {what} but the growth plan makes {want}; "
            f"set {flag} {want} (or change the growth factors)"
        )
