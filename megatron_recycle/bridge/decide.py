"""What a Megatron-Bridge run does with its checkpoint settings and a `GrowthConfig`, decided once
on its `ConfigContainer` before `pretrain()` builds the model.

The source is what Bridge itself would load:
- `checkpoint.load` holding a checkpoint (continue the base run): the train state carries over
  (step, consumed samples, FLOPs, LR schedule; the optimizer state grown per `growth.optimizer`);
- else `checkpoint.pretrained_checkpoint` (Bridge's weights-only start): the grown weights, a
  fresh train state and optimizer, as Bridge does for any pretrained checkpoint.
A checkpoint in `checkpoint.save` or `checkpoint.load` that this growth of this source already
wrote is a requeued job: it is resumed plainly, never grown twice. The target sizes are set on
`cfg.model` (so Bridge builds the grown model and writes the grown run_config.yaml); bad
combinations are refused naming the config key. Reads checkpoint metadata only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .. import compat, merge
from ..errors import GrowthError
from ..growth_run import (check_optimizer_growth, find_grown, growth_notes, growth_provenance,
                          has_checkpoint, plan_growth, read_second, real_path)
from ..io.checkpoint import CheckpointInfo
from ..options import Growth
from ..plan import GrowthPlan, nothing_to_grow
from ..provenance import Provenance
from .config import FROM_SECOND, GrowthConfig

GROWN_BY = "megatron-bridge"
# cfg.model fields that growth sets: (field, what the plan's source / target says)
SIZES = ("num_layers", "num_moe_experts", "moe_router_topk")


@dataclass
class Decision:
    grow: bool  # True: grow `checkpoint`; False: it already is the grown model, load plainly
    plan: GrowthPlan
    request: Growth
    checkpoint: CheckpointInfo  # the iteration directory that will be loaded
    weights_only: bool  # grown from checkpoint.pretrained_checkpoint: a fresh train state
    provenance: Provenance  # recorded in every checkpoint this run saves
    notes: list[str] = field(default_factory=list)
    second: Optional[merge.Second] = None  # growth.from_second, when growing (pinned)


def configure(cfg, growth: GrowthConfig) -> Optional[Decision]:
    """Decide grow vs resume and set `cfg` for it (model sizes, checkpoint settings). None when
    `growth` asks for nothing. Raises GrowthError before any model exists."""
    request = growth.growth()
    if not request.asked:
        if given := growth.given():  # the run would train on without them, silently
            raise nothing_to_grow(", ".join(given), "growth.depth, growth.experts or growth.layer_map")
        return None
    ckpt = cfg.checkpoint
    if ckpt.ckpt_format != "torch_dist":
        raise GrowthError(f"checkpoint.ckpt_format={ckpt.ckpt_format}: growth reads and writes "
                          "torch_dist checkpoints; set checkpoint.ckpt_format=torch_dist")
    if getattr(cfg, "peft", None) is not None:
        raise GrowthError("peft is set: growth changes the base model that adapters would be "
                          "trained on; grow first (this run without peft), then fine-tune the result")
    if getattr(cfg.ddp, "use_megatron_fsdp", False) or getattr(cfg.dist, "use_torch_fsdp2", False):
        raise GrowthError("ddp.use_megatron_fsdp / dist.use_torch_fsdp2: growth at load runs with "
                          "Megatron's DDP; grow offline (`megatron-recycle grow`) for an FSDP run")
    sources = [s for s in (ckpt.load, ckpt.pretrained_checkpoint) if s]
    roots = [(r, f"checkpoint.{name}") for name, r in (("save", ckpt.save), ("load", ckpt.load)) if r]
    grown = find_grown(request, list(dict.fromkeys(roots)), sources, ckpt.ckpt_step, FROM_SECOND)
    if grown is not None:
        ckpt.load = grown.root  # Bridge then resumes it (a checkpoint in load wins over pretrained)
        ckpt.ckpt_step = None
        decision = Decision(False, grown.plan, request, grown.info, False, grown.provenance,
                            [grown.note()])
    else:
        decision = _grow_decision(cfg, request)
    set_model_sizes(cfg.model, decision.plan)
    return decision


def _grow_decision(cfg, request: Growth) -> Decision:
    from megatron.bridge.training.utils.checkpoint_utils import checkpoint_exists

    ckpt = cfg.checkpoint
    if checkpoint_exists(ckpt.load):  # what Bridge loads, before a pretrained checkpoint
        source, setting, step, weights_only = ckpt.load, "checkpoint.load", ckpt.ckpt_step, False
    elif ckpt.pretrained_checkpoint:
        source, setting, step, weights_only = ckpt.pretrained_checkpoint, "checkpoint.pretrained_checkpoint", None, True
    else:
        raise GrowthError("growth needs the source checkpoint: set checkpoint.load (continue its "
                          "training) or checkpoint.pretrained_checkpoint (its weights only)")
    if ckpt.save and has_checkpoint(ckpt.save) and real_path(ckpt.save) != real_path(source):
        info = CheckpointInfo.read(ckpt.save, flag="checkpoint.save")
        raise GrowthError(
            f"checkpoint.save {ckpt.save} already holds a checkpoint (iteration {info.iteration}) "
            f"that was not grown from {setting} {source} with these growth options; point "
            "checkpoint.save at an empty directory, or resume that checkpoint without growth")
    info = CheckpointInfo.read(source, step, flag=setting)
    compat.check_loadable(info, flag=setting)
    plan = plan_growth(request, info.architecture())
    optimizer_loaded = not weights_only and request.optimizer != "reset" and ckpt.load_optim
    if optimizer_loaded:
        src_ep = getattr(info.model_args, "expert_model_parallel_size", 1) or 1
        check_optimizer_growth(request.optimizer, info, cfg.optimizer.use_distributed_optimizer,
                               src_ep, cfg.model.expert_model_parallel_size,
                               "optimizer.use_distributed_optimizer", "model.expert_model_parallel_size")
    elif not weights_only:
        ckpt.load_optim = False  # growth.optimizer=reset: a fresh optimizer, the schedule carried
    ckpt.load_rng = False  # RNG states are per (TP, PP) rank of the old layout
    if not weights_only and not cfg.scheduler.use_checkpoint_opt_param_scheduler:
        cfg.scheduler.override_opt_param_scheduler = True  # LR settings from this run's config
    model = cfg.model
    layout = {name: getattr(model, name) for name in (
        "tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size")}
    second = read_second(request, info, optimizer_loaded, FROM_SECOND)
    provenance = growth_provenance(request, plan, info, source, GROWN_BY, layout, optimizer_loaded, second)
    notes = growth_notes(info, plan) + [
        f"{setting}: " + ("weights only, a fresh train state and optimizer" if weights_only else
                          "the train state carries over")]
    return Decision(True, plan, request, info, weights_only, provenance, notes, second)


def set_model_sizes(model, plan: GrowthPlan) -> None:
    """The grown sizes on the provider: the recipe gives the base model's (replaced) or the
    grown model's (kept); anything else is refused."""
    source, target = plan.source, plan.target
    have = {"num_layers": (source.num_layers, target.num_layers),
            "num_moe_experts": (source.num_experts, target.num_experts),
            "moe_router_topk": (source.topk, target.topk)}
    for name, (base, grown) in have.items():
        value = getattr(model, name, None)
        if value not in (base, grown, None):
            raise GrowthError(f"model.{name}={value} is neither the source checkpoint's ({base}) "
                              f"nor the grown model's ({grown}); set model.{name}={grown} or "
                              "leave the recipe's base value")
    freq = getattr(model, "moe_layer_freq", 1)
    pattern = target.moe_layer_freq()
    plan.check_target(
        num_layers=target.num_layers, num_experts=target.num_experts, topk=target.topk,
        expert_parallel=model.expert_model_parallel_size,
        pipeline_parallel=model.pipeline_model_parallel_size,
        num_layers_in_first_stage=getattr(model, "num_layers_in_first_pipeline_stage", None),
        num_layers_in_last_stage=getattr(model, "num_layers_in_last_pipeline_stage", None))
    if getattr(model, "pipeline_model_parallel_layout", None) is not None:
        raise GrowthError("model.pipeline_model_parallel_layout lists layers, and growth changes "
                          "them: drop it (set model.num_layers_in_first/last_pipeline_stage if needed)")
    model.num_layers = target.num_layers
    if target.is_moe:
        model.num_moe_experts = target.num_experts
        model.moe_router_topk = target.topk
    if pattern is not None:
        model.moe_layer_freq = pattern
    elif isinstance(freq, list) and len(freq) != target.num_layers:
        model.moe_layer_freq = 1  # every layer MoE, as the plan says
