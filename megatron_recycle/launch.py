"""Run a stock Megatron-LM training script with the `--grow-*` flags.

    torchrun --nproc-per-node 8 ... -m megatron_recycle.launch /path/to/Megatron-LM/pretrain_gpt.py ARGS...

The script runs unchanged as `__main__`, exactly as `python pretrain_gpt.py ARGS...` would,
after `megatron_lm.install()` hooked Megatron-LM (see there). Without CUDA (tests, laptops) the
CPU shims of `megatron_recycle.cpu` are installed and the script runs over gloo; with CUDA
nothing else changes.
"""

from __future__ import annotations

import os
import runpy
import sys

from .errors import GrowthError

USAGE = "usage: python -m megatron_recycle.launch PRETRAIN_SCRIPT.py [MEGATRON-LM ARGS...] [--grow-* ARGS...]"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help") and len(argv) == 1:
        print(USAGE + "\n\n" + __doc__)
        return
    script = os.path.abspath(argv[0])
    if not script.endswith(".py") or not os.path.isfile(script):
        sys.exit(f"megatron_recycle.launch: {argv[0]}: not a Python script\n{USAGE}")
    # As `python script.py` would: the script's directory first, so its Megatron-LM checkout
    # (megatron/, gpt_builders.py, model_provider.py) wins over any installed megatron-core.
    sys.path.insert(0, os.path.dirname(script))
    sys.argv = [script, *argv[1:]]

    try:
        _run(script)
    except GrowthError as e:  # a usage error: the message says what to change
        if os.environ.get("RANK", "0") == "0":
            print(f"megatron-recycle: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


def _run(script: str) -> None:
    import torch

    from . import megatron_lm

    megatron_lm.install()
    if torch.cuda.is_available():
        runpy.run_path(script, run_name="__main__")
        return
    from .testing import cpu

    cpu.install()
    _initialize_without_cuda()
    with cpu.cuda_to_cpu():
        runpy.run_path(script, run_name="__main__")


def _initialize_without_cuda() -> None:
    """Megatron-LM's start-up on CPU: `pretrain()` asserts CUDA unless `allow_no_cuda`,
    `_initialize_distributed` sets up model parallelism only when it sees a device, and the
    legacy fused kernels (CUDA only, compiled with nvcc) are loaded unconditionally. The
    rerun state machine and checkpoints record a CUDA RNG state: there is none, so a
    placeholder is recorded and restoring it does nothing."""
    import torch
    import torch.distributed as dist
    from megatron.training import initialize, training

    from . import megatron_lm

    initialize_megatron = training.initialize_megatron
    initialize_distributed = initialize._initialize_distributed

    def initialize_megatron_without_cuda(*args, **kwargs):
        kwargs["allow_no_cuda"] = True
        return initialize_megatron(*args, **kwargs)

    def initialize_distributed_on_gloo(*args, **kwargs):
        if not dist.is_initialized():  # its own init would pin a CUDA device
            dist.init_process_group("gloo")
        device_count = torch.cuda.device_count
        torch.cuda.device_count = lambda: 1
        try:
            return initialize_distributed(*args, **kwargs)
        finally:
            torch.cuda.device_count = device_count

    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, device="cuda": None
    training.initialize_megatron = initialize_megatron_without_cuda
    initialize._initialize_distributed = initialize_distributed_on_gloo
    fused_kernels = megatron_lm.compat.legacy_fused_kernels()
    if fused_kernels is not None:
        fused_kernels.load = lambda args: None


if __name__ == "__main__":
    main()
