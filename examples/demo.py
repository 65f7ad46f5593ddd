"""The whole story on one machine, one command: pretrain a small MoE, grow it into a
different parallel layout, continue training, and compare with training the grown
architecture from scratch for the same number of steps.

    python examples/demo.py            # 2 CPU ranks, a few minutes
    python examples/demo.py --help     # bigger models, more steps, other layouts; GPUs too

Each phase is `examples/pretrain_moe.py` under torchrun on `--nproc` ranks:
1. base: L layers x E experts, pretrained for `--base-iters` steps (saved in model space);
2. grown: depth x2 by interposition, experts x2 (alpha = `--noise-alpha`), loaded from the
   base *at load time* into `--grown-layout`, optimizer state carried over, training
   continued to `--base-iters + --extra-iters` (same data position and LR schedule);
3. scratch: the grown architecture from random init, `--extra-iters` steps.
Writes `results.json`, `loss_curves.png` and the checkpoints under `--out`.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PRETRAIN = HERE / "pretrain_moe.py"
LAYOUT_FLAGS = {"tp": "--tensor-model-parallel-size", "pp": "--pipeline-model-parallel-size",
                "ep": "--expert-model-parallel-size", "etp": "--expert-tensor-parallel-size"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("demo-out"))
    p.add_argument("--nproc", type=int, default=2, help="ranks per phase")
    p.add_argument("--base-layout", default="ep=2", help="e.g. 'ep=2' or 'pp=2,ep=2'")
    p.add_argument("--grown-layout", default="pp=2", help="a different layout for the grown model")
    p.add_argument("--base-iters", type=int, default=150)
    p.add_argument("--extra-iters", type=int, default=100)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--num-experts", type=int, default=4)
    p.add_argument("--moe-router-topk", type=int, default=2)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--global-batch-size", type=int, default=16)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--eval-interval", type=int, default=25)
    p.add_argument("--eval-samples", type=int, default=64)
    p.add_argument("--noise-alpha", type=float, default=0.01)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup-iters", type=int, default=10,
                   help="for base and scratch (at most half of --extra-iters)")
    return p.parse_args(argv)


def layout_flags(spec: str) -> list[str]:
    flags = []
    for part in filter(None, spec.split(",")):
        name, _, size = part.partition("=")
        if name not in LAYOUT_FLAGS or not size.isdigit():
            raise SystemExit(f"layout {spec!r}: use comma-separated {sorted(LAYOUT_FLAGS)}=N")
        flags += [LAYOUT_FLAGS[name], size]
    return flags


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_phase(name: str, nproc: int, flags: list[str], log_path: Path) -> None:
    """One torchrun of the pretraining script; its progress lines are shown as they come."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={_free_port()}", str(PRETRAIN), *flags]
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", PYTHONWARNINGS="ignore",
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    tail = collections.deque(maxlen=60)
    with open(log_path, "w") as log, subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            log.write(line)
            tail.append(line)
            if line.startswith("[pretrain_moe]"):
                print(f"  {name:8s}{line[len('[pretrain_moe]'):].rstrip()}", flush=True)
    if proc.returncode:
        raise SystemExit(f"phase {name!r} failed (rc {proc.returncode}); last output:\n"
                         + "".join(tail) + f"\nfull log: {log_path}")


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def curve(records: list[dict], metric: str) -> list[tuple[int, float]]:
    return [(r["iteration"], r[metric]) for r in records if metric in r]


def summarize(args, base, grown, scratch) -> dict:
    curves = {name: {"val": curve(records, "val_loss"), "train": curve(records, "train_loss")}
              for name, records in (("base", base), ("grown", grown), ("scratch", scratch))}
    return {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "base_at_growth": curves["base"]["val"][-1][1],
        "grown_right_after_growth": curves["grown"]["val"][0][1],
        "grown_after_extra": curves["grown"]["val"][-1][1],
        "scratch_at_start": curves["scratch"]["val"][0][1],
        "scratch_after_extra": curves["scratch"]["val"][-1][1],
        "curves": curves,
    }


def table(results: dict, args) -> str:
    rows = [
        ("base, at growth", args.base_iters, results["base_at_growth"]),
        ("grown, right after growth", args.base_iters, results["grown_right_after_growth"]),
        (f"grown, +{args.extra_iters} steps", args.base_iters + args.extra_iters,
         results["grown_after_extra"]),
        (f"scratch (grown arch.), +{args.extra_iters} steps", args.extra_iters,
         results["scratch_after_extra"]),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'validation loss (bytes, nats)':{width}s}  iteration  loss", "-" * (width + 18)]
    lines += [f"{name:{width}s}  {it:9d}  {loss:.4f}" for name, it, loss in rows]
    return "\n".join(lines)


def plot(results: dict, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    colors = {"base": "tab:gray", "grown": "tab:blue", "scratch": "tab:orange"}
    # Scratch is drawn from the growth point: the same extra steps, side by side.
    shift = {"base": 0, "grown": 0, "scratch": args.base_iters}
    for name, curves in results["curves"].items():
        it, loss = zip(*curves["train"])
        ax.plot([i + shift[name] for i in it], loss, color=colors[name], alpha=0.25, lw=0.8)
        it, loss = zip(*curves["val"])
        ax.plot([i + shift[name] for i in it], loss, "o-", color=colors[name], ms=3,
                label=f"{name} (validation)")
    ax.axvline(args.base_iters, color="k", ls=":", lw=0.8)
    ax.set_xlabel("iteration (scratch shifted to start at the growth point)")
    ax.set_ylabel("loss (nats per byte)")
    ax.set_title("Growth (depth x2, experts x2) vs. training the grown model from scratch")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.jsonl"):
        old.unlink()  # metrics are appended; a rerun starts them afresh
    total = args.base_iters + args.extra_iters
    common = ["--hidden-size", args.hidden_size, "--ffn-hidden-size", 2 * args.hidden_size,
              "--moe-ffn-hidden-size", args.hidden_size, "--seq-length", args.seq_length,
              "--global-batch-size", args.global_batch_size,
              "--micro-batch-size", args.micro_batch_size, "--lr", args.lr, "--min-lr",
              args.lr / 10, "--lr-warmup-iters", min(args.warmup_iters, args.extra_iters // 2),
              "--eval-interval", args.eval_interval,
              "--eval-samples", args.eval_samples, "--log-interval", 10]
    common = [str(x) for x in common]
    phases = [
        ("base", layout_flags(args.base_layout) + common + [
            "--num-layers", str(args.num_layers), "--num-experts", str(args.num_experts),
            "--moe-router-topk", str(args.moe_router_topk),
            "--train-iters", str(args.base_iters), "--lr-decay-iters", str(total),
            "--save", str(out / "base")]),
        ("grown", layout_flags(args.grown_layout) + common + [
            "--grow-from", str(out / "base"), "--grow-depth", "2", "--grow-experts", "2",
            "--grow-noise-alpha", str(args.noise_alpha), "--grow-optimizer", "copy",
            "--train-iters", str(total), "--save", str(out / "grown")]),
        ("scratch", layout_flags(args.grown_layout) + common + [
            "--num-layers", str(2 * args.num_layers), "--num-experts", str(2 * args.num_experts),
            "--moe-router-topk", str(2 * args.moe_router_topk),
            "--train-iters", str(args.extra_iters)]),
    ]
    start = time.time()
    for name, flags in phases:
        print(f"[demo] {name}: {' '.join(flags[:4])} …", flush=True)
        run_phase(name, args.nproc, flags + ["--metrics", str(out / f"{name}.jsonl")],
                  out / f"{name}.log")
    results = summarize(args, *(read_metrics(out / f"{n}.jsonl") for n, _ in phases))
    results["wall_seconds"] = round(time.time() - start, 1)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plot(results, args, out / "loss_curves.png")
    print("\n" + table(results, args))
    print(f"\n[demo] {results['wall_seconds']:.0f} s; wrote {out / 'results.json'} and "
          f"{out / 'loss_curves.png'}")
    if not all(math.isfinite(v) for v in (results["grown_after_extra"], results["scratch_after_extra"])):
        raise SystemExit("[demo] a loss is not finite")
    return results


if __name__ == "__main__":
    main()
