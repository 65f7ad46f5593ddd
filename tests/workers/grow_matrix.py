"""Save a tiny MoE at two layouts, grow each at load into several layouts, dump the shards.

Usage: torchrun --nproc-per-node 4 grow_matrix.py OUT
"""

import sys

import _boot

import torch

import ckpt_tools
from megatron_recycle.testing import toy
from scenarios import PLAN, SOURCES, SPEC, TARGETS


def main(out):
    rank, _ = _boot.init()
    ckpt_tools.save_source(SPEC, SOURCES["s1"], f"{out}/s1", iteration=5)
    if rank == 0:
        with open(f"{out}/s1.sha256", "w") as f:
            f.write(ckpt_tools.tree_digest(f"{out}/s1"))
    ckpt_tools.save_source(SPEC, SOURCES["s2"], f"{out}/s2", iteration=5, like=f"{out}/s1/iter_0000005")
    for src in SOURCES:
        for name, (layout, fully_parallel) in TARGETS.items():
            chunks = ckpt_tools.grow_into(SPEC, PLAN, layout, f"{out}/{src}/iter_0000005",
                                          fully_parallel=fully_parallel)
            shards = ckpt_tools.local_shards(toy.sharded_state_dict(chunks))
            torch.save(shards, f"{out}/{src}-{name}-rank{rank}.pt")
    _boot.finish()


if __name__ == "__main__":
    main(sys.argv[1])
