"""Megatron-LM integration: `--grow-*` flags for a stock `pretrain_gpt.py`, requeue-safe.

- `decide`: pure decisions on parsed arguments (grow or resume, target sizes, refusals);
- `hooks`: `install()` hooks Megatron-LM's module globals so the decisions take effect;
- `compat`: what differs between Megatron-LM revisions.
"""

from .decide import Decision, add_arguments, configure, explicit_dests  # noqa: F401
from .hooks import active_decision, apply_schedule, install  # noqa: F401
