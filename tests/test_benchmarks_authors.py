"""benchmarks/authors_method.py, the stand-in for the paper authors' offline growth that
benchmarks/offline_grow.py races: at alpha 0 it writes what `megatron-recycle grow` writes, bit
for bit (the growth record aside); at alpha 0.01 its copies carry the paper's noise."""

import os
import subprocess
import sys

import pytest
import torch

import ckpt_tools
from conftest import REPO

EXPERTS = "decoder.layers.mlp.experts.experts.linear_fc1.weight"
ROUTER = "decoder.layers.mlp.router.weight"


def run(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=600)
    if proc.returncode:
        pytest.fail(f"{args[:2]} failed (rc {proc.returncode}):\n{proc.stderr[-6000:]}")


def authors(src, dst, alpha):
    run(REPO / "benchmarks" / "authors_method.py", "--load", src, "--save", dst,
        "--grow-depth", 2, "--grow-experts", 2, "--grow-noise-alpha", alpha)
    return ckpt_tools.read_checkpoint(dst / "iter_0000001")


@pytest.fixture(scope="module")
def out(ranks, tmp_path_factory):
    out = tmp_path_factory.mktemp("authors")
    ranks("authors_source.py", 2, out)
    return out


def test_at_alpha_0_it_writes_what_grow_writes(out):
    run("-m", "megatron_recycle.cli", "grow", "--load", out / "src", "--save", out / "grow",
        "--grow-depth", 2, "--grow-experts", 2, "--grow-noise-alpha", 0)
    ours = ckpt_tools.read_checkpoint(out / "grow" / "iter_0000001")
    theirs = authors(out / "src", out / "authors0", 0)
    assert ours.keys() == theirs.keys() and ours[EXPERTS].shape == (4, 8, 32, 32)
    assert all(ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]) for k in ours)
    common = ckpt_tools.common_state(out / "grow")
    assert common.pop("megatron_recycle")  # the growth record, ours alone
    assert common == ckpt_tools.common_state(out / "authors0")


def test_at_alpha_001_its_copies_carry_the_papers_noise(out):
    src = ckpt_tools.read_checkpoint(out / "src" / "iter_0000001")
    grown = authors(out / "src", out / "authors1", 0.01)
    for layer in range(4):  # interposition: l1 l1 l2 l2
        source = src[EXPERTS][layer // 2]
        assert torch.equal(grown[EXPERTS][layer, :4], source)
        noise = grown[EXPERTS][layer, 4:] - source
        ratios = [float(noise[e].std() / source[e].std()) for e in range(4)]  # per expert tensor
        assert all(0.009 < r < 0.011 for r in ratios), ratios
        router = grown[ROUTER][layer]
        assert torch.equal(router[:4], src[ROUTER][layer // 2]) and not torch.equal(router[4:], router[:4])
