"""What carries over from the source run, and how: the optimizer and LR-schedule policies.

One definition for the load hook, offline growth, the reference loop and the Megatron-LM
adapter. Pure Python (no torch.distributed).

- Optimizer policy (`--grow-optimizer`): `copy` (the grown optimizer's state comes from the
  source by the growth mapping; copies get their source's moments), `zero` (the same, but
  copies start with zero moments), `reset` (a fresh optimizer, as in the paper).
- Schedule: by default the iteration, the consumed samples and the LR schedule's step count
  continue from the source, so no sample is seen twice. `--grow-rewarmup-iters N` restarts
  the LR schedule at growth: N warm-up iterations, then the configured decay.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional

from .plan import GrowthError

MOMENT_POLICIES = ("copy", "zero")  # what the load hook does with the copies' moments
OPTIMIZER_POLICIES = (*MOMENT_POLICIES, "reset")
# Optimizer checkpoint formats whose state is in model space (one tensor per weight, the
# weight's global shape), so the growth mapping applies to it.
MODEL_SPACE_OPTIMIZER_FORMATS = ("fully_reshardable", "non_distributed")
# The distributed optimizer's dp_reshardable format: opaque per-DP-rank buckets.
DP_RESHARDABLE_KEY = re.compile(r"^(chained_\d+\.)?optimizer\.distributed\.")


def check_optimizer_policy(policy: str) -> None:
    if policy not in OPTIMIZER_POLICIES:
        raise GrowthError(f"--grow-optimizer must be one of {OPTIMIZER_POLICIES}, got {policy!r}")


def check_rewarmup_iters(iters: int) -> None:
    if iters < 0:
        raise GrowthError(f"--grow-rewarmup-iters must be >= 0, got {iters}")


def grows_optimizer(policy: str) -> bool:
    """Whether the optimizer state is loaded through the growth mapping (copy / zero)."""
    check_optimizer_policy(policy)
    return policy in MOMENT_POLICIES


def load_moment_policy(policy: str, optimizer_format: Optional[str]) -> Optional[str]:
    """The moment policy for a run's optimizer policy, or None: do not load the optimizer.
    Refuses what the source checkpoint cannot provide, saying what to do instead."""
    if not grows_optimizer(policy):
        return None
    if optimizer_format is None:
        raise GrowthError(
            f"--grow-optimizer {policy}: the source checkpoint holds no optimizer state "
            "(saved with --no-save-optim?); use --grow-optimizer reset"
        )
    if optimizer_format not in MODEL_SPACE_OPTIMIZER_FORMATS:
        raise GrowthError(
            f"--grow-optimizer {policy}: the source optimizer state is {optimizer_format!r}, "
            "opaque per-rank buckets that cannot be mapped onto grown layers and experts; "
            "use --grow-optimizer reset, or save the source with "
            "--dist-ckpt-optim-fully-reshardable"
        )
    return policy


@dataclass(frozen=True)
class Progress:
    """Where a run stands: optimizer steps taken, samples consumed, the LR schedule's state."""

    iteration: int = 0
    consumed_samples: int = 0
    scheduler: Optional[dict[str, Any]] = None  # OptimizerParamScheduler.state_dict()

    @classmethod
    def from_common(cls, common: dict[str, Any]) -> "Progress":
        """From a Megatron checkpoint's common state."""
        args = common.get("args")
        return cls(
            iteration=int(common.get("iteration") or 0),
            consumed_samples=int(getattr(args, "consumed_train_samples", 0) or 0),
            scheduler=common.get("opt_param_scheduler"),
        )


def apply_schedule_after_growth(scheduler, saved: Optional[dict[str, Any]], rewarmup_iters: int,
                                samples_per_iter: int) -> None:
    """Set a Megatron `OptimizerParamScheduler` for the grown run, after the grown load.

    `saved`: the source's scheduler state, when the load did not already restore it (with
    `--grow-optimizer reset` Megatron-LM restores none). The step count continues; with
    `rewarmup_iters` the schedule restarts here with that many warm-up iterations (Megatron
    counts schedules in samples). Set on the object, not through a state dict, which
    `--override-opt-param-scheduler` (set while growing) would ignore."""
    check_rewarmup_iters(rewarmup_iters)
    if saved is not None:
        scheduler.load_state_dict(saved)
    if rewarmup_iters:
        scheduler.num_steps = 0
        scheduler.lr_warmup_steps = rewarmup_iters * samples_per_iter
    scheduler.step(increment=0)
