"""Mapping → tensors: the operators that turn source regions into grown target shards.

Noise is layout-free by construction: the noise of one copied unit (a whole, unsharded
expert matrix or router row) is a fixed function of (seed, tensor name, target layer,
target expert) and the flat index, drawn in fixed blocks of `NOISE_BLOCK` elements each
seeded on its own. A shard draws only the blocks its box touches (a dim-0 slice: only its
rows) and takes its part; each element gets the same noise, bit for bit, whatever the box.
σ is the std of the whole source unit, computed in float64 and rounded to float32. So the
grown weights do not depend on how source or target are sharded, nor on how many threads
drew them.
"""

from __future__ import annotations

import hashlib
import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, Optional

import torch

from .mapping import Box, Fill, Noise

NOISE_BLOCK = 1 << 18  # elements drawn from one seed: 1 MiB of fp32, cache-sized
MAX_THREADS = 16


def noise_seed(seed: int, name: str, layer: int, expert: int, block: int) -> int:
    digest = hashlib.blake2b(f"{seed}|{name}|{layer}|{expert}|{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def worker_threads() -> int:
    """Threads for drawing noise and filling shards: the cores this process may use. Launchers
    set OMP_NUM_THREADS=1 per rank, yet at load time the cores are otherwise idle, and with
    appended expert copies some ranks hold all the noisy shards."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(MAX_THREADS, cores or 1))


def parallel(fn: Callable, items: Iterable) -> list:
    """fn over items on `worker_threads()` threads (torch releases the GIL in its kernels)."""
    items = list(items)
    threads = min(worker_threads(), len(items))
    if threads <= 1:
        return [fn(item) for item in items]
    grad = torch.is_grad_enabled()  # thread-local in torch: carry the caller's (no_grad) over

    def call(item):
        with torch.set_grad_enabled(grad):
            return fn(item)

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(call, items))


def sigma(unit_tensor: torch.Tensor) -> float:
    """Std of a whole source unit; float64 accumulation, rounded to float32 for stability."""
    std = unit_tensor.to(device="cpu", dtype=torch.float64).std().item()  # the CPU's, on any device
    return float(torch.tensor(std, dtype=torch.float32))


def box(offset: tuple[int, ...], shape: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(o, o + s) for o, s in zip(offset, shape))


def box_view(buffers: dict[Box, torch.Tensor], source: Box) -> torch.Tensor:
    """The data of `source`, from its own read or from a read of its whole unit."""
    if source in buffers:
        return buffers[source]
    return buffers[source.unit()][box(source.offset, source.shape)]


def scaled_noise_blocks(seed: int, name: str, layer: int, expert: int, numel: int, scale: float,
                        start: int, stop: int) -> Iterator[tuple[int, torch.Tensor]]:
    """scale·N(0, 1) for flat indices [start, stop) of a unit of `numel` elements, as
    (position from `start`, noise) pieces, one per block. Whole blocks are always drawn and
    scaled (a block's values depend on its length), then cut. Every piece is a view of one
    buffer, drawn into in place: a piece is valid until the next one is drawn."""
    buffer = torch.empty(min(NOISE_BLOCK, numel), dtype=torch.float32)
    for block in range(start // NOISE_BLOCK, -(-stop // NOISE_BLOCK)):
        lo = block * NOISE_BLOCK
        hi = min(lo + NOISE_BLOCK, numel)
        gen = torch.Generator(device="cpu").manual_seed(noise_seed(seed, name, layer, expert, block))
        values = torch.randn(hi - lo, generator=gen, out=buffer[:hi - lo]).mul_(scale)
        first, last = max(lo, start), min(hi, stop)
        yield first - start, values[first - lo:last - lo]


def add_unit_noise(out: torch.Tensor, scale: float, seed: int, name: str, layer: int, expert: int,
                   unit_shape: tuple[int, ...], offset: tuple[int, ...]) -> None:
    """out += scale · (the box of one unit's noise at `offset`, shaped like `out`), fp32.

    Scale, then add, as two operations: a fused multiply-add could round differently
    depending on where a shard's slice starts, and the result must not depend on sharding."""
    numel = math.prod(unit_shape)
    whole_rows = tuple(out.shape[1:]) == tuple(unit_shape[1:]) and not any(offset[1:])
    if whole_rows and out.is_contiguous():  # a contiguous flat range: draw only its blocks
        start = offset[0] * math.prod(unit_shape[1:]) if unit_shape else 0
        flat = out.view(-1)
        for at, values in scaled_noise_blocks(seed, name, layer, expert, numel, scale,
                                              start, start + flat.numel()):
            flat[at:at + values.numel()] += values
        return
    full = torch.empty(numel, dtype=torch.float32)
    for at, values in scaled_noise_blocks(seed, name, layer, expert, numel, scale, 0, numel):
        full[at:at + values.numel()] = values
    out += full.view(unit_shape)[box(offset, out.shape)]


class NotFinite(Exception):
    """A shard that growth changed holds Inf/NaN. `overflow`: its fp32 values were finite and
    their cast to the target's narrower dtype (fp16 near its range, plus noise) was not;
    otherwise the values read were not finite."""

    def __init__(self, overflow: bool):
        super().__init__(overflow)
        self.overflow = overflow


def fill_shard(
    target: torch.Tensor,
    fill: Fill,
    source: Optional[torch.Tensor],
    sigma_of: Callable[[Box], float],
    alpha: float,
    seed: int,
    second: Optional[torch.Tensor] = None,
) -> None:
    """Write one grown shard into `target` (any dtype, any device) in place; `second`: the
    data of `fill.second`. Raises NotFinite where a shard it changes (scaled, noised) is not
    finite: growth never writes Inf/NaN."""
    if fill.zero:
        target.zero_()
        return
    if fill.source is None:  # drawn afresh: a baseline's re-initialised unit
        data = torch.zeros(target.shape, dtype=torch.float32)
    elif fill.rows is None:
        data = source
    else:
        both = source if second is None else torch.cat([source, second])
        data = both.index_select(0, torch.tensor(fill.rows))
    if fill.zero_rows:
        data[list(fill.zero_rows)] = 0  # a fresh tensor from index_select: safe to write
    if not fill.modifies:
        _copy(target, data)
        return
    # Scaled and noised in fp32 on the CPU whatever the target's dtype and device: a bf16
    # weight and its fp32 main param get the same values, and a GPU target the CPU's.
    in_place = target.dtype == torch.float32 and target.device.type == "cpu"
    out = target if in_place else torch.empty(target.shape, dtype=torch.float32)
    _copy(out, data)
    if fill.scale != 1.0 and fill.scaled_rows is None:
        out.mul_(fill.scale)
    elif fill.scale != 1.0:
        rows = list(fill.scaled_rows)
        out[rows] = out[rows] * fill.scale
    if fill.noise is not None:
        _add_noise(out, fill.noise, sigma_of, alpha, seed)
    if not in_place:
        target.copy_(out)
    if not all_finite(target):
        raise NotFinite(overflow=not in_place and all_finite(out))


def all_finite(t: torch.Tensor) -> bool:
    """Whether every value is finite, in one reduction with no temporary: min and max are
    both finite exactly when all values are (an Inf is the max or the min, a NaN propagates
    to both). A tenth of the cost of `isfinite(t).all()`, which allocates a mask."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    if dst.data_ptr() != src.data_ptr() or dst.device != src.device:  # else read straight into it
        dst.copy_(src)


def _add_noise(out: torch.Tensor, noise: Noise, sigma_of, alpha: float, seed: int) -> None:
    scale = noise.std_of(sigma_of, alpha)
    for expert, row in noise.experts:
        add_unit_noise(out if row < 0 else out[row], scale, seed, noise.name, noise.layer, expert,
                       noise.unit_shape, noise.offset)
