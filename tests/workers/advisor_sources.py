"""Checkpoints with the architecture, batch and sequence length of the default setting of
`examples/paper_findings.py`, saved by megatron-core at the iterations of its earliest and
latest bases, with the common state its reference loop writes. The advisor reads only their
metadata, common state and expert norms, so no training is needed to put them where the
paper's findings place those bases.

Usage: torchrun --nproc-per-node 1 advisor_sources.py OUT
Writes OUT/early (the first base's iteration; initial weights: a flat norm profile),
OUT/late (the last base's iteration; layer l's expert weights scaled by 1 + 0.1 l: a profile
rising with depth, as a converged model's), OUT/late-flat (the last base's iteration, initial
weights) and OUT/setting.json (the setting and the iterations).
"""

import json
import sys
from pathlib import Path

import _boot

import torch

from megatron_recycle.testing import toy

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import paper_findings  # noqa: E402
import pretrain_moe  # noqa: E402


def base_args():
    """The paper-findings default setting and the reference loop's flags of its base run."""
    config = paper_findings.setting(paper_findings.parse_args([]))
    flags = next(f for name, f, _ in paper_findings.runs(config) if name == "seed1/base")
    return config, pretrain_moe.parse_args(flags)


def save(root, iteration, args, rise):
    spec, layout = pretrain_moe.spec_from(args), toy.Layout()
    toy.init_parallel(layout)
    (model,) = toy.build(spec, layout, seed=args.seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".experts." in name:
                param.mul_(1 + rise * int(name.split("layers.")[1].split(".")[0]))
    gbs = args.global_batch_size
    toy.save_checkpoint(root, iteration, {
        "model": toy.sharded_state_dict([model]),
        "iteration": iteration,
        "args": toy.megatron_args(spec, layout, consumed_train_samples=iteration * gbs,
                                  global_batch_size=gbs, micro_batch_size=args.micro_batch_size,
                                  train_iters=args.train_iters),
    })


def main(out):
    _boot.init()
    config, args = base_args()
    interval = config["base_iters"] // config["points"]
    iterations = {"early": interval, "late": config["base_iters"], "late-flat": config["base_iters"]}
    for name, iteration in iterations.items():
        save(f"{out}/{name}", iteration, args, 0.1 if name == "late" else 0.0)
    if torch.distributed.get_rank() == 0:
        Path(out, "setting.json").write_text(json.dumps({"config": config, "iterations": iterations}))
    _boot.finish()


if __name__ == "__main__":
    main(sys.argv[1])
