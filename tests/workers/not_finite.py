"""The load hook refuses to load a grown shard that is not finite, on every rank.

Usage: torchrun --nproc-per-node 2 not_finite.py SRC_ITERATION OUT
Rank 0 asks for a noisy copy of an fp16 expert whose noise overflows fp16 (layer 1, expert 6:
a copy of expert 2), rank 1 for an original (layer 0, expert 0). OUT/errors.json: each
rank's error, or None.
"""

import sys

import _boot

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor

from megatron_recycle.errors import GrowthError
from megatron_recycle.io.checkpoint import CheckpointInfo
from megatron_recycle.load_hook import GrowthLoadStrategy
from megatron_recycle.plan import DepthGrowth, WidthGrowth

EXPERTS = "decoder.layers.mlp.experts.experts.linear_fc1.weight"


def main(src, out):
    rank, _ = _boot.init()
    layers, experts, *matrix = CheckpointInfo.read(src).shapes[EXPERTS]
    offset = (1, 6, 0, 0) if rank == 0 else (0, 0, 0, 0)
    target = ShardedTensor(key=EXPERTS, data=torch.empty(matrix, dtype=torch.float16),
                           dtype=torch.float16, local_shape=tuple(matrix),
                           global_shape=(2 * layers, 2 * experts, *matrix), global_offset=offset,
                           axis_fragmentations=None, replica_id=0, prepend_axis_num=2)
    strategy = GrowthLoadStrategy(depth=DepthGrowth(2), width=WidthGrowth(2, noise_alpha=0.01, seed=7))
    try:
        strategy.load({"w": target}, src)
        error = None
    except GrowthError as e:
        error = f"{type(e).__name__}: {e}"
    _boot.report(f"{out}/errors.json", error)
    _boot.finish()


if __name__ == "__main__":
    main(*sys.argv[1:])
