"""The tensor operators alone: noise that does not depend on the shard, the thread or the
device. Units here span several noise blocks (the models in the multi-rank tests are smaller
than one block)."""

import math

import pytest
import torch

from megatron_recycle import ops
from megatron_recycle.mapping import Box, Fill, Noise

UNIT = (700, 1000)  # 2.7 noise blocks: block edges fall inside rows
ID = dict(seed=7, name="decoder.layers.mlp.experts.experts.linear_fc1.weight", layer=3, expert=9)


def noisy(shape, offset, scale=0.5, out=None):
    out = torch.zeros(shape) if out is None else out
    ops.add_unit_noise(out, scale, ID["seed"], ID["name"], ID["layer"], ID["expert"], UNIT, offset)
    return out


def test_unit_spans_several_blocks():
    assert math.prod(UNIT) > 2 * ops.NOISE_BLOCK


@pytest.mark.parametrize("offset,shape", [
    ((0, 0), (350, 1000)),  # column-parallel halves: only their rows' blocks are drawn
    ((350, 0), (350, 1000)),
    ((262, 0), (1, 1000)),  # one row across a block edge
    ((0, 500), (700, 500)),  # row-parallel halves: a strided box
    ((100, 250), (300, 250)),
])
def test_a_shard_gets_exactly_its_box_of_the_whole_units_noise(offset, shape):
    whole = noisy(UNIT, (0, 0))
    assert torch.equal(noisy(shape, offset), whole[ops.box(offset, shape)])


def test_noise_lands_on_a_non_contiguous_target():
    base = torch.zeros(1000, 700)
    out = base.t()[:350]  # a strided (350, 1000) view
    noisy((350, 1000), (350, 0), out=out)
    assert torch.equal(out, noisy(UNIT, (0, 0))[350:])


def test_blocks_are_independent_standard_normal_draws():
    flat = noisy(UNIT, (0, 0), scale=1.0).view(-1)
    first, second = flat[:ops.NOISE_BLOCK], flat[ops.NOISE_BLOCK:2 * ops.NOISE_BLOCK]
    assert abs(flat.mean().item()) < 0.01 and abs(flat.std().item() - 1) < 0.01
    assert abs(torch.corrcoef(torch.stack([first, second]))[0, 1].item()) < 0.01
    other_expert = torch.zeros(UNIT)
    ops.add_unit_noise(other_expert, 1.0, ID["seed"], ID["name"], ID["layer"], 10, UNIT, (0, 0))
    assert not torch.equal(other_expert.view(-1), flat)


def test_threads_do_not_change_the_result(monkeypatch):
    shards = [((r * 100, 0), (100, 1000)) for r in range(7)]
    serial = [noisy(s, o) for o, s in shards]
    monkeypatch.setattr(ops, "worker_threads", lambda: 4)
    threaded = ops.parallel(lambda box_: noisy(box_[1], box_[0]), shards)
    assert all(torch.equal(a, b) for a, b in zip(serial, threaded))


def _fill_of_a_copy(unit_key="w"):
    unit = Box.whole_unit(unit_key, (4,) + UNIT, (0,))
    noise = Noise(ID["name"], ID["layer"], ((ID["expert"], -1),), UNIT, (0, 0), unit)
    return unit, Fill(unit, noise=noise)


def test_a_bf16_target_gets_the_fp32_noise_rounded_once():
    unit, fill = _fill_of_a_copy()
    source = torch.randn(UNIT) * 0.02
    fp32, bf16 = torch.empty(UNIT), torch.empty(UNIT, dtype=torch.bfloat16)
    for target in (fp32, bf16):
        ops.fill_shard(target, fill, source, lambda u: ops.sigma(source), alpha=0.01, seed=ID["seed"])
    assert not torch.equal(fp32, source)
    assert torch.equal(bf16, fp32.bfloat16())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: a CUDA target gets the CPU's noise")
def test_a_gpu_target_gets_the_same_values_as_a_cpu_one():
    unit, fill = _fill_of_a_copy()
    source = torch.randn(UNIT) * 0.02
    cpu = torch.empty(UNIT)
    ops.fill_shard(cpu, fill, source, lambda u: ops.sigma(source), 0.01, ID["seed"])
    for dtype in (torch.float32, torch.bfloat16):
        gpu = torch.empty(UNIT, dtype=dtype, device="cuda")
        ops.fill_shard(gpu, fill, source.cuda(), lambda u: ops.sigma(source.cuda()), 0.01, ID["seed"])
        assert torch.equal(gpu.cpu(), cpu.to(dtype))


def _drawn(offset, shape, std=0.02):
    """A baseline's fresh draw of one unit: no source, N(0, std²) on the init stream."""
    fill = Fill(None, noise=Noise("init:" + ID["name"], ID["layer"], ((ID["expert"], -1),), UNIT, offset,
                                  None, std=std))
    out = torch.full(shape, 5.0)  # whatever the target held before
    ops.fill_shard(out, fill, None, lambda u: pytest.fail("a fresh draw needs no sigma"), 0.01, ID["seed"])
    return out


@pytest.mark.parametrize("offset,shape", [((0, 0), (350, 1000)), ((0, 500), (700, 500)), ((100, 250), (300, 250))])
def test_a_fresh_draw_is_layout_free_and_n_0_std(offset, shape):
    whole = _drawn((0, 0), UNIT)
    assert torch.equal(_drawn(offset, shape), whole[ops.box(offset, shape)])
    assert abs(whole.std().item() - 0.02) < 2e-4 and abs(whole.mean().item()) < 2e-4
    assert not torch.equal(whole, noisy(UNIT, (0, 0), scale=0.02))  # the copies' stream is another


def test_multiplied_router_rows_scale_only_the_copies_and_their_noise():
    """Rows 0-1 originals, 2-3 copies of them: copies = m x source + N(0, (alpha m sigma)^2)."""
    source = torch.randn(2, 64)
    unit = Box.whole_unit("router", (2, 64), ())
    noise = Noise("router", 0, ((2, 2), (3, 3)), (64,), (0,), unit, factor=0.5)
    fill = Fill(unit, rows=(0, 1, 0, 1), noise=noise, scale=0.5, scaled_rows=(2, 3))
    out = torch.empty(4, 64)
    sigma = ops.sigma(source)
    ops.fill_shard(out, fill, source, lambda u: sigma, 0.01, ID["seed"])
    assert torch.equal(out[:2], source)
    for row, expert in ((2, 2), (3, 3)):
        want = source[row - 2] * 0.5
        ops.add_unit_noise(want, 0.01 * sigma * 0.5, ID["seed"], "router", 0, expert, (64,), (0,))
        assert torch.equal(out[row], want)


def test_the_noise_of_a_fixed_unit_is_pinned():
    """Golden values: the seeds and the draws across a block edge of one fixed unit. A torch
    release (or a change here) that changes them changes every grown checkpoint's noise, and
    `verify` of checkpoints grown before it would report their noisy copies as mismatches."""
    name = "decoder.layers.mlp.experts.linear_fc1.weight"
    assert [ops.noise_seed(1234, name, 3, 5, block) for block in (0, 1)] == [
        6553401922583147638, 5142955941444980819]
    pieces = ops.scaled_noise_blocks(1234, name, 3, 5, ops.NOISE_BLOCK + 8, 1.0,
                                     ops.NOISE_BLOCK - 4, ops.NOISE_BLOCK + 4)
    drawn = [(at, [x.hex() for x in values.tolist()]) for at, values in pieces]
    assert drawn == [
        (0, ["0x1.ffb2fc0000000p-2", "0x1.abfbae0000000p-1", "-0x1.fba4580000000p+0",
             "0x1.ca80460000000p-3"]),
        (4, ["0x1.171a4a0000000p-1", "-0x1.01234c0000000p-2", "-0x1.d515b40000000p-1",
             "-0x1.3dbeae0000000p-2"]),
    ]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("at", [0, 12345, -1])
def test_a_noisy_fill_refuses_a_source_that_is_not_finite(bad, at):
    unit, fill = _fill_of_a_copy()
    source = torch.randn(UNIT) * 0.02
    sigma = ops.sigma(source)
    source.view(-1)[at] = bad
    for target in (torch.empty(UNIT), torch.empty(UNIT, dtype=torch.bfloat16)):
        with pytest.raises(ops.NotFinite) as e:
            ops.fill_shard(target, fill, source, lambda u: sigma, 0.01, ID["seed"])
        assert not e.value.overflow


def test_a_noisy_fill_refuses_noise_that_overflows_the_targets_dtype():
    unit, fill = _fill_of_a_copy()
    source = torch.full(UNIT, 65504.0)  # fp16's largest finite value
    with pytest.raises(ops.NotFinite) as e:
        ops.fill_shard(torch.empty(UNIT, dtype=torch.float16), fill, source, lambda u: 100.0, 0.5, ID["seed"])
    assert e.value.overflow
