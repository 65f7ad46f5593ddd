"""Megatron-Bridge's training entry (`megatron.bridge.training.pretrain.pretrain`) on CPU over
gloo, and a tiny `ConfigContainer` for it (mock data, a null tokenizer).

On top of `bridge_cpu.install()` (the conversion path), Bridge's training path needs:
- `pretrain.py`'s unconditional `from nvidia_resiliency_ext.inprocess import CallWrapper` (a
  type hint): a stand-in package while that one module is imported, without `__path__`, so
  Bridge's `safe_import("nvidia_resiliency_ext.checkpointing")` still finds nothing;
- `initialize_megatron`'s "Megatron requires CUDA" assertion: its own `allow_no_cuda=True`;
- the dataset helpers: the wheel ships `helpers_cpp` built, but rank 0 runs `make` on a
  directory without a Makefile and exits; the build is skipped.
Nothing here changes numerics. Tests use this; growth never does.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
import types

import torch

from . import bridge_cpu

_INSTALLED = False


def install() -> None:
    global _INSTALLED
    if _INSTALLED:
        return
    bridge_cpu.install()
    from megatron.bridge.training import initialize, setup, train  # noqa: F401  (before the stand-in)

    if importlib.util.find_spec("nvidia_resiliency_ext") is None:
        package = types.ModuleType("nvidia_resiliency_ext")
        package.inprocess = types.ModuleType("nvidia_resiliency_ext.inprocess")
        package.inprocess.CallWrapper = type("CallWrapper", (), {})
        stand_in = {"nvidia_resiliency_ext": package, "nvidia_resiliency_ext.inprocess": package.inprocess}
        sys.modules.update(stand_in)
        try:
            import megatron.bridge.training.pretrain  # noqa: F401
        finally:
            for name in stand_in:
                sys.modules.pop(name, None)
    if not torch.cuda.is_available():
        setup.initialize_megatron = functools.partial(initialize.initialize_megatron, allow_no_cuda=True)
    if importlib.util.find_spec("megatron.core.datasets.helpers_cpp") is not None:
        initialize.compile_helpers = lambda: None
    _INSTALLED = True


def tiny_config(provider, save, *, train_iters: int, lr: float, seq_length: int = 16,
                global_batch_size: int = 4, save_interval=None, **checkpoint):
    """A ConfigContainer for `provider` (made CPU-runnable): mock data, fp32 Adam without the
    distributed optimizer, a constant LR, torch_dist checkpoints into `save`, gloo. No RNG state
    is saved: on CPU the CUDA RNG tracker has no states, and Bridge's resume would refuse (and
    exit 0) on the empty ones."""
    from megatron.bridge.training.config import (CheckpointConfig, ConfigContainer,
                                                 DistributedDataParallelConfig,
                                                 DistributedInitConfig, LoggerConfig,
                                                 MockGPTDatasetConfig, OptimizerConfig, RNGConfig,
                                                 SchedulerConfig, TokenizerConfig, TrainingConfig,
                                                 ValidationConfig)

    provider.seq_length = seq_length
    return ConfigContainer(
        model=provider,
        train=TrainingConfig(train_iters=train_iters, global_batch_size=global_batch_size,
                             micro_batch_size=1, exit_signal_handler=False),
        validation=ValidationConfig(eval_interval=10**6, eval_iters=0),
        optimizer=OptimizerConfig(optimizer="adam", lr=lr, min_lr=lr, weight_decay=0.0,
                                  use_distributed_optimizer=False, bf16=False, fp16=False,
                                  params_dtype=torch.float32),
        scheduler=SchedulerConfig(lr_decay_style="constant", lr_warmup_iters=0,
                                  start_weight_decay=0.0, end_weight_decay=0.0,
                                  weight_decay_incr_style="constant"),
        ddp=DistributedDataParallelConfig(use_distributed_optimizer=False),
        dataset=MockGPTDatasetConfig(seq_length=seq_length, random_seed=1, reset_attention_mask=False,
                                     reset_position_ids=False, eod_mask_loss=False,
                                     num_dataset_builder_threads=1, split="9999,8,2",
                                     data_sharding=True, dataloader_type="single",
                                     skip_getting_attention_mask_from_dataset=True),
        logger=LoggerConfig(log_interval=1),
        tokenizer=TokenizerConfig(tokenizer_type="NullTokenizer", vocab_size=provider.vocab_size),
        checkpoint=CheckpointConfig(save=str(save), load=str(save), ckpt_format="torch_dist",
                                    save_interval=save_interval or train_iters,
                                    fully_parallel_save=False, async_save=False,
                                    save_rng=False, **checkpoint),
        rng=RNGConfig(seed=1),
        dist=DistributedInitConfig(distributed_backend="gloo"),
    )
