"""Pretrain, grow with each optimizer policy, continue, save and reload at a third layout,
all with the reference loop (examples/pretrain_moe.py) in one 2-rank group.

Usage: torchrun --nproc-per-node 2 resume_growth.py OUT
Writes OUT/<run>.jsonl (metrics), OUT/<run>/ (checkpoints), OUT/refusal.txt.
"""

import sys
from pathlib import Path

import _boot

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import pretrain_moe  # noqa: E402

from megatron_recycle.plan import GrowthError  # noqa: E402
from resume_scenario import BASE_ITERS, DP2, EP2, GROW, GROWN_ITERS, MODEL, PP2  # noqa: E402


def run(out: Path, name: str, *flags, save=True):
    argv = [*MODEL, *flags, "--metrics", str(out / f"{name}.jsonl")]
    pretrain_moe.main(argv + (["--save", str(out / name)] if save else []))


def main(out):
    out = Path(out)
    _boot.init()
    base = str(out / "base")
    run(out, "base", *EP2, "--train-iters", BASE_ITERS)
    # Width only, alpha = 0: the function is preserved, so is the validation loss.
    run(out, "width_alpha0", *PP2, "--grow-from", base, "--grow-experts", "2",
        "--grow-noise-alpha", "0", "--train-iters", BASE_ITERS, save=False)
    # Grown state, saved before any step: the optimizer state exactly as growth made it.
    for policy in ("copy", "zero"):
        run(out, f"grown_{policy}", *PP2, "--grow-from", base, *GROW, "--grow-optimizer", policy,
            "--train-iters", BASE_ITERS)
    # Continue training after depth x width growth, then reload at a third layout.
    run(out, "grown", *PP2, "--grow-from", base, *GROW, "--train-iters", GROWN_ITERS)
    run(out, "resumed_base", *DP2, "--load", base, "--train-iters", GROWN_ITERS, save=False)
    run(out, "reloaded", *DP2, "--load", str(out / "grown"), "--train-iters", GROWN_ITERS)
    # dp_reshardable: opaque buckets, so `copy` is refused and `reset` works.
    run(out, "dp_base", *EP2, "--dist-optim-format", "dp_reshardable", "--train-iters", "1")
    try:
        run(out, "dp_copy", *PP2, "--grow-from", str(out / "dp_base"), *GROW, "--train-iters", "2")
    except GrowthError as e:
        (out / "refusal.txt").write_text(str(e))
    run(out, "reset", *PP2, "--grow-from", str(out / "dp_base"), *GROW, "--grow-optimizer",
        "reset", "--grow-rewarmup-iters", "2", "--train-iters", "2")
    _boot.finish()


if __name__ == "__main__":
    main(sys.argv[1])
