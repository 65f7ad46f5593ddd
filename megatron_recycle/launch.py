"""Run a stock Megatron-LM training script with the `--grow-*` flags.

    torchrun --nproc-per-node 8 ... -m megatron_recycle.launch /path/to/Megatron-LM/pretrain_gpt.py ARGS...

The script runs unchanged as `__main__`, exactly as `python pretrain_gpt.py ARGS...` would,
after `megatron_lm.install()` hooked Megatron-LM (see there). Without CUDA (tests, laptops) the
CPU shims of `megatron_recycle.testing.cpu` are installed, the flags a run without CUDA, Transformer
Engine and apex needs (`CPU_ARGS`) are added after the script's own, and the script runs over
gloo; with CUDA nothing else changes.
"""

from __future__ import annotations

import os
import runpy
import sys

from .errors import GrowthError

# What Megatron-LM needs on CPU: gloo, the local (torch) modules, and no CUDA-only fused
# kernels (RoPE, apex's persistent layer norm, gradient-accumulation fusion, masked softmax).
CPU_ARGS = ("--distributed-backend", "gloo", "--transformer-impl", "local", "--no-rope-fusion",
            "--no-persist-layer-norm", "--no-gradient-accumulation-fusion",
            "--no-masked-softmax-fusion")
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

    if os.environ.get("RANK", "0") == "0":
        print(f"megatron-recycle: no CUDA: running on CPU with {' '.join(CPU_ARGS)}", flush=True)
    sys.argv += CPU_ARGS  # after the script's own: these win
    cpu.install()
    _initialize_without_cuda()
    with cpu.cuda_to_cpu():
        runpy.run_path(script, run_name="__main__")


def _initialize_without_cuda() -> None:
    """Megatron-LM's start-up on CPU: `pretrain()` asserts CUDA unless `allow_no_cuda`,
    `_initialize_distributed` sets up model parallelism only when it sees a device, and the
    legacy fused kernels (CUDA only, compiled with nvcc) are loaded unconditionally. The
    rerun state machine and checkpoints record a CUDA RNG state: there is none, so a
    placeholder is recorded and restoring it does nothing. The model-parallel RNG tracker is
    seeded only when a device is seen: seeded here too, so checkpoints record its states and
    a resumed run can restore them (Megatron-LM exits when they are empty)."""
    import torch
    import torch.distributed as dist
    from megatron.training import initialize, training

    from . import megatron_lm

    initialize_megatron = training.initialize_megatron
    initialize_distributed = initialize._initialize_distributed

    def initialize_megatron_without_cuda(*args, **kwargs):
        kwargs["allow_no_cuda"] = True
        return initialize_megatron(*args, **kwargs)

    def seeing_one_device(function):
        def call(*args, **kwargs):
            device_count = torch.cuda.device_count
            torch.cuda.device_count = lambda: 1
            try:
                return function(*args, **kwargs)
            finally:
                torch.cuda.device_count = device_count

        return call

    def initialize_distributed_on_gloo(*args, **kwargs):
        if not dist.is_initialized():  # its own init would pin a CUDA device
            dist.init_process_group("gloo")
        return seeing_one_device(initialize_distributed)(*args, **kwargs)

    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, device="cuda": None
    training.initialize_megatron = initialize_megatron_without_cuda
    initialize._initialize_distributed = initialize_distributed_on_gloo
    initialize._set_random_seed = seeing_one_device(initialize._set_random_seed)
    fused_kernels = megatron_lm.compat.legacy_fused_kernels()
    if fused_kernels is not None:
        fused_kernels.load = lambda args: None


if __name__ == "__main__":
    main()
