"""What a Megatron-LM job does with its `--load` and `--grow-*` flags, decided once from its
parsed arguments, before any model exists.

`configure(args, explicit)` reads the checkpoint metadata, decides between *grow* (load the
source through the growth strategy) and *resume* (a checkpoint grown from this source with
these options already exists: load it plainly, never grow twice — a requeued job), sets the
target `num_layers` / `num_experts` / `moe_router_topk` / `moe_layer_freq`, and refuses bad
combinations naming the flag to change. No torch.distributed, no tensors are read.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from .. import compat, hybrid, merge, upcycling
from ..errors import GrowthError
from ..growth_run import (check_optimizer_growth, find_grown, growth_notes, growth_provenance,
                          has_checkpoint, plan_growth, read_second, real_path)
from ..io.checkpoint import CheckpointInfo
from ..options import Growth, add_growth_args, given_options, growth_from_args
from ..plan import GrowthPlan, nothing_to_grow
from ..provenance import Provenance

# Megatron-LM argument dests that growth sets; their values given on the command line are
# checked against the plan.
SIZE_DESTS = ("num_layers", "num_experts", "moe_router_topk")
HYBRID_PATTERN_DESTS = ("hybrid_layer_pattern", "hybrid_override_pattern")  # 0.19+, older
UPCYCLE_SIZE_DESTS = ("moe_ffn_hidden_size", "moe_shared_expert_intermediate_size")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `--grow-*` options (an `extra_args_provider` for Megatron-LM's parser)."""
    return add_growth_args(parser)


def requested(args) -> Optional[Growth]:
    """The growth the `--grow-*` / `--upcycle-*` flags ask for; None when none is given. Flags
    that ask for no growth are refused: the job would train on without them, silently."""
    growth = growth_from_args(args)
    if growth.asked:
        return growth
    if given := given_options(args):
        raise nothing_to_grow(", ".join(given))
    return None


@dataclass
class Decision:
    """What this job does with its `--load`, decided once at argument time."""

    grow: bool  # True: grow `checkpoint`; False: it already is the grown model, load plainly
    plan: GrowthPlan
    request: Growth  # the --grow-* / --upcycle-* options
    checkpoint: CheckpointInfo  # the iteration directory that will be loaded
    load: str  # the root `args.load` is set to
    provenance: Provenance  # written into the common state of every checkpoint this job saves
    updates: dict[str, Any]  # the Megatron-LM args set from the plan
    notes: list[str]
    second: Optional[merge.Second] = None  # --grow-from-second, when growing (pinned)


def explicit_dests(args, parser: argparse.ArgumentParser) -> set[str]:
    """The size arguments the user gave (differ from the parser's defaults)."""
    return {d for d in SIZE_DESTS if getattr(args, d, None) != parser.get_default(d)}


def configure(args, explicit: set[str]) -> Optional[Decision]:
    """Decide grow vs resume, set the target sizes on `args`. None when no growth is asked.

    Reads only checkpoint metadata (`.metadata`, `common.pt`), on every rank alike; raises
    GrowthError before any model exists.
    """
    request = requested(args)
    if request is None:
        return None
    if getattr(args, "moe_use_upcycling", False):
        raise GrowthError("--moe-use-upcycling is Megatron's own upcycling (no optimizer state, the "
                          "iteration reset, a relaunch); megatron-recycle upcycles with "
                          "--upcycle-experts: give one of them")
    if args.use_checkpoint_args:
        raise GrowthError(
            "--use-checkpoint-args overwrites num_layers, num_experts and the MoE settings "
            "with the source checkpoint's, which growth changes; drop --use-checkpoint-args "
            "and pass the base run's model arguments (the --grow-* flags derive the rest)")
    if not args.load:
        raise GrowthError("--grow-* needs --load pointing at the source checkpoint")
    if getattr(args, "ckpt_format", "torch_dist") != "torch_dist":
        raise GrowthError(
            f"--ckpt-format {args.ckpt_format}: growth reads and writes torch_dist "
            "checkpoints; use --ckpt-format torch_dist")
    decision = _resume_decision(args, request) or _grow_decision(args, request)
    decision.updates = target_updates(decision.plan, args, explicit, decision.notes)
    for dest, value in decision.updates.items():
        setattr(args, dest, value)
    args.load = decision.load
    if decision.grow:
        _configure_growth_run(args, decision)
    else:
        args.ckpt_step = None  # the grown checkpoint's own latest iteration
    return decision


def target_updates(plan: GrowthPlan, args, explicit: set[str], notes: list[str]) -> dict:
    """The Megatron-LM args the plan's target fixes; given sizes must be the source's
    (the base run's script, replaced) or the target's (checked by the plan)."""
    src = plan.source
    source_value = {"num_layers": src.num_layers, "num_experts": src.num_experts,
                    "moe_router_topk": src.topk}
    given = {}
    for dest in SIZE_DESTS:
        value = getattr(args, dest) if dest in explicit else None
        if value is not None and value == source_value[dest] and not _is_target(plan, dest, value):
            notes.append(f"--{dest.replace('_', '-')} {value} is the base run's; the grown "
                         "model's comes from the plan")
            value = None
        given[dest] = value
    plan.check_target(
        num_layers=given["num_layers"],
        num_experts=given["num_experts"],
        topk=given["moe_router_topk"],
        expert_parallel=args.expert_model_parallel_size,
        pipeline_parallel=args.pipeline_model_parallel_size,
        num_layers_in_first_stage=getattr(args, "decoder_first_pipeline_num_layers", None),
        num_layers_in_last_stage=getattr(args, "decoder_last_pipeline_num_layers", None),
    )
    target = plan.target
    updates = {"num_layers": target.num_layers}
    if target.is_moe:
        updates.update(num_experts=target.num_experts, moe_router_topk=target.topk)
    dest = next((d for d in HYBRID_PATTERN_DESTS if getattr(args, d, None)), None)
    if target.is_hybrid:
        updates[dest or HYBRID_PATTERN_DESTS[0]] = hybrid_pattern(plan, args, dest)
    elif dest is not None:
        raise GrowthError(f"--{dest.replace('_', '-')} builds a HybridModel, but the source "
                          "checkpoint is a GPT model; growing while converting GPT to hybrid is "
                          "not supported: grow it as GPT (pretrain_gpt.py)")
    else:
        freq = moe_layer_freq(plan, getattr(args, "moe_layer_freq", None))
        if freq is not None:
            updates["moe_layer_freq"] = freq
    for dest, value in upcycling.model_args(plan, getattr(args, "ffn_hidden_size", None)).items():
        given_value = getattr(args, dest, None)
        if dest in UPCYCLE_SIZE_DESTS and given_value not in (None, value):
            raise GrowthError(f"--{dest.replace('_', '-')} {given_value} does not match upcycling "
                              f"(--ffn-hidden-size / --upcycle-granularity): pass {value} or drop it")
        updates[dest] = value
    return updates


def moe_layer_freq(plan: GrowthPlan, given) -> Optional[list[int]]:
    """The grown `--moe-layer-freq` list: the target's where the layers are listed (the
    checkpoint keys them by index), or a given list grown with the layers by the plan's layer
    map; None to keep an integer (stacked layers). A given list must be the base run's (one
    entry per source layer) or the grown one."""
    target = plan.target.moe_layer_freq()
    if not isinstance(given, (list, tuple)):
        return target
    given = [int(x) for x in given]
    source = plan.source.moe_layer_freq() or [1] * plan.source.num_layers
    if given == source:
        return target or [given[s] for s in plan.layer_map]
    if given == (target or [1] * plan.target_num_layers):
        return given
    raise GrowthError(f"--moe-layer-freq {given} is neither the source checkpoint's layers {source} "
                      f"nor the grown ones {target or [1] * plan.target_num_layers}; pass one of them")


def hybrid_pattern(plan: GrowthPlan, args, dest: Optional[str]) -> str:
    """The grown `--hybrid-layer-pattern`: the one given if it is already the grown pattern, the
    grown one cut into as many pipeline segments as the given (base) one when that fits the
    job's pipeline size, else one segment per pipeline stage."""
    source, target = plan.source.hybrid_pattern, plan.target.hybrid_pattern
    if dest is None:
        raise GrowthError(f"the source checkpoint is a HybridModel ({source!r}): run pretrain_hybrid.py "
                          "with the base run's --hybrid-layer-pattern (growth derives the grown one)")
    given = getattr(args, dest)
    flag = f"--{dest.replace('_', '-')}"
    main, mtp = hybrid.split(given)
    if main + mtp == target:
        return given
    if main + mtp != source:
        raise GrowthError(f"{flag} {given!r} is neither the source checkpoint's pattern {source!r} "
                          f"nor the grown one {target!r}; pass one of them")
    segments = given.partition(hybrid.MTP)[0].count(hybrid.PIPE) + 1
    stages = args.pipeline_model_parallel_size
    return plan.target_hybrid_pattern(segments if segments % stages == 0 else stages,
                                      "--pipeline-model-parallel-size")


def _is_target(plan: GrowthPlan, dest: str, value) -> bool:
    return value == {"num_layers": plan.target_num_layers, "num_experts": plan.target_num_experts,
                     "moe_router_topk": plan.target_topk}[dest]


def _resume_decision(args, request: Growth) -> Optional[Decision]:
    """A checkpoint grown from this `--load` with these options, in `--save` or `--load`:
    a requeued job. It is loaded plainly, whatever iteration it reached."""
    roots = [(r, "--save" if r == args.save else "--load") for r in dict.fromkeys([args.save, args.load])]
    grown = find_grown(request, roots, [args.load], args.ckpt_step)
    if grown is not None:
        return Decision(False, grown.plan, request, grown.info, grown.root, grown.provenance, {},
                        [grown.note()])
    if has_checkpoint(args.save) and real_path(args.save) != real_path(args.load):
        info = CheckpointInfo.read(args.save, flag="--save")
        raise GrowthError(
            f"--save {args.save} already holds a checkpoint (iteration {info.iteration}) that "
            f"was not grown from --load {args.load} with these --grow-* options; point --save "
            "at an empty directory, or --load at that checkpoint without --grow-* flags")
    return None


def _grow_decision(args, request: Growth) -> Decision:
    info = CheckpointInfo.read(args.load, args.ckpt_step)
    compat.check_loadable(info)
    plan = plan_growth(request, source_architecture(info, args))
    layout = {"tensor_model_parallel_size": args.tensor_model_parallel_size,
              "pipeline_model_parallel_size": args.pipeline_model_parallel_size,
              "expert_model_parallel_size": args.expert_model_parallel_size}
    optimizer_loaded = request.optimizer != "reset"
    second = read_second(request, info, optimizer_loaded)
    provenance = growth_provenance(request, plan, info, args.load, "megatron-lm", layout,
                                   optimizer_loaded, second)
    return Decision(True, plan, request, info, args.load, provenance, {}, growth_notes(info, plan),
                    second)


def source_architecture(info: CheckpointInfo, args):
    """The checkpoint's architecture; a top-k it does not record (a checkpoint without `args`)
    is this run's `--moe-router-topk`, the base run's script's (its default where not given)."""
    arch = info.architecture()
    if arch.is_moe and arch.topk is None:
        topk = getattr(args, "moe_router_topk", None)
        if not topk:
            raise GrowthError(f"{info.path} records no top-k (its common state has no args): "
                              "pass the base run's --moe-router-topk")
        arch = dataclasses.replace(arch, topk=topk)
    return arch


def _configure_growth_run(args, decision: Decision) -> None:
    """Optimizer, RNG and schedule settings of the run that grows."""
    request, info = decision.request, decision.checkpoint
    args.no_load_rng = True  # RNG states are per (TP, PP) rank of the old layout
    # The step count continues; warmup, decay and LR come from this run's flags.
    if not args.use_checkpoint_opt_param_scheduler:
        args.override_opt_param_scheduler = True
    if request.optimizer != "reset":
        dropping = next((f for f, on in (("--no-load-optim", args.no_load_optim),
                                         ("--finetune", args.finetune)) if on), None)
        if dropping is not None:  # Megatron-LM would silently not load what we grow
            raise GrowthError(
                f"{dropping} drops the optimizer state that --grow-optimizer {request.optimizer}"
                f"{' (the default)' if request.optimizer == 'copy' else ''} grows: drop "
                f"{dropping} to grow it, or pass --grow-optimizer reset for a fresh optimizer")
    if request.optimizer == "reset":
        args.no_load_optim = True
        return
    src_ep = getattr(info.args, "expert_model_parallel_size", 1) or 1
    check_optimizer_growth(request.optimizer, info, args.use_distributed_optimizer, src_ep,
                           args.expert_model_parallel_size, "--use-distributed-optimizer",
                           "--expert-model-parallel-size")
