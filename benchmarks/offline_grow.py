"""Offline `megatron-recycle grow` vs copying a checkpoint directory of the output's size.

    python benchmarks/offline_grow.py [--sizes-gb 0.5 1 2] [--repeats 3] [--workers 1 2] [--ranks 2 4]

Same disk, same run, medians over interleaved repeats (page cache warm for both: the source
and the copied directory were just written). Both are durable: grow fsyncs what it writes (as
Megatron's own save does), so the copy is `cp -r` followed by `sync` of the copied files.
Grow is timed with 1 process per `--workers`, as a torch.distributed job of each `--ranks`
(torchrun on this machine, 1 worker per rank), and at alpha 0 (what the noise itself costs).
Prints a table, writes JSON (default benchmarks/results/offline_grow.json), and the peak RSS
of grow (for a distributed job: of its largest process, one rank).
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

from load_growth import grown_shape, launch, shape_for, slope, source_dir  # noqa: E402


def timed(cmd) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of a child process."""
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{cmd[:3]} failed:\n{proc.stderr[-4000:]}")
    return time.perf_counter() - start, int(proc.stderr.strip().splitlines()[-1]) * 1024


def variants(workers: list[int], ranks: list[int]) -> dict[str, tuple[list[str], int, str]]:
    """name → (launcher command, workers per rank, alpha)."""
    one = [sys.executable, "-m", "megatron_recycle.cli"]
    out = {f"grow_w{w}": (one, w, "0.01") for w in workers}
    for r in ranks:
        out[f"grow_r{r}"] = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                              f"--nproc-per-node={r}", "-m", "megatron_recycle.cli"], 1, "0.01")
    out[f"grow_w{workers[0]}_alpha0"] = (one, workers[0], "0")
    return out


def measure(gb: float, repeats: int, workers: list[int], ranks: list[int], workdir: Path) -> dict:
    work = Path(tempfile.mkdtemp(dir=workdir))
    try:
        launch(2, "--phase", "source", "--gb", gb, "--work", work)
        source = source_dir(work)
        runs = variants(workers, ranks)
        times = {name: [] for name in runs} | {"copy": []}
        rss = {}
        for _ in range(repeats):
            for name, (launcher, w, alpha) in runs.items():
                dest = work / name
                seconds, peak = timed([*launcher, "grow", "--load", str(source), "--save", str(dest),
                                       "--grow-depth", "2", "--grow-experts", "2", "--grow-noise-alpha",
                                       alpha, "--workers", str(w), "--batch-size-mb", "256",
                                       "--overwrite"])
                times[name].append(seconds)
                rss[name] = max(rss.get(name, 0), peak)
            grown = work / f"grow_w{workers[0]}"
            copy = work / "copy"
            shutil.rmtree(copy, ignore_errors=True)
            seconds, _ = timed(["sh", "-c", f"cp -r '{grown}' '{copy}' && find '{copy}' -type f "
                                            "-exec sync {} +"])
            times["copy"].append(seconds)
        out_bytes = sum(p.stat().st_size for p in (work / f"grow_w{workers[0]}").rglob("*") if p.is_file())
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
    p.add_argument("--ranks", type=int, nargs="*", default=[2, 4],
                   help="torch.distributed ranks (torchrun on this machine)")
    p.add_argument("--workdir", default=tempfile.gettempdir())
    p.add_argument("--out", default=str(HERE / "results" / "offline_grow.json"))
    args = p.parse_args()
    rows = []
    for gb in args.sizes_gb:
        print(f"source ≈ {gb} GB (grown ≈ {grown_shape(shape_for(gb)).total_bytes() / 2**30:.1f} GB) …",
              flush=True)
        rows.append(measure(gb, args.repeats, args.workers, args.ranks, Path(args.workdir)))
    names = list(variants(args.workers, args.ranks))
    cols = ["source_gb", "grown_gb", "copy_s"] + [c for n in names for c in
                                                  (f"{n}_s", f"{n}_over_copy", f"{n}_peak_rss_gb")]
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.2f}" for c in cols) + " |")
    summary = {"rows": rows, "copy_s_per_gb": slope(rows, "grown_gb", "copy_s")}
    summary.update({f"{n}_s_per_gb": slope(rows, "grown_gb", f"{n}_s") for n in names})
    print("\nslopes (s per grown GB): " + ", ".join(f"{k[:-7]} {v:.2f}" for k, v in summary.items()
                                                  if k.endswith("_s_per_gb")))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
