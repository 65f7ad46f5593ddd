"""How exactly upcycled models compute what the dense model did: megatron-recycle's upcycling
(at load, alpha 0) vs megatron-core's own (`moe.upcycling_utils.upcycle_state_dict`, what
Megatron-LM's --moe-use-upcycling runs), on the same dense model, CPU, one process.

    python benchmarks/upcycling_vs_megatron.py [--out benchmarks/results/upcycling_vs_megatron.json]

For each setting (experts E, top-k K, granularity G) it prints the relative logit error of
both against the dense model: max |upcycled - dense| / max |dense|. Needs megatron-core 0.19+
(upcycling_utils as Megatron-LM calls it) and torch; the dense model is a small GPT with a
SwiGLU MLP.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

SETTINGS = [(4, 2, 1), (8, 2, 1), (4, 4, 4), (8, 4, 4), (4, 2, 2)]  # (experts, top-k, granularity)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(HERE / "results" / "upcycling_vs_megatron.json"))
    args = p.parse_args()

    import torch
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core.transformer.moe.upcycling_utils import upcycle_state_dict

    from megatron_recycle import GrowthLoadStrategy
    from megatron_recycle.plan import GrowthPlan, Upcycling, WidthGrowth
    from megatron_recycle.testing import cpu, toy

    cpu.install()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29561"),
                      RANK="0", WORLD_SIZE="1")
    dist.init_process_group("gloo")
    layout = toy.Layout()
    toy.init_parallel(layout)
    dense_spec = toy.ToySpec(num_layers=4, experts=None, ffn=64, hidden=32, vocab=64)

    def logits(model):
        torch.manual_seed(0)
        tokens = torch.randint(0, dense_spec.vocab, (2, dense_spec.seq))
        positions = torch.arange(dense_spec.seq).unsqueeze(0).expand(2, -1)
        model.eval()
        with torch.no_grad(), cpu.cuda_to_cpu():
            return model(tokens, positions, None).float()

    (dense,) = toy.build(dense_spec, layout, seed=3)
    reference = logits(dense)
    work = Path(tempfile.mkdtemp())
    toy.save_checkpoint(work / "dense", 1, {"model": dense.sharded_state_dict(),
                                            "args": toy.megatron_args(dense_spec, layout), "iteration": 1})
    rows = []
    for experts, topk, granularity in SETTINGS:
        plan = GrowthPlan(dense_spec.architecture(), width=WidthGrowth(noise_alpha=0.0),
                          upcycle=Upcycling(experts=experts, topk=topk, granularity=granularity))
        spec = dense_spec.grown(plan)
        (ours,) = toy.build(spec, layout, seed=11)
        with cpu.cuda_to_cpu():
            state = dist_checkpointing.load({"model": ours.sharded_state_dict()}, str(work / "dense" / "iter_0000001"),
                                            GrowthLoadStrategy(plan))
        ours.load_state_dict(state["model"])
        (theirs,) = toy.build(spec, layout, seed=11)
        theirs.load_state_dict(upcycle_state_dict([theirs], [dense])["model"])
        error = {name: float((logits(m) - reference).abs().max() / reference.abs().max())
                 for name, m in (("megatron_recycle", ours), ("megatron_core", theirs))}
        rows.append({"experts": experts, "topk": topk, "granularity": granularity, **error})
        print(f"E={experts} K={topk} G={granularity}: megatron-recycle {error['megatron_recycle']:.2e}, "
              f"megatron-core upcycling {error['megatron_core']:.2e}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))
    toy.finish()


if __name__ == "__main__":
    main()
