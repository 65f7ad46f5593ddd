"""Hooks on Megatron-LM's module globals, so that a stock `pretrain_gpt.py` grows at load time.

Megatron-LM looks these functions up at call time, so replacing the module attributes is
enough; no Megatron-LM file changes:
- `parse_args`: adds the `--grow-*` group, then `decide.configure` (grow or resume, target sizes);
- the `torch_dist` load strategy (factory or class, by revision: `compat`): the source loads
  through `GrowthLoadStrategy`;
- `check_checkpoint_args`: accepts the grown `num_layers` while growing;
- `load_checkpoint` as the training loop calls it: the schedule after growth (`policy`);
- `generate_state_dict`: every checkpoint the job saves records the growth (`provenance`).

One `Integration` per process holds the decision; `install()` creates it and wires the hooks.
"""

from __future__ import annotations

import copy
from typing import Callable, Optional

from .. import policy
from ..provenance import KEY as PROVENANCE_KEY
from . import compat
from .decide import Decision, add_arguments, configure, explicit_dests

_integration: Optional["Integration"] = None


def install() -> "Integration":
    """Hook Megatron-LM's module globals (idempotent). Import Megatron-LM after sys.path
    points at the checkout whose `pretrain_gpt.py` runs."""
    global _integration
    if _integration is None:
        _integration = Integration()
        _integration.install()
    return _integration


def active_decision() -> Optional[Decision]:
    return None if _integration is None else _integration.decision


class Integration:
    def __init__(self):
        self.decision: Optional[Decision] = None

    def install(self) -> None:
        from megatron.training import checkpointing, training

        for module in compat.parse_args_modules():
            module.parse_args = self._parse_args_hook(module.parse_args)
        name = compat.load_strategy_name(checkpointing)
        setattr(checkpointing, name, self._strategy_hook(getattr(checkpointing, name)))
        checkpointing.check_checkpoint_args = self._check_args_hook(checkpointing.check_checkpoint_args)
        checkpointing.generate_state_dict = self._provenance_hook(checkpointing.generate_state_dict)
        training.load_checkpoint = self._schedule_hook(training.load_checkpoint)

    @property
    def growing(self) -> bool:
        return self.decision is not None and self.decision.grow

    def _parse_args_hook(self, original: Callable) -> Callable:
        def parse_args(extra_args_provider=None, ignore_unknown_args=False):
            seen = {}

            def provider(parser):
                parser = add_arguments(extra_args_provider(parser) if extra_args_provider else parser)
                seen["parser"] = parser
                return parser

            args = original(provider, ignore_unknown_args)
            first = self.decision is None  # some releases parse twice (in-process restart wrapper)
            self.decision = configure(args, explicit_dests(args, seen["parser"]))
            if first and self.decision is not None and args.rank == 0:
                for note in self.decision.notes:
                    print(f"megatron-recycle: {note}", flush=True)
            return args

        return parse_args

    def _strategy_hook(self, original: Callable) -> Callable:
        def load_strategy(*args, **kwargs):
            # Where Megatron-LM builds the class itself (0.19+) the directory is not known yet:
            # the strategy grows what is loaded from the source and loads anything else plainly.
            if self.growing:
                from ..load_hook import GrowthLoadStrategy

                return GrowthLoadStrategy(self.decision.plan,
                                          optimizer_policy=self.decision.request.optimizer,
                                          source=self.decision.checkpoint.path,
                                          second=self.decision.second)
            return original(*args, **kwargs)

        return load_strategy

    def _check_args_hook(self, original: Callable) -> Callable:
        def check_checkpoint_args(checkpoint_args, *args, **kwargs):
            if self.growing and (
                    getattr(checkpoint_args, "num_layers", None) == self.decision.plan.source.num_layers):
                checkpoint_args = copy.copy(checkpoint_args)
                checkpoint_args.num_layers = self.decision.plan.target_num_layers
            return original(checkpoint_args, *args, **kwargs)

        return check_checkpoint_args

    def _provenance_hook(self, original: Callable) -> Callable:
        def generate_state_dict(*args, **kwargs):
            state_dict = original(*args, **kwargs)
            if self.decision is not None:  # non-tensor entries land in the common state
                state_dict[PROVENANCE_KEY] = self.decision.provenance.to_dict()
            return state_dict

        return generate_state_dict

    def _schedule_hook(self, original: Callable) -> Callable:
        def load_checkpoint(model, optimizer, opt_param_scheduler, *args, **kwargs):
            result = original(model, optimizer, opt_param_scheduler, *args, **kwargs)
            if self.growing and opt_param_scheduler is not None:
                from megatron.training.global_vars import get_args

                apply_schedule(opt_param_scheduler, self.decision, get_args())
            return result

        return load_checkpoint


def apply_schedule(scheduler, decision: Decision, args) -> None:
    """After the grown load: the source's step count continues, or restarts with a warm-up.
    With `--grow-optimizer reset` (`--no-load-optim`) Megatron-LM restores no scheduler state,
    so the source's is taken from its common state here."""
    saved = decision.checkpoint.common.get("opt_param_scheduler")
    restored = not args.no_load_optim or args.finetune
    policy.apply_schedule_after_growth(scheduler, None if restored else saved,
                                       decision.request.rewarmup_iters, args.global_batch_size)
