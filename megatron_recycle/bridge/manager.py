"""`GrowthCheckpointManager`: Megatron-Bridge's own checkpoint manager, growing at load time.

Bridge's official extension point is `CheckpointConfig.custom_manager_class` (a class
implementing its `CheckpointManager` protocol, built by `create_checkpoint_manager` after the
target prefix passed Bridge's allow-list). This one is Bridge's `DefaultCheckpointManager` with,
for the duration of each of its own calls only:
- load: the `torch_dist` load strategy that Bridge's loader builds (`TorchDistLoadShardedStrategy`,
  a module global looked up at call time) is the growth strategy for the source directory,
  and the model load is strict: Bridge's own retries non-strict and only prints a mismatch;
  here a mismatched key fails the load, naming it. The model must have been built grown.
  After a growing load the load strategy is dropped from the checkpointing context, so
  `ckpt_assume_constant_structure` never seeds the first save with the *source's* metadata;
- save: every checkpoint carries the growth record (`provenance`) in its common state.
The decision (`decide.Decision`) is made before the model exists, by `hooks.install`.
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch

from .. import policy
from ..errors import GrowthError
from ..provenance import KEY as PROVENANCE_KEY
from .decide import Decision

_decision: Optional[Decision] = None


def activate(decision: Optional[Decision]) -> None:
    global _decision
    _decision = decision


def active_decision() -> Optional[Decision]:
    return _decision


def _default_manager():
    from megatron.bridge.training.checkpointing import DefaultCheckpointManager

    return DefaultCheckpointManager


class GrowthCheckpointManager(_default_manager()):
    def __init__(self, checkpoint_config) -> None:
        if _decision is None:
            raise GrowthError(
                "checkpoint.custom_manager_class names megatron-recycle's manager but no growth "
                "is configured in this process: call megatron_recycle.bridge.install(cfg, growth) "
                "(or megatron_recycle.bridge.pretrain) before Bridge's pretrain()")
        super().__init__(checkpoint_config)
        self.decision = _decision

    def load(self, ctx) -> tuple[int, int]:
        from megatron.bridge.training import checkpointing

        decision = self.decision
        check_model(ctx.model, decision)
        with contextlib.ExitStack() as stack:
            stack.enter_context(_replaced(checkpointing, "_load_model_state_dict", strict_model_load))
            if decision.grow:
                stack.enter_context(_replaced(checkpointing, "TorchDistLoadShardedStrategy",
                                              self._growth_strategy))
            result = super().load(ctx)
        if decision.grow:
            self.checkpointing_context.pop("load_strategy", None)
            if not decision.weights_only and ctx.opt_param_scheduler is not None:
                cfg = ctx.state.cfg
                saved = None if cfg.checkpoint.load_optim else decision.checkpoint.common.get("opt_param_scheduler")
                policy.apply_schedule_after_growth(ctx.opt_param_scheduler, saved,
                                                   decision.request.rewarmup_iters,
                                                   cfg.train.global_batch_size)
        return result

    def _growth_strategy(self, *args, **kwargs):
        from ..load_hook import GrowthLoadStrategy

        if args or kwargs:  # Bridge builds it bare; anything else is not the loader we know
            raise GrowthError(f"Megatron-Bridge built its load strategy with {args} {kwargs}; "
                              "this Bridge release is not supported by megatron-recycle's manager")
        return GrowthLoadStrategy(self.decision.plan, optimizer_policy=self.decision.request.optimizer,
                                  source=self.decision.checkpoint.path,
                                  second=self.decision.second)

    def save(self, ctx, callback_manager) -> None:
        from megatron.bridge.training import checkpointing

        record = self.decision.provenance.to_dict()
        original = checkpointing.generate_state_dict

        def generate_state_dict(*args, **kwargs):
            state_dict = original(*args, **kwargs)
            state_dict[PROVENANCE_KEY] = record  # non-tensor entries land in the common state
            return state_dict

        with _replaced(checkpointing, "generate_state_dict", generate_state_dict):
            super().save(ctx, callback_manager)


def check_model(model, decision: Decision) -> None:
    """The model Bridge built must be the grown one (built from the `cfg.model` that `decide` set)."""
    from megatron.core.utils import unwrap_model

    target = decision.plan.target
    want = {"num_layers": target.num_layers, "num_moe_experts": target.num_experts,
            "moe_router_topk": target.topk}
    for module in unwrap_model(model):
        config = module.config
        have = {name: getattr(config, name, None) for name in want}
        if have != want:
            raise GrowthError(f"the model was built with {have}, but the growth makes {want}: "
                              "call megatron_recycle.bridge.install(cfg, growth) before pretrain() "
                              "builds the model, and do not change cfg.model after it")


def strict_model_load(module: torch.nn.Module, state_dict: dict[str, Any], strict: bool) -> None:
    """`module.load_state_dict` that fails on any mismatched key except Transformer Engine's
    `_extra_state` (what Bridge's own fallback tolerates too, but then only prints)."""
    result = module.load_state_dict(state_dict, strict=False)
    mismatched = [k for k in (*result.missing_keys, *result.unexpected_keys)
                  if not k.endswith("._extra_state")]
    if mismatched:
        raise GrowthError(f"the checkpoint does not match the model: {len(mismatched)} keys "
                          f"missing or unexpected, e.g. {mismatched[:3]}; nothing was trained on it")


@contextlib.contextmanager
def _replaced(module, name: str, value):
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)
