"""Train the reference loop (examples/pretrain_moe.py) for a few steps from the same init and
data at TP1 and at TP2 (sequence parallel, as megatron-core requires for MoE), in one 4-rank
group.

Usage: torchrun --nproc-per-node 4 tp_training.py OUT   → OUT/<layout>.jsonl (metrics)
"""

import sys
from pathlib import Path

import _boot

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import pretrain_moe  # noqa: E402

from tp_training_scenario import LAYOUTS, MODEL  # noqa: E402


def main(out):
    _boot.init()
    for name, flags in LAYOUTS.items():
        pretrain_moe.main([*MODEL, *flags, "--metrics", f"{out}/{name}.jsonl"])
    _boot.finish()


if __name__ == "__main__":
    main(sys.argv[1])
