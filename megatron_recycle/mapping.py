"""Plan → mapping: for one target shard, which source box fills it and what is done to it.

A target shard is described by Megatron-Core's own ShardedTensor/ShardedObject metadata (key,
global shape, global offset, prepended axes): that metadata is the single source of truth for
the target layout, so any TP/EP/PP/VPP layout maps the same way. The result is plain data
(`Fill`), consumed by the tensor operators in `ops.py`. Pure Python, no torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

from . import indexing, upcycling
from .plan import GrowthError, GrowthPlan

# The noise stream of fresh draws is apart from the copies' noise: a drawn unit and a noisy copy
# of the same tensor, layer and expert share no random numbers.
INIT_STREAM = "init:"


@dataclass(frozen=True)
class Box:
    """A box of one checkpoint tensor: `shape` at `offset` inside the slab (the *unit*) at
    prepended index `index` — one layer/expert of a stacked tensor, or the whole tensor."""

    key: str
    global_shape: tuple[int, ...]
    index: tuple[int, ...] = ()  # prepended-axis indices (layer, expert)
    offset: tuple[int, ...] = ()  # inside the unit
    shape: tuple[int, ...] = ()  # inside the unit
    second: bool = False  # in the second checkpoint (--grow-from-second), not the source

    @property
    def unit_shape(self) -> tuple[int, ...]:
        return self.global_shape[len(self.index):]

    @property
    def global_offset(self) -> tuple[int, ...]:
        return self.index + self.offset

    def unit(self) -> "Box":
        """The whole unit this box lies in."""
        return Box(self.key, self.global_shape, self.index, (0,) * len(self.unit_shape), self.unit_shape,
                   self.second)

    def in_second(self) -> "Box":
        """The same box of the second checkpoint (which has the source's shapes)."""
        return dataclasses.replace(self, second=True)

    @classmethod
    def whole_unit(cls, key: str, global_shape, index, second: bool = False) -> "Box":
        global_shape, index = tuple(global_shape), tuple(index)
        unit_shape = global_shape[len(index):]
        return cls(key, global_shape, index, (0,) * len(unit_shape), unit_shape, second)


@dataclass(frozen=True)
class Noise:
    """Noise on one target shard: per target expert (or router row), seeded layout-free."""

    name: str  # canonical tensor name (no layer/expert indices, no optimizer prefix)
    layer: int  # target layer (decoder) or -1
    experts: tuple[tuple[int, int], ...]  # (target expert, local row or -1 for whole shard)
    unit_shape: tuple[int, ...]  # full shape one seed covers (an expert matrix or a router row)
    offset: tuple[int, ...]  # the shard's offset inside that shape
    sigma_unit: Optional[Box]  # the source unit whose std scales the noise; None: a fresh draw
    factor: float = 1.0  # on α·σ: the copies' --grow-weight-multiplier
    std: Optional[float] = None  # a fresh draw (a re-initialised unit): N(0, std²), no σ

    def std_of(self, sigma_of: Callable[[Box], float], alpha: float) -> float:
        """The std of this noise, given σ of source units and α."""
        if self.std is not None:
            return self.std
        return alpha * sigma_of(self.sigma_unit) * self.factor


@dataclass(frozen=True)
class Fill:
    """How to build one target shard from the source."""

    source: Optional[Box]  # None: nothing to read (a zero router of an upcycled layer)
    rows: Optional[tuple[int, ...]] = None  # router: source row for each local target row
    # router rows of --grow-from-second: the second checkpoint's rows of `source`; `rows` then
    # index `source` and `second` one after the other (row E + e: the second's row e)
    second: Optional[Box] = None
    zero: bool = False  # zeroed output projection / moments of a copy
    zero_rows: tuple[int, ...] = ()  # router moments: the local rows that are copies
    noise: Optional[Noise] = None
    scale: float = 1.0  # the source times this, before noise (upcycled fc2, multiplied copies)
    scaled_rows: Optional[tuple[int, ...]] = None  # router: the local rows `scale` applies to

    @property
    def modifies(self) -> bool:
        """Whether the fill changes the values it reads (so it runs after other readers)."""
        return self.noise is not None or self.scale != 1.0


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
    if came_from.layer >= 0 and plan.upcycled(plan.layer_map[came_from.layer]):
        upcycled = _map_upcycled(plan, source_shapes, layout, came_from, global_shape, global_offset,
                                 local_shape, prepend, optimizer_policy)
        if upcycled is not None:
            return upcycled
    source_key, source_index = indexing.as_stored(source_shapes, came_from.key, came_from.index)
    source_shape = _source_shape(source_shapes, source_key)
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
    if source_key != came_from.key:  # the source stacks the layers the target keys by index
        expected = (plan.source.num_layers,) + expected
    if tuple(source_shape) != expected:
        raise GrowthError(
            f"key {key!r}: the target's global shape {tuple(global_shape)} maps to {expected} in "
            f"the source, but the source checkpoint has {tuple(source_shape)}; the target model's "
            "hidden sizes, heads or TP-independent shapes must match the source"
        )
    source = Box(source_key, tuple(source_shape), source_index, offset, shape)

    copy_rows = () if rows is None else tuple(
        i for i, r in enumerate(target_rows) if plan.expert_source(r)[1] > 0)
    init, moment, name = plan.init, layout.is_optimizer_moment, layout.canonical_name()
    router_weight = rows is not None and layout.model_key.endswith(".router.weight")
    zero_moments = moment and optimizer_policy == "zero"
    is_copy = came_from.layer_copy > 0 or came_from.expert_copy > 0
    reinit_unit = init.reinit_expert_copies and came_from.expert_copy > 0 and layout.has_expert_index
    zero = (
        (plan.depth.zero_copy_outputs and came_from.layer_copy > 0 and layout.decoder
         and layout.is_output_projection)
        or (zero_moments and is_copy)
    )
    if zero:
        return Fill(source=source, rows=rows, zero=True)
    fresh_router = init.random_router and rows is not None
    if (reinit_unit and moment) or (fresh_router and (moment or not router_weight)) or (
            init.zero_expert_bias and layout.model_key.endswith(".router.expert_bias")):
        return Fill(source=None, zero=True)
    if fresh_router:  # every row drawn afresh
        rows_drawn = tuple((r, i) for i, r in enumerate(target_rows))
        return Fill(source=None, noise=_drawn(plan, name, came_from.layer, rows_drawn, global_shape[prepend + 1:],
                                              global_offset[prepend + 1:]))
    if reinit_unit:
        return Fill(source=None, noise=_drawn(plan, name, came_from.layer, ((came_from.expert, -1),),
                                              global_shape[prepend:], global_offset[prepend:]))
    second = None  # --grow-from-second: expert copies and their router rows from the second
    if init.from_second and came_from.expert_copy > 0 and layout.has_expert_index:
        source = source.in_second()
    elif init.from_second and copy_rows and not zero_moments:  # zeroed rows read nothing of it
        second = source.in_second()
        rows = tuple(r + plan.source.num_experts if i in copy_rows else r for i, r in enumerate(rows))
    scale, scaled_rows = 1.0, None
    if init.weight_multiplier != 1.0 and not moment and (is_copy or copy_rows):
        scale = init.weight_multiplier
        scaled_rows = copy_rows if rows is not None and came_from.layer_copy == 0 else None
    if init.reinit_expert_copies and copy_rows:  # the copies' rows drawn afresh, their biases zero
        drawn = tuple((target_rows[i], i) for i in copy_rows)
        return Fill(source=source, rows=rows, zero_rows=copy_rows, scale=scale, scaled_rows=scaled_rows,
                    noise=_drawn(plan, name, came_from.layer, drawn, global_shape[prepend + 1:],
                                 global_offset[prepend + 1:]) if router_weight and not moment else None)
    zero_rows = copy_rows if zero_moments else ()
    noise = None
    wants_noise = plan.width.noise_alpha > 0 and not moment
    if wants_noise and copy_rows:
        copies = tuple((target_rows[i], i) for i in copy_rows)
        noise = Noise(name, came_from.layer, copies,
                      tuple(global_shape[prepend + 1:]), tuple(global_offset[prepend + 1:]),
                      _sigma_unit(layout, second or source, source_shapes), init.weight_multiplier)
    elif wants_noise and came_from.expert_copy > 0:
        noise = Noise(name, came_from.layer, ((came_from.expert, -1),),
                      tuple(global_shape[prepend:]), tuple(global_offset[prepend:]),
                      _sigma_unit(layout, source, source_shapes), init.weight_multiplier)
    return Fill(source=source, rows=rows, zero_rows=zero_rows, noise=noise, scale=scale,
                scaled_rows=scaled_rows, second=second)


def _drawn(plan: GrowthPlan, name: str, layer: int, experts, unit_shape, offset) -> Noise:
    """A fresh N(0, init_std²) draw of whole units (a baseline's), on its own noise stream."""
    return Noise(INIT_STREAM + name, layer, tuple(experts), tuple(unit_shape), tuple(offset), None,
                 std=plan.init.init_std)


def _map_upcycled(plan: GrowthPlan, source_shapes, layout: indexing.KeyLayout, came_from: indexing.Origin,
                  global_shape, global_offset, local_shape, prepend: int, optimizer_policy: str,
                  ) -> Optional[Fill]:
    """A tensor of an upcycled layer's MoE MLP, from the dense layer (`upcycling.py`); None for
    the tensors upcycling leaves as they are."""
    role = upcycling.role(layout.tail)
    if role is None:
        return None
    if role.kind == "router":
        return Fill(source=None, zero=True)
    layer, layer_copy = plan.layer_source(came_from.layer)

    def located(tail: str) -> tuple[str, tuple[int, ...], tuple[int, ...]]:
        key, index = indexing.as_stored(source_shapes, indexing.layer_key(layout.prefix, tail, layer), ())
        return key, index, tuple(_source_shape(source_shapes, key))

    offset, shape = tuple(global_offset[prepend:]), tuple(local_shape)
    if role.kind == "norm":
        tails = {indexing.parse_key(k, 0).tail for k in source_shapes}
        key, index, full = located(upcycling.dense_tail(role, tails))
        return Fill(source=Box(key, full, index, offset, shape))
    key, index, full = located(upcycling.dense_tail(role, ()))
    unit = tuple(global_shape[prepend:])
    dense_unit = full[len(index):]
    up, moment = plan.upcycle, layout.is_optimizer_moment
    expert, copy = (0, 0) if role.kind == "shared" else plan.expert_source(came_from.expert)
    granularity = up.granularity if role.kind == "expert" else 1
    hidden = located(upcycling.DENSE_FC["fc2"])[2][-1]  # the dense MLP's hidden units
    glu = role.fc == "fc1" and dense_unit[0] == 2 * hidden
    axis = 0 if role.fc == "fc1" else 1
    want = list(dense_unit)
    want[axis] //= granularity
    if tuple(want) != unit or dense_unit[axis] % granularity:
        raise GrowthError(f"key {layout.prefix + layout.model_key!r}: the target expert is {unit} but upcycling "
                          f"{dense_unit} with granularity {granularity} makes {tuple(want)}; set "
                          f"--moe-ffn-hidden-size {hidden // granularity} (the dense --ffn-hidden-size "
                          "/ --upcycle-granularity)")
    source_offset = list(offset)
    source_offset[axis] = upcycling.slice_rows(role.fc, glu, hidden, granularity, expert, offset[axis], shape[axis])
    source = Box(key, full, index, tuple(source_offset), shape)
    zero_moments = moment and optimizer_policy == "zero"
    zero = ((plan.depth.zero_copy_outputs and layer_copy > 0 and layout.is_output_projection)
            or (zero_moments and (layer_copy > 0 or copy > 0)))
    scale = 1.0
    if role.fc == "fc2" and not moment:
        scale = up.routed_scale() if role.kind == "expert" else up.shared_scale()
    noise = None
    if plan.width.noise_alpha > 0 and copy > 0 and not zero and not moment:
        noise = Noise(layout.canonical_name(), came_from.layer, ((came_from.expert, -1),), unit, offset,
                      _sigma_unit(layout, Box(key, full, index, (0,) * len(dense_unit), dense_unit),
                                  source_shapes))
    return Fill(source=source, zero=zero, noise=noise, scale=scale)


def map_object(plan: GrowthPlan, source_objects, key: str, global_shape, global_offset,
               ) -> tuple[str, tuple, tuple]:
    """Map a ShardedObject (e.g. `_extra_state`): its offsets are the prepended axes only.
    Returns the source object's (key, global shape, global offset) as the source stores it
    (`source_objects`: its storage keys)."""
    layout = indexing.parse_key(key, len(global_shape))
    came_from = indexing.origin(plan, layout, tuple(global_offset))
    layer = plan.layer_map[came_from.layer] if came_from.layer >= 0 else None
    dense = upcycling.dense_object_tail(layout.tail) if layer is not None and plan.upcycled(layer) else None
    if dense is not None:
        candidates = [(indexing.layer_key(layout.prefix, dense, None), (plan.source.num_layers,), (layer,)),
                      (indexing.layer_key(layout.prefix, dense, layer), (1,), (0,))]
    else:
        shape = indexing.resized(plan, layout, tuple(global_shape), None, to_target=False)
        candidates = [(came_from.key, shape, came_from.index)]
        if layout.layer_in_key is not None:  # the source may stack the layers the target indexes
            stacked_shape = shape if layout.has_expert_index else ()
            stacked_index = came_from.index if layout.has_expert_index else ()
            candidates.append((indexing.layer_key(layout.prefix, layout.tail, None),
                               (plan.source.num_layers,) + stacked_shape, (layer,) + stacked_index))
    for candidate in candidates:
        if object_storage_key(*candidate) in source_objects:
            return candidate
    return candidates[0]  # missing: the read names it


def object_storage_key(key: str, global_shape, global_offset) -> str:
    """Where torch_dist stores a ShardedObject: `{key}/shard_{offset}_{shape}` (dotted)."""
    return f"{key}/shard_{'.'.join(map(str, global_offset))}_{'.'.join(map(str, global_shape))}"


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
            return dataclasses.replace(unit, key=weight_key)
    return unit


def _expect(key: str, what: str, got: Optional[int], want: Optional[int]) -> None:
    if got != want:
        flag = "--num-layers" if what == "layers" else "--num-experts"
        raise GrowthError(
            f"key {key!r}: the target model has {got} {what} but the growth plan makes {want}; "
            f"set {flag} {want} (or change the growth factors)"
        )
