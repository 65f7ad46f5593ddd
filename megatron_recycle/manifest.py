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

from . import compat, indexing
from .io.checkpoint import CheckpointInfo
from .mapping import Box
from .plan import GrowthPlan
from .policy import MODEL_SPACE_OPTIMIZER_FORMATS

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


def keeps_optimizer(info: CheckpointInfo) -> bool:
    """Whether the source's optimizer state can be grown (it is in model space)."""
    return info.optimizer_format in MODEL_SPACE_OPTIMIZER_FORMATS


def _source_tensors(info: CheckpointInfo, keep_optimizer: Optional[bool]) -> dict[str, tuple[int, ...]]:
    """The source tensors to grow; the optimizer's only where kept (None: where growable)."""
    keep = keeps_optimizer(info) if keep_optimizer is None else keep_optimizer
    return info.shapes if keep else info.model_shapes()


def target_tensors(info: CheckpointInfo, plan: GrowthPlan, keep_optimizer: Optional[bool] = None,
                   ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every tensor of the grown checkpoint: key → (global shape, dtype)."""
    out = {}
    for key, shape in _source_tensors(info, keep_optimizer).items():
        prepend = indexing.stored_prepend_axes(key)
        layout = indexing.parse_key(key, prepend)
        grown = indexing.resized(plan, layout, shape, row_axis=prepend)
        for target_key in indexing.target_keys(plan, layout):
            out[target_key] = (grown, info.dtypes[key])
    return out


def target_pieces(info: CheckpointInfo, plan: GrowthPlan, max_piece_bytes: int,
                  keep_optimizer: Optional[bool] = None) -> list[Piece]:
    """Every target tensor piece, in source order."""
    pieces = []
    for key, shape in _source_tensors(info, keep_optimizer).items():
        prepend = indexing.stored_prepend_axes(key)
        layout = indexing.parse_key(key, prepend)
        grown = indexing.resized(plan, layout, shape, row_axis=prepend)
        unit = grown[prepend:]
        dtype = info.dtypes[key]
        rows = None if layout.has_expert else _row_block(unit, dtype, max_piece_bytes)
        starts = range(0, unit[0], rows) if rows else [None]
        for target_key in indexing.target_keys(plan, layout):
            for source_index in itertools.product(*(range(n) for n in shape[:prepend])):
                for index in indexing.target_indices(plan, layout, source_index):
                    order = (key, layout.layer_in_key, layout.expert_in_key, source_index)
                    for start in starts:
                        piece_shape = unit if start is None else (min(rows, unit[0] - start),) + unit[1:]
                        offset = (0,) * len(unit) if start is None else (start,) + (0,) * (len(unit) - 1)
                        pieces.append(Piece(Box(target_key, grown, index, offset, piece_shape), dtype,
                                            order + (index, start or 0)))
    return sorted(pieces, key=lambda x: x.order)


def _row_block(unit: tuple[int, ...], dtype: torch.dtype, max_bytes: int) -> Optional[int]:
    """Rows per block: the largest divisor of the row count that fits `max_bytes` (megatron-core
    reads the pieces of one tensor as a regular grid, so blocks must be equal)."""
    nbytes = math.prod(unit) * dtype.itemsize
    if not unit or nbytes <= max_bytes or unit[0] < 2:
        return None
    fit = max(1, max_bytes // (nbytes // unit[0]))
    return max(d for d in range(1, fit + 1) if unit[0] % d == 0)


def target_objects(info: CheckpointInfo, plan: GrowthPlan, keep_optimizer: bool) -> list[ObjectRef]:
    """The grown ShardedObjects: each source object once per target layer/expert made from it.
    Objects without layer/expert axes (e.g. RNG state) are kept as they are; the common state
    is not among them (it is written anew)."""
    out = []
    for storage_key in info.objects:
        if compat.is_common_state_object(storage_key):
            continue
        source = ObjectRef.parse(storage_key)
        if source.key.startswith("optimizer.") and not keep_optimizer:
            continue
        layout = indexing.parse_key(source.key, len(source.global_shape))
        shape = indexing.resized(plan, layout, source.global_shape, row_axis=None)
        for target_key in indexing.target_keys(plan, layout):
            out.extend(ObjectRef(target_key, shape, index)
                       for index in indexing.target_indices(plan, layout, source.offset))
    return out


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
