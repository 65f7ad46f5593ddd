"""Reading boxes of a `torch_dist` checkpoint in one process, without torch.distributed.

megatron-core's own reader turns requests into torch ShardedTensors on a regular grid and
counts the missing grid cells as "other ranks' shards", which cannot work in a world of one
for partial tensors. The offline tools read in plain processes, so they ask torch DCP for
the boxes directly: each request (a megatron-core ShardedTensor or ShardedObject) becomes
DCP read items for exactly its box, read into the request's own tensor.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner
from torch.distributed.checkpoint.planner_helpers import (
    _create_read_item_for_byteio,
    create_read_items_for_chunk_list,
)

from .plan import GrowthError


class _BoxPlanner(LoadPlanner):
    """Reads each requested box into its destination tensor (and objects into a dict)."""

    def __init__(self, requests: dict):
        self.requests = requests
        self.targets: dict[MetadataIndex, torch.Tensor] = {}
        self.objects: dict[str, object] = {}
        self.names_of_objects: dict[str, list[str]] = {}
        self._chunks_by_index: dict[str, dict] = {}

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:
        self.metadata = metadata

    def create_local_plan(self) -> LoadPlan:
        from megatron.core.dist_checkpointing.mapping import ShardedObject

        items = []
        stored = self.metadata.state_dict_metadata
        for name, sh in self.requests.items():
            if isinstance(sh, ShardedObject):
                key = sh.unique_key
                if key not in self.names_of_objects:
                    if not isinstance(stored.get(key), BytesStorageMetadata):
                        raise GrowthError(f"object {key!r} is not in the checkpoint")
                    index = MetadataIndex(key)
                    items.append(_create_read_item_for_byteio(index, 0, index, 0, 0))
                self.names_of_objects.setdefault(key, []).append(name)
                continue
            md = stored.get(sh.key)
            if md is None or isinstance(md, BytesStorageMetadata):
                raise GrowthError(f"tensor {sh.key!r} is not in the checkpoint")
            if tuple(md.size) != tuple(sh.global_shape):
                raise GrowthError(f"tensor {sh.key!r}: the checkpoint holds global shape "
                                  f"{tuple(md.size)}, {tuple(sh.global_shape)} was asked for")
            sizes = torch.Size((1,) * sh.prepend_axis_num + tuple(sh.local_shape))
            chunk = ChunkStorageMetadata(torch.Size(sh.global_offset), sizes)
            reads = create_read_items_for_chunk_list(sh.key, self._stored_in(sh, md), [chunk])
            for r in reads:
                self.targets[r.dest_index] = sh.data.view(sizes)
            items.extend(reads)
        return LoadPlan(items)

    def _stored_in(self, sh, md: TensorStorageMetadata) -> TensorStorageMetadata:
        """`md` cut to the stored chunks at the request's layer/expert index: torch matches a
        request against every chunk of the tensor, which is quadratic over a whole model."""
        p = sh.prepend_axis_num
        if not p:
            return md
        by_index = self._chunks_by_index.get(sh.key)
        if by_index is None:
            by_index = {}
            for c in md.chunks:
                by_index.setdefault(tuple(c.offsets[:p]) if all(n == 1 for n in c.sizes[:p]) else None,
                                    []).append(c)
            self._chunks_by_index[sh.key] = by_index
        if None in by_index:  # chunks spanning several layers/experts: match against all
            return md
        return TensorStorageMetadata(md.properties, md.size, by_index.get(tuple(sh.global_offset[:p]), []))

    def create_global_plan(self, global_plan):
        return global_plan

    def finish_plan(self, central_plan):
        return central_plan

    def load_bytes(self, read_item, value) -> None:
        self.objects[read_item.dest_index.fqn] = torch.load(value, weights_only=False)

    def resolve_tensor(self, read_item):
        view = self.targets[read_item.dest_index]
        for dim, (offset, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            view = view.narrow(dim, offset, length)
        return view

    def commit_tensor(self, read_item, tensor) -> None:
        pass  # resolve_tensor returned a view of the destination: already in place


def box_request(key: str, global_shape, offset, shape, prepend: int, dtype: torch.dtype):
    """A read request for `read_boxes`: `shape` at global `offset` of tensor `key`, its first
    `prepend` axes (layers/experts) left out of `shape`, into a fresh tensor."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    return ShardedTensor(key=key, data=torch.empty(tuple(shape), dtype=dtype), dtype=dtype,
                         local_shape=tuple(shape), global_shape=tuple(global_shape),
                         global_offset=tuple(offset), axis_fragmentations=None, replica_id=0,
                         prepend_axis_num=prepend)


def read_boxes(checkpoint_dir, requests: dict) -> dict:
    """`requests`: name → megatron-core ShardedTensor (its `data` is filled in place, so it must
    be contiguous) or ShardedObject. Returns name → tensor or object, like megatron-core."""
    for name, sh in requests.items():
        data = getattr(sh, "data", None)
        if isinstance(data, torch.Tensor) and not data.is_contiguous():
            raise ValueError(f"{name}: destination tensors must be contiguous")
    planner = _BoxPlanner(requests)
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
        dcp_load({}, storage_reader=_Reader(checkpoint_dir), planner=planner, no_dist=True)
    out = {name: sh.data for name, sh in requests.items() if name not in _object_names(planner)}
    for key, names in planner.names_of_objects.items():
        (value,) = planner.objects[key]  # megatron-core stores each object as a 1-element list
        out.update({name: value for name in names})
    return out


class _Reader(FileSystemReader):
    """A FileSystemReader that unpickles a checkpoint's `.metadata` once per process, not once
    per read (the offline tools read a checkpoint batch by batch)."""

    def __init__(self, checkpoint_dir):
        super().__init__(str(Path(checkpoint_dir)))
        self.checkpoint_dir = Path(checkpoint_dir)

    def read_metadata(self) -> Metadata:
        stat = (self.checkpoint_dir / ".metadata").stat()
        return _cached_metadata(str(self.checkpoint_dir.resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _cached_metadata(checkpoint_dir: str, mtime_ns: int, size: int) -> Metadata:
    return FileSystemReader(checkpoint_dir).read_metadata()  # keyed by mtime and size: never stale


def _object_names(planner: _BoxPlanner) -> set[str]:
    return {n for names in planner.names_of_objects.values() for n in names}


def single_process_strategy(base: type) -> type:
    """`base` (a TorchDistLoadShardedStrategy subclass, e.g. the growth hook) with its raw
    checkpoint read replaced by `read_boxes`: everything `base` adds on top is kept."""
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistLoadShardedStrategy

    class _Read(TorchDistLoadShardedStrategy):
        def load(self, sharded_state_dict, checkpoint_dir):
            return read_boxes(checkpoint_dir, sharded_state_dict)

    return type(f"SingleProcess{base.__name__}", (base, _Read), {})
