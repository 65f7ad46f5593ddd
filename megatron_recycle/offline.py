"""Offline growth: source checkpoint → grown `torch_dist` (or, from an `fsdp_dtensor` source,
`fsdp_dtensor`: `io/formats.py` chooses the writer) checkpoint, streamed.

1. Plan: the manifest (`manifest.py`) lists every piece and object the grown checkpoint holds,
   from the source metadata and the plan alone; it is cut into batches bounded in bytes.
2. Check, before anything is written: the options, the source's files against its
   `integrity.json` where it has one, the destination (`io/destination.py`: lock, what
   `--overwrite` may replace, free space).
3. Grow and write: each batch is grown by the load hook's own code (`engine.grow_state_dict`,
   so the output is the hook's output by construction) from boxes read in this process, and
   written as one more `.distcp` file into a private staging directory; one process grows a
   batch while it writes the previous one, and files are fsynced in the background. Batches
   are independent: `--workers N` processes, or the ranks of a torch.distributed job
   (torchrun / srun, gloo), share them.
4. Commit: once every batch file is durable, one `.metadata` over all batches, the common
   state (grown args, provenance), `metadata.json`, the files the source's framework keeps
   beside the weights (`companions.py`: Megatron-Bridge's run_config.yaml, train state), the
   iteration's own (`io/iteration_files.py`: the tokenizer, and an `integrity.json` over the
   grown files where the source has one) and last the tracker file are written; the source is
   checked to be what it was when the grow started (`io/snapshot.py`: every rank after its
   last read, rank 0 again here), and the staging directory is renamed to the destination.
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from . import __version__, companions, hybrid, merge, policy, upcycling
from .cost import human
from .distributed import Job
from .errors import GrowthError
from .io import formats
from .io.checkpoint import TRACKER_FILE, CheckpointInfo, resolve
from .io.destination import Destination, tree_bytes
from .io.iteration_files import IterationFiles
from .io.snapshot import SourceSnapshot
from .manifest import Batch, batches, keeps_optimizer, target_objects, target_pieces
from .options import Growth
from .plan import GrowthPlan
from .provenance import KEY as PROVENANCE_KEY
from .provenance import Provenance, SourceRef

Log = Callable[[str], None]


class BatchGrower:
    """Grows and writes batches into one output directory; one per process."""

    def __init__(self, source: CheckpointInfo, out_dir: Path, plan: GrowthPlan, optimizer: str,
                 second: Optional[CheckpointInfo], writer):
        self.source, self.out_dir = source, out_dir
        self.plan, self.optimizer, self.second, self.writer = plan, optimizer, second, writer

    def run(self, batch: Batch):
        return batch.number, self.write(batch, self.grow(batch))

    def run_pipelined(self, work: list[Batch], done: Callable) -> None:
        """Grow each batch while the previous one is written (two batches in memory at most):
        writing is mostly the kernel copying into the page cache, growing is reading and noise."""
        with ThreadPoolExecutor(1) as writer:
            writing = None
            for batch in work:
                grown = self.grow(batch)
                if writing is not None:
                    done(*writing.result())
                writing = writer.submit(lambda b=batch, g=grown: (b.number, self.write(b, g)))
            if writing is not None:
                done(*writing.result())

    def grow(self, batch: Batch) -> dict:
        from .engine import grow_state_dict
        from .io.reader import ObjectRequest, box_request

        request = {f"t{i}": box_request(p.box, p.dtype) for i, p in enumerate(batch.pieces)}
        for i, o in enumerate(batch.objects):
            request[f"o{i}"] = ObjectRequest(o.key, tuple(o.global_shape), tuple(o.offset))
        return grow_state_dict(self.plan, self.source, request,
                               self.source.read_boxes, self.optimizer, self.second)

    def write(self, batch: Batch, grown: dict) -> list:
        return self.writer.write_batch(self.out_dir, batch.number, batch.pieces, batch.objects, grown)


_grower: Optional[BatchGrower] = None  # one per worker process of a pool


def _init_worker(*args) -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops the pool
    global _grower
    _grower = BatchGrower(*args)


def _run_batch(batch: Batch):
    return _grower.run(batch)


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


def tracker_text(info: CheckpointInfo) -> str:
    """What `latest_checkpointed_iteration.txt` of the grown root says: the source's iteration."""
    name = info.path.name
    if name == "release" or (name.startswith("iter_") and name[5:].isdigit()):
        return "release" if name == "release" else str(int(name[5:]))
    raise GrowthError(f"--load {info.path}: an iteration directory must be named iter_XXXXXXX "
                      "or release (Megatron-LM finds iterations by that name)")


def grown_model_args(plan: GrowthPlan, recorded: Callable[[str], object], dense_hidden) -> dict:
    """The model arguments (Megatron-LM names) that growth changes, and their grown values;
    `recorded(name)`: the source's value, or None. Pipeline stage sizes keep their stage
    boundaries: a stage gets every copy of the layers it had."""
    target = plan.target
    out: dict = {"num_layers": target.num_layers}
    if target.is_moe:
        out["num_experts"] = target.num_experts
        out["moe_router_topk"] = target.topk
    if target.is_hybrid:  # as many pipeline segments as the source's pattern had
        for name in ("hybrid_layer_pattern", "hybrid_override_pattern"):
            if recorded(name):
                segments = recorded(name).partition(hybrid.MTP)[0].count(hybrid.PIPE) + 1
                out[name] = plan.target_hybrid_pattern(segments)
    elif target.moe_layer_freq() is not None:
        out["moe_layer_freq"] = target.moe_layer_freq()
    if not target.is_hybrid:
        first, last = "decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers"
        if recorded(first):
            out[first] = sum(1 for s in plan.layer_map if s < recorded(first))
        if recorded(last):
            out[last] = sum(1 for s in plan.layer_map if s >= plan.source.num_layers - recorded(last))
    out.update(upcycling.model_args(plan, recorded("ffn_hidden_size") or dense_hidden))
    return out


def grown_common(info: CheckpointInfo, plan: GrowthPlan, keep_optimizer: bool, optimizer: str,
                 second: Optional[CheckpointInfo] = None, output_format: str = formats.TORCH_DIST) -> dict:
    """The common state of the grown checkpoint: args describe the grown model; provenance."""
    common = copy.copy(info.common)
    if info.args is not None:
        args = copy.copy(info.args)
        for name, value in grown_model_args(plan, lambda n: getattr(args, n, None), info.dense_hidden()).items():
            setattr(args, name, value)
        if getattr(args, "ckpt_format", None) is not None:
            args.ckpt_format = output_format  # what is written, whatever the source was saved as
        common["args"] = args
    if not keep_optimizer:
        common.pop("optimizer", None)
    common[PROVENANCE_KEY] = Provenance(
        source=SourceRef(os.path.realpath(info.path), info.iteration),
        plan=plan.describe(),
        optimizer_policy=optimizer,
        optimizer="grown" if keep_optimizer else "dropped",
        grown_by="offline",
        version=__version__,
        previous=info.provenance,
        second=None if second is None else merge.reference(second),
    ).to_dict()
    return common


def grow(
    source: str | os.PathLike,
    dest: str | os.PathLike,
    growth: Growth = Growth(),
    step: Optional[int] = None,
    overwrite: bool = False,
    workers: int = 1,
    batch_bytes: int = 1 << 30,
    remove_stale_staging: bool = False,
    ckpt_format: Optional[str] = None,
    log: Log = lambda s: print(s, file=sys.stderr, flush=True),
) -> GrowResult:
    """Grow the checkpoint at `source` into a new checkpoint root `dest`.

    `growth.optimizer`: copy / zero (grow a model-space optimizer state; copies' moments
    copied or zeroed) or reset (drop it). In a torch.distributed job every rank calls this with the
    same arguments and grows its share of the batches; rank 0 holds the destination's lock,
    writes the metadata and commits. `ckpt_format`: what to write (`io.formats.output_format`;
    by default the source's format where it is written, else torch_dist)."""
    start = time.monotonic()
    pinned = SourceSnapshot.take(resolve(source, step))  # before anything is read from it
    info = CheckpointInfo.read(source, step)
    tracker = tracker_text(info)
    plan = growth.plan(info.architecture())
    output = formats.output_format(info.format, ckpt_format)
    # pinned as the source is, before it is read
    second = None if growth.second is None else merge.Second.read(info, growth.second)
    second_info = None if second is None else second.info
    optimizer = growth.optimizer
    keep_optimizer = policy.grows_optimizer(optimizer) and keeps_optimizer(info, output)
    if second is not None and keep_optimizer:
        merge.check_optimizer(info, second_info)
    if workers < 1:
        raise GrowthError(f"--workers must be >= 1, got {workers}")
    job = Job.current()
    log = log if job.rank == 0 else (lambda s: None)
    destination = Destination(dest, overwrite, parts=(TRACKER_FILE, info.path.name),
                              log=lambda s: log(f"grow: {s}"))
    destination.check_overlap(info.path)
    plan.require_growth()  # after the destination's checks, which say more about a mistyped --save
    framework_files = companions.of(info)  # read and checked before anything is written
    if framework_files is not None:
        framework_files.grown_config(plan, info.dense_hidden())
    iteration_files = IterationFiles.of(info.path)
    job.on_rank0(iteration_files.check_source)  # reads the source once, where it has a manifest

    notes = list(plan.exactness_notes()) + info.reading_notes()
    if info.optimizer_format and optimizer == "reset":
        notes.append("optimizer state dropped (--grow-optimizer reset): load the grown "
                     "checkpoint with --no-load-optim")
    elif info.optimizer_format and not keep_optimizer:
        notes.append(f"optimizer state ({info.optimizer_format}) cannot be grown into {output} (growth "
                     f"maps {', '.join(formats.CARRIED_OPTIMIZERS[output])} there); it is dropped: load "
                     "the grown checkpoint with --no-load-optim")
    if framework_files is not None:
        notes += framework_files.notes(plan, info.dense_hidden())
    pieces = target_pieces(info, plan, max(batch_bytes // 4, 1), keep_optimizer)
    objects = target_objects(info, plan, keep_optimizer)
    writer = formats.writer(output, info, plan, keep_optimizer, pieces)
    work = batches(pieces, objects, batch_bytes)
    total = sum(b.nbytes for b in work)

    def open_staging() -> Path:
        stack.enter_context(destination)
        stale = destination.stale_staging()
        if stale and remove_stale_staging:
            destination.remove_stale_staging(lambda s: log(f"grow: {s}"))
        elif stale:
            size = human(sum(tree_bytes(p) for p in stale), "B")
            log(f"grow: note: {len(stale)} staging director{'y' if len(stale) == 1 else 'ies'} of "
                f"interrupted runs beside {destination.given} ({', '.join(p.name for p in stale)}; "
                f"{size}); remove them with --remove-stale-staging")
        for note in destination.moved_aside_notes():
            log(f"grow: note: {note}")
        destination.check_space(total)
        (destination.staging / info.path.name).mkdir()
        return destination.staging

    def commit() -> None:
        from .io.writer import fsync

        results = [per_rank[number % job.world][number] for number in range(len(work))]
        writer.finish(out_dir, pieces, objects, results,
                      grown_common(info, plan, keep_optimizer, optimizer, second_info, output),
                      info.metadata_json(), common_number=len(work))
        if framework_files is not None:
            for path in framework_files.write(staging, out_dir, plan, info.dense_hidden()):
                fsync(path)
        for path in iteration_files.write(out_dir):
            fsync(path)
        sealed = iteration_files.seal(out_dir)  # hashes every file above: after them
        if sealed is not None:
            fsync(sealed)
        fsync(out_dir)  # the entries added since `finish`
        (staging / TRACKER_FILE).write_text(tracker)  # last: only now is it a checkpoint
        fsync(staging / TRACKER_FILE)
        pinned.check()  # after every rank's last read
        if second is not None:
            second.check_unchanged()
        destination.commit()

    with contextlib.ExitStack() as stack:  # on rank 0: the destination's lock and staging
        staging = job.on_rank0(open_staging)
        out_dir = staging / info.path.name
        log(f"grow: {info.path} -> {destination.given}: {plan.source.num_layers}->"
            f"{plan.target_num_layers} layers, {plan.source.num_experts}->{plan.target_num_experts} "
            f"experts; {len(pieces)} tensor pieces, {human(total, 'B')} in {len(work)} batches, "
            f"{job.world} rank(s) x {workers} process(es)")
        mine = [b for b in work if b.number % job.world == job.rank]
        workers = _processes(workers, len(mine), log)

        def grow_mine() -> dict:
            results = _execute(mine, (info, out_dir, plan, optimizer, second_info, writer), workers, start, log)
            pinned.check()  # what this rank read (its window overlaps every other rank's)
            if second is not None:
                second.check_unchanged()
            return results

        per_rank = job.on_every_rank(grow_mine)
        job.on_rank0(commit)
    for note in notes:
        log(f"grow: note: {note}")
    seconds = time.monotonic() - start
    log(f"grow: wrote {destination.given} ({human(total, 'B')}) in {seconds:.1f} s")
    return GrowResult(destination.path, destination.path / info.path.name, plan, len(pieces), total,
                      seconds, notes)


def _processes(workers: int, batches: int, log: Log) -> int:
    """`--workers`, capped: never more processes than batches to grow, nor than the cores this
    process may use (more would only multiply the memory)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    processes = max(1, min(workers, batches, cores))
    if processes < workers:
        log(f"grow: note: --workers {workers}, but this rank has {batches} batch(es) and {cores} "
            f"core(s): running {processes} process(es)")
    return processes


def _execute(work: list[Batch], grower_args, workers: int, start: float, log: Log) -> dict:
    """Grow and write `work`; returns batch number → write results. Each batch's files are
    fsynced in the background, all before this returns."""
    from .io.writer import fsync_results

    out_dir = grower_args[1]
    results: dict = {}
    total = sum(b.nbytes for b in work)
    done_bytes = 0
    with ThreadPoolExecutor(1) as syncer:
        syncs = []

        def done(number: int, result) -> None:
            nonlocal done_bytes
            results[number] = result
            syncs.append(syncer.submit(fsync_results, out_dir, result))
            done_bytes += next(b.nbytes for b in work if b.number == number)
            elapsed = time.monotonic() - start
            left = elapsed * (total - done_bytes) / done_bytes if done_bytes else float("nan")
            log(f"grow: batch {len(results)}/{len(work)}, {human(done_bytes, 'B')}/{human(total, 'B')}, "
                f"{elapsed:.0f} s elapsed, ~{max(left, 0):.0f} s left")

        if workers == 1:
            BatchGrower(*grower_args).run_pipelined(work, done)
        else:
            import multiprocessing

            # spawn: a forked copy of a process holding torch/gloo state is not safe to use
            with multiprocessing.get_context("spawn").Pool(workers, _init_worker, grower_args) as pool:
                for number, result in pool.imap_unordered(_run_batch, work):
                    done(number, result)
        for sync in syncs:
            sync.result()
    return results
