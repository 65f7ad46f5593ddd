"""Checkpoints for the Megatron-LM adapter tests: a base, a dense one, the base with a
dp_reshardable optimizer tag, a grown one carrying the provenance the adapter records (and one
grown with --grow-from-second base_dp), one grown offline
(schema-1 record, as megatron-recycle 0.1 wrote it), a root grown in place (--save =
--load: base at iteration 5, grown at 7), the base saved without `args` in its common state,
and an all-MoE base saved with `moe_layer_freq` as a list (layers keyed by index).

Usage: torchrun --nproc-per-node 1 megatron_lm_checkpoints.py OUT
"""

import sys

import _boot

import ckpt_tools
from megatron_recycle import megatron_lm
from megatron_recycle.testing import toy
from megatron_recycle.provenance import KEY as PROVENANCE_KEY

SPEC = toy.ToySpec(num_layers=4, experts=4, topk=2)
LISTED = toy.ToySpec(num_layers=4, experts=4, topk=2, moe_layer_freq=(1, 1, 1, 1))


def main(out):
    _boot.init()
    ckpt_tools.save_source(SPEC, toy.Layout(), f"{out}/base", 5)
    ckpt_tools.save_source(toy.ToySpec(num_layers=4, experts=None, ffn=64), toy.Layout(), f"{out}/dense", 5)
    ckpt_tools.save_source(SPEC, toy.Layout(), f"{out}/base_dp", 5,
                           content_metadata={"distrib_optim_sharding_type": "dp_reshardable"})
    from test_megatron_lm import parse  # the tests' own argument parsing

    args, explicit = parse(["--load", f"{out}/base", "--grow-depth", "2", "--grow-experts", "2",
                            "--grow-optimizer", "reset"])
    decision = megatron_lm.configure(args, explicit)
    ckpt_tools.save_source(SPEC.grown(decision.plan), toy.Layout(), f"{out}/grown", 7,
                           **{PROVENANCE_KEY: decision.provenance.to_dict()})
    args, explicit = parse(["--load", f"{out}/base", "--grow-experts", "2", "--grow-optimizer", "reset",
                            "--grow-from-second", f"{out}/base_dp"])
    merged = megatron_lm.configure(args, explicit)
    ckpt_tools.save_source(SPEC.grown(merged.plan), toy.Layout(), f"{out}/grown_second", 7,
                           **{PROVENANCE_KEY: merged.provenance.to_dict()})
    offline_record = {"source": f"{out}/base/iter_0000005", "iteration": 5,
                      "plan": decision.plan.describe(), "seed": 1234, "optimizer_policy": "reset",
                      "optimizer": "dropped", "version": "0.1.0", "previous": None}
    ckpt_tools.save_source(SPEC.grown(decision.plan), toy.Layout(), f"{out}/offline_grown", 5,
                           **{PROVENANCE_KEY: offline_record})

    inplace = f"{out}/inplace"
    ckpt_tools.save_source(SPEC, toy.Layout(), inplace, 5)
    args, explicit = parse(["--load", inplace, "--save", inplace, "--grow-depth", "2",
                            "--grow-experts", "2", "--grow-optimizer", "reset"])
    decision = megatron_lm.configure(args, explicit)
    ckpt_tools.save_source(SPEC.grown(decision.plan), toy.Layout(), inplace, 7,
                           **{PROVENANCE_KEY: decision.provenance.to_dict()})
    ckpt_tools.save_source(LISTED, toy.Layout(), f"{out}/listed", 5)
    chunks = toy.build(SPEC, toy.Layout(), seed=1)
    toy.save_checkpoint(f"{out}/noargs", 5, {"model": toy.sharded_state_dict(chunks), "iteration": 5})
    _boot.finish()


if __name__ == "__main__":
    main(sys.argv[1])
