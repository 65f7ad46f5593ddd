"""Common start of every test worker: CPU shims, gloo, quiet warnings."""

import os
import warnings

warnings.filterwarnings("ignore")
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

from megatron_recycle.testing import cpu, toy  # noqa: E402

cpu.install()

import torch.distributed as dist  # noqa: E402


def init():
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def finish():
    toy.finish()


def report(path, obj, every_rank=True):
    """Write `obj` as JSON from rank 0: a list with every rank's, or rank 0's alone."""
    import json

    if every_rank:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, obj)
        obj = gathered
    if dist.get_rank() == 0:
        with open(path, "w") as f:
            json.dump(obj, f, indent=1)
