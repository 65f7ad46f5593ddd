"""Offline `megatron-recycle grow` vs copying a checkpoint directory of the output's size.

    python benchmarks/offline_grow.py [--sizes-gb 0.5 1 2] [--repeats 3] [--workers 1 2]

Same disk, same run, medians over interleaved repeats (page cache warm for both: the source
and the copied directory were just written). Prints a table, writes JSON (default
benchmarks/results/offline_grow.json), and the peak RSS of the grow process.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from load_growth import grown_shape, launch, shape_for, slope  # noqa: E402


def timed(cmd) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of a child process."""
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{cmd[:3]} failed:\n{proc.stderr[-4000:]}")
    return time.perf_counter() - start, int(proc.stderr.strip().splitlines()[-1]) * 1024


def measure(gb: float, repeats: int, workers: list[int], workdir: Path) -> dict:
    work = Path(tempfile.mkdtemp(dir=workdir))
    try:
        launch(2, "--phase", "source", "--gb", gb, "--work", work)
        source = work / "src" / "iter_0000001"  # a Megatron checkpoint root around it
        source.parent.mkdir()
        (work / "source").rename(source)
        (source.parent / "latest_checkpointed_iteration.txt").write_text("1")
        times = {f"grow_w{w}": [] for w in workers} | {"copy": []}
        rss = {}
        for _ in range(repeats):
            for w in workers:
                dest = work / f"grown_w{w}"
                seconds, peak = timed([sys.executable, "-m", "megatron_recycle.cli", "grow",
                                       "--load", str(source), "--save", str(dest), "--grow-depth",
                                       "2", "--grow-experts", "2", "--workers", str(w),
                                       "--batch-size-mb", "256", "--overwrite"])
                times[f"grow_w{w}"].append(seconds)
                rss[f"grow_w{w}"] = max(rss.get(f"grow_w{w}", 0), peak)
            grown = work / f"grown_w{workers[0]}"
            copy = work / "copy"
            shutil.rmtree(copy, ignore_errors=True)
            seconds, _ = timed(["cp", "-r", str(grown), str(copy)])
            times["copy"].append(seconds)
        out_bytes = sum(p.stat().st_size for p in (work / f"grown_w{workers[0]}").rglob("*") if p.is_file())
    finally:
        shutil.rmtree(work)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "source_gb": shape_for(gb).total_bytes() / 2**30,
        "grown_gb": out_bytes / 2**30,
        "copy_s": med["copy"],
        **{f"{k}_s": v for k, v in med.items() if k != "copy"},
        **{f"{k}_over_copy": v / med["copy"] for k, v in med.items() if k != "copy"},
        **{f"{k}_peak_rss_gb": v / 2**30 for k, v in rss.items()},
        "times": times,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes-gb", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--workdir", default=tempfile.gettempdir())
    p.add_argument("--out", default=str(HERE / "results" / "offline_grow.json"))
    args = p.parse_args()
    rows = []
    for gb in args.sizes_gb:
        print(f"source ≈ {gb} GB (grown ≈ {grown_shape(shape_for(gb)).total_bytes() / 2**30:.1f} GB) …",
              flush=True)
        rows.append(measure(gb, args.repeats, args.workers, Path(args.workdir)))
    cols = ["source_gb", "grown_gb", "copy_s"] + [c for w in args.workers for c in
                                                  (f"grow_w{w}_s", f"grow_w{w}_over_copy",
                                                   f"grow_w{w}_peak_rss_gb")]
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.2f}" for c in cols) + " |")
    summary = {"rows": rows, "copy_s_per_gb": slope(rows, "grown_gb", "copy_s")}
    summary.update({f"grow_w{w}_s_per_gb": slope(rows, "grown_gb", f"grow_w{w}_s") for w in args.workers})
    print("\nslopes (s per grown GB): " + ", ".join(f"{k[:-7]} {v:.2f}" for k, v in summary.items()
                                                  if k.endswith("_s_per_gb")))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
