"""Run real megatron-core on CPU over gloo (tests, the demo, laptops).

megatron-core assumes CUDA in a handful of places that are not about the math: device
placement, RNG tracker forks, CUDA streams in the alltoall dispatcher, `param.type()` string
checks in the optimizer. `install()` patches exactly those, once per process, and is a no-op
when CUDA is available. It also applies the two patches that megatron-core without apex or TE
needs on any device, which GPU callers apply themselves: `patch_torch_adam_fallback()` and
`patch_torch_norm_sequence_parallel()`. Nothing here changes numerics.
"""

from __future__ import annotations

import contextlib
import copy
import functools

import torch
from torch.overrides import TorchFunctionMode

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
    patch_torch_adam_fallback()
    patch_torch_norm_sequence_parallel()
    _INSTALLED = True
    return True


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


def patch_torch_adam_fallback() -> bool:
    """Fix the distributed optimizer's load path when it runs torch AdamW (no apex / TE),
    as it always does on CPU. Returns True if patched; a no-op with apex or TE.

    megatron-core 0.16.1 (any device) copies every per-param state key on a
    fully_reshardable load, but that format leaves `step` out: KeyError 'step'. Its load
    gives all params one shared `step` tensor, which torch AdamW increments once per param
    per iteration: silently wrong bias correction. And a never-stepped torch AdamW has no
    state, so asking it for a sharded state dict to load into fails (`len(steps) == 1`).
    """
    from megatron.core.optimizer import distrib_optimizer as do

    cls = do.DistributedOptimizer
    if do.HAVE_APEX_OR_TE or getattr(cls, "_recycle_adam_patched", False):
        return False
    set_states, load_state_dict = cls._set_main_param_and_optimizer_states, cls.load_state_dict
    sharded_state_dict = cls.sharded_state_dict

    def sharded_state_dict_with_states(self, model_sharded_state_dict=None, is_loading=False,
                                       *args, **kwargs):
        if is_loading and not self.optimizer.state:  # tensors for the load to fill
            self._init_optimizer_states_with_dummy_values()
        return sharded_state_dict(self, model_sharded_state_dict or {}, is_loading, *args, **kwargs)

    def set_main_param_and_optimizer_states(self, model_param, tensors):
        if "step" not in tensors:  # `step` is set from the param groups by load_state_dict
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            step = self.optimizer.state[main_param].pop("step", None)
            try:
                return set_states(self, model_param, tensors)
            finally:
                if step is not None:
                    self.optimizer.state[main_param]["step"] = step
        return set_states(self, model_param, tensors)

    def load_state_dict_with_own_steps(self, state_dict):
        load_state_dict(self, state_dict)
        for state in self.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()

    cls._set_main_param_and_optimizer_states = set_main_param_and_optimizer_states
    cls.load_state_dict = load_state_dict_with_own_steps
    cls.sharded_state_dict = sharded_state_dict_with_states
    cls._recycle_adam_patched = True
    return True


def patch_torch_norm_sequence_parallel() -> bool:
    """Let megatron-core's torch norm run under sequence parallelism, which MoE at TP > 1 needs.

    That norm is the local spec's without apex or TE, on any device. Returns True if patched.
    Under sequence parallelism each TP rank normalises its own slice of the sequence: the same
    math, so the norm is built as without it. Only its weights' grads change, each rank holding
    its tokens' share: the params are marked `sequence_parallel`, as apex's FusedLayerNorm and
    TENorm mark theirs, so `finalize_model_grads` sums their grads across the TP group.
    """
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    if getattr(WrappedTorchNorm, "_recycle_sp_patched", False):
        return False
    build = WrappedTorchNorm.__new__  # returns a torch.nn.LayerNorm / RMSNorm, not a wrapper

    def build_sequence_parallel(cls, config, *args, **kwargs):
        without_sp = copy.copy(config)  # shallow: no __post_init__, only the flag differs
        without_sp.sequence_parallel = False
        norm = build(cls, without_sp, *args, **kwargs)
        for param in norm.parameters():
            setattr(param, "sequence_parallel", config.sequence_parallel)
        return norm

    # Patched in place: the specs hold the class itself (`LNImpl = WrappedTorchNorm`).
    WrappedTorchNorm.__new__ = staticmethod(build_sequence_parallel)
    WrappedTorchNorm._recycle_sp_patched = True
    return True


@contextlib.contextmanager
def cuda_to_cpu():
    """Context in which hard-coded CUDA placements land on the CPU (no-op with CUDA)."""
    if torch.cuda.is_available():
        yield
        return
    with CudaToCpuMode():
        yield
