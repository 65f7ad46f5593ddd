"""Writing a `torch_dist` checkpoint batch by batch, as megatron-core's save would lay it out.

Each batch of grown pieces becomes one `.distcp` file (`__{batch}_0.distcp`), written by torch
DCP's `FileSystemWriter` without fsync (the caller syncs files in the background while the
next batch grows). Once every batch file is durable, `finish` writes one `.metadata` over all
of them, the common state in the form the installed megatron-core saves (`compat`), and
`metadata.json`, and makes them durable. Batches are independent, so any process (or rank)
can write any batch into the same directory.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from .. import compat
from ..errors import CheckpointError
from ..manifest import ObjectRef, Piece
from .safe_pickle import torch_save


def write_batch(out_dir: Path, number: int, pieces: Sequence[Piece], objects: Sequence[ObjectRef],
                values: dict) -> list:
    """Write `pieces` (values[f"t{i}"]) and `objects` (values[f"o{i}"]) into batch file
    `number`; returns torch DCP's write results, which `finish` needs."""
    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

    items, data = [], {}
    for i, piece in enumerate(pieces):
        chunk = _chunk(piece)
        index = MetadataIndex(piece.box.key, chunk.offsets)
        items.append(WriteItem(index=index, type=WriteItemType.SHARD, tensor_data=TensorWriteData(
            chunk=chunk, properties=tensor_properties(piece.dtype), size=torch.Size(piece.box.global_shape))))
        data[index] = values[f"t{i}"].reshape(chunk.sizes)
    for i, obj in enumerate(objects):
        index = MetadataIndex(obj.storage_key)
        items.append(WriteItem(index=index, type=WriteItemType.BYTE_IO))
        data[index] = object_bytes(values[f"o{i}"])
    return write_items(out_dir, number, items, data)


def write_items(out_dir: Path, number: int, items: list, data: dict) -> list:
    """torch DCP write items (`data`: index → tensor or bytes) into batch file `number`,
    unsynced; any format built on DCP's files (torch_dist, fsdp_dtensor) writes through this."""
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.filesystem import _StoragePrefix
    from torch.distributed.checkpoint.planner import SavePlan

    writer = FileSystemWriter(out_dir, single_file_per_rank=True, sync_files=False, thread_count=1)
    plan = SavePlan(items, storage_data=_StoragePrefix(f"__{number}_"))
    try:
        with _without_zip_checksums():
            return writer.write_data(plan, _Resolver(data)).wait()
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        raise CheckpointError(f"writing {out_dir} failed ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:300]}); is its file system full or "
                              "read-only?") from None


def finish(out_dir: Path, pieces: Sequence[Piece], objects: Sequence[ObjectRef], results: list,
           common: dict[str, Any], metadata_json: bytes, common_number: int) -> None:
    """Write the common state, `.metadata` over every batch's results and `metadata.json`,
    all durable. `common_number`: the batch file number the common state object may use."""
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex
    from torch.distributed.checkpoint.planner import WriteItem, WriteItemType

    metadata = _metadata(pieces, objects)
    results = list(results)
    if compat.saves_common_state_object():
        key = compat.common_state_storage_key()
        index = MetadataIndex(key)
        written = write_items(out_dir, common_number, [WriteItem(index=index, type=WriteItemType.BYTE_IO)],
                         {index: object_bytes(common)})
        fsync(out_dir / written[0].storage_data.relative_path)
        results.append(written)
        metadata.state_dict_metadata[key] = BytesStorageMetadata()
    else:
        with open(out_dir / compat.COMMON_STATE_FILE, "wb") as f:
            torch_save(common, f)
            f.flush()
            os.fsync(f.fileno())
    writer = FileSystemWriter(out_dir, single_file_per_rank=True)
    writer.set_up_storage_writer(True)
    writer.finish(metadata, results)  # writes .metadata (temporary name, fsync, rename)
    with open(out_dir / "metadata.json", "wb") as f:
        f.write(metadata_json)
        f.flush()
        os.fsync(f.fileno())
    fsync(out_dir)


def fsync_results(out_dir: Path, results) -> None:
    """Make the files a batch wrote durable, and drop them from the page cache: nothing here
    reads them again, and a cache full of written pages makes every later write slower
    (measured at 4 GB: the whole grow in half the time)."""
    for name in {r.storage_data.relative_path for r in results}:
        fsync(out_dir / name, drop_cache=True)


def fsync(path: Path, drop_cache: bool = False) -> None:
    """Make a file, or a directory's entries, durable; `drop_cache`: then evict its pages
    (where the OS has posix_fadvise: Linux)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        if drop_cache and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def object_bytes(obj) -> io.BytesIO:
    """Serialised as megatron-core's torch_dist save does (a one-element list)."""
    return pickled([obj])


def pickled(obj) -> io.BytesIO:
    """`obj` as torch.save writes it, megatron-core enums read as stand-ins written back as
    themselves (`safe_pickle.torch_save`)."""
    buf = io.BytesIO()
    torch_save(obj, buf)
    buf.seek(0)
    return buf


def _chunk(piece: Piece):
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

    box = piece.box
    return ChunkStorageMetadata(torch.Size(box.global_offset), torch.Size((1,) * len(box.index) + box.shape))


def _metadata(pieces: Sequence[Piece], objects: Sequence[ObjectRef]):
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, TensorStorageMetadata

    state = {}
    for piece in pieces:
        md = state.setdefault(piece.box.key, TensorStorageMetadata(
            tensor_properties(piece.dtype), torch.Size(piece.box.global_shape), []))
        md.chunks.append(_chunk(piece))
    state.update({o.storage_key: BytesStorageMetadata() for o in objects})
    return Metadata(state_dict_metadata=state)


def tensor_properties(dtype: torch.dtype):
    """DCP's per-tensor properties: the dtype alone, as megatron-core's save records it."""
    from torch.distributed.checkpoint.metadata import TensorProperties

    return TensorProperties(dtype=dtype)


def _without_zip_checksums():
    """torch.load does not check the CRC32 of a record, and torch.save computes it at a
    fraction of disk speed (measured: saving tensors ran 4x faster without it)."""
    from torch.utils.serialization import config

    return config.patch({"save.compute_crc32": False})


class _Resolver:
    """The one planner method `FileSystemWriter.write_data` calls."""

    def __init__(self, data):
        self.data = data

    def resolve_data(self, item):
        return self.data[item.index]
