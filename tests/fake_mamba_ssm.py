"""A stand-in for the `mamba_ssm` package (CUDA/Triton kernels), so megatron-core's MambaMixer
builds and runs on CPU in the tests: the two kernels it calls, written in plain torch (a
sequential SSD scan and a gated group RMSNorm). Not checked against mamba_ssm's numerics: the
tests that use it check growth's key mapping and that zero-initialised copies are identities,
which do not depend on what the mixer computes."""

import sys
import types

import torch
import torch.nn.functional as F


class GatedRMSNorm(torch.nn.Module):
    """mamba_ssm.ops.triton.layernorm_gated.RMSNorm: group-wise RMSNorm, gated by silu(z)."""

    def __init__(self, hidden_size, eps=1e-5, group_size=None, norm_before_gate=True, device=None, dtype=None):
        super().__init__()
        self.eps, self.group_size, self.norm_before_gate = eps, group_size, norm_before_gate
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)

    def forward(self, x, z=None):
        dtype, x = x.dtype, x.float()
        if z is not None and not self.norm_before_gate:
            x = x * F.silu(z.float())
        group = self.group_size or x.shape[-1]
        grouped = x.reshape(*x.shape[:-1], x.shape[-1] // group, group)
        grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + self.eps)
        out = grouped.reshape(x.shape) * self.weight.float()
        if z is not None and self.norm_before_gate:
            out = out * F.silu(z.float())
        return out.to(dtype)


def mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None,
                              initial_states=None, seq_idx=None, dt_softplus=False,
                              dt_limit=(0.0, float("inf")), return_final_states=False, **_):
    """The SSD scan, one step at a time: x (b, l, h, p), dt (b, l, h), A (h), B, C (b, l, g, n)."""
    b, length, heads, p = x.shape
    dt = dt.float() + (dt_bias.float() if dt_bias is not None else 0.0)
    dt = (F.softplus(dt) if dt_softplus else dt).clamp(min=dt_limit[0], max=dt_limit[1])
    Bh = B.float().repeat_interleave(heads // B.shape[2], dim=2)
    Ch = C.float().repeat_interleave(heads // C.shape[2], dim=2)
    state = (initial_states.float() if initial_states is not None
             else torch.zeros(b, heads, p, B.shape[-1], dtype=torch.float32))
    ys = []
    for t in range(length):
        decay = torch.exp(dt[:, t] * A.float())
        state = state * decay[..., None, None] + dt[:, t, :, None, None] * x[:, t].float()[..., None] * Bh[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Ch[:, t]))
    y = torch.stack(ys, dim=1)
    if D is not None:
        y = y + x.float() * (D.float() if D.dim() == 2 else D.float()[:, None])
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(x.dtype)
    return (y, state) if return_final_states else y


def install() -> None:
    """Make `import mamba_ssm…` find these, before megatron-core's mamba_mixer is imported."""
    names = ["mamba_ssm", "mamba_ssm.ops", "mamba_ssm.ops.triton", "mamba_ssm.ops.triton.layernorm_gated",
             "mamba_ssm.ops.triton.ssd_combined"]
    modules = {name: types.ModuleType(name) for name in names}
    for name, module in modules.items():
        module.__path__ = []
        sys.modules.setdefault(name, module)
    sys.modules["mamba_ssm.ops.triton.layernorm_gated"].RMSNorm = GatedRMSNorm
    ssd = sys.modules["mamba_ssm.ops.triton.ssd_combined"]
    ssd.mamba_chunk_scan_combined = mamba_chunk_scan_combined

    def fused_path(*args, **kwargs):
        raise NotImplementedError("the fused Mamba path needs CUDA: set use_mamba_mem_eff_path=False")

    ssd.mamba_split_conv1d_scan_combined = fused_path
