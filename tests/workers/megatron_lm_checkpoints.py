"""Checkpoints for the Megatron-LM adapter tests: a base, the same with a dp_reshardable
optimizer tag, and a grown one carrying the provenance the adapter records.

Usage: torchrun --nproc-per-node 1 megatron_lm_checkpoints.py OUT
"""

import sys

import _boot

import ckpt_tools
from megatron_recycle import megatron_lm, toy
from megatron_recycle.checkpoint import PROVENANCE_KEY

SPEC = toy.ToySpec(num_layers=4, experts=4, topk=2)


def main(out):
    _boot.init()
    ckpt_tools.save_source(SPEC, toy.Layout(), f"{out}/base", 5)
    ckpt_tools.save_source(SPEC, toy.Layout(), f"{out}/base_dp", 5,
                           content_metadata={"distrib_optim_sharding_type": "dp_reshardable"})
    from test_megatron_lm import parse  # the tests' own argument parsing

    args, explicit = parse(["--load", f"{out}/base", "--grow-depth", "2", "--grow-experts", "2",
                            "--grow-optimizer", "reset"])
    decision = megatron_lm.configure(args, explicit)
    ckpt_tools.save_source(SPEC.grown(decision.plan), toy.Layout(), f"{out}/grown", 7,
                           **{PROVENANCE_KEY: decision.provenance})
    _boot.finish()


if __name__ == "__main__":
    main(sys.argv[1])
