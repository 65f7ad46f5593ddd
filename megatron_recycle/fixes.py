"""megatron-core bugs and limits that a run without apex or Transformer Engine meets on any
device, GPU included (always on CPU). Each fix is a no-op where it is not needed; `apply()`
applies all of them, once. Nothing here changes numerics.
"""

from __future__ import annotations

import copy

import torch


def apply() -> None:
    patch_torch_adam_fallback()
    patch_torch_norm_sequence_parallel()


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
            param.sequence_parallel = config.sequence_parallel
        return norm

    # Patched in place: the specs hold the class itself (`LNImpl = WrappedTorchNorm`).
    WrappedTorchNorm.__new__ = staticmethod(build_sequence_parallel)
    WrappedTorchNorm._recycle_sp_patched = True
    return True
