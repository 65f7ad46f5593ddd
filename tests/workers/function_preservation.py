"""Grow with alpha = 0 / zero-init copies and compare logits through megatron-core's forward.

Usage: torchrun --nproc-per-node 2 function_preservation.py OUT
Writes OUT/results.json: case → max |grown - source| / max |source| over the logits.
"""

import sys

import _boot

import torch
from megatron.core import parallel_state as ps

import ckpt_tools
from megatron_recycle.testing import cpu, toy
from scenarios import CHANGING_CASES, PRESERVATION_CASES


def logits(chunks, spec):
    """Logits, or the per-token loss for MTP models (whose forward requires labels)."""
    torch.manual_seed(0)
    tokens = torch.randint(0, spec.vocab, (2, spec.seq))
    positions = torch.arange(spec.seq).unsqueeze(0).expand(2, -1)
    labels = torch.roll(tokens, -1, dims=1) if spec.mtp_layers else None
    (model,) = chunks
    model.eval()
    with torch.no_grad(), cpu.cuda_to_cpu():  # the default causal mask is built on "cuda"
        return model(tokens, positions, None, labels=labels).float()


def mtp_deviation(chunks, plan, source_dir):
    """Max |grown - expected| over MTP tensors: experts width-grown, layers not depth-grown."""
    import torch.distributed as dist

    shards = [None] * dist.get_world_size()
    dist.all_gather_object(shards, ckpt_tools.local_shards(toy.sharded_state_dict(chunks)))
    grown = ckpt_tools.assemble(shards)
    source = ckpt_tools.read_checkpoint(source_dir)
    experts = torch.tensor([e for e, _ in plan.expert_map()])
    worst, mtp_expert_keys = 0.0, 0
    for key, t in grown.items():
        if key.startswith("mtp."):
            mtp_expert_keys += ".experts.experts." in key
            want = source[key]
            if ".experts.experts." in key or key.endswith(".router.weight"):
                want = want[experts]
            worst = max(worst, float((t - want).abs().max()))
    return worst if mtp_expert_keys else float("nan")  # no MTP experts: nothing was checked


def main(out):
    _boot.init()
    results = {}
    for name, (spec, plan, source_layout, target_layout) in {**PRESERVATION_CASES, **CHANGING_CASES}.items():
        root = f"{out}/{name}"
        source = logits(ckpt_tools.save_source(spec, source_layout, root, seed=3), spec)
        chunks = ckpt_tools.grow_into(spec, plan, target_layout, f"{root}/iter_0000001")
        grown = logits(chunks, spec)
        if ps.get_tensor_model_parallel_world_size() > 1:
            raise AssertionError("compare logits at TP1 (vocab-parallel output otherwise)")
        results[name] = float((grown - source).abs().max() / source.abs().max())
        if spec.mtp_layers:
            results[f"{name}/mtp_tensors"] = mtp_deviation(chunks, plan, f"{root}/iter_0000001")
    _boot.report(f"{out}/results.json", results, every_rank=False)
    _boot.finish()


if __name__ == "__main__":
    main(sys.argv[1])
