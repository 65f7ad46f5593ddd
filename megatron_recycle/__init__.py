"""megatron-recycle: grow pretrained Megatron-Core MoE checkpoints (depth x experts) at load
time, into any TP/EP/PP layout, and keep training.

The growth engine, in the order data flows:
    plan (what comes from where) → indexing (keys, index algebra) → mapping (target shard →
    source box) → ops (tensors, noise) → load_hook (the torch_dist load strategy).
Around it: policy (optimizer / schedule), provenance (the growth record), compat (megatron-core
releases), io/ (checkpoint reading, writing, destinations), manifest + offline + verify + cost +
inspection + cli (the offline tools), megatron_lm/ (Megatron-LM), hf/ (Hugging Face
checkpoints through the same engine), testing/ (CPU shims, toy models: not used by growth itself).
"""

__version__ = "0.2.0"

from .errors import CheckpointError, GrowthError  # noqa: E402,F401
from .plan import Architecture, CopyInit, DepthGrowth, GrowthPlan, WidthGrowth  # noqa: E402,F401

__all__ = ["Architecture", "CheckpointError", "CopyInit", "DepthGrowth", "GrowthError", "GrowthLoadStrategy",
           "GrowthPlan", "WidthGrowth"]


def __getattr__(name):  # the load hook imports megatron-core: only when asked for
    if name == "GrowthLoadStrategy":
        from .load_hook import GrowthLoadStrategy

        return GrowthLoadStrategy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
