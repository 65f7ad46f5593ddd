"""HybridModel (megatron-core 0.18+) grown at load: every tensor of two target layouts, and
the logits with alpha = 0 and zero-initialised depth copies.

Usage: torchrun --nproc-per-node 2 hybrid_growth.py OUT
Writes OUT/<case>/ (the source checkpoint), OUT/<case>-<layout>-rank<r>.pt (grown shards),
OUT/preservation.json (case → relative logit error; controls too).
"""

import sys

import _boot
import fake_mamba_ssm

fake_mamba_ssm.install()  # before megatron-core's mamba_mixer is imported

import torch  # noqa: E402

import ckpt_tools  # noqa: E402
from function_preservation import logits  # noqa: E402
from megatron_recycle.plan import DepthGrowth, GrowthPlan  # noqa: E402
from megatron_recycle.testing import toy  # noqa: E402
from scenarios import EXACT, HYBRID_NOISY, HYBRID_SPECS, HYBRID_TARGETS  # noqa: E402


def main(out):
    rank, _ = _boot.init()
    results = {}
    for name, spec in HYBRID_SPECS.items():
        root = f"{out}/{name}"
        source_logits = logits(ckpt_tools.save_source(spec, toy.Layout(), root, seed=3), spec)
        noisy = GrowthPlan(spec.architecture(), DepthGrowth(2), HYBRID_NOISY)
        for layout_name, layout in HYBRID_TARGETS.items():
            chunks = ckpt_tools.grow_into(spec, noisy, layout, f"{root}/iter_0000001")
            torch.save(ckpt_tools.local_shards(toy.sharded_state_dict(chunks)),
                       f"{out}/{name}-{layout_name}-rank{rank}.pt")
        for case, plan in {
            "": GrowthPlan(spec.architecture(), DepthGrowth(2, zero_copy_outputs=True), EXACT),
            "/copies_not_zeroed": GrowthPlan(spec.architecture(), DepthGrowth(2), EXACT),
        }.items():
            grown = logits(ckpt_tools.grow_into(spec, plan, toy.Layout(ep=2), f"{root}/iter_0000001"), spec)
            results[name + case] = float((grown - source_logits).abs().max() / source_logits.abs().max())
    _boot.report(f"{out}/preservation.json", results, every_rank=False)
    _boot.finish()


if __name__ == "__main__":
    main(sys.argv[1])
