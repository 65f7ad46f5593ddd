"""The manifest of a grown checkpoint: every tensor piece and object it holds, from the source
metadata and the plan alone (no tensor is read). Offline growth writes it, `verify` checks
it, `plan` costs it.

Batches cut the pieces into groups bounded in bytes, each read, grown and written at once.

A piece is one target layer/expert unit, or a row block of a big unit without experts (so
memory stays bounded); expert units stay whole because their noise is drawn per whole expert
matrix anyway. Pieces are ordered by their source unit, so copies of one source unit stay
together in a batch and the unit is read once.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Optional

import torch

from . import compat, indexing, upcycling
from .io import formats
from .io.checkpoint import CheckpointInfo
from .mapping import Box
from .errors import GrowthError
from .plan import GrowthPlan

OBJECT_SHARD = "/shard_"  # ShardedObject storage key: `{key}/shard_{offset}_{shape}`


@dataclass(frozen=True)
class Piece:
    """One tensor piece of the grown checkpoint."""

    box: Box
    dtype: torch.dtype
    order: tuple  # source key and unit first: copies of one source unit stay together

    @property
    def nbytes(self) -> int:
        return math.prod(self.box.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class ObjectRef:
    """One ShardedObject of a checkpoint: its key, and where it sits on its prepended axes."""

    key: str
    global_shape: tuple[int, ...]
    offset: tuple[int, ...]

    @property
    def storage_key(self) -> str:
        return f"{self.key}{OBJECT_SHARD}{_dotted(self.offset)}_{_dotted(self.global_shape)}"

    @classmethod
    def parse(cls, storage_key: str) -> "ObjectRef":
        key, _, rest = storage_key.rpartition(OBJECT_SHARD)
        offset, _, shape = rest.partition("_")
        return cls(key, _ints(shape), _ints(offset))


def _dotted(xs) -> str:
    return ".".join(map(str, xs))


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(".") if x != "")


def keeps_optimizer(info: CheckpointInfo, output_format: str = formats.TORCH_DIST) -> bool:
    """Whether the source's optimizer state can be grown into `output_format` (it is in model
    space: torch_dist's model-space formats, or fsdp_dtensor's per-parameter state)."""
    return info.optimizer_format in formats.CARRIED_OPTIMIZERS[output_format]


def _source_tensors(info: CheckpointInfo, keep_optimizer: Optional[bool]) -> dict[str, tuple[int, ...]]:
    """The source tensors to grow; the optimizer's only where kept (None: where growable)."""
    keep = keeps_optimizer(info) if keep_optimizer is None else keep_optimizer
    return info.shapes if keep else info.model_shapes()


@dataclass(frozen=True)
class _Slab:
    """One target layer/expert slab: `key` at prepended `index`."""

    key: str
    global_shape: tuple[int, ...]
    index: tuple[int, ...]
    dtype: torch.dtype
    order: tuple  # the source key and unit it is made from
    whole: bool  # an expert unit or router rows: never cut into row blocks


def _slabs(info: CheckpointInfo, plan: GrowthPlan, keep_optimizer: Optional[bool]):
    """Every slab of the grown checkpoint, made source tensor by source tensor."""
    in_keys = indexing.layers_in_keys(plan.target)
    for key, shape in _source_tensors(info, keep_optimizer).items():
        prepend = indexing.stored_prepend_axes(key)
        layout = indexing.parse_key(key, prepend)
        dtype = info.dtypes[key]
        if not (layout.decoder and layout.has_layer):  # outside the decoder stack: experts only
            grown = indexing.resized(plan, layout, shape, row_axis=prepend)
            for target_key in indexing.target_keys(plan, layout):
                for source_index in itertools.product(*(range(n) for n in shape[:prepend])):
                    for index in indexing.target_indices(plan, layout, source_index):
                        yield _Slab(target_key, grown, index, dtype, (key, source_index), layout.has_expert)
            continue
        stacked = layout.layer_axis is not None
        layers = range(shape[0]) if stacked else [layout.layer_in_key]
        for layer in layers:
            per_layer = shape[1:] if stacked else shape  # experts first where they are stacked
            for tail, layer_shape, experts in _layer_tensors(plan, layout, per_layer, layer, info.shapes):
                for target_layer in plan.layer_targets(layer):
                    target_key = indexing.layer_key(layout.prefix, tail, target_layer if in_keys else None)
                    grown = layer_shape if in_keys else (plan.target_num_layers,) + layer_shape
                    base = () if in_keys else (target_layer,)
                    for source_expert, target_expert in experts:
                        index = base if target_expert is None else base + (target_expert,)
                        yield _Slab(target_key, grown, index, dtype,
                                    (key, layer, -1 if source_expert is None else source_expert),
                                    layout.has_expert or target_expert is not None)


def _layer_tensors(plan: GrowthPlan, layout: indexing.KeyLayout, shape, layer: int, source_shapes):
    """What one source layer's tensor becomes in each of its target layers: (tail, the target
    layer's tensor shape, [(source expert, target expert or None)])."""
    tail = layout.tail
    if plan.upcycled(layer) and upcycling.role(tail) is None:
        made = [(t, _upcycled_shape(plan, t, tail, shape, layout, layer, source_shapes))
                for t in upcycling.target_tails(tail, plan.upcycle.shared_expert)]
        if tail == upcycling.DENSE_FC["fc2"]:  # the router comes from nowhere: one per layer
            made.append((upcycling.ROUTER[0], (plan.upcycle.experts, shape[0])))  # fc2: [hidden, ffn]
        out = []
        for t, s in made:
            stacked_experts = upcycling.role(t) is not None and upcycling.role(t).kind == "expert"
            out.append((t, s, [(0, e) for e in range(s[0])] if stacked_experts else [(None, None)]))
        return out
    if layout.expert_in_key is not None:  # an expert in the key: one tail per target expert
        return [(indexing.parse_key(layout.with_indices(layer, e), 0).tail, tuple(shape), [(None, None)])
                for e in plan.expert_targets(layout.expert_in_key)]
    grown = list(shape)
    experts = [(None, None)]
    if layout.expert_axis is not None:  # stacked experts: first axis of the layer's tensor
        grown[0] = plan.target_num_experts
        experts = [(x, e) for x in range(shape[0]) for e in plan.expert_targets(x)]
    elif layout.expert_rows and plan.source.is_moe:
        grown[0] = plan.target_num_experts
    return [(tail, tuple(grown), experts)]


def _upcycled_shape(plan: GrowthPlan, tail: str, dense_tail: str, shape, layout, layer: int,
                    source_shapes) -> tuple[int, ...]:
    """The shape of what `dense_tail` (a dense layer's tensor of `shape`) becomes as `tail`."""
    role = upcycling.role(tail)
    if role is None or role.kind != "expert":
        return tuple(shape)
    fc2 = indexing.as_stored(source_shapes, indexing.layer_key(layout.prefix, upcycling.DENSE_FC["fc2"], layer), ())[0]
    hidden = source_shapes[fc2][-1]
    g = plan.upcycle.granularity
    if hidden % g:
        raise GrowthError(f"--upcycle-granularity {g} does not divide the dense MLP's {hidden} "
                          "hidden units (--ffn-hidden-size)")
    axis = 0 if role.fc == "fc1" else 1
    sliced = list(shape)
    sliced[axis] //= g
    return (plan.upcycle.experts,) + tuple(sliced)


def target_tensors(info: CheckpointInfo, plan: GrowthPlan, keep_optimizer: Optional[bool] = None,
                   ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every tensor of the grown checkpoint: key → (global shape, dtype)."""
    return {slab.key: (slab.global_shape, slab.dtype) for slab in _slabs(info, plan, keep_optimizer)}


def target_pieces(info: CheckpointInfo, plan: GrowthPlan, max_piece_bytes: int,
                  keep_optimizer: Optional[bool] = None) -> list[Piece]:
    """Every target tensor piece, in source order. Units without experts larger than
    `max_piece_bytes` are cut into row blocks; expert units stay whole (their noise is drawn
    per whole expert matrix anyway), except that an upcycled GLU fc1 with granularity is cut
    at its halves, which come from two places of the dense fc1."""
    pieces = []
    for slab in _slabs(info, plan, keep_optimizer):
        unit = slab.global_shape[len(slab.index):]
        rows = _row_block(unit, slab.dtype, max_piece_bytes) if not slab.whole else _glu_halves(plan, slab, unit)
        for start in range(0, unit[0], rows) if rows else [None]:
            shape = unit if start is None else (min(rows, unit[0] - start),) + unit[1:]
            offset = (0,) * len(unit) if start is None else (start,) + (0,) * (len(unit) - 1)
            pieces.append(Piece(Box(slab.key, slab.global_shape, slab.index, offset, shape), slab.dtype,
                                slab.order + (slab.index, start or 0)))
    return sorted(pieces, key=lambda x: x.order)


def _glu_halves(plan: GrowthPlan, slab: _Slab, unit) -> Optional[int]:
    up = plan.upcycle
    role = upcycling.role(indexing.parse_key(slab.key, 0).tail) if up.active else None
    if role is None or role.kind != "expert" or role.fc != "fc1" or up.granularity == 1 or unit[0] % 2:
        return None
    return unit[0] // 2  # GLU or not: halves of a non-GLU slice are read from one place anyway


def _row_block(unit: tuple[int, ...], dtype: torch.dtype, max_bytes: int) -> Optional[int]:
    """Rows per block: the largest divisor of the row count that fits `max_bytes` (megatron-core
    reads the pieces of one tensor as a regular grid, so blocks must be equal)."""
    nbytes = math.prod(unit) * dtype.itemsize
    if not unit or nbytes <= max_bytes or unit[0] < 2:
        return None
    fit = max(1, max_bytes // (nbytes // unit[0]))
    return max(d for d in range(1, fit + 1) if unit[0] % d == 0)


def target_objects(info: CheckpointInfo, plan: GrowthPlan, keep_optimizer: bool) -> list[ObjectRef]:
    """The grown ShardedObjects: each source object once per target layer/expert made from it,
    in the target's key form (see `indexing.layers_in_keys`). Objects without layer/expert axes
    (e.g. RNG state) are kept as they are; the common state is not among them (it is written
    anew)."""
    in_keys = indexing.layers_in_keys(plan.target)
    out = []
    for storage_key in info.objects:
        if compat.is_common_state_object(storage_key):
            continue
        source = ObjectRef.parse(storage_key)
        if source.key.startswith("optimizer.") and not keep_optimizer:
            continue
        layout = indexing.parse_key(source.key, len(source.global_shape))
        if not (layout.decoder and layout.has_layer):
            shape = indexing.resized(plan, layout, source.global_shape, row_axis=None)
            for target_key in indexing.target_keys(plan, layout):
                out.extend(ObjectRef(target_key, shape, index)
                           for index in indexing.target_indices(plan, layout, source.offset))
            continue
        stacked = layout.layer_axis is not None
        layer = source.offset[0] if stacked else layout.layer_in_key
        expert_axes = source.global_shape[1:] if stacked else (source.global_shape if layout.has_expert_index else ())
        tails = (upcycling.object_tails(layout.tail, plan.upcycle.shared_expert) if plan.upcycled(layer)
                 else [layout.tail])
        for tail in tails:
            experts = _object_experts(plan, layout, tail, source.offset[1:] if stacked else source.offset,
                                      expert_axes)
            for target_layer in plan.layer_targets(layer):
                for expert_shape, expert in experts:
                    if in_keys:
                        shape, offset = expert_shape or (1,), expert or (0,)
                        key = indexing.layer_key(layout.prefix, tail, target_layer)
                    else:
                        shape, offset = (plan.target_num_layers,) + expert_shape, (target_layer,) + expert
                        key = indexing.layer_key(layout.prefix, tail, None)
                    out.append(ObjectRef(key, shape, offset))
    return out


def _object_experts(plan: GrowthPlan, layout: indexing.KeyLayout, tail: str, expert_offset, expert_axes):
    """[(expert axes of the target object, its offset on them)] for one source object."""
    role = upcycling.role(tail.replace("._extra_state", ".weight")) if plan.upcycle.active else None
    if role is not None and role.kind == "expert":
        return [((plan.target_num_experts,), (e,)) for e in range(plan.target_num_experts)]
    if layout.has_expert_index and expert_axes:
        return [((plan.target_num_experts,), (e,)) for e in plan.expert_targets(expert_offset[0])]
    return [((), ())]


@dataclass
class Batch:
    number: int
    pieces: list[Piece]
    objects: list[ObjectRef]

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.pieces)


def batches(pieces: list[Piece], objects: list[ObjectRef], max_bytes: int) -> list[Batch]:
    out: list[Batch] = []
    current: list[Piece] = []
    current_bytes = 0
    for piece in pieces:
        if current and current_bytes + piece.nbytes > max_bytes:
            out.append(Batch(len(out), current, []))
            current, current_bytes = [], 0
        current.append(piece)
        current_bytes += piece.nbytes
    out.append(Batch(len(out), current, list(objects)))  # objects are small: the last batch
    return out
