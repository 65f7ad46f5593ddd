"""Megatron-Bridge integration (an adapter beside `megatron_lm/`; growth never imports it).

- `checkpoint`: a Bridge checkpoint's files beside the weights (run_config.yaml, train state,
  tokenizer), grown with it by offline growth and checked by `verify`;
- `config`: `GrowthConfig`, the `--grow-*` flags as a config dataclass; `split_overrides` takes
  `growth.*=` overrides off a recipe override list;
- `decide`: load-time growth's grow vs resume (requeue-safe), the grown sizes on `cfg.model`;
- `manager`: `GrowthCheckpointManager`, Bridge's checkpoint manager growing at load;
- `hooks`: `install(cfg, growth)` / `pretrain(cfg, forward_step_func, growth)`.
Importing this package does not import Megatron-Bridge.
"""

from .config import GrowthConfig, split_overrides  # noqa: F401
from .hooks import install, pretrain  # noqa: F401
