"""A Megatron-LM `--ckpt-format fsdp_dtensor` checkpoint and a `torch_dist` one of the same
weights, for tests/test_fsdp_dtensor.py.

Usage: torchrun --nproc-per-node 2 fsdp_dtensor_source.py source OUT
       torchrun --nproc-per-node 2 fsdp_dtensor_source.py load GROWN_ITER_DIR OUT
       torchrun --nproc-per-node 2 fsdp_dtensor_source.py logits SOURCE_ITER_DIR GROWN_ITER_DIR OUT
`source` writes OUT/fsdp (fsdp_dtensor) and OUT/td (torch_dist), both iteration 5, of FSDP_SPEC
at EP2. `load` loads a torch_dist checkpoint grown from OUT/fsdp by FSDP_PLAN with plain
megatron-core at EP2 (strictness `log_all`: fsdp_dtensor stores no `_extra_state`, so neither
does what is grown from it), checks every local shard against the checkpoint's tensors and
writes OUT/load.json (shards compared, module keys left unloaded). `logits` loads an
fsdp_dtensor source and the fsdp_dtensor checkpoint grown from it (by FSDP_EXACT_PLAN) as
Megatron-LM's fsdp_dtensor load does (the state dict of a model of its size through the same
key functions, torch DCP's `load` with every key required), then undoes those functions into
the modules and writes OUT/logits.json: max |grown - source| / max |source| over the logits.

Megatron-FSDP cannot be built on CPU (its constructor makes CUDA streams), so the model is a
plain GPTModel and its state dict goes through what Megatron-LM's
`preprocess_fsdp_dtensor_state_dict` does before torch DCP saves it: megatron-core's own
`handle_fp8_extra_state_case` (no `_extra_state`) and `handle_experts_in_state_dict` (expert
keys by global expert); the SwiGLU split of `handle_swiglu_in_state_dict` needs Megatron-FSDP's
parameters, so it is done here as it lays the rows out (at TP1: `linear_fc1` rows cut in two,
`_w` then `_v`). Weights outside the experts are DTensors sharded over both ranks (as
Megatron-FSDP shards them, dim 0); the optimizer state is keyed as Megatron-FSDP's
(`state.module.<name>.exp_avg`). Then torch DCP's own `save`, as Megatron-LM calls it.
"""

import re
import sys
from pathlib import Path

import _boot

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import save as dcp_save
from torch.distributed.tensor import DeviceMesh, Shard, distribute_tensor

from megatron.core import parallel_state as ps
from megatron.core.transformer.fsdp_dtensor_checkpoint import (
    handle_experts_in_state_dict,
    handle_fp8_extra_state_case,
)

import ckpt_tools
from megatron_recycle.testing import toy
from scenarios import FSDP_PLAN, FSDP_SPEC

LAYOUT = toy.Layout(ep=2)
ITERATION = 5
# the keys megatron-core's handle_swiglu_in_state_dict splits (its own patterns)
_SWIGLU = re.compile(r"\.mlp\.(experts\.local_experts\.\d+\.|shared_experts\.)?linear_fc1\.(weight|bias)$")


def fsdp_state(model, args, experts=FSDP_SPEC.experts) -> dict:
    sd = dict(model.state_dict_for_save_checkpoint())
    handle_fp8_extra_state_case(sd)
    for key in [k for k in sd if _SWIGLU.search(k)]:
        sd[f"{key}_w"], sd[f"{key}_v"] = (t.clone() for t in torch.chunk(sd.pop(key), 2, dim=0))
    sd = handle_experts_in_state_dict(sd, experts)
    mesh = DeviceMesh("cpu", list(range(dist.get_world_size())))
    model_sd = {k: (v.detach().clone() if ".mlp.experts." in k else
                    distribute_tensor(v.detach().clone(), mesh, [Shard(0)])) for k, v in sd.items()}
    gen = torch.Generator().manual_seed(11 + ps.get_expert_model_parallel_rank())
    optimizer = {"state": {f"module.{k}": {"exp_avg": torch.rand(v.shape, generator=gen),
                                           "exp_avg_sq": torch.rand(v.shape, generator=gen)}
                           for k, v in sd.items()},
                 "param_to_group_meta": {f"module.{k}": {"wd_mult": 1.0} for k in sd}}
    return {"args": args, "checkpoint_version": 3.0, "iteration": ITERATION, "model": model_sd,
            "optimizer": optimizer, "opt_param_scheduler": ckpt_tools.scheduler().state_dict(),
            "num_floating_point_operations_so_far": 0}


def save_sources(out: Path):
    _boot.init()
    chunks = ckpt_tools.save_source(FSDP_SPEC, LAYOUT, out / "td", iteration=ITERATION, seed=4)
    args = toy.megatron_args(FSDP_SPEC, LAYOUT, ckpt_format="fsdp_dtensor", use_megatron_fsdp=True,
                              transformer_impl="local")
    path = out / "fsdp" / f"iter_{ITERATION:07d}"
    if dist.get_rank() == 0:
        path.mkdir(parents=True)
    dist.barrier()
    dcp_save(fsdp_state(chunks[0], args), checkpoint_id=str(path))
    dist.barrier()
    if dist.get_rank() == 0:
        (out / "fsdp" / "latest_checkpointed_iteration.txt").write_text(str(ITERATION))
    _boot.finish()


def load_grown(grown: Path, out: Path):
    from megatron.core import dist_checkpointing

    _boot.init()
    toy.init_parallel(LAYOUT)
    chunks = toy.build(FSDP_SPEC.grown(FSDP_PLAN), LAYOUT, seed=9)
    state = dist_checkpointing.load({"model": toy.sharded_state_dict(chunks)}, str(grown), strict="log_all")
    unloaded = chunks[0].load_state_dict(state["model"], strict=False)
    stored = ckpt_tools.read_checkpoint(grown)
    compared = 0
    for key, _, offset, tensor in ckpt_tools.local_shards(chunks[0].sharded_state_dict()):
        box = tuple(slice(o, o + n) for o, n in zip(offset, (1,) * (len(offset) - tensor.dim()) + tuple(tensor.shape)))
        assert torch.equal(stored[key][box].reshape(tensor.shape), tensor), key
        compared += 1
    _boot.report(out / "load.json", {"compared": compared, "missing": sorted(unloaded.missing_keys),
                                      "unexpected": sorted(unloaded.unexpected_keys)})
    _boot.finish()


def load_fsdp(spec, path: Path):
    """A model of `spec` at LAYOUT loaded from the fsdp_dtensor checkpoint `path`."""
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.tensor import DTensor

    toy.init_parallel(LAYOUT)
    (model,) = toy.build(spec, LAYOUT, seed=9)
    args = toy.megatron_args(spec, LAYOUT, ckpt_format="fsdp_dtensor", use_megatron_fsdp=True,
                             transformer_impl="local")
    request = fsdp_state(model, args, spec.experts)
    dcp_load(request, checkpoint_id=str(path), planner=DefaultLoadPlanner(allow_partial_load=False))
    # the key functions undone: global expert names → local, DTensors whole, GLU halves joined
    names = [k for k in model.state_dict_for_save_checkpoint() if "_extra_state" not in k]
    names = [n for k in names for n in ((f"{k}_w", f"{k}_v") if _SWIGLU.search(k) else (k,))]
    local = handle_experts_in_state_dict({n: n for n in names}, spec.experts)  # global → local
    state = {}
    for name, value in request["model"].items():
        value = value.full_tensor() if isinstance(value, DTensor) else value
        key = local[name]
        key, half = (key[:-2], key[-1]) if _SWIGLU.search(key[:-2]) else (key, None)
        state.setdefault(key, {})[half] = value
    state = {k: torch.cat([v["w"], v["v"]]) if None not in v else v[None] for k, v in state.items()}
    unloaded = model.load_state_dict(state, strict=False)
    assert not unloaded.unexpected_keys and all("_extra_state" in k for k in unloaded.missing_keys), unloaded
    return model


def compare_logits(source: Path, grown: Path, out: Path):
    from function_preservation import logits

    from scenarios import FSDP_EXACT_PLAN

    _boot.init()
    source_logits = logits([load_fsdp(FSDP_SPEC, source)], FSDP_SPEC)
    grown_logits = logits([load_fsdp(FSDP_SPEC.grown(FSDP_EXACT_PLAN), grown)], FSDP_SPEC)
    _boot.report(out / "logits.json", float((grown_logits - source_logits).abs().max()
                                             / source_logits.abs().max()), every_rank=False)
    _boot.finish()


if __name__ == "__main__":
    if sys.argv[1] == "source":
        save_sources(Path(sys.argv[2]))
    elif sys.argv[1] == "logits":
        compare_logits(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
    else:
        load_grown(Path(sys.argv[2]), Path(sys.argv[3]))
