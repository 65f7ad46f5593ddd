"""What differs between the Megatron-LM revisions we hook (core_v0.16.1 … core_v0.19.0, main),
in one place. Each function finds the thing by what the checkout has, not by its version."""

from __future__ import annotations


def parse_args_modules() -> list:
    """The modules whose `parse_args` global Megatron-LM calls: `arguments` on every revision
    (0.19+: through `parse_and_validate_args`), and `initialize`, which imports it by name up
    to core_v0.16.x."""
    from megatron.training import arguments, initialize

    original = arguments.parse_args
    return [m for m in (arguments, initialize) if getattr(m, "parse_args", None) is original]


def load_strategy_name(checkpointing) -> str:
    """The name in `megatron.training.checkpointing` that makes the `torch_dist` load strategy:
    a factory taking the checkpoint directory up to core_v0.18, the class itself (called
    without the directory) from core_v0.19 on."""
    if hasattr(checkpointing, "get_default_load_sharded_strategy"):
        return "get_default_load_sharded_strategy"
    return "TorchDistLoadShardedStrategy"


def legacy_fused_kernels():
    """`megatron.legacy.fused_kernels` (CUDA-only kernels loaded at start-up), or None where
    the checkout no longer has it."""
    try:
        from megatron.legacy import fused_kernels
    except ImportError:
        return None
    return fused_kernels
