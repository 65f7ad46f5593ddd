"""Megatron-Bridge integration: grow the checkpoint a Bridge run starts from while it loads.

- `config`: `GrowthConfig`, the `--grow-*` flags as a config dataclass; `split_overrides` takes
  `growth.*=` overrides off a recipe override list;
- `decide`: grow vs resume (requeue-safe), the grown sizes on `cfg.model`, refusals;
- `manager`: `GrowthCheckpointManager`, Bridge's checkpoint manager growing at load;
- `hooks`: `install(cfg, growth)` / `pretrain(cfg, forward_step_func, growth)`.
Importing this package does not import Megatron-Bridge.
"""

from .config import GrowthConfig, split_overrides  # noqa: F401
from .hooks import install, pretrain  # noqa: F401
