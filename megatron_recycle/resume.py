"""Resuming pretraining after growth: what carries over from the source run, and how.

Pure Python (no torch.distributed): the reference loop in `examples/` and the Megatron-LM
adapter both decide here which optimizer state to request, whether the source checkpoint
can provide it, and what the LR schedule does after growth.

- Optimizer policy: `copy` (the grown optimizer's state comes from the source by the growth
  mapping; copies get their source's moments), `zero` (the same, but copies start with zero
  moments), `reset` (a fresh optimizer, as in the paper).
- Schedule: by default the iteration, the consumed samples and the LR schedule continue from
  the source, so no sample is seen twice. `rewarmup_steps > 0` restarts the LR schedule at
  growth: warm-up over that many steps, then the configured decay, counted from growth.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from .plan import GrowthError

MOMENT_POLICIES = ("copy", "zero")  # what the load hook does with the copies' moments
OPTIMIZER_POLICIES = (*MOMENT_POLICIES, "reset")
# Optimizer checkpoint formats whose state is in model space (one tensor per weight, the
# weight's global shape), so the growth mapping applies to it.
MODEL_SPACE_OPTIMIZER_FORMATS = ("fully_reshardable", "non_distributed")


def check_optimizer_policy(policy: str) -> None:
    if policy not in OPTIMIZER_POLICIES:
        raise GrowthError(f"--grow-optimizer must be one of {OPTIMIZER_POLICIES}, got {policy!r}")


def check_rewarmup_iters(iters: int) -> None:
    if iters < 0:
        raise GrowthError(f"--grow-rewarmup-iters must be >= 0, got {iters}")


def load_moment_policy(policy: str, optimizer_format: Optional[str]) -> Optional[str]:
    """The hook's `moment_policy` for a run's optimizer policy, or None: do not load the
    optimizer. Refuses what the source checkpoint cannot provide, saying what to do instead."""
    check_optimizer_policy(policy)
    if policy == "reset":
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
        """From a Megatron checkpoint's common state (`common.pt`)."""
        args = common.get("args")
        return cls(
            iteration=int(common.get("iteration") or 0),
            consumed_samples=int(getattr(args, "consumed_train_samples", 0) or 0),
            scheduler=common.get("opt_param_scheduler"),
        )


def schedule_after_growth(progress: Progress, rewarmup_steps: int,
                          samples_per_step: int) -> Optional[dict[str, Any]]:
    """The scheduler state the grown run starts from: the source's (continue), or a restart
    whose warm-up is `rewarmup_steps` optimizer steps (Megatron counts schedules in samples).
    None: the run's own configured schedule from step 0."""
    check_rewarmup_iters(rewarmup_steps)
    if rewarmup_steps == 0:
        return progress.scheduler
    if progress.scheduler is None:
        return None
    return {**progress.scheduler, "num_steps": 0,
            "lr_warmup_steps": rewarmup_steps * samples_per_step}
