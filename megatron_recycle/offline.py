"""Offline growth: source checkpoint → grown `torch_dist` checkpoint, streamed.

Plan/execute split: `target_units` lists, from the source metadata and the plan alone, every
tensor piece the grown checkpoint holds (one per target layer/expert unit, big dense units
cut into row blocks) and every ShardedObject. `grow` cuts that list into batches bounded in
bytes, and for each batch asks the load hook (`GrowthLoadStrategy`) for exactly those target
pieces — so the output is the hook's output by construction — and writes them with torch
DCP's `FileSystemWriter` as one more `.distcp` file, fsynced in the background. Once every
batch file is durable, one `.metadata` over all batches is written, then `common.pt`,
`metadata.json` and last the tracker file, all in a temporary sibling directory renamed to
DST. One process grows a batch while it writes the previous one; batches are independent, so
several processes can also grow them in parallel. Memory stays near two batches per process.
"""

from __future__ import annotations

import copy
import io
import itertools
import math
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from . import __version__, keys
from .checkpoint import PROVENANCE_KEY, TRACKER_FILE, CheckpointInfo
from .plan import DepthGrowth, GrowthError, GrowthPlan, WidthGrowth
from .resume import MODEL_SPACE_OPTIMIZER_FORMATS, check_optimizer_policy

OBJECT_SHARD = "/shard_"  # ShardedObject storage key: `{key}/shard_{offset}_{shape}`


@dataclass(frozen=True)
class TensorPiece:
    """One target tensor piece: a whole layer/expert unit or a row block of a big one."""

    key: str
    global_shape: tuple[int, ...]
    offset: tuple[int, ...]  # global offset, prepended axes included
    shape: tuple[int, ...]  # local shape, prepended axes excluded
    prepend: int
    dtype: torch.dtype
    order: tuple  # source key and unit first: copies of one source unit stay together

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize



@dataclass(frozen=True)
class ObjectPiece:
    key: str
    global_shape: tuple[int, ...]
    offset: tuple[int, ...]

    @property
    def storage_key(self) -> str:
        return f"{self.key}{OBJECT_SHARD}{_dotted(self.offset)}_{_dotted(self.global_shape)}"


def _dotted(xs) -> str:
    return ".".join(map(str, xs))


def parse_object_key(storage_key: str) -> ObjectPiece:
    key, _, rest = storage_key.rpartition(OBJECT_SHARD)
    offset, _, shape = rest.partition("_")
    as_ints = lambda s: tuple(int(x) for x in s.split(".") if x != "")  # noqa: E731
    return ObjectPiece(key, as_ints(shape), as_ints(offset))


def stacked_axes(key: str) -> int:
    """How many leading axes of a stored tensor index layers/experts (its prepend_axis_num)."""
    lay = keys.parse_key(key, 2)
    return (lay.layer_axis is not None) + (lay.expert_axis is not None)


def keeps_optimizer(info: CheckpointInfo) -> bool:
    return info.optimizer_format in MODEL_SPACE_OPTIMIZER_FORMATS


def _grown_axes(plan: GrowthPlan, lay: keys.KeyLayout, shape, row_axis: Optional[int]) -> tuple[int, ...]:
    """The target global shape: layer, expert and router-row axes resized by the plan."""
    out = list(shape)
    if lay.decoder and lay.layer_axis is not None:
        out[lay.layer_axis] = plan.target_num_layers
    if lay.expert_axis is not None:
        out[lay.expert_axis] = plan.target_num_experts
    if row_axis is not None and lay.expert_rows and plan.source.is_moe:
        out[row_axis] = plan.target_num_experts
    return tuple(out)


def _target_keys(plan: GrowthPlan, lay: keys.KeyLayout) -> list[tuple[str, tuple]]:
    """(target key, (source layer, source expert)) for each target key made from `lay`'s key:
    several where layer/expert indices are written in the key, else the key itself."""
    layer = lay.layer_in_key if lay.decoder else None
    layers = [None] if layer is None else [
        t for t in range(plan.target_num_layers) if plan.layer_map[t] == layer]
    experts = [None] if lay.expert_in_key is None else [
        e for e in range(plan.target_num_experts) if plan.expert_source(e)[0] == lay.expert_in_key]
    return [(lay.with_indices(t, e), (layer, lay.expert_in_key)) for t in layers for e in experts]


def target_tensors(info: CheckpointInfo, plan: GrowthPlan, keep_optimizer: Optional[bool] = None,
                   ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every tensor of the grown checkpoint: key → (global shape, dtype)."""
    out = {}
    for key, shape in _source_tensors(info, keep_optimizer).items():
        p = stacked_axes(key)
        lay = keys.parse_key(key, p)
        grown = _grown_axes(plan, lay, shape, row_axis=p)
        for target_key, _ in _target_keys(plan, lay):
            out[target_key] = (grown, info.dtypes[key])
    return out


def _source_tensors(info: CheckpointInfo, keep_optimizer: Optional[bool]) -> dict[str, tuple[int, ...]]:
    """The source tensors to grow; the optimizer's only where kept (None: where growable)."""
    keep = keeps_optimizer(info) if keep_optimizer is None else keep_optimizer
    return info.shapes if keep else info.model_shapes()


def target_units(info: CheckpointInfo, plan: GrowthPlan, max_piece_bytes: int,
                 keep_optimizer: Optional[bool] = None) -> list[TensorPiece]:
    """Every target tensor piece, in source order. Units without experts larger than
    `max_piece_bytes` are cut into row blocks; expert units stay whole because their noise
    is drawn per whole expert matrix anyway."""
    pieces = []
    for key, shape in _source_tensors(info, keep_optimizer).items():
        p = stacked_axes(key)
        lay = keys.parse_key(key, p)
        grown = _grown_axes(plan, lay, shape, row_axis=p)
        dtype = info.dtypes[key]
        for target_key, source_index in _target_keys(plan, lay):
            unit = grown[p:]
            rows = _row_block(unit, dtype, max_piece_bytes) if not lay.has_expert else None
            for index in itertools.product(*(range(n) for n in grown[:p])):
                order = (key, source_index, _source_prepended(plan, lay, index))
                for start in range(0, unit[0], rows) if rows else [None]:
                    shape_ = unit if start is None else (min(rows, unit[0] - start),) + unit[1:]
                    within = (0,) * len(unit) if start is None else (start,) + (0,) * (len(unit) - 1)
                    pieces.append(TensorPiece(target_key, grown, index + within, shape_, p, dtype,
                                              order + (start or 0,)))
    return sorted(pieces, key=lambda x: x.order)


def _row_block(unit: tuple[int, ...], dtype: torch.dtype, max_bytes: int) -> Optional[int]:
    """Rows per block: the largest divisor of the row count that fits `max_bytes` (megatron-core
    reads the pieces of one tensor as a regular grid, so blocks must be equal)."""
    nbytes = math.prod(unit) * dtype.itemsize
    if not unit or nbytes <= max_bytes or unit[0] < 2:
        return None
    fit = max(1, max_bytes // (nbytes // unit[0]))
    return max(d for d in range(1, fit + 1) if unit[0] % d == 0)


def _source_prepended(plan: GrowthPlan, lay: keys.KeyLayout, index: tuple[int, ...]) -> tuple:
    out = list(index)
    if lay.decoder and lay.layer_axis is not None:
        out[lay.layer_axis] = plan.layer_map[index[lay.layer_axis]]
    if lay.expert_axis is not None:
        out[lay.expert_axis] = plan.expert_source(index[lay.expert_axis])[0]
    return tuple(out)


def target_objects(info: CheckpointInfo, plan: GrowthPlan, object_keys, keep_optimizer: bool,
                   ) -> list[ObjectPiece]:
    """The grown ShardedObjects: each source object once per target layer/expert made from it.
    Objects without layer/expert axes (e.g. RNG state) are kept as they are."""
    out = []
    for storage_key in object_keys:
        obj = parse_object_key(storage_key)
        lay = keys.parse_key(obj.key, len(obj.global_shape))
        if obj.key.startswith("optimizer.") and not keep_optimizer:
            continue
        shape = _grown_axes(plan, lay, obj.global_shape, row_axis=None)
        choices = [[o] for o in obj.offset]
        if lay.decoder and lay.layer_axis is not None:
            choices[lay.layer_axis] = [t for t in range(plan.target_num_layers)
                                       if plan.layer_map[t] == obj.offset[lay.layer_axis]]
        if lay.expert_axis is not None:
            choices[lay.expert_axis] = [e for e in range(plan.target_num_experts)
                                        if plan.expert_source(e)[0] == obj.offset[lay.expert_axis]]
        for target_key, _ in _target_keys(plan, lay):
            out.extend(ObjectPiece(target_key, shape, tuple(o)) for o in itertools.product(*choices))
    return out


# --- execution ----------------------------------------------------------------------------------
@dataclass
class Batch:
    number: int
    tensors: list[TensorPiece]
    objects: list[ObjectPiece]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def batches(pieces: list[TensorPiece], objects: list[ObjectPiece], max_bytes: int) -> list[Batch]:
    out: list[Batch] = []
    current: list[TensorPiece] = []
    current_bytes = 0
    for piece in pieces:
        if current and current_bytes + piece.nbytes > max_bytes:
            out.append(Batch(len(out), current, []))
            current, current_bytes = [], 0
        current.append(piece)
        current_bytes += piece.nbytes
    out.append(Batch(len(out), current, list(objects)))  # objects are small: the last batch
    return out


class _Worker:
    """Grows and writes batches; one per process."""

    def __init__(self, source_dir: Path, out_dir: Path, plan: GrowthPlan, moment_policy: str):
        from .reading import single_process_strategy
        from .strategy import GrowthLoadStrategy

        self.source_dir, self.out_dir = source_dir, out_dir
        self.strategy = single_process_strategy(GrowthLoadStrategy)(plan, moment_policy=moment_policy)

    def run(self, batch: Batch):
        return batch.number, self.write(batch, self.grow(batch))

    def run_pipelined(self, work: list[Batch], progress: Callable) -> None:
        """Grow each batch while the previous one is written (two batches in memory at most):
        writing is mostly the kernel copying into the page cache, growing is reading and noise."""
        with ThreadPoolExecutor(1) as writer:
            writing = None
            for batch in work:
                grown = self.grow(batch)
                if writing is not None:
                    progress(*writing.result())
                writing = writer.submit(lambda b=batch, g=grown: (b.number, self.write(b, g)))
            progress(*writing.result())

    def grow(self, batch: Batch) -> dict:
        from megatron.core.dist_checkpointing.mapping import ShardedObject

        from .reading import box_request

        request = {f"t{i}": box_request(t.key, t.global_shape, t.offset, t.shape, t.prepend, t.dtype)
                   for i, t in enumerate(batch.tensors)}
        for i, o in enumerate(batch.objects):
            request[f"o{i}"] = ShardedObject(o.key, None, o.global_shape, o.offset, replica_id=0)
        return self.strategy.load(request, self.source_dir)

    def write(self, batch: Batch, grown: dict) -> list:
        from torch.distributed.checkpoint import FileSystemWriter
        from torch.distributed.checkpoint.filesystem import _StoragePrefix
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex
        from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

        items, data = [], {}
        for i, t in enumerate(batch.tensors):
            chunk = ChunkStorageMetadata(torch.Size(t.offset), torch.Size((1,) * t.prepend + t.shape))
            index = MetadataIndex(t.key, chunk.offsets)
            items.append(WriteItem(index=index, type=WriteItemType.SHARD, tensor_data=TensorWriteData(
                chunk=chunk, properties=_properties(t.dtype), size=torch.Size(t.global_shape))))
            data[index] = grown[f"t{i}"].reshape(chunk.sizes)
        for i, o in enumerate(batch.objects):
            index = MetadataIndex(o.storage_key)
            items.append(WriteItem(index=index, type=WriteItemType.BYTE_IO))
            data[index] = _object_bytes(grown[f"o{i}"])
        # Not fsynced here: `grow` syncs each batch's file in the background while the next
        # batch is grown, and waits for all of them before the checkpoint is made visible.
        writer = FileSystemWriter(self.out_dir, single_file_per_rank=True, sync_files=False,
                                  thread_count=1)
        plan = SavePlan(items, storage_data=_StoragePrefix(f"__{batch.number}_"))
        with _without_zip_checksums():
            return writer.write_data(plan, _Resolver(data)).wait()


def _without_zip_checksums():
    """torch.load does not check the CRC32 of a record, and torch.save computes it at a
    fraction of disk speed (measured: saving tensors ran 4x faster without it)."""
    from torch.utils.serialization import config

    return config.patch({"save.compute_crc32": False})


def _fsync_batch(out_dir: Path, results) -> None:
    for name in {r.storage_data.relative_path for r in results}:
        _fsync(out_dir / name)


def _fsync(path: Path) -> None:
    """Make a file, or a directory's entries, durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _object_bytes(obj) -> io.BytesIO:
    """Serialised as megatron-core's torch_dist save does (a one-element list)."""
    buf = io.BytesIO()
    torch.save([obj], buf)
    buf.seek(0)
    return buf


def _properties(dtype: torch.dtype):
    from torch.distributed.checkpoint.metadata import TensorProperties

    return TensorProperties(dtype=dtype)


class _Resolver:
    """The one planner method `FileSystemWriter.write_data` calls."""

    def __init__(self, data):
        self.data = data

    def resolve_data(self, item):
        return self.data[item.index]


_worker: Optional[_Worker] = None


def _init_worker(*args) -> None:
    global _worker
    _worker = _Worker(*args)


def _run_batch(batch: Batch):
    return _worker.run(batch)


def _metadata(pieces: list[TensorPiece], objects: list[ObjectPiece]):
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata, ChunkStorageMetadata, Metadata, TensorStorageMetadata)

    state = {}
    for t in pieces:
        md = state.setdefault(t.key, TensorStorageMetadata(_properties(t.dtype), torch.Size(t.global_shape), []))
        md.chunks.append(ChunkStorageMetadata(torch.Size(t.offset), torch.Size((1,) * t.prepend + t.shape)))
    state.update({o.storage_key: BytesStorageMetadata() for o in objects})
    return Metadata(state_dict_metadata=state)


# --- the command ---------------------------------------------------------------------------
@dataclass
class GrowResult:
    path: Path
    iteration_dir: Path
    plan: GrowthPlan
    tensors: int
    bytes: int
    seconds: float
    notes: list[str]


def check_destination(source_dir: Path, dest: Path, overwrite: bool) -> None:
    src_root = source_dir.resolve().parent
    d = dest.resolve()
    for a, b in ((d, source_dir.resolve()), (d, src_root)):
        if a == b or a in b.parents or b in a.parents:
            raise GrowthError(f"--save {dest} overlaps the source checkpoint {source_dir}; "
                              "write the grown checkpoint somewhere else")
    if dest.exists() and not overwrite:
        raise GrowthError(f"--save {dest} already exists; pick a new directory or pass --overwrite")
    if dest.exists() and not dest.is_dir():
        raise GrowthError(f"--save {dest} exists and is not a directory")


def tracker_text(info: CheckpointInfo) -> str:
    """What `latest_checkpointed_iteration.txt` of the grown root says: the source's iteration."""
    name = info.path.name
    if name == "release" or (name.startswith("iter_") and name[5:].isdigit()):
        return "release" if name == "release" else str(int(name[5:]))
    raise GrowthError(f"--load {info.path}: an iteration directory must be named iter_XXXXXXX "
                      "or release (Megatron-LM finds iterations by that name)")


def grown_common(info: CheckpointInfo, plan: GrowthPlan, keep_optimizer: bool, moment_policy: str) -> dict:
    """common.pt of the grown checkpoint: args describe the grown model; provenance added."""
    common = copy.copy(info.common)
    target = plan.target
    if info.args is not None:
        args = copy.copy(info.args)
        args.num_layers = target.num_layers
        if target.is_moe:
            args.num_experts = target.num_experts
            args.moe_router_topk = target.topk
        freq = target.moe_layer_freq()
        if freq is not None:
            args.moe_layer_freq = freq
        common["args"] = args
    if not keep_optimizer:
        common.pop("optimizer", None)
    common[PROVENANCE_KEY] = {
        "source": str(info.path.resolve()),
        "iteration": info.iteration,
        "plan": plan.describe(),
        "seed": plan.width.seed,
        "optimizer_policy": moment_policy if keep_optimizer else "reset",
        "optimizer": "grown" if keep_optimizer and info.optimizer_format else "dropped",
        "version": __version__,
        "previous": info.provenance,
    }
    return common


def grow(
    source: str | os.PathLike,
    dest: str | os.PathLike,
    depth=None,
    width=None,
    optimizer: str = "copy",
    step: Optional[int] = None,
    overwrite: bool = False,
    workers: int = 1,
    batch_bytes: int = 1 << 30,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
) -> GrowResult:
    """Grow the checkpoint at `source` into a new checkpoint root `dest`.

    `optimizer`: copy / zero (grow a model-space optimizer state; copies' moments copied or
    zeroed) or reset (drop it)."""

    start = time.monotonic()
    info = CheckpointInfo.read(source, step)
    dest = Path(dest)
    check_destination(info.path, dest, overwrite)
    tracker = tracker_text(info)
    plan = GrowthPlan(info.architecture(), depth or DepthGrowth(), width or WidthGrowth())
    check_optimizer_policy(optimizer)
    moment_policy = "copy" if optimizer == "reset" else optimizer
    if workers < 1:
        raise GrowthError(f"--workers must be >= 1, got {workers}")

    notes = list(plan.exactness_notes())
    keep_optimizer = optimizer != "reset" and keeps_optimizer(info)
    if info.optimizer_format and optimizer == "reset":
        notes.append("optimizer state dropped (--grow-optimizer reset): load the grown "
                     "checkpoint with --no-load-optim")
    elif info.optimizer_format and not keep_optimizer:
        notes.append(f"optimizer state ({info.optimizer_format}) is tied to the saving job's "
                     "parallel layout and cannot be grown; it is dropped: load the grown "
                     "checkpoint with --no-load-optim")
    pieces = target_units(info, plan, max(batch_bytes // 4, 1), keep_optimizer)
    objects = target_objects(info, plan, info.objects, keep_optimizer)
    work = batches(pieces, objects, batch_bytes)
    total = sum(b.nbytes for b in work)

    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.parent / f".{dest.name}.partial-{os.getpid()}"
    out_dir = staging / info.path.name
    out_dir.mkdir(parents=True)
    log(f"grow: {info.path} -> {dest}: {plan.source.num_layers}->{plan.target_num_layers} layers, "
        f"{plan.source.num_experts}->{plan.target_num_experts} experts; {len(pieces)} tensor "
        f"pieces, {_gib(total)} in {len(work)} batches on {workers} process(es)")
    try:
        with ThreadPoolExecutor(1) as syncer:
            syncs = []
            results = _execute(work, (info.path, out_dir, plan, moment_policy), workers, total, start,
                               log, lambda r: syncs.append(syncer.submit(_fsync_batch, out_dir, r)))
            for done in syncs:
                done.result()
        from torch.distributed.checkpoint import FileSystemWriter

        writer = FileSystemWriter(out_dir, single_file_per_rank=True)
        writer.set_up_storage_writer(True)
        writer.finish(_metadata(pieces, objects), results)
        torch.save(grown_common(info, plan, keep_optimizer, moment_policy), out_dir / "common.pt")
        shutil.copyfile(info.path / "metadata.json", out_dir / "metadata.json")
        (staging / TRACKER_FILE).write_text(tracker)  # last: only now is it a checkpoint
        for path in (out_dir / "common.pt", out_dir / "metadata.json", out_dir, staging / TRACKER_FILE,
                     staging):
            _fsync(path)
        _replace(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for note in notes:
        log(f"grow: note: {note}")
    seconds = time.monotonic() - start
    log(f"grow: wrote {dest} ({_gib(total)}) in {seconds:.1f} s")
    return GrowResult(dest, dest / info.path.name, plan, len(pieces), total, seconds, notes)


def _execute(work: list[Batch], worker_args, workers: int, total: int, start: float, log,
             written: Callable[[list], None]):
    results: list = [None] * len(work)
    done = 0

    def progress(number, result):
        nonlocal done
        results[number] = result
        written(result)
        done += work[number].nbytes
        elapsed = time.monotonic() - start
        left = elapsed * (total - done) / done if done else float("nan")
        log(f"grow: batch {sum(r is not None for r in results)}/{len(work)}, "
            f"{_gib(done)}/{_gib(total)}, {elapsed:.0f} s elapsed, ~{left:.0f} s left")

    if workers == 1:
        _init_worker(*worker_args)
        _worker.run_pipelined(work, progress)
        return results
    import multiprocessing

    # spawn: a forked copy of a process holding torch/gloo state is not safe to use
    with multiprocessing.get_context("spawn").Pool(workers, _init_worker, worker_args) as pool:
        for number, result in pool.imap_unordered(_run_batch, work):
            progress(number, result)
    return results


def _replace(staging: Path, dest: Path) -> None:
    """Rename the finished staging directory to `dest`; an old `dest` is moved aside first
    and removed only once the rename is durable, so some complete checkpoint is always in place."""
    aside = dest.parent / f".{dest.name}.replaced-{os.getpid()}"
    replacing = dest.exists()
    if replacing:
        os.rename(dest, aside)
    os.rename(staging, dest)
    _fsync(dest.parent)
    if replacing:
        shutil.rmtree(aside)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"
