"""Loads that must fail with a clear GrowthError on every rank, before any tensor is read.

Usage: torchrun --nproc-per-node 2 bad_input.py OUT   → OUT/errors.json: case → message per rank
"""

import dataclasses
import sys

import _boot

import torch

import ckpt_tools
from megatron_recycle.testing import toy
from megatron_recycle.plan import DepthGrowth, GrowthError, GrowthPlan, WidthGrowth
from megatron_recycle.load_hook import GrowthLoadStrategy

SPEC = toy.ToySpec()
PLAN = GrowthPlan(SPEC.architecture(), DepthGrowth(2), WidthGrowth(2))
GROWN = SPEC.grown(PLAN)
CASES = {
    # target model built with a layer count the plan does not make
    "wrong_layers": (dataclasses.replace(GROWN, num_layers=6), toy.Layout(ep=2)),
    "wrong_experts": (dataclasses.replace(GROWN, experts=4, topk=2), toy.Layout(ep=2)),
    # a tensor the source does not have
    "unmappable_key": (dataclasses.replace(GROWN, shared_expert=16), toy.Layout(ep=2)),
    # a TP-independent shape that differs from the source
    "other_hidden_size": (dataclasses.replace(GROWN, moe_ffn=32), toy.Layout(ep=2)),
}


def main(out):
    _boot.init()
    ckpt_tools.save_source(SPEC, toy.Layout(), f"{out}/src")
    errors = {}
    for name, (target, layout) in CASES.items():
        toy.init_parallel(layout)
        chunks = toy.build(target, layout, seed=5)
        before = [p.detach().clone() for p in chunks[0].parameters()]
        try:
            from megatron.core import dist_checkpointing

            dist_checkpointing.load({"model": toy.sharded_state_dict(chunks)},
                                    f"{out}/src/iter_0000001", GrowthLoadStrategy(PLAN))
            errors[name] = None
        except GrowthError as e:
            errors[name] = str(e)
        untouched = all(torch.equal(a, b) for a, b in zip(before, chunks[0].parameters()))
        errors[f"{name}/weights_untouched"] = untouched
    _boot.report(f"{out}/errors.json", errors)
    _boot.finish()


if __name__ == "__main__":
    main(sys.argv[1])
