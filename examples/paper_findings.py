"""The paper's findings ("Recycling Pretrained Checkpoints: Orthogonal Growth of MoE"),
reproduced at toy scale with this tool, side by side with the paper's numbers.

    python examples/paper_findings.py --quick        # <= 15 minutes on 2 CPU cores
    python examples/paper_findings.py                # the default setting (README: how long)
    python examples/paper_findings.py --help         # sizes, seeds, --out

One base MoE run per seed (the reference loop, `examples/pretrain_moe.py`, on the standard
library's sources), checkpointed at several points; then, from those checkpoints, grown runs
through the load hook with the same flags a user passes, each given the same extra steps:
1. interposition vs stack (depth x2) from an early and a late base, and the per-layer weight
   norms of base, interposed and stacked models;
2. the copies' noise (width x2): alpha 0.01 vs alpha 0 vs re-initialised copies
   (`--grow-reinit-expert-copies`), with the router similarity of copies to their originals
   and the expert-load entropy;
3. grown vs trained from scratch with the same extra compute (FLOPs), for depth, width, both;
4. sunk cost: bases from several points of one run, the same extra compute each;
5. the optimizer state after growth: carried (`copy`) vs `reset` (the paper resets).
Every run of all seeds runs in one torchrun (one start-up). Writes OUT/results.json
({"findings": [{"name", "paper", "ours", "reproduced", ...}], "pending", "finished_runs",
"config": ...}) after every run (the findings whose runs have all finished), a table on
stdout and, once every run finished, PNG plots; `--report-only` reports whatever finished.
Runs unchanged on GPUs (NCCL).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SETTINGS = {  # --quick (README: how long on 2 CPU cores), and the default, whose late base sees
    # about 1.7x the Chinchilla-optimal compute of its active parameters and earliest about 0.43x
    # (1.2x and 0.3x counting all parameters): the paper's depth finding turns on that
    "quick": dict(layers=2, hidden=32, experts=4, topk=2, seq=64, global_batch=8, micro_batch=4,
                  base_iters=360, extra_iters=180, points=4, eval_interval=30, eval_samples=32,
                  seeds=2, lr=3e-3, corpus_bytes=1_000_000),
    "default": dict(layers=4, hidden=48, experts=4, topk=2, seq=64, global_batch=16, micro_batch=8,
                    base_iters=4000, extra_iters=300, points=4, eval_interval=50, eval_samples=64,
                    seeds=2, lr=3e-3, corpus_bytes=4_000_000),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smaller, faster setting")
    p.add_argument("--out", type=Path, default=Path("paper-findings"))
    p.add_argument("--nproc", type=int, default=2, help="ranks (data-parallel)")
    for name in SETTINGS["quick"]:
        kind = float if name == "lr" else int
        p.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None,
                       help=f"override the setting's {name}")
    p.add_argument("--report-only", action="store_true",
                   help="no training: the findings, table and plots again from the runs already in --out")
    p.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def setting(args) -> dict:
    config = dict(SETTINGS["quick" if args.quick else "default"])
    config.update({k: v for k, v in vars(args).items() if k in config and v is not None})
    config["base_iters"] -= config["base_iters"] % config["points"]  # bases at equal intervals
    return config


# --- the runs --------------------------------------------------------------------------------
def runs(config: dict) -> list[tuple[str, list[str], dict]]:
    """(name, the reference loop's flags, what to do besides) for every run of every seed."""
    c = config
    total = c["base_iters"] + c["extra_iters"]
    model = ["--hidden-size", c["hidden"], "--ffn-hidden-size", 2 * c["hidden"],
             "--moe-ffn-hidden-size", c["hidden"], "--num-attention-heads", 4,
             "--seq-length", c["seq"], "--global-batch-size", c["global_batch"],
             "--micro-batch-size", c["micro_batch"], "--lr", c["lr"], "--min-lr", c["lr"] / 10,
             "--lr-warmup-iters", max(2, c["extra_iters"] // 10), "--lr-decay-iters", total,
             "--eval-interval", c["eval_interval"], "--eval-samples", c["eval_samples"],
             "--log-interval", 10 ** 6, "--corpus-bytes", c["corpus_bytes"]]
    base_size = ["--num-layers", c["layers"], "--num-experts", c["experts"], "--moe-router-topk", c["topk"]]
    out = []
    for seed in range(1, c["seeds"] + 1):
        tag = f"seed{seed}"
        seeded = [*model, "--seed", 1000 + seed, "--grow-seed", 2000 + seed]
        interval = c["base_iters"] // c["points"]
        out.append((f"{tag}/base", [*seeded, *base_size, "--train-iters", c["base_iters"],
                                    "--save-interval", interval], {}))

        def grown(name, point, *flags, extra=None):
            start = point * interval
            out.append((f"{tag}/{name}", [*seeded, "--grow-from", f"{{out}}/{tag}/base/iter_{start:07d}",
                                          *flags, "--train-iters", start + c["extra_iters"]], extra or {}))

        last = c["points"]
        for point in range(1, last + 1):  # 4: sunk cost; 1: interposition from these bases
            grown(f"depth-interposition-p{point}", point, "--grow-depth", 2, extra={"save": True})
        for point in (1, last):  # 1: stack from the earliest and the latest base
            grown(f"depth-stack-p{point}", point, "--grow-depth", 2, "--grow-depth-method", "stack",
                  extra={"save": True})
        for name, flags, extra in (("width-alpha0.01", ["--grow-noise-alpha", 0.01], {}),
                                   ("width-alpha0", ["--grow-noise-alpha", 0], {}),
                                   ("width-reinit", ["--grow-reinit-expert-copies"], {})):
            grown(name, last, "--grow-experts", 2, *flags, extra={**extra, "router_stats": True})
        grown("depth-width", last, "--grow-depth", 2, "--grow-experts", 2)
        grown("depth-width-optimizer-reset", last, "--grow-depth", 2, "--grow-experts", 2,
              "--grow-optimizer", "reset")
        # scratch: the grown architecture, the same extra steps, a whole LR schedule of its own
        for name, (layers, experts, topk) in {
                "depth": (2 * c["layers"], c["experts"], c["topk"]),
                "width": (c["layers"], 2 * c["experts"], 2 * c["topk"]),
                "depth-width": (2 * c["layers"], 2 * c["experts"], 2 * c["topk"])}.items():
            out.append((f"{tag}/scratch-{name}", [*seeded, "--num-layers", layers, "--num-experts", experts,
                                                  "--moe-router-topk", topk, "--train-iters",
                                                  c["extra_iters"], "--lr-decay-iters", c["extra_iters"]], {}))
    return [(name, [str(f) for f in flags], extra) for name, flags, extra in out]


def worker(out: Path, config: dict) -> None:
    """Inside torchrun: every run, one after the other, in one process group."""
    sys.path.insert(0, str(HERE))
    import pretrain_moe
    import torch.distributed as dist

    todo = runs(config)
    for number, (name, flags, extra) in enumerate(todo, 1):
        flags = [f.replace("{out}", str(out)) for f in flags]
        metrics = out / f"{name}.jsonl"
        metrics.parent.mkdir(parents=True, exist_ok=True)
        metrics.unlink(missing_ok=True)
        save = ["--save", str(out / name)] if name.endswith("/base") or extra.get("save") else []
        start = time.time()
        pretrain_moe.main([*flags, *save, "--metrics", str(metrics)],
                          customize=lambda run, e=extra: _customize(run, e))
        if dist.get_rank() == 0:
            print(f"[findings] {number}/{len(todo)} {name}: {time.time() - start:.0f} s", flush=True)


def _customize(run, extra: dict) -> None:
    if extra.get("router_stats"):
        run.eval_metrics.append(_router_stats)


def _router_stats(run) -> dict:
    """How far the copies have moved from their originals (router rows: cosine similarity),
    and how evenly tokens spread over the experts (normalised entropy of the expert load)."""
    import torch
    import torch.distributed as dist

    import pretrain_moe

    source = run.plan.source.num_experts
    cosines = []
    for chunk in run.chunks:
        for name, param in chunk.named_parameters():
            if name.endswith("router.weight"):
                w = param.detach().float()
                copies = torch.arange(source, w.shape[0])
                cosines.append(torch.nn.functional.cosine_similarity(w[copies], w[copies % source]).mean())
    loads = []
    hooks = [m.register_forward_hook(lambda mod, inp, outp: loads.append(outp[1].float().sum(0)))
             for chunk in run.chunks for m in chunk.modules() if type(m).__name__ == "TopKRouter"]
    pretrain_moe.evaluate(run)
    for hook in hooks:
        hook.remove()
    load = torch.stack(loads).sum(0) if loads else torch.zeros(run.spec.experts)
    stats = torch.tensor([float(sum(cosines)) if cosines else 0.0, float(len(cosines))] + load.tolist(),
                         dtype=torch.float64, device=pretrain_moe.collective_device())
    dist.all_reduce(stats)
    share = stats[2:] / stats[2:].sum()
    entropy = float(-(share * share.clamp_min(1e-12).log()).sum() / math.log(len(share)))
    return {"copy_router_cosine": float(stats[0] / max(stats[1], 1)), "expert_load_entropy": entropy}


# --- the findings ---------------------------------------------------------------------------
class Pending(Exception):
    """A finding needs a run that has not finished."""


class Runs:
    """The metrics of the runs in OUT that finished (`finished`: their names; None: all)."""

    def __init__(self, out: Path, finished=None):
        self.out, self.finished = out, finished

    def load(self, name: str) -> list[dict]:
        if self.finished is not None and name not in self.finished:
            raise Pending(name)
        return [json.loads(line) for line in (self.out / f"{name}.jsonl").read_text().splitlines()]

    def final(self, seeds: int, name: str) -> list[float]:
        return [self.load(f"seed{s}/{name}")[-1]["val_loss"] for s in range(1, seeds + 1)]


def ordered(better: list[float], worse: list[float]) -> tuple[bool, str]:
    """Whether `better` < `worse` in every seed by more than the seed-to-seed spread of the
    runs themselves (a conservative bar: the same order in every seed with a smaller gap is
    reported, not claimed); and how the seeds agree."""
    n, wins = len(better), sum(b < w for b, w in zip(better, worse))
    gap = statistics.fmean(worse) - statistics.fmean(better)
    spread = max(statistics.stdev(better), statistics.stdev(worse)) if n > 1 else 0.0
    sizes = f"gap {gap:.2g}, seed spread {spread:.2g}"
    if wins not in (0, n):
        return False, f"within seed noise ({wins} of {n} seeds; {sizes})"
    if abs(gap) <= spread:
        return False, f"{'the same' if wins else 'the opposite'} order in all {n} seeds, but within " \
                      f"seed noise ({sizes})"
    return wins == n, f"{'' if wins else 'the opposite '}in all {n} seeds ({sizes})"


def findings(out: Path, config: dict, finished=None) -> tuple[list[dict], list[str]]:
    """The findings whose runs have all finished, and the names of those still pending."""
    runs_ = Runs(out, finished)
    found, pending = [], []
    for name, finding in FINDINGS.items():
        try:
            found.append({"name": name, **finding(runs_, config)})
        except Pending:
            pending.append(name)
    return found, pending


def _depth_methods(runs_: Runs, c: dict) -> dict:
    seeds, last, mean = c["seeds"], c["points"], statistics.fmean
    interp_early, stack_early = runs_.final(seeds, "depth-interposition-p1"), runs_.final(seeds, "depth-stack-p1")
    interp_late, stack_late = (runs_.final(seeds, f"depth-interposition-p{last}"),
                               runs_.final(seeds, f"depth-stack-p{last}"))
    ok, how = ordered(interp_late, stack_late)
    chinchilla = base_compute_over_chinchilla(runs_.out, c)
    return {
        "paper": "interposition better from a converged base (about 1x Chinchilla compute and "
                 "more); stacking competitive before that",
        "ours": {"late_base": {"interposition": mean(interp_late), "stack": mean(stack_late)},
                 "early_base": {"interposition": mean(interp_early), "stack": mean(stack_early)},
                 "late_base_compute_over_chinchilla": chinchilla},
        "reproduced": ok, "seeds": how,
        "note": f"the late base saw {chinchilla:.2g}x Chinchilla compute" + (
            ", below the paper's threshold" if chinchilla < 1 else ""),
    }


def _noise(runs_: Runs, c: dict) -> dict:
    seeds, mean = c["seeds"], statistics.fmean
    noise = {name: runs_.final(seeds, f"width-{name}") for name in ("alpha0.01", "alpha0", "reinit")}
    ok_random, how_random = ordered(noise["alpha0.01"], noise["reinit"])
    ok_random = ok_random and ordered(noise["alpha0"], noise["reinit"])[0]
    ok_alpha, how = ordered(noise["alpha0.01"], noise["alpha0"])
    stats = {name: runs_.load(f"seed1/width-{name}")[-1] for name in noise}
    return {
        "paper": "alpha 0.01 about 1 point better downstream than alpha 0; re-initialised experts far worse",
        "ours": {name: mean(v) for name, v in noise.items()} | {
            "copy_router_cosine": {n: s.get("copy_router_cosine") for n, s in stats.items()},
            "expert_load_entropy": {n: s.get("expert_load_entropy") for n, s in stats.items()}},
        "reproduced": ok_random and ok_alpha,
        "seeds": f"alpha 0.01 < random: {how_random}; alpha 0.01 < alpha 0: {how}",
        "note": "with alpha 0 the copies and their router rows get the same gradients as their "
                "originals and stay identical (router cosine 1); the noise is what lets them diverge",
    }


def _versus_scratch(runs_: Runs, c: dict) -> dict:
    seeds, last, mean = c["seeds"], c["points"], statistics.fmean
    gains = {}
    for name, grown_name in (("depth", f"depth-interposition-p{last}"), ("width", "width-alpha0.01"),
                             ("depth-width", "depth-width")):
        grown_loss, scratch_loss = runs_.final(seeds, grown_name), runs_.final(seeds, f"scratch-{name}")
        gains[name] = {"grown": mean(grown_loss), "scratch": mean(scratch_loss),
                       "relative_gain": (mean(scratch_loss) - mean(grown_loss)) / mean(scratch_loss),
                       "beats_scratch": ordered(grown_loss, scratch_loss)[0],
                       "extra_train_flops": extra_flops(c, name)}
    return {
        "paper": "+10.66% relative downstream accuracy at 70B over training from scratch with the "
                 "same extra compute",
        "ours": gains, "reproduced": all(g["beats_scratch"] for g in gains.values()),
        "note": "relative_gain is in validation loss (nats/byte); each pair trains the same grown "
                "architecture for the same steps, so the same FLOPs (extra_train_flops)",
    }


def _sunk_cost(runs_: Runs, c: dict) -> dict:
    seeds, last, mean = c["seeds"], c["points"], statistics.fmean
    sunk_seeds = [runs_.final(seeds, "scratch-depth")] + [
        runs_.final(seeds, f"depth-interposition-p{p}") for p in range(1, last + 1)]
    sunk = [mean(losses) for losses in sunk_seeds]
    points = [0] + [p * c["base_iters"] // last for p in range(1, last + 1)]
    return {
        "paper": "average accuracy 38.79 -> 48.99 as the base goes from 0k to 88k steps",
        "ours": {"base_steps": points, "final_loss": sunk},
        "reproduced": all(ordered(later, earlier)[0] for earlier, later in zip(sunk_seeds, sunk_seeds[1:])),
        "note": "final validation loss after the same extra steps, by the base's steps (0: scratch)",
    }


def _optimizer_state(runs_: Runs, c: dict) -> dict:
    copy_, reset = runs_.final(c["seeds"], "depth-width"), runs_.final(c["seeds"], "depth-width-optimizer-reset")
    ok, how = ordered(copy_, reset)
    return {
        "paper": "resets the optimizer (no comparison)",
        "ours": {"copy": statistics.fmean(copy_), "reset": statistics.fmean(reset)},
        "reproduced": None, "seeds": f"copy < reset: {how}",
        "note": "not a claim of the paper; what carrying the Adam state does here",
    }


FINDINGS = {"interposition vs stack": _depth_methods, "noise on expert copies": _noise,
            "grown vs scratch at equal extra compute": _versus_scratch, "sunk cost": _sunk_cost,
            "optimizer state after growth": _optimizer_state}


def train_flops_per_step(config: dict, layers: int, experts: int, topk: int) -> float:
    """6 x active parameters per token (+ attention) x tokens per step: the cost model `plan`
    uses (megatron_recycle.cost), for the toy models' sizes."""
    h, f, s, v = config["hidden"], config["hidden"], config["seq"], 256
    attention = 4 * h * h
    active = layers * (attention + topk * 3 * f * h + experts * h) + v * h
    return (6 * active + 12 * layers * s * h) * s * config["global_batch"]


def extra_flops(config: dict, name: str) -> float:
    c = config
    layers = 2 * c["layers"] if "depth" in name else c["layers"]
    experts, topk = (2 * c["experts"], 2 * c["topk"]) if "width" in name else (c["experts"], c["topk"])
    return train_flops_per_step(c, layers, experts, topk) * c["extra_iters"]


def base_compute_over_chinchilla(out: Path, config: dict) -> float:
    """The late base's training compute over the Chinchilla-optimal 6 N_a (20 N_a), N_a its
    active parameters: what `megatron-recycle plan` / `inspect` report (the growth advisor)."""
    sys.path.insert(0, str(HERE.parent))
    from megatron_recycle.advisor import sunk_compute
    from megatron_recycle.io.checkpoint import CheckpointInfo

    return sunk_compute(CheckpointInfo.read(out / "seed1" / "base", config["base_iters"]))["over_chinchilla"]


# --- output ------------------------------------------------------------------------------
def table(found: list[dict]) -> str:
    lines = [f"{'finding':40s} {'reproduced':>10s}  ours"]
    for f in found:
        mark = {True: "yes", False: "no", None: "n/a"}[f["reproduced"]]
        lines.append(f"{f['name']:40s} {mark:>10s}  {_short(f['ours'])}")
        lines.append(f"{'':40s} {'':>10s}  paper: {f['paper']}")
        if f.get("seeds"):
            lines.append(f"{'':40s} {'':>10s}  seeds: {f['seeds']}")
    return "\n".join(lines)


def _short(value) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_short(v)}" for k, v in value.items())
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "[" + ", ".join(_short(v) for v in value) + "]"
    return str(value)


def plots(out: Path, config: dict, found: list[dict]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    last, written = config["points"], []

    def curves(path: Path, title: str, names: dict):
        fig, ax = plt.subplots(figsize=(7, 4))
        for label, name in names.items():
            records = [r for r in Runs(out).load(f"seed1/{name}") if "val_loss" in r]
            ax.plot([r["iteration"] for r in records], [r["val_loss"] for r in records], "o-", ms=2, label=label)
        ax.set_xlabel("iteration (seed 1)")
        ax.set_ylabel("validation loss (nats/byte)")
        ax.set_title(title)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    curves(out / "interposition_vs_stack.png", "Depth x2: interposition vs stack",
           {f"interposition, base at p{p}": f"depth-interposition-p{p}" for p in (1, last)}
           | {f"stack, base at p{p}": f"depth-stack-p{p}" for p in (1, last)})
    curves(out / "noise.png", "Width x2: noise on the copies",
           {"alpha 0.01": "width-alpha0.01", "alpha 0": "width-alpha0", "re-initialised": "width-reinit"})
    curves(out / "grown_vs_scratch.png", "Grown vs scratch, same extra steps",
           {"grown depth": f"depth-interposition-p{last}", "scratch depth": "scratch-depth",
            "grown width": "width-alpha0.01", "scratch width": "scratch-width",
            "grown depth+width": "depth-width", "scratch depth+width": "scratch-depth-width"})
    curves(out / "sunk_cost.png", "Sunk cost: bases from several points, same extra steps",
           {f"base at p{p}": f"depth-interposition-p{p}" for p in range(1, last + 1)}
           | {"scratch": "scratch-depth"})
    written.append(norm_profile(out, config, plt))
    return written


def norm_profile(out: Path, config: dict, plt) -> Path:
    """Per-layer weight norms of the late base, and of the interposed and stacked models
    grown from it, right after growth and after their extra steps: each expert projection's
    norm / sqrt(numel), averaged over projections and experts, as the paper normalises them."""
    sys.path.insert(0, str(HERE.parent))
    from megatron_recycle.io.checkpoint import CheckpointInfo
    from megatron_recycle.norms import checkpoint_norms

    def layer_norms(root: Path, iteration: int) -> list[float]:  # as `megatron-recycle norms`
        return [layer.norm for layer in checkpoint_norms(CheckpointInfo.read(root, iteration)).layers()]

    last, c = config["points"], config
    start = c["base_iters"]
    base = layer_norms(out / "seed1" / "base", start)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(len(base)), base, "ko-", label="base")
    for method, marker in (("interposition", "s"), ("stack", "^")):
        grown = [base[s] for s in _layer_map(method, len(base))]
        ax.plot(range(len(grown)), grown, f"{marker}--", alpha=0.5, label=f"{method}, at growth")
        trained = layer_norms(out / "seed1" / f"depth-{method}-p{last}", start + c["extra_iters"])
        ax.plot(range(len(trained)), trained, f"{marker}-", label=f"{method}, +{c['extra_iters']} steps")
    ax.set_xlabel("layer")
    ax.set_ylabel("expert weight norm / sqrt(numel)")
    ax.set_title("Per-layer weight norms (seed 1)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "norm_profile.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _layer_map(method: str, layers: int) -> list[int]:
    from megatron_recycle.plan import depth_layer_map, DepthGrowth

    return list(depth_layer_map(layers, DepthGrowth(2, method=method)))


def main(argv=None) -> dict:
    args = parse_args(argv)
    config = setting(args)
    out = args.out.resolve()
    if args.worker is not None:
        worker(args.worker, config)
        return {}
    require_plotting()  # before any compute: the plots come last
    start, previous = time.time(), out / "results.json"
    if args.report_only:
        if not previous.is_file():
            raise SystemExit(f"--report-only: no runs in {out} (no results.json); run without it first")
        recorded = json.loads(previous.read_text())
        wall_seconds = recorded["wall_seconds"]  # of the training
        finished = recorded.get("finished_runs", [name for name, _, _ in runs(config)])
    else:
        out.mkdir(parents=True, exist_ok=True)
        print(f"[findings] {len(runs(config))} runs on {args.nproc} ranks into {out} "
              f"({'quick' if args.quick else 'default'} setting)", flush=True)
        finished = []

        def finished_one(name: str) -> None:  # results.json after every run: nothing is lost
            finished.append(name)
            write_results(out, config, finished, round(time.time() - start, 1))

        launch(args, out, finished_one)
        wall_seconds = round(time.time() - start, 1)
    results = write_results(out, config, finished, wall_seconds)
    found = results["findings"]
    images = []
    if not results["pending"]:
        images = plots(out, config, found)
        results = write_results(out, config, finished, wall_seconds, images)
    print("\n" + table(found))
    if results["pending"]:
        print(f"\n[findings] partial: {len(finished)} of {results['runs']} runs finished; pending: "
              f"{', '.join(results['pending'])} (no plots); wrote {out / 'results.json'}")
    else:
        print(f"\n[findings] {results['wall_seconds']:.0f} s; wrote {out / 'results.json'} and "
              f"{', '.join(p.name for p in images)}")
    return results


def require_plotting() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("paper_findings.py: matplotlib is not installed and the plots need it; install it "
              "(pip install -r requirements/common.txt) and run again", file=sys.stderr)
        raise SystemExit(2)


def write_results(out: Path, config: dict, finished: list[str], wall_seconds: float,
                  images: list[Path] = ()) -> dict:
    """OUT/results.json from the runs that finished, written whole (a new file renamed over it)."""
    found, pending = findings(out, config, set(finished))
    results = {"findings": found, "pending": pending, "config": config, "wall_seconds": wall_seconds,
               "runs": len(runs(config)), "finished_runs": list(finished),
               "plots": [p.name for p in images]}
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, out / "results.json")
    return results


def launch(args, out: Path, finished_one) -> None:
    """The runs in one torchrun; `finished_one(name)` after each."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    passthrough = [*(["--quick"] if args.quick else []),
                   *[f for k, v in vars(args).items() if k in SETTINGS["quick"] and v is not None
                     for f in (f"--{k.replace('_', '-')}", str(v))]]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.nproc}",
           f"--master-port={port}", str(Path(__file__).resolve()), *passthrough, "--worker", str(out)]
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", PYTHONWARNINGS="ignore",
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    with open(out / "runs.log", "w") as log, subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            log.write(line)
            if line.startswith("[findings]"):
                print(line.rstrip(), flush=True)
                finished_one(line.split()[2].rstrip(":"))
    if proc.returncode:
        raise SystemExit(f"the runs failed (rc {proc.returncode}); see {out / 'runs.log'}; the "
                         f"runs that finished are in {out / 'results.json'} (--report-only reports them)")


if __name__ == "__main__":
    main()
    if "--worker" in sys.argv:
        from megatron_recycle.testing import toy

        toy.finish()
