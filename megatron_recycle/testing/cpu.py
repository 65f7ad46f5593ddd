"""Run real megatron-core on CPU over gloo (tests, the demo, laptops).

megatron-core assumes CUDA in a handful of places that are not about the math: device
placement, RNG tracker forks, CUDA streams in the alltoall dispatcher, `param.type()` string
checks in the optimizer. `install()` patches exactly those, once per process, and is a no-op
when CUDA is available. It also applies `megatron_recycle.fixes`, the megatron-core fixes that
a run without apex or TE needs on any device (GPU callers apply them themselves). Nothing here
changes numerics.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch.overrides import TorchFunctionMode

from .. import fixes

_INSTALLED = False


def _cpu_device(device):
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    if isinstance(device, str) and device.startswith("cuda"):
        return "cpu"
    if isinstance(device, int) and not isinstance(device, bool):
        return "cpu"  # torch.cuda.current_device() style ordinals
    return device


class CudaToCpuMode(TorchFunctionMode):
    """Rewrites `device='cuda'` and `.cuda()` inside torch calls to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        name = getattr(func, "__name__", "")
        if name == "cuda":
            return args[0]
        if name == "to" and args:
            args = tuple(_cpu_device(a) if isinstance(a, (str, torch.device)) else a for a in args)
        return func(*args, **kwargs)


class _FakeStream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _FakeEvent()

    def synchronize(self):
        pass


class _FakeEvent(_FakeStream):
    def record(self, *args, **kwargs):
        pass

    def query(self):
        return True


def install() -> bool:
    """Patch megatron-core for CPU execution. Returns True if patches were applied."""
    global _INSTALLED
    if _INSTALLED or torch.cuda.is_available():
        return _INSTALLED
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.Stream = _FakeStream
    torch.cuda.Event = _FakeEvent
    torch.cuda.current_stream = lambda *a, **k: _FakeStream()
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
    torch.cuda.empty_cache = lambda: None

    from megatron.core import utils as mcore_utils
    from megatron.core.tensor_parallel import random as mcore_random
    from megatron.core.transformer.moe import moe_utils

    def get_tensor(self, tensor_shape, dtype, name, mem_alloc_context=None):
        n = functools.reduce(lambda a, b: a * b, tensor_shape, 1)
        buf = self.buffer.get((name, dtype))
        if buf is None or buf.numel() < n:
            buf = self.buffer[(name, dtype)] = torch.empty(n, dtype=dtype)
        return buf[:n].view(*tensor_shape)

    mcore_utils.GlobalMemoryBuffer.get_tensor = get_tensor
    mcore_random.CudaRNGStatesTracker.fork = lambda self, name=None: contextlib.nullcontext()
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None  # referenced unguarded without TE (0.16.x)

    # The optimizer and grad buffers check `param.type()` against CUDA type strings.
    _type = torch.Tensor.type

    def tensor_type(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None:
            name = _type(self)
            return name.replace("torch.", "torch.cuda.", 1) if ".cuda." not in name else name
        return _type(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = tensor_type
    _patch_alltoall_split_sizes()
    _patch_hybrid_final_norm()
    fixes.apply()
    _INSTALLED = True
    return True


def _patch_hybrid_final_norm():
    """HybridModel's stack builds its final norm with Transformer Engine whatever its spec says
    (megatron-core 0.19+): the torch norm instead, the local specs' own."""
    try:
        from megatron.core.models.hybrid import hybrid_block
    except ImportError:  # before 0.19: no HybridModel
        return
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    hybrid_block.TENorm = WrappedTorchNorm


def _patch_alltoall_split_sizes():
    """The alltoall dispatcher turns split sizes into numpy only for CUDA tensors."""
    try:
        from megatron.core.transformer.moe import token_dispatcher
    except ImportError:
        return
    from megatron.core.transformer.moe import moe_utils

    original = getattr(moe_utils, "maybe_move_tensor_to_cpu", None)
    if original is None:
        return

    def to_numpy_too(tensor, as_numpy=False, record_stream=False):
        if tensor is not None and as_numpy and tensor.device.type == "cpu":
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = to_numpy_too
    if hasattr(token_dispatcher, "maybe_move_tensor_to_cpu"):
        token_dispatcher.maybe_move_tensor_to_cpu = to_numpy_too


@contextlib.contextmanager
def cuda_to_cpu():
    """Context in which hard-coded CUDA placements land on the CPU (no-op with CUDA)."""
    if torch.cuda.is_available():
        yield
        return
    with CudaToCpuMode():
        yield
