"""Legacy `torch` checkpoints as Megatron-LM's `--ckpt-format torch` writes them
(`iter_N/mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt`: args, iteration, the rank's
`state_dict_for_save_checkpoint()`, optimizer, scheduler and RNG state; saved by the ranks of
expert data-parallel rank 0), written with megatron-core alone, with the torch_dist checkpoint
of the same model beside each (its keys and global tensors are what the reader must give).

Usage: torchrun --nproc-per-node 4 legacy_torch.py save OUT
         → OUT/{name}-torch and OUT/{name}-dist, for name in scenarios.LEGACY_SOURCES
       torchrun --nproc-per-node 2 legacy_torch.py logits SOURCE_ITER GROWN_ITER OUT
         → OUT/logits.json: max |grown - source| / max |source| of the logits at TP1 EP2
"""

import os
import random
import sys
import zlib

import _boot

import numpy as np
import torch
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps

from function_preservation import logits
from megatron_recycle.testing import toy
from scenarios import LEGACY_EXACT_PLAN, LEGACY_SOURCES, LEGACY_SPEC

ITERATION = 5


def distinct_weights(chunk, virtual_stage: int) -> None:
    """Every weight drawn afresh from its place (virtual stage included), so that layers of different stages and experts
    of different expert ranks differ (the toy's seeded init repeats them); replicas stay equal."""
    tp, pp, ep = (ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
                  ps.get_expert_model_parallel_rank())
    for name, p in chunk.named_parameters():
        split = getattr(p, "tensor_model_parallel", False)
        expert = not getattr(p, "allreduce", True)
        place = f"{name}/{pp}/{virtual_stage}/{tp if split else '-'}/{ep if expert else '-'}"
        gen = torch.Generator().manual_seed(zlib.crc32(place.encode()))
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05 + (1.0 if name.endswith("norm.weight") else 0.0))


def rank_file(root, layout) -> str:
    """Megatron-LM's get_checkpoint_name."""
    name = f"mp_rank_{ps.get_tensor_model_parallel_rank():02d}"
    if layout.pp > 1:
        name += f"_{ps.get_pipeline_model_parallel_rank():03d}"
    if layout.ep > 1:
        name += f"_{ps.get_expert_model_parallel_rank():03d}"
    return f"{root}/iter_{ITERATION:07d}/{name}/model_optim_rng.pt"


def save(out):
    import torch.distributed as dist

    for name, (spec, layout) in LEGACY_SOURCES.items():
        toy.init_parallel(layout)
        chunks = toy.build(spec, layout, seed=3)
        for virtual_stage, chunk in enumerate(chunks):
            distinct_weights(chunk, virtual_stage)
        args = toy.megatron_args(spec, layout, swiglu=spec.glu, ckpt_format="torch",
                                 untie_embeddings_and_output_weights=True,
                                 virtual_pipeline_model_parallel_size=layout.vpp,
                                 decoder_first_pipeline_num_layers=layout.first_stage_layers,
                                 decoder_last_pipeline_num_layers=layout.last_stage_layers)
        models = {"model": chunks[0].state_dict_for_save_checkpoint()} if len(chunks) == 1 else {
            f"model{i}": c.state_dict_for_save_checkpoint() for i, c in enumerate(chunks)}
        if ps.get_expert_data_parallel_rank() == 0:
            path = rank_file(f"{out}/{name}-torch", layout)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.save({
                "args": args, "checkpoint_version": 3.0, "iteration": ITERATION, **models,
                "optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1e-4}]},
                "opt_param_scheduler": {"max_lr": 3e-4, "num_steps": ITERATION},
                "rng_state": [{"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
                               "torch_rng_state": torch.get_rng_state(), "rng_tracker_states": {}}],
                "num_floating_point_operations_so_far": 0,
            }, path)
        dist.barrier()
        if dist.get_rank() == 0:
            with open(f"{out}/{name}-torch/latest_checkpointed_iteration.txt", "w") as f:
                f.write(str(ITERATION))
        toy.save_checkpoint(f"{out}/{name}-dist", ITERATION, {
            "model": toy.sharded_state_dict(chunks), "args": args, "iteration": ITERATION})


def compare_logits(source, grown, out):
    layout = toy.Layout(ep=2)
    result = []
    for spec, path in ((LEGACY_SPEC, source), (LEGACY_SPEC.grown(LEGACY_EXACT_PLAN), grown)):
        toy.init_parallel(layout)
        chunks = toy.build(spec, layout, seed=11)
        state = dist_checkpointing.load({"model": toy.sharded_state_dict(chunks)}, path)  # plainly
        toy.load_state(chunks, state["model"])
        result.append(logits(chunks, spec))
    source_logits, grown_logits = result
    _boot.report(f"{out}/logits.json", float((grown_logits - source_logits).abs().max()
                                             / source_logits.abs().max()), every_rank=False)


if __name__ == "__main__":
    _boot.init()
    if sys.argv[1] == "save":
        save(sys.argv[2])
    else:
        compare_logits(*sys.argv[2:5])
    _boot.finish()
