"""A stand-in for the paper authors' offline growth, the contender in benchmarks/offline_grow.py.

    python benchmarks/authors_method.py --load SRC --save DST [--grow-depth 2] [--grow-experts 2]
        [--grow-noise-alpha 0.01] [--seed 0]

What it mirrors: "Recycling Pretrained Checkpoints: Orthogonal Growth of MoE"
(Mr-Philo/Orthogonal-Model-Growth), its Megatron integration
`integration/megatron/Offline_checkpoint_growth.py` and the same algorithm in `growth/algorithm.py`:

- the whole checkpoint is loaded into one process (their `load_checkpoint` into a built model:
  megatron-core's `dist_checkpointing.load`, here into one tensor per layer and per expert, as a
  Megatron model's state dict holds them);
- depth growth by interposition (`model_depth_growth`, "interleaved"): every layer's tensors are
  copied (`tensor * weight_multiplier`, multiplier 1) to layers l1 l1 l2 l2 ..., then loaded into
  a newly built model of the new depth;
- width growth (`model_moe_width_growth`, factor 2): expert e's tensors are copied to expert
  e + E; the router's rows (weight and expert_bias) are concatenated [original; copy]; each copy
  gets `add_noise_to_tensor`'s noise, N(0, (alpha * std of the tensor copied)^2), drawn whole from
  one generator; then loaded into a newly built model of the new width;
- megatron-core's `dist_checkpointing.save` of that model (their `save_checkpoint`), with the
  args in the common state updated as they do (num_layers, moe_layer_freq, num_experts, topk).

Written here from that published description, on megatron-core alone; none of their code. It is
not their program: no model is built (a "model" is its dict of tensors, allocated anew and
copied into after each growth step, as building a model and `load_state_dict` do, without the
random initialisation a real build also spends time on: the stand-in errs toward the
contender's speed), and it handles what `benchmarks/synthetic_moe.py` writes: tensors only
(no `_extra_state` objects, no optimizer state), every decoder layer an MoE layer. Its memory
holds the whole source, the depth-grown model, the copies and the grown model at once, as
theirs does: peak RSS measured at 8.9-9.9x the source (0.5-1 GB sources, depth x2 + experts x2).

At alpha 0 its output equals `megatron-recycle grow --grow-noise-alpha 0` bit for bit, the
growth record aside (tests/test_benchmarks_authors.py).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

LAYERS = "decoder.layers."  # stored with the layer index as a prepended axis
EXPERTS = ".experts.experts."  # stored with (layer, expert) prepended
ROUTER = (".mlp.router.weight", ".mlp.router.expert_bias")  # rows are experts

# A model's tensors: (storage key, layer or None, expert or None) -> tensor.
Model = dict


def refuse(msg: str):
    print(f"authors_method: {msg}", file=sys.stderr)
    raise SystemExit(2)


def sharded(model: Model, layers: int, experts: int) -> dict:
    """The megatron-core sharded state dict of `model`, one ShardedTensor per tensor."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    out = {}
    for (key, layer, expert), t in model.items():
        axes = [] if layer is None else [(0, layer, layers)]
        if expert is not None:
            axes.append((1, expert, experts))
        out[f"{key}/{layer}/{expert}"] = ShardedTensor.from_rank_offsets(
            key, t, *axes, prepend_axis_num=len(axes))
    return out


def load_whole(info) -> tuple[Model, int, int]:
    """Every tensor of the checkpoint, in this process."""
    from megatron.core import dist_checkpointing

    if info.objects:
        refuse(f"{info.path} holds {len(info.objects)} ShardedObjects (e.g. {info.objects[0]}); "
               "this stand-in reads tensors only, as benchmarks/synthetic_moe.py writes them")
    routers = [s for k, s in info.shapes.items() if k.endswith(ROUTER[0])]
    if not routers or any(not k.startswith((LAYERS, "embedding.", "output_layer.", "decoder."))
                          for k in info.shapes):
        refuse(f"{info.path}: not a model-only MoE GPT checkpoint (no router, or optimizer "
               "state); this stand-in grows model tensors only")
    layers, experts = routers[0][:2]
    model = {}
    for key, shape in info.shapes.items():
        dtype = info.dtypes[key]
        if not key.startswith(LAYERS):
            model[(key, None, None)] = torch.empty(shape, dtype=dtype)
        elif EXPERTS in key:
            model.update({(key, l, e): torch.empty(shape[2:], dtype=dtype)
                          for l in range(layers) for e in range(experts)})
        else:
            model.update({(key, l, None): torch.empty(shape[1:], dtype=dtype) for l in range(layers)})
    dist_checkpointing.load(sharded(model, layers, experts), str(info.path))  # fills in place
    return model, layers, experts


def built(state: Model) -> Model:
    """A new model loaded with `state` (model_provider_func() + load_state_dict(strict=True))."""
    return {k: torch.empty_like(v).copy_(v) for k, v in state.items()}


def add_noise(t: torch.Tensor, alpha: float, gen: torch.Generator) -> torch.Tensor:
    """The copy plus N(0, (alpha * std(t))^2), the paper's symmetry breaking."""
    std = t.detach().float().std().item() * alpha
    return t + torch.normal(0.0, std, size=t.shape, generator=gen, dtype=t.dtype)


def grow_depth(model: Model, factor: int, multiplier: float = 1.0) -> Model:
    """Interposition: source layer l becomes layers l*factor .. l*factor + factor - 1."""
    state = {}
    for (key, layer, expert), t in model.items():
        if layer is None:
            state[(key, None, expert)] = t
        else:
            for j in range(factor):
                state[(key, layer * factor + j, expert)] = t * multiplier
    return built(state)


def grow_width(model: Model, experts: int, alpha: float, gen: torch.Generator,
               multiplier: float = 1.0) -> Model:
    """Expert e copied to e + experts; router rows [original; copy]; noise on every copy."""
    state = dict(model)
    for (key, layer, expert), t in model.items():
        base = t * multiplier  # their load_in_func; an expert's original stays in place, this is its copy
        if key.endswith(ROUTER):
            second = add_noise(base, alpha, gen) if alpha > 0 else base
            state[(key, layer, expert)] = torch.cat([base, second], dim=0)
        elif EXPERTS in key:
            state[(key, layer, expert + experts)] = add_noise(base, alpha, gen) if alpha > 0 else base
        else:
            state[(key, layer, expert)] = base
    return built(state)


def grown_common(common: dict, layers: int, experts: int) -> dict:
    out = copy.deepcopy(common)
    args = out.get("args")
    if args is not None:
        args.num_layers, args.moe_layer_freq = layers, [1] * layers
        args.num_experts, args.moe_router_topk = experts, args.moe_router_topk * 2
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="source checkpoint (root or iter_XXXXXXX)")
    p.add_argument("--save", required=True, help="output checkpoint root (must not exist)")
    p.add_argument("--grow-depth", type=int, default=2)
    p.add_argument("--grow-experts", type=int, default=2)
    p.add_argument("--grow-noise-alpha", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.grow_experts != 2:
        refuse(f"--grow-experts {args.grow_experts}: the authors' width growth is x2 only")
    if args.grow_depth < 1:
        refuse(f"--grow-depth {args.grow_depth}: must be at least 1")
    if Path(args.save).exists():
        refuse(f"--save {args.save}: exists; give a new directory")

    import torch.distributed as dist

    from megatron_recycle.errors import GrowthError
    from megatron_recycle.io.checkpoint import CheckpointInfo
    from megatron_recycle.testing import cpu, toy

    cpu.install()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        info = CheckpointInfo.read(args.load)
    except GrowthError as e:  # CheckpointError too
        refuse(str(e))
    model, layers, experts = load_whole(info)
    model = grow_depth(model, args.grow_depth)
    model = grow_width(model, experts, args.grow_noise_alpha, torch.Generator().manual_seed(args.seed))
    layers, experts = layers * args.grow_depth, experts * 2
    iteration = info.common.get("iteration", int(info.path.name.removeprefix("iter_")))
    toy.save_checkpoint(Path(args.save), iteration,
                        {**grown_common(info.common, layers, experts), **sharded(model, layers, experts)})
    toy.finish()


if __name__ == "__main__":
    main()
