"""Offline `megatron-recycle grow` vs the paper authors' method and a copy of its output.

    python benchmarks/offline_grow.py [--sizes-gb 0.5 1 2] [--repeats 3] [--workers 1 2] [--ranks 2 4]
        [--authors-max-gb GB]

Same disk, same run, every variant once per repeat, interleaved (page cache warm for all: the
source and the copied directory were just written); min / median / max over the repeats.
All are durable: grow fsyncs what it writes (as Megatron's own save does), so the copy is
`cp -r` followed by `sync` of the copied files. Grow is timed with 1 process per `--workers`,
as a torch.distributed job of each `--ranks` (torchrun on this machine, 1 worker per rank), and
at alpha 0 (what the noise itself costs). The contender, `authors` (benchmarks/authors_method.py:
a stand-in built from the authors' published algorithm: the whole checkpoint in one process,
megatron-core's save), runs with the same growth; it needs about 9x the source in memory, so
it is skipped, and the table and JSON say so, where 9.5x the source exceeds `--authors-max-gb`
(default: 90% of the memory available at the start). Every output directory is removed before
its run. Prints a table, writes JSON (default benchmarks/results/offline_grow.json) with the
load average before and after, and the peak RSS of each (for a distributed job: of its largest
process, one rank).
"""

from __future__ import annotations

import argparse
import json
import os
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


AUTHORS_MEMORY = 9.5  # the authors' method's peak RSS over the source's bytes (measured 8.9-9.9x at 0.5-1 GB)


def authors_skipped(gb: float, max_gb: float) -> str | None:
    """Why the authors' method is not run at this size, or None."""
    need = AUTHORS_MEMORY * shape_for(gb).total_bytes() / 2**30
    if need <= max_gb:
        return None
    return (f"not run: its memory (~{AUTHORS_MEMORY:g}x the source, {need:.1f} GiB) would exceed "
            f"--authors-max-gb {max_gb:.1f}")


def commands(source: Path, work: Path, workers: list[int], ranks: list[int], authors: bool) -> dict:
    """variant name → (command, output directory); the first grow variant is `grow`'s own."""
    grow = ["--grow-depth", "2", "--grow-experts", "2"]
    out = {}
    for name, (launcher, w, alpha) in variants(workers, ranks).items():
        out[name] = ([*launcher, "grow", "--load", str(source), "--save", str(work / name), *grow,
                      "--grow-noise-alpha", alpha, "--workers", str(w), "--batch-size-mb", "256",
                      "--overwrite"], work / name)
    if authors:
        out["authors"] = ([sys.executable, str(HERE / "authors_method.py"), "--load", str(source),
                           "--save", str(work / "authors"), *grow, "--grow-noise-alpha", "0.01"],
                          work / "authors")
    grown, copy = work / f"grow_w{workers[0]}", work / "copy"
    out["copy"] = (["sh", "-c", f"cp -r '{grown}' '{copy}' && find '{copy}' -type f -exec sync {{}} +"],
                   copy)
    return out


def measure(gb: float, repeats: int, workers: list[int], ranks: list[int], workdir: Path,
            authors_max_gb: float) -> dict:
    work = Path(tempfile.mkdtemp(dir=workdir))
    skipped = authors_skipped(gb, authors_max_gb)
    try:
        launch(2, "--phase", "source", "--gb", gb, "--work", work)
        runs = commands(source_dir(work), work, workers, ranks, authors=skipped is None)
        times, rss = {name: [] for name in runs}, {}
        for _ in range(repeats):
            for name, (cmd, dest) in runs.items():
                shutil.rmtree(dest, ignore_errors=True)
                seconds, peak = timed(cmd)
                times[name].append(seconds)
                rss[name] = max(rss.get(name, 0), peak)
        out_bytes = sum(p.stat().st_size for p in (work / f"grow_w{workers[0]}").rglob("*") if p.is_file())
    finally:
        shutil.rmtree(work)
    med = {k: statistics.median(v) for k, v in times.items()}
    grow = med[f"grow_w{workers[0]}"]
    row = {
        "source_gb": shape_for(gb).total_bytes() / 2**30,
        "grown_gb": out_bytes / 2**30,
        **{f"{k}_{stat}_s": f(v) for k, v in times.items() for stat, f in
           (("min", min), ("median", statistics.median), ("max", max))},
        **{f"{k}_s": v for k, v in med.items()},
        **{f"{k}_over_copy": v / med["copy"] for k, v in med.items() if k != "copy"},
        **{f"{k}_peak_rss_gb": v / 2**30 for k, v in rss.items()},
        "grow_over_copy": grow / med["copy"],
        "times": times,
    }
    if skipped:
        row["authors"] = skipped
    else:
        row["grow_over_authors"] = grow / med["authors"]
    return row


def table(rows: list[dict], names: list[str], grow: str) -> str:
    """One line per size and variant; `grow / this`: the median of `grow` over this one's."""
    lines = ["| source GB | grown GB | variant | min s | median s | max s | this / copy | grow / this "
             "| peak RSS GiB |", "|" + "---|" * 9]
    for r in rows:
        for n in names:
            head = f"| {r['source_gb']:.2f} | {r['grown_gb']:.2f} | {n} |"
            if f"{n}_s" not in r:
                lines.append(f"{head} {r.get(n, 'not run')} | | | | | |")
                continue
            lines.append(f"{head} {r[f'{n}_min_s']:.2f} | {r[f'{n}_s']:.2f} | {r[f'{n}_max_s']:.2f} | "
                         f"{r[f'{n}_s'] / r['copy_s']:.2f} | {r[f'{grow}_s'] / r[f'{n}_s']:.2f} | "
                         f"{r[f'{n}_peak_rss_gb']:.2f} |")
    return "\n".join(lines)


def available_gb() -> float:
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) / 2**20


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes-gb", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--ranks", type=int, nargs="*", default=[2, 4],
                   help="torch.distributed ranks (torchrun on this machine)")
    p.add_argument("--authors-max-gb", type=float, default=0.9 * available_gb(),
                   help="skip the authors' method where 9.5x the source exceeds this (GiB)")
    p.add_argument("--workdir", default=tempfile.gettempdir())
    p.add_argument("--out", default=str(HERE / "results" / "offline_grow.json"))
    args = p.parse_args()
    load_before = os.getloadavg()
    rows = []
    for gb in args.sizes_gb:
        print(f"source ≈ {gb} GB (grown ≈ {grown_shape(shape_for(gb)).total_bytes() / 2**30:.1f} GB) …",
              flush=True)
        rows.append(measure(gb, args.repeats, args.workers, args.ranks, Path(args.workdir),
                            args.authors_max_gb))
    names = [*variants(args.workers, args.ranks), "authors", "copy"]
    print("\n" + table(rows, names, f"grow_w{args.workers[0]}"))
    summary = {"sizes_gb": args.sizes_gb, "workers": args.workers, "ranks": args.ranks, "repeats": args.repeats, "authors_max_gb": args.authors_max_gb,
               "load_avg_before": load_before, "load_avg_after": os.getloadavg(), "rows": rows}
    for n in names:
        measured = [r for r in rows if f"{n}_s" in r]
        if len(measured) > 1:
            summary[f"{n}_s_per_gb"] = slope(measured, "grown_gb", f"{n}_s")
    print("\nslopes (s per grown GB): " + ", ".join(f"{k[:-9]} {v:.2f}" for k, v in summary.items()
                                                  if k.endswith("_s_per_gb")))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
