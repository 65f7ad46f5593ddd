"""Reading boxes of a `torch_dist` checkpoint in one process, without torch.distributed, and
without running code from the checkpoint.

megatron-core's own reader turns requests into torch ShardedTensors on a regular grid and
counts the missing grid cells as "other ranks' shards", which cannot work in a world of one
for partial tensors. The offline tools read in plain processes, so they ask torch DCP for
the boxes directly: each request (ours, `TensorRequest` / `ObjectRequest`, or megatron-core's
ShardedTensor / ShardedObject, which carry the same fields) becomes DCP read items for exactly
its box, read into the request's own tensor; megatron-core is never imported here. `.metadata` is
unpickled with an allow-list and objects with `weights_only=True` (torch DCP's own planner
unpickles objects with `weights_only=False`). Requests name torch_dist keys; an
`fsdp_dtensor` checkpoint's are translated to what it stores (`fsdp_dtensor.py`).
"""

from __future__ import annotations

import functools
import io
import sys
import warnings
from dataclasses import dataclass
from typing import Optional
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

from ..errors import CheckpointError, GrowthError
from ..mapping import Box, object_storage_key
from .safe_pickle import forbidden, load, load_metadata, refusal


class SafeFileSystemReader(FileSystemReader):
    """torch DCP's file reader with `.metadata` unpickled safely, once per process (the
    offline tools read a checkpoint batch by batch)."""

    def __init__(self, checkpoint_dir):
        super().__init__(str(Path(checkpoint_dir)))
        self.checkpoint_dir = Path(checkpoint_dir)

    def read_metadata(self) -> Metadata:
        path = self.checkpoint_dir / ".metadata"
        try:
            stat = path.stat()
        except OSError:
            return load_metadata(path)  # raises, naming the file
        return _cached_metadata(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _cached_metadata(path: str, mtime_ns: int, size: int) -> Metadata:
    return load_metadata(Path(path))  # keyed by mtime and size: never stale


@dataclass
class TensorRequest:
    """A read of the box of tensor `key` at `global_offset` (prepended indices first) into
    `data` (`local_shape`: the box's shape, default `data`'s)."""

    key: str
    data: torch.Tensor
    global_shape: tuple
    global_offset: tuple
    prepend_axis_num: int = 0
    local_shape: Optional[tuple] = None

    def __post_init__(self):
        if self.local_shape is None:
            self.local_shape = tuple(self.data.shape)


@dataclass(frozen=True)
class ObjectRequest:
    """A read of the object torch_dist stores for `key` at `global_offset` of `global_shape`
    (a megatron-core ShardedObject's fields)."""

    key: str
    global_shape: tuple
    global_offset: tuple

    @property
    def unique_key(self) -> str:
        return object_storage_key(self.key, self.global_shape, self.global_offset)


def _megatron_requests() -> tuple:
    """megatron-core's request types, where it is imported (only then can a request be one)."""
    mapping = sys.modules.get("megatron.core.dist_checkpointing.mapping")
    return () if mapping is None else (mapping.ShardedTensor, mapping.ShardedObject)


def is_tensor_request(request) -> bool:
    return isinstance(request, (TensorRequest, *_megatron_requests()[:1]))


def is_object_request(request) -> bool:
    """Ours or megatron-core's ShardedObject (not a `StoredObject`)."""
    return isinstance(request, (ObjectRequest, *_megatron_requests()[1:]))


@dataclass(frozen=True)
class StoredObject:
    """A request for the object torch DCP stores under `key`, as it is (megatron-core's
    ShardedObjects are one-element lists under their `unique_key`)."""

    key: str


class _BoxPlanner(LoadPlanner):
    """Reads each requested box into its destination tensor (and objects into a dict)."""

    def __init__(self, checkpoint_dir, requests: dict):
        self.checkpoint_dir = checkpoint_dir
        self.requests = requests
        self.targets: dict[MetadataIndex, torch.Tensor] = {}
        self.objects: dict[str, object] = {}
        self.names_of_objects: dict[str, list[str]] = {}
        self._chunks_by_index: dict[str, dict] = {}

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:
        self.metadata = metadata

    def create_local_plan(self) -> LoadPlan:
        items = []
        stored = self.metadata.state_dict_metadata
        for name, sh in self.requests.items():
            if isinstance(sh, StoredObject) or is_object_request(sh):
                key = sh.key if isinstance(sh, StoredObject) else sh.unique_key
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
        prepend = sh.prepend_axis_num
        if not prepend:
            return md
        by_index = self._chunks_by_index.get(sh.key)
        if by_index is None:
            by_index = {}
            for c in md.chunks:
                single = all(n == 1 for n in c.sizes[:prepend])
                by_index.setdefault(tuple(c.offsets[:prepend]) if single else None, []).append(c)
            self._chunks_by_index[sh.key] = by_index
        if None in by_index:  # chunks spanning several layers/experts: match against all
            return md
        return TensorStorageMetadata(md.properties, md.size,
                                     by_index.get(tuple(sh.global_offset[:prepend]), []))

    def create_global_plan(self, global_plan):
        return global_plan

    def finish_plan(self, central_plan):
        return central_plan

    def load_bytes(self, read_item, value) -> None:
        fqn = read_item.dest_index.fqn
        try:
            obj = load(value)
            if isinstance(obj, io.BytesIO):  # saved through torch DCP's default planner, which
                obj = load(obj)  # wraps bytes once more (as megatron-core reads it)
            self.objects[fqn] = obj
        except Exception as e:
            what = refusal(e) if forbidden(e) else f"garbled ({type(e).__name__}: {e})"
            raise CheckpointError(f"{self.checkpoint_dir}: object {fqn!r}: {what}") from None

    def resolve_tensor(self, read_item):
        view = self.targets[read_item.dest_index]
        for dim, (offset, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            view = view.narrow(dim, offset, length)
        return view

    def commit_tensor(self, read_item, tensor) -> None:
        pass  # resolve_tensor returned a view of the destination: already in place


def tensor_request(key: str, data: torch.Tensor, global_shape, global_offset, prepend_axis_num: int = 0):
    """A read request: the box of `key` at `global_offset` (prepended indices first) the shape
    of `data`, into `data`."""
    return TensorRequest(key, data, tuple(global_shape), tuple(global_offset), prepend_axis_num)


def box_request(box: Box, dtype: torch.dtype, into: Optional[torch.Tensor] = None):
    """A read request for `read_boxes`: `box` into `into` (default: a fresh tensor of `dtype`)."""
    return tensor_request(box.key, torch.empty(box.shape, dtype=dtype) if into is None else into,
                          box.global_shape, box.global_offset, len(box.index))


def read_boxes(checkpoint_dir, requests: dict) -> dict:
    """`requests`: name → tensor request (its `data` is filled in place, so it must be
    contiguous), object request or StoredObject, by torch_dist key. Returns name → tensor or
    object, like megatron-core."""
    from .fsdp_dtensor import open_checkpoint

    stored = open_checkpoint(Path(checkpoint_dir))
    if stored is None:
        return read_stored(checkpoint_dir, requests)
    values = read_stored(checkpoint_dir, stored.stored_requests(requests))
    return {name: values[name] if name in values else sh.data for name, sh in requests.items()}


def read_stored(checkpoint_dir, requests: dict) -> dict:
    """`read_boxes` by the keys the checkpoint stores (no translation)."""
    for name, sh in requests.items():
        data = getattr(sh, "data", None)
        if isinstance(data, torch.Tensor) and not data.is_contiguous():
            raise ValueError(f"{name}: destination tensors must be contiguous")
    out = {}
    for part in _without_shared_corners(requests):
        out.update(_read(checkpoint_dir, part))
    return out


def _without_shared_corners(requests: dict) -> list[dict]:
    """The requests split so that no two boxes of one tensor start at the same place in one
    read: torch DCP addresses a destination by (tensor, offset) (a slice of a unit and the
    whole unit, both at its origin, would collide)."""
    parts: list[dict] = []
    for name, sh in requests.items():
        corner = (sh.key, tuple(getattr(sh, "global_offset", ())))
        part = next((p for p in parts if corner not in p["corners"]), None)
        if part is None:
            part = {"corners": set(), "requests": {}}
            parts.append(part)
        if hasattr(sh, "data"):
            part["corners"].add(corner)
        part["requests"][name] = sh
    return [p["requests"] for p in parts]


def _read(checkpoint_dir, requests: dict) -> dict:
    planner = _BoxPlanner(checkpoint_dir, requests)
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
        try:
            dcp_load({}, storage_reader=SafeFileSystemReader(checkpoint_dir), planner=planner,
                     no_dist=True)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # torch DCP wraps failures in a BaseException
            cause = _cause(e)
            if isinstance(cause, GrowthError) or not isinstance(cause, Exception):
                raise cause from None  # ours, or Ctrl-C / SIGTERM while reading
            raise CheckpointError(f"{checkpoint_dir}: reading its tensors failed "
                                  f"({_first_line(cause)}); the checkpoint is corrupt or "
                                  "unreadable") from None
    objects = {n for names in planner.names_of_objects.values() for n in names}
    out = {name: sh.data for name, sh in requests.items() if name not in objects}
    for key, names in planner.names_of_objects.items():
        value = planner.objects[key]
        for name in names:
            if isinstance(requests[name], StoredObject):
                out[name] = value
            else:
                (out[name],) = value  # megatron-core stores each object as a 1-element list
    return out


def read_object(checkpoint_dir, key: str, global_shape=(1,), global_offset=(0,)):
    """One ShardedObject's value."""
    return read_boxes(checkpoint_dir, {"o": ObjectRequest(key, tuple(global_shape), tuple(global_offset))})["o"]


def _cause(e: BaseException) -> BaseException:
    """The exception torch DCP's CheckpointException wraps (per rank), else `e`."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        wrapped = next(iter(failures.values()))
        return wrapped[0] if isinstance(wrapped, tuple) else wrapped
    return e


def _first_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}"
