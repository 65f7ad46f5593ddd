"""megatron-recycle: grow pretrained Megatron-Core MoE checkpoints (depth x experts) at load
time, into any TP/EP/PP layout, and keep training."""

__version__ = "0.1.0"

from .plan import Architecture, DepthGrowth, GrowthError, GrowthPlan, WidthGrowth  # noqa: F401

__all__ = ["Architecture", "DepthGrowth", "GrowthError", "GrowthPlan", "WidthGrowth"]
