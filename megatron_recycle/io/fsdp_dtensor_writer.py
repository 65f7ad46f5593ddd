"""Writing a grown `fsdp_dtensor` checkpoint (Megatron-FSDP's), batch by batch, as Megatron-LM's
`load_checkpoint` reads it back with torch DCP.

The grown pieces come in torch_dist terms (as for `io.writer`); each is stored under its
fsdp_dtensor name (`FsdpNaming.name`: `model.<parameter>`, experts by global id, GLU
`linear_fc1` rows as `_w` / `_v` halves where the source splits them) and its optimizer
moments under `optimizer.state.module.<parameter>.<field>`. `finish` writes what Megatron-LM's
`generate_state_dict` saves beside the weights, flattened as torch DCP flattens it: the common
objects (`args` …, the growth record) and, where the optimizer state is carried, every grown
parameter's `optimizer.param_to_group_meta` (its source parameter's group: the grown
optimizer's param groups are rebuilt from it); then one `.metadata`. No `metadata.json`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from .. import indexing
from ..errors import CheckpointError, GrowthError
from ..provenance import KEY as PROVENANCE_KEY
from .fsdp_dtensor import GROUP_META_PREFIX, OPTIMIZER_STATE_PREFIX, FsdpDtensorCheckpoint
from .reader import StoredObject, read_stored
from .writer import fsync, pickled, tensor_properties, write_items


class FsdpDtensorWriter:
    """Writes one grown checkpoint of `source` (an fsdp_dtensor checkpoint) by `plan`."""

    def __init__(self, source: FsdpDtensorCheckpoint, plan, keep_optimizer: bool, pieces: Sequence):
        """`pieces`: every piece of the grown checkpoint (checked here, before anything is written)."""
        self.source_path, self.naming = source.path, source.naming
        self.plan, self.keep_optimizer = plan, keep_optimizer
        self.group_meta = source.group_meta if keep_optimizer else {}
        if keep_optimizer:
            self.parameter_groups(pieces)

    def parameter_groups(self, pieces) -> dict[str, str]:
        """Grown parameter (`module.<name>`) → the source parameter whose group meta it takes,
        for every grown weight; refused where a source parameter has none."""
        have = {param for param, _ in self.group_meta.values()}
        out = {}
        for key, index in {(p.box.key, p.box.index) for p in pieces if not p.box.key.startswith("optimizer.")}:
            came = indexing.origin(self.plan, indexing.parse_key(key, len(index)), index)
            for half in ("w", "v") if self.naming.split(key) else (None,):
                grown = self.naming.name(key, index, half)[len(indexing.FSDP_MODEL_PREFIX):]
                source = self.naming.name(came.key, came.index, half)[len(indexing.FSDP_MODEL_PREFIX):]
                if source not in have:
                    raise GrowthError(
                        f"--grow-optimizer: {self.source_path} has no optimizer group for {source!r} "
                        f"(which {grown!r} is grown from); use --grow-optimizer reset")
                out[grown] = source
        return out

    def write_batch(self, out_dir: Path, number: int, pieces: Sequence, objects: Sequence, values: dict) -> list:
        """`pieces` (values[f"t{i}"]) into batch file `number`; fsdp_dtensor sources hold no
        sharded objects, so `objects` is empty."""
        from torch.distributed.checkpoint.metadata import MetadataIndex
        from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

        if objects:
            raise CheckpointError(f"{out_dir}: sharded objects cannot be written as fsdp_dtensor")
        items, data = [], {}
        for i, piece in enumerate(pieces):
            tensor = values[f"t{i}"].reshape(piece.box.shape)
            for name, chunk, size, rows in self._stored(piece):
                index = MetadataIndex(name, chunk.offsets)
                items.append(WriteItem(index=index, type=WriteItemType.SHARD, tensor_data=TensorWriteData(
                    chunk=chunk, properties=tensor_properties(piece.dtype), size=size)))
                data[index] = tensor if rows is None else tensor.narrow(0, *rows).contiguous()
        return write_items(out_dir, number, items, data)

    def _stored(self, piece):
        """Where one torch_dist piece is stored: (name, chunk, the name's global shape, the
        piece's rows it holds or None for all), one per GLU half it overlaps."""
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

        box = piece.box
        unit, offset, shape = box.unit_shape, box.offset, box.shape
        if not self.naming.split(box.key):
            yield (self.naming.name(box.key, box.index, None),
                   ChunkStorageMetadata(torch.Size(offset), torch.Size(shape)), torch.Size(unit), None)
            return
        rows = unit[0] // 2
        for half, first in (("w", 0), ("v", rows)):
            lo, hi = max(offset[0], first), min(offset[0] + shape[0], first + rows)
            if lo < hi:
                yield (self.naming.name(box.key, box.index, half),
                       ChunkStorageMetadata(torch.Size((lo - first,) + offset[1:]), torch.Size((hi - lo,) + shape[1:])),
                       torch.Size((rows,) + unit[1:]), (lo - offset[0], hi - lo))

    def finish(self, out_dir: Path, pieces: Sequence, objects: Sequence, results: list,
               common: dict[str, Any], metadata_json: bytes, common_number: int) -> None:
        """The common objects, the grown parameters' group meta and `.metadata` over every
        batch's results, all durable (`metadata_json` is torch_dist's: not written)."""
        from torch.distributed.checkpoint import FileSystemWriter
        from torch.distributed.checkpoint._nested_dict import flatten_state_dict
        from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, Metadata, MetadataIndex,
                                                           TensorStorageMetadata)
        from torch.distributed.checkpoint.planner import WriteItem, WriteItemType

        # the growth record as one object: flattening would drop its empty fields
        flat, paths = flatten_state_dict({k: v for k, v in common.items() if k != PROVENANCE_KEY})
        if PROVENANCE_KEY in common:
            flat[PROVENANCE_KEY], paths[PROVENANCE_KEY] = common[PROVENANCE_KEY], (PROVENANCE_KEY,)
        flat.update(self._group_meta(pieces, paths))
        # each object as torch DCP's default planner saves it (the object itself)
        data = {MetadataIndex(name): pickled(value) for name, value in flat.items()}
        written = write_items(out_dir, common_number, [WriteItem(index=i, type=WriteItemType.BYTE_IO) for i in data], data)
        fsync(out_dir / written[0].storage_data.relative_path)
        state: dict[str, Any] = {name: BytesStorageMetadata() for name in flat}
        for piece in pieces:
            for name, chunk, size, _ in self._stored(piece):
                md = state.setdefault(name, TensorStorageMetadata(tensor_properties(piece.dtype), size, []))
                md.chunks.append(chunk)
                paths[name] = _path(name)
        writer = FileSystemWriter(out_dir, single_file_per_rank=True)
        writer.set_up_storage_writer(True)
        # writes .metadata (temporary name, fsync, rename)
        writer.finish(Metadata(state_dict_metadata=state, planner_data=paths), list(results) + [written])
        fsync(out_dir)

    def _group_meta(self, pieces, paths: dict) -> dict[str, Any]:
        if not self.keep_optimizer:
            return {}
        stored = read_stored(self.source_path, {n: StoredObject(n) for n in self.group_meta})
        fields: dict[str, dict[str, Any]] = {}
        for name, value in stored.items():
            param, field = self.group_meta[name]
            fields.setdefault(param, {})[field] = value
        out = {}
        for grown, source in self.parameter_groups(pieces).items():
            for field, value in fields[source].items():
                name = f"{GROUP_META_PREFIX}{grown}.{field}"
                out[name], paths[name] = value, _path(name)
        return out


def _path(name: str) -> tuple[str, ...]:
    """Where torch DCP's flattening took a stored name from in Megatron-LM's state dict
    (its `planner_data`): parameter names keep their dots."""
    if name.startswith((OPTIMIZER_STATE_PREFIX, GROUP_META_PREFIX)):
        head, _, rest = name.partition(".module.")
        param, _, field = rest.rpartition(".")
        return (*head.split("."), f"module.{param}", field)
    head, _, param = name.partition(".")
    return head, param
