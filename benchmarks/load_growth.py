"""Load-time growth vs a plain load of a checkpoint of the grown shape, and memory per rank.

    python benchmarks/load_growth.py [--sizes-gb 0.5 1 2] [--ranks 2] [--repeats 3]
    python benchmarks/load_growth.py --quick      # 1 GB only
    python benchmarks/load_growth.py --quick --profile   # where the hook's time goes, per rank

For each source size: (a) plain megatron-core load of a grown-shape checkpoint into layout
EP = ranks; (b) the same target loaded from the source through GrowthLoadStrategy (depth x2,
experts x2, alpha 0.01; and at alpha 0, to separate the noise's cost). Times: min / median /
max over interleaved repeats in one run (slowest rank each); CPU s: the busiest rank's CPU time
(all its threads), which holds better than wall time on a machine others load too. Memory: a
fresh process runs (b) once; peak RSS minus the interpreter's RSS before any tensor, over the
rank's own grown shard bytes. `--profile` runs (b) once more under cProfile on every rank and prints each rank's
top functions by own time (torch kernels show as their Python calls). `--keep DIR` keeps the
checkpoints in DIR and reuses them on the next run. Prints a table and writes JSON (default
benchmarks/results/load_growth.json; not with --profile).
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


def shape_for(gb: float):
    from synthetic_moe import MoEShape

    base = MoEShape(layers=4, experts=8, hidden=512, moe_ffn=512)
    layers = max(1, round(gb * 2**30 / base.total_bytes() * base.layers))
    return MoEShape(layers=layers, experts=8, hidden=512, moe_ffn=512)


def plan_for(shape, alpha: float = 0.01):
    from megatron_recycle.plan import Architecture, DepthGrowth, GrowthPlan, WidthGrowth

    return GrowthPlan(Architecture(shape.layers, shape.experts, topk=2), DepthGrowth(2),
                      WidthGrowth(2, noise_alpha=alpha))


def grown_shape(shape):
    from synthetic_moe import MoEShape

    plan = plan_for(shape)
    return MoEShape(plan.target_num_layers, plan.target_num_experts, shape.hidden, shape.moe_ffn)


def source_dir(work) -> Path:
    """The source checkpoint's iteration directory (its root holds the tracker file)."""
    from megatron_recycle.io.checkpoint import iteration_dir

    return iteration_dir(Path(work) / "src", 1)


# --- rank side ------------------------------------------------------------------------------
def rank_main(args):
    import warnings

    warnings.filterwarnings("ignore")
    import psutil
    import torch
    import torch.distributed as dist

    from megatron_recycle.testing import cpu, toy

    cpu.install()
    from megatron.core import dist_checkpointing

    import synthetic_moe
    from megatron_recycle.io.checkpoint import iteration_dir
    from megatron_recycle.load_hook import GrowthLoadStrategy

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    shape = shape_for(args.gb)
    plan = plan_for(shape)
    src, grown = source_dir(args.work), iteration_dir(Path(args.work) / "grown", 1)
    result = {}
    if args.phase == "source":
        toy.save_checkpoint(src.parent, 1, synthetic_moe.state_dict(shape, rank, world, random=True))
    elif args.phase == "grown":  # a checkpoint of the grown shape, for the plain load
        target = synthetic_moe.state_dict(grown_shape(shape), rank, world, random=False)
        dist_checkpointing.load(target, str(src), GrowthLoadStrategy(plan))
        for sh in target.values():
            sh.replica_id = 0 if sh.prepend_axis_num == 2 or rank == 0 else rank
        toy.save_checkpoint(grown.parent, 1, target)
    elif args.phase == "time":
        target = synthetic_moe.state_dict(grown_shape(shape), rank, world, random=False)
        names = ("plain", "grow", "grow_alpha0")
        times = {name: [] for name in names} | {f"{name}_cpu": [] for name in names}
        for _ in range(args.repeats):
            for name, path, strategy in (("plain", grown, None), ("grow", src, GrowthLoadStrategy(plan)),
                                         ("grow_alpha0", src, GrowthLoadStrategy(plan_for(shape, 0.0)))):
                dist.barrier()
                start, cpu = time.perf_counter(), time.process_time()
                dist_checkpointing.load(target, str(path), strategy)
                elapsed = torch.tensor(time.perf_counter() - start)
                cpu = torch.tensor(time.process_time() - cpu)
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
                dist.all_reduce(cpu, op=dist.ReduceOp.MAX)
                times[name].append(float(elapsed))
                times[f"{name}_cpu"].append(float(cpu))
        result = times
    elif args.phase == "memory":
        baseline = psutil.Process().memory_info().rss
        target = synthetic_moe.state_dict(grown_shape(shape), rank, world, random=False)
        for sh in target.values():
            sh.data.zero_()  # touch the pages: they are this rank's own shards
        dist_checkpointing.load(target, str(src), GrowthLoadStrategy(plan))
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        result = {"baseline": baseline, "peak": peak, "own": synthetic_moe.shard_bytes(target)}
    elif args.phase == "profile":
        import cProfile
        import io
        import pstats

        target = synthetic_moe.state_dict(grown_shape(shape), rank, world, random=False)
        dist_checkpointing.load(target, str(src), GrowthLoadStrategy(plan))  # warm, as the timed loads are
        dist.barrier()
        profile, start = cProfile.Profile(), time.perf_counter()
        profile.runcall(dist_checkpointing.load, target, str(src), GrowthLoadStrategy(plan))
        elapsed = time.perf_counter() - start
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(args.top)
        result = {"rank": rank, "seconds": elapsed, "profile": text.getvalue()}
    gathered = [None] * world
    dist.all_gather_object(gathered, result)
    if rank == 0 and args.result:
        Path(args.result).write_text(json.dumps(gathered))
    toy.finish()


# --- orchestration --------------------------------------------------------------------------
def launch(ranks: int, *args) -> None:
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}",
           "--master-port=0", "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0",
           __file__, "--rank-side", *map(str, args)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"benchmark ranks failed:\n{(proc.stdout + proc.stderr)[-6000:]}")


def checkpoints(gb: float, ranks: int, workdir: Path, keep: bool) -> Path:
    """A directory holding the source and grown checkpoints of this size (kept ones reused)."""
    if not keep:
        work = Path(tempfile.mkdtemp(dir=workdir))
    else:
        work = workdir / f"ranks{ranks}-gb{gb:g}"
        if (work / "made").exists():
            return work
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
    launch(ranks, "--phase", "source", "--gb", gb, "--work", work)
    launch(ranks, "--phase", "grown", "--gb", gb, "--work", work)
    (work / "made").touch()
    return work


def spread(times: list[float]) -> dict:
    return {"min": min(times), "median": statistics.median(times), "max": max(times)}


def measure(gb: float, ranks: int, repeats: int, work: Path) -> dict:
    shape = shape_for(gb)
    res = work / "result.json"
    launch(ranks, "--phase", "time", "--gb", gb, "--work", work, "--repeats", repeats, "--result", res)
    times = json.loads(res.read_text())[0]
    launch(ranks, "--phase", "memory", "--gb", gb, "--work", work, "--result", res)
    mem = json.loads(res.read_text())
    res.unlink()
    stats = {name: spread(t) for name, t in times.items()}
    plain, grow = stats["plain"]["median"], stats["grow"]["median"]
    grow0 = stats["grow_alpha0"]["median"]
    worst = max(mem, key=lambda m: (m["peak"] - m["baseline"]) / m["own"])
    return {
        "source_gb": shape.total_bytes() / 2**30,
        "grown_gb": grown_shape(shape).total_bytes() / 2**30,
        "plain_load_s": plain,
        "grow_load_s": grow,
        "grow_over_plain": grow / plain,
        "grow_alpha0_s": grow0,
        "grow_alpha0_over_plain": grow0 / plain,
        "spread_s": stats,
        "plain_cpu_s": stats["plain_cpu"]["median"],
        "grow_cpu_s": stats["grow_cpu"]["median"],
        "grow_alpha0_cpu_s": stats["grow_alpha0_cpu"]["median"],
        "own_shard_gb": worst["own"] / 2**30,
        "interpreter_gb": worst["baseline"] / 2**30,
        "peak_rss_gb": worst["peak"] / 2**30,
        "rss_over_own": (worst["peak"] - worst["baseline"]) / worst["own"],
        "times": times,
    }


def profile(gb: float, ranks: int, work: Path) -> None:
    res = work / "result.json"
    launch(ranks, "--phase", "profile", "--gb", gb, "--work", work, "--result", res)
    for r in json.loads(res.read_text()):
        print(f"--- rank {r['rank']}: one hook load {r['seconds']:.2f} s (under cProfile)\n{r['profile']}")
    res.unlink()


def slope(rows, x, y) -> float:
    xs, ys = [r[x] for r in rows], [r[y] for r in rows]
    mx, my = statistics.mean(xs), statistics.mean(ys)
    den = sum((a - mx) ** 2 for a in xs)
    return sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / den if den else float("nan")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rank-side", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--phase", help=argparse.SUPPRESS)
    p.add_argument("--gb", type=float, help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--top", type=int, default=25, help=argparse.SUPPRESS)
    p.add_argument("--sizes-gb", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    p.add_argument("--quick", action="store_true", help="1 GB only (the target's smallest size)")
    p.add_argument("--profile", action="store_true",
                   help="profile one hook load per rank instead of timing (prints, writes no JSON)")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", default=tempfile.gettempdir(), help="where checkpoints are written")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints in --workdir and reuse them")
    p.add_argument("--out", default=str(HERE / "results" / "load_growth.json"))
    args = p.parse_args()
    if args.rank_side:
        return rank_main(args)
    sizes = [1.0] if args.quick else args.sizes_gb
    rows = []
    for gb in sizes:
        print(f"source ≈ {gb} GB: making checkpoints, timing, measuring memory …", flush=True)
        work = checkpoints(gb, args.ranks, Path(args.workdir), args.keep)
        try:
            if args.profile:
                profile(gb, args.ranks, work)
                continue
            rows.append(measure(gb, args.ranks, args.repeats, work))
        finally:
            if not args.keep:
                shutil.rmtree(work)
    if args.profile:
        return
    header = ("source GB", "grown GB", "plain s (a) min/med/max", "grow s (b) min/med/max", "b/a",
              "b/a at alpha 0", "CPU s/rank a / b / b at alpha 0", "own GB/rank", "interp. GB", "peak GB",
              "(peak-interp)/own")
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in rows:
        plain, grow = (r["spread_s"][k] for k in ("plain", "grow"))
        print(f"| {r['source_gb']:.2f} | {r['grown_gb']:.2f} | "
              f"{plain['min']:.2f} / {plain['median']:.2f} / {plain['max']:.2f} | "
              f"{grow['min']:.2f} / {grow['median']:.2f} / {grow['max']:.2f} | {r['grow_over_plain']:.2f} | "
              f"{r['grow_alpha0_over_plain']:.2f} | "
              f"{r['plain_cpu_s']:.2f} / {r['grow_cpu_s']:.2f} / {r['grow_alpha0_cpu_s']:.2f} | "
              f"{r['own_shard_gb']:.2f} | "
              f"{r['interpreter_gb']:.2f} | {r['peak_rss_gb']:.2f} | {r['rss_over_own']:.2f} |")
    summary = {
        "ranks": args.ranks, "repeats": args.repeats, "rows": rows,
        "plain_s_per_grown_gb": slope(rows, "grown_gb", "plain_load_s"),
        "grow_s_per_grown_gb": slope(rows, "grown_gb", "grow_load_s"),
    }
    print(f"\nslope: plain {summary['plain_s_per_grown_gb']:.2f} s/GB, "
          f"grow {summary['grow_s_per_grown_gb']:.2f} s/GB (per GB of grown checkpoint)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
