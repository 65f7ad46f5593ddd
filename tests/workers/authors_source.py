"""A tiny synthetic MoE source as benchmarks/synthetic_moe.py writes it (2 layers x 4 experts,
hidden 32; experts over 2 ranks): OUT/src, iteration 1.

Usage: torchrun --nproc-per-node 2 authors_source.py OUT
"""

import sys
from pathlib import Path

import _boot

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import synthetic_moe  # noqa: E402

from megatron_recycle.testing import toy  # noqa: E402

SHAPE = synthetic_moe.MoEShape(layers=2, experts=4, hidden=32, moe_ffn=16)


def main(out):
    rank, world = _boot.init()
    toy.save_checkpoint(Path(out) / "src", 1, synthetic_moe.state_dict(SHAPE, rank, world, random=True))
    _boot.finish()


if __name__ == "__main__":
    main(*sys.argv[1:])
