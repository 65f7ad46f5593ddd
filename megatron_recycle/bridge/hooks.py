"""Install load-time growth into a Megatron-Bridge run: `install(cfg, growth)` before Bridge's
`pretrain(cfg, ...)`, or `pretrain(cfg, forward_step_func, growth)` for both.

`install` decides grow vs resume (`decide.configure`: the grown sizes on `cfg.model`, the
checkpoint settings), registers megatron-recycle's prefix with Bridge's `_target_` allow-list
and names `GrowthCheckpointManager` in `cfg.checkpoint.custom_manager_class` — Bridge's official
extension point — so Bridge's own `setup()` builds it. A requeued job runs the same command:
`install` finds the grown checkpoint and the manager loads it plainly.
"""

from __future__ import annotations

import os
from typing import Optional

from ..errors import GrowthError
from . import decide
from .config import GrowthConfig

PREFIX = "megatron_recycle"
MANAGER = "megatron_recycle.bridge.manager.GrowthCheckpointManager"


def install(cfg, growth: GrowthConfig) -> Optional[decide.Decision]:
    """Set `cfg` (a Bridge ConfigContainer, before `pretrain`) for `growth`; None when it asks
    for no growth. Every rank calls it alike (it reads checkpoint metadata only)."""
    given = cfg.checkpoint.custom_manager_class
    if given not in (None, MANAGER):
        raise GrowthError(f"checkpoint.custom_manager_class={given}: growth brings its own "
                          f"checkpoint manager ({MANAGER}); unset it")
    decision = decide.configure(cfg, growth)
    from . import manager

    manager.activate(decision)
    if decision is None:
        return None
    from megatron.bridge.utils.instantiate_utils import register_allowed_target_prefix

    register_allowed_target_prefix(PREFIX)
    cfg.checkpoint.custom_manager_class = MANAGER
    if int(os.environ.get("RANK", "0")) == 0:
        for note in decision.notes:
            print(f"megatron-recycle: {note}", flush=True)
    return decision


def pretrain(cfg, forward_step_func, growth: GrowthConfig, callbacks=None) -> None:
    """Bridge's `pretrain` of `cfg`, grown at load by `growth`."""
    install(cfg, growth)
    from megatron.bridge.training.pretrain import pretrain as bridge_pretrain

    bridge_pretrain(cfg, forward_step_func, callbacks=callbacks)
