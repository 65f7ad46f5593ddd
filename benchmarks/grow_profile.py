"""Where one offline `megatron-recycle grow` spends its time, stage by stage, in one run.

    python benchmarks/grow_profile.py [--gb 1] [--workdir DIR] [--source ITER_DIR] [--json OUT]

Builds the synthetic source of `load_growth.py` (or takes `--source`), then runs one grow
(depth x2, experts x2, alpha 0.01, one process) in a fresh interpreter that times its stages:
interpreter start, imports (and whether megatron.core was imported), opening the source
(metadata, common state), reading boxes, copies + noise, serializing and writing each batch
(time inside the file's write() calls apart), fsync (with dropping the pages), commit
(metadata, common state, rename), and the exit after `main` returned (`cli.run`).
Stages run on three threads (grow, writer, fsync), so they overlap: each row is the busy
time of its stage and its share of the whole command's wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

GROW_FLAGS = ["--grow-depth", "2", "--grow-experts", "2", "--grow-noise-alpha", "0.01", "--grow-seed", "7"]
# stage → thread it runs on
STAGES = {"interpreter start": "main", "import torch": "main", "import megatron_recycle": "main",
          "open source": "main", "read boxes": "grow", "copies + noise": "grow",
          "serialize": "writer", "write() calls": "writer", "fsync + drop cache": "fsync",
          "plan + checks": "main", "commit": "main", "shutdown": "main"}


def child(source: str, dest: str, spawned: float) -> None:
    """Runs in the profiled interpreter: times the grow's stages, prints them as JSON."""
    started = time.time()
    import threading
    from collections import defaultdict

    t0 = time.perf_counter()
    import torch  # noqa: F401

    t1 = time.perf_counter()
    from megatron_recycle import cli, offline
    from megatron_recycle.io import checkpoint, writer

    t2 = time.perf_counter()
    busy: dict[str, float] = defaultdict(float)
    first_start: dict[str, float] = {}
    last_end: dict[str, float] = {}
    writes = {"count": 0, "bytes": 0}
    lock = threading.Lock()

    def timed(owner, name: str, stage: str):
        inner = getattr(owner, name)

        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                with lock:
                    last_end[stage] = time.perf_counter()
                    first_start.setdefault(stage, start)
                    busy[stage] += last_end[stage] - start
        setattr(owner, name, wrapper)

    engine = __import__("megatron_recycle.engine", fromlist=["grow_state_dict"])
    timed(checkpoint.CheckpointInfo, "read", "open source")
    timed(checkpoint.CheckpointInfo, "read_boxes", "read boxes")
    timed(engine, "grow_state_dict", "grow")
    timed(writer, "write_batch", "write batch")
    timed(writer, "fsync_results", "fsync + drop cache")
    timed(offline, "_execute", "execute")

    from torch.distributed.checkpoint import filesystem

    class TimedStream:
        def __init__(self, stream):
            self._stream = stream

        def write(self, data):
            start = time.perf_counter()
            n = self._stream.write(data)
            with lock:
                busy["write() calls"] += time.perf_counter() - start
                writes["count"] += 1
                writes["bytes"] += memoryview(data).nbytes
            return n

        def __getattr__(self, name):
            return getattr(self._stream, name)

    create_stream = filesystem.FileSystem.create_stream

    def timed_stream(self, path, mode):
        context = create_stream(self, path, mode)
        if "w" not in mode:
            return context

        class Wrapped:
            def __enter__(self):
                return TimedStream(context.__enter__())

            def __exit__(self, *exc):
                return context.__exit__(*exc)
        return Wrapped()

    filesystem.FileSystem.create_stream = timed_stream
    rc = cli.main(["grow", "--load", source, "--save", dest, *GROW_FLAGS])
    t4 = time.perf_counter()
    stages = {
        "interpreter start": started - spawned,
        "import torch": t1 - t0,
        "import megatron_recycle": t2 - t1,
        "open source": busy["open source"],
        "read boxes": busy["read boxes"],
        "copies + noise": busy["grow"] - busy["read boxes"],
        "serialize": busy["write batch"] - busy["write() calls"],
        "write() calls": busy["write() calls"],
        "fsync + drop cache": busy["fsync + drop cache"],
        "plan + checks": first_start["execute"] - last_end["open source"],
        # from the last batch's fsync to the rename (metadata, common state, tracker)
        "commit": t4 - last_end["execute"],
    }
    print(json.dumps({"rc": rc, "stages": stages, "main_end": time.time(), "writes": writes,
                      "megatron_core_imported": "megatron.core" in sys.modules}), flush=True)
    sys.stderr.flush()
    os._exit(rc)  # as the command's entry point leaves (`cli.run`)


def profile(source: Path, dest: Path) -> dict:
    spawned = time.time()
    proc = subprocess.run([sys.executable, __file__, "--child", str(source), str(dest), str(spawned)],
                          capture_output=True, text=True)
    ended = time.time()
    if proc.returncode:
        sys.exit(f"grow failed:\n{proc.stderr[-4000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["stages"]["shutdown"] = ended - out["main_end"]
    out["wall"] = ended - spawned
    return out


def table(result: dict, grown_gb: float) -> str:
    wall = result["wall"]
    lines = [f"grow of {grown_gb:.2f} GB: {wall:.2f} s wall (megatron.core imported: "
             f"{result['megatron_core_imported']}; {result['writes']['count']} write() calls, "
             f"{result['writes']['bytes'] / max(result['writes']['count'], 1) / 2**20:.2f} MiB each)",
             "", "| stage | thread | s | share of wall |", "|---|---|---|---|"]
    for stage, seconds in result["stages"].items():
        lines.append(f"| {stage} | {STAGES[stage]} | {seconds:.2f} | {seconds / wall:.2f} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    p.add_argument("--gb", type=float, default=1.0, help="source size (default 1)")
    p.add_argument("--source", help="an existing source iteration directory (default: build one)")
    p.add_argument("--workdir", default=tempfile.gettempdir(), help="where checkpoints are written")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args()
    if args.child:
        return child(args.child[0], args.child[1], float(args.child[2]))
    from load_growth import grown_shape, launch, shape_for, source_dir

    work = Path(tempfile.mkdtemp(dir=args.workdir))
    try:
        if args.source:
            source = Path(args.source)
        else:
            launch(2, "--phase", "source", "--gb", args.gb, "--work", work)
            source = source_dir(work)
        result = profile(source, work / "grown")
        print(table(result, grown_shape(shape_for(args.gb)).total_bytes() / 2**30))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
