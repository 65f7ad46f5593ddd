"""Megatron-LM integration: `--grow-*` flags for `pretrain_gpt.py`, requeue-safe.

Three layers, each usable alone:

* `add_arguments(parser)`: the `--grow-*` argument group (an `extra_args_provider`).
* `configure(args, explicit)`: pure decisions on parsed arguments, before any model exists:
  read the checkpoint metadata, decide between *grow* (load the source through the growth
  strategy) and *resume* (a grown checkpoint already exists: load it plainly, never grow
  twice), set the target `num_layers` / `num_experts` / `moe_router_topk` /
  `moe_layer_freq`, and refuse bad combinations with the flag to change. No
  torch.distributed, no tensors are read.
* `install()`: hooks on Megatron-LM's module globals, looked up at call time, so the stock
  `pretrain_gpt.py` needs no edit: `parse_args` (adds the group, runs `configure`), the
  `torch_dist` load strategy factory, `check_checkpoint_args` (accepts the grown
  `num_layers` only while growing), `load_checkpoint` in the training loop (optimizer and LR
  schedule policy) and `generate_state_dict` (records the provenance in `common.pt`).
"""

from __future__ import annotations

import argparse
import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from . import __version__
from .checkpoint import PROVENANCE_KEY, TRACKER_FILE, CheckpointInfo
from .options import add_growth_args, growth_from_args
from .plan import DepthGrowth, GrowthError, GrowthPlan, WidthGrowth
from .resume import load_moment_policy

# Megatron-LM argument dests that growth sets; their values given on the command line are
# checked against the plan.
SIZE_DESTS = ("num_layers", "num_experts", "moe_router_topk")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `--grow-*` options (an `extra_args_provider` for Megatron-LM's parser)."""
    return add_growth_args(parser)


@dataclass(frozen=True)
class GrowthRequest:
    """The `--grow-*` options, as given."""

    depth: DepthGrowth
    width: WidthGrowth
    optimizer: str = "copy"  # copy / zero (copies' moments) / reset
    rewarmup_iters: int = 0  # 0: the LR schedule continues

    @classmethod
    def from_args(cls, args) -> Optional["GrowthRequest"]:
        """None when no growth is asked for (depth and width factors 1, no layer map)."""
        if args.grow_depth == 1 and args.grow_layer_map is None and args.grow_experts == 1:
            return None
        depth, width, optimizer = growth_from_args(args)
        return cls(depth, width, optimizer, args.grow_rewarmup_iters)

    def same_growth(self, plan_description: dict) -> bool:
        try:
            depth = DepthGrowth(**plan_description["depth"])
            width = WidthGrowth(**plan_description["width"])
        except (KeyError, TypeError):  # written by another version: not ours to resume
            return False
        return depth == self.depth and width == self.width


@dataclass
class Decision:
    """What this job does with its `--load`, decided once at argument time."""

    grow: bool  # True: grow `checkpoint`; False: it already is the grown model, load plainly
    plan: GrowthPlan
    request: GrowthRequest
    checkpoint: CheckpointInfo  # the iteration directory that will be loaded
    load: str  # the root `args.load` is set to
    provenance: dict  # written into common.pt of every checkpoint this job saves
    updates: dict[str, Any]  # the Megatron-LM args set from the plan
    notes: list[str]


def explicit_dests(args, parser: argparse.ArgumentParser) -> set[str]:
    """The size arguments the user gave (differ from the parser's defaults)."""
    return {d for d in SIZE_DESTS if getattr(args, d, None) != parser.get_default(d)}


def configure(args, explicit: set[str]) -> Optional[Decision]:
    """Decide grow vs resume, set the target sizes on `args`. None when no growth is asked.

    Reads only checkpoint metadata (`.metadata`, `common.pt`), on every rank alike; raises
    GrowthError before any model exists.
    """
    request = GrowthRequest.from_args(args)
    if request is None:
        return None
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
        freq = target.moe_layer_freq()
        if freq is not None:
            updates["moe_layer_freq"] = freq
    return updates


def _is_target(plan: GrowthPlan, dest: str, value) -> bool:
    return value == {"num_layers": plan.target_num_layers, "num_experts": plan.target_num_experts,
                     "moe_router_topk": plan.target_topk}[dest]


def _realpath(path) -> str:
    return os.path.realpath(os.fspath(path))


def _has_checkpoint(root) -> bool:
    return bool(root) and (Path(root) / TRACKER_FILE).exists()


def _resume_decision(args, request: GrowthRequest) -> Optional[Decision]:
    """A checkpoint grown from this `--load` with these options, in `--save` or `--load`:
    a requeued job. It is loaded plainly, whatever iteration it reached."""
    source_root = _realpath(args.load)
    candidates = [r for r in dict.fromkeys([args.save, args.load]) if _has_checkpoint(r)]
    for root in candidates:
        info = CheckpointInfo.read(root, flag="--save" if root == args.save else "--load")
        prov = info.provenance
        if not (prov and prov.get("source", {}).get("load") == source_root
                and (args.ckpt_step is None or prov["source"].get("iteration") == args.ckpt_step)
                and request.same_growth(prov.get("plan", {}))):
            continue
        plan = GrowthPlan.from_description(prov["plan"])
        have = info.architecture()
        if (have.num_layers, have.num_experts) != (plan.target.num_layers, plan.target.num_experts):
            raise GrowthError(
                f"{info.path} records growth to {plan.target.num_layers} layers / "
                f"{plan.target.num_experts} experts but holds {have.num_layers} / "
                f"{have.num_experts}; the checkpoint is inconsistent")
        note = (f"{info.path} was already grown from {prov['source']['path']} with these "
                "options: resuming it, no growth")
        return Decision(False, plan, request, info, str(root), prov, {}, [note])
    if _has_checkpoint(args.save) and _realpath(args.save) != source_root:
        info = CheckpointInfo.read(args.save, flag="--save")
        raise GrowthError(
            f"--save {args.save} already holds a checkpoint (iteration {info.iteration}) that "
            f"was not grown from --load {args.load} with these --grow-* options; point --save "
            "at an empty directory, or --load at that checkpoint without --grow-* flags")
    return None


def _grow_decision(args, request: GrowthRequest) -> Decision:
    info = CheckpointInfo.read(args.load, args.ckpt_step)
    plan = GrowthPlan(info.architecture(), request.depth, request.width)
    if plan.is_identity:
        raise GrowthError("the --grow-* options change nothing (factor 1, identity layer map)")
    provenance = {
        "version": __version__,
        "source": {"load": _realpath(args.load), "path": _realpath(info.path),
                   "iteration": info.iteration},
        "plan": plan.describe(),
        "optimizer_policy": request.optimizer,
        "rewarmup_iters": request.rewarmup_iters,
        "layout": {"tensor_model_parallel_size": args.tensor_model_parallel_size,
                   "pipeline_model_parallel_size": args.pipeline_model_parallel_size,
                   "expert_model_parallel_size": args.expert_model_parallel_size},
    }
    notes = [f"growing {info.path}: {plan.source.num_layers} -> {plan.target_num_layers} layers, "
             f"{plan.source.num_experts} -> {plan.target_num_experts} experts, top-k "
             f"{plan.source.topk} -> {plan.target_topk}"] + plan.exactness_notes()
    return Decision(True, plan, request, info, args.load, provenance, {}, notes)


def _configure_growth_run(args, decision: Decision) -> None:
    """Optimizer, RNG and schedule settings of the run that grows."""
    request, info = decision.request, decision.checkpoint
    args.no_load_rng = True  # RNG states are per (TP, PP) rank of the old layout
    # The step count continues; warmup, decay and LR come from this run's flags.
    if not args.use_checkpoint_opt_param_scheduler:
        args.override_opt_param_scheduler = True
    if request.optimizer == "reset" or args.no_load_optim or args.finetune:
        args.no_load_optim = True
        return
    fmt = info.optimizer_format
    load_moment_policy(request.optimizer, fmt)  # refuses what cannot be grown, saying why
    if (fmt == "non_distributed") == bool(args.use_distributed_optimizer):
        raise GrowthError(
            f"--grow-optimizer {request.optimizer}: {info.path} was saved "
            f"{'without' if fmt == 'non_distributed' else 'with'} --use-distributed-optimizer "
            "and this run differs; match it or use --grow-optimizer reset")
    src_ep = getattr(info.args, "expert_model_parallel_size", 1) or 1
    if (src_ep == 1) != (args.expert_model_parallel_size == 1):  # one optimizer vs dense + expert
        raise GrowthError(
            f"--grow-optimizer {request.optimizer}: Megatron's optimizer state cannot move between "
            f"--expert-model-parallel-size 1 and > 1 (source {src_ep}, now "
            f"{args.expert_model_parallel_size}); use --grow-optimizer reset")


# --- hooks on Megatron-LM -------------------------------------------------------------------

_decision: Optional[Decision] = None
_installed = False


def active_decision() -> Optional[Decision]:
    return _decision


def install() -> None:
    """Hook Megatron-LM's module globals (idempotent). Import Megatron-LM after sys.path
    points at the checkout whose `pretrain_gpt.py` runs."""
    global _installed
    if _installed:
        return
    from megatron.training import arguments, checkpointing, initialize, training

    original_parse = arguments.parse_args
    for module in (arguments, initialize):  # core_v0.16.1: initialize; newer: arguments
        if getattr(module, "parse_args", None) is original_parse:
            module.parse_args = _parse_args_hook(original_parse)
    if hasattr(checkpointing, "get_default_load_sharded_strategy"):
        checkpointing.get_default_load_sharded_strategy = _strategy_hook(
            checkpointing.get_default_load_sharded_strategy)
    else:  # newer main constructs the strategy class directly
        checkpointing.TorchDistLoadShardedStrategy = _strategy_hook(
            checkpointing.TorchDistLoadShardedStrategy)
    checkpointing.check_checkpoint_args = _check_args_hook(checkpointing.check_checkpoint_args)
    checkpointing.generate_state_dict = _provenance_hook(checkpointing.generate_state_dict)
    training.load_checkpoint = _schedule_hook(training.load_checkpoint)
    _installed = True


def _parse_args_hook(original: Callable) -> Callable:
    def parse_args(extra_args_provider=None, ignore_unknown_args=False):
        global _decision
        seen = {}

        def provider(parser):
            parser = add_arguments(extra_args_provider(parser) if extra_args_provider else parser)
            seen["parser"] = parser
            return parser

        args = original(provider, ignore_unknown_args)
        first = _decision is None  # some releases parse twice (in-process restart wrapper)
        _decision = configure(args, explicit_dests(args, seen["parser"]))
        if first and _decision is not None and args.rank == 0:
            for note in _decision.notes:
                print(f"megatron-recycle: {note}", flush=True)
        return args

    return parse_args


def _is_source(checkpoint_dir) -> bool:
    return (_decision is not None and _decision.grow
            and _realpath(checkpoint_dir) == _realpath(_decision.checkpoint.path))


def _strategy_hook(original: Callable) -> Callable:
    def load_strategy(*args, **kwargs):
        checkpoint_dir = args[0] if args else kwargs.get("checkpoint_dir")
        # core_v0.16.1 passes the directory; newer main does not: the only dir loaded with
        # a strategy while growing is the source.
        if _decision is not None and _decision.grow and (
                checkpoint_dir is None or _is_source(checkpoint_dir)):
            from .strategy import GrowthLoadStrategy

            policy = _decision.request.optimizer
            return GrowthLoadStrategy(_decision.plan,
                                      moment_policy="copy" if policy == "reset" else policy)
        return original(*args, **kwargs)

    return load_strategy


def _check_args_hook(original: Callable) -> Callable:
    def check_checkpoint_args(checkpoint_args, *args, **kwargs):
        if _decision is not None and _decision.grow and (
                getattr(checkpoint_args, "num_layers", None) == _decision.plan.source.num_layers):
            checkpoint_args = copy.copy(checkpoint_args)
            checkpoint_args.num_layers = _decision.plan.target_num_layers
        return original(checkpoint_args, *args, **kwargs)

    return check_checkpoint_args


def _provenance_hook(original: Callable) -> Callable:
    def generate_state_dict(*args, **kwargs):
        state_dict = original(*args, **kwargs)
        if _decision is not None:  # non-tensor entries land in common.pt
            state_dict[PROVENANCE_KEY] = _decision.provenance
        return state_dict

    return generate_state_dict


def _schedule_hook(original: Callable) -> Callable:
    def load_checkpoint(model, optimizer, opt_param_scheduler, *args, **kwargs):
        result = original(model, optimizer, opt_param_scheduler, *args, **kwargs)
        if _decision is not None and _decision.grow and opt_param_scheduler is not None:
            from megatron.training.global_vars import get_args

            apply_schedule_policy(opt_param_scheduler, _decision, get_args())
        return result

    return load_checkpoint


def apply_schedule_policy(scheduler, decision: Decision, args) -> None:
    """After the grown load: continue the source's step count, or restart with a warmup.

    With `--grow-optimizer reset` Megatron-LM loads no scheduler state, so the source's
    step count is taken from its common.pt here.
    """
    saved = decision.checkpoint.common.get("opt_param_scheduler")
    if args.no_load_optim and saved is not None and not args.finetune:
        scheduler.load_state_dict(saved)
    iters = decision.request.rewarmup_iters
    if iters:
        scheduler.num_steps = 0
        scheduler.lr_warmup_steps = iters * args.global_batch_size
    scheduler.step(increment=0)
