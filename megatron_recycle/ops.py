"""Mapping → tensors: the operators that turn source regions into grown target shards.

Noise is layout-free by construction: one seed per (seed, tensor name, target layer, target
expert) draws the *full* unsharded expert matrix (or router row), and each shard takes its
slice; σ is the std of the whole source unit, computed in float64 and rounded to float32.
So the grown weights do not depend on how source or target are sharded.
"""

from __future__ import annotations

import hashlib
from typing import Callable

import torch

from .mapping import Fill, Noise, Region, Unit


def noise_seed(seed: int, name: str, layer: int, expert: int) -> int:
    digest = hashlib.blake2b(f"{seed}|{name}|{layer}|{expert}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def unit_noise(seed: int, name: str, layer: int, expert: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Standard normal noise for one whole (unsharded) expert matrix or router row, float32."""
    gen = torch.Generator(device="cpu").manual_seed(noise_seed(seed, name, layer, expert))
    return torch.randn(shape, generator=gen, dtype=torch.float32)


def sigma(unit_tensor: torch.Tensor) -> float:
    """Std of a whole source unit; float64 accumulation, rounded to float32 for stability."""
    return float(torch.tensor(unit_tensor.double().std().item(), dtype=torch.float32))


def box(offset: tuple[int, ...], shape: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(o, o + s) for o, s in zip(offset, shape))


def region_view(buffers: dict[Region, torch.Tensor], region: Region) -> torch.Tensor:
    """The data of `region`, from its own read or from a read of its whole unit."""
    if region in buffers:
        return buffers[region]
    return buffers[region.unit.whole()][box(region.offset, region.shape)]


def fill_shard(
    target: torch.Tensor,
    fill: Fill,
    source: torch.Tensor,
    sigma_of: Callable[[Unit], float],
    alpha: float,
    seed: int,
) -> None:
    """Write one grown shard into `target` in place."""
    if fill.zero:
        target.zero_()
        return
    data = source if fill.rows is None else source.index_select(0, torch.tensor(fill.rows))
    if fill.zero_rows:
        data[list(fill.zero_rows)] = 0  # a fresh tensor from index_select: safe to write
    if fill.noise is None or target.dtype == torch.float32:
        if target.data_ptr() != data.data_ptr():
            target.copy_(data)
        if fill.noise is not None:
            _add_noise(target, fill.noise, sigma_of, alpha, seed)
        return
    # In fp32 whatever the storage dtype, so a bf16 weight and its fp32 main param get the
    # same noise.
    out = data.float()
    _add_noise(out, fill.noise, sigma_of, alpha, seed)
    target.copy_(out)


def _add_noise(out: torch.Tensor, noise: Noise, sigma_of, alpha: float, seed: int) -> None:
    """out += α·σ·(the shard's slice of each copy's full noise), in place, fp32.

    Multiply, then add, as two operations: a fused multiply-add could round differently
    depending on where a shard's slice starts, and the result must not depend on sharding.
    """
    scale = alpha * sigma_of(noise.sigma_unit)
    for expert, row in noise.experts:
        full = unit_noise(seed, noise.name, noise.layer, expert, noise.unit_shape)
        if row < 0:
            out += scale * full[box(noise.offset, out.shape)]
        else:
            out[row] += scale * full[box(noise.offset, out.shape[1:])]
