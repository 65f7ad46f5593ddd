"""Common start of every test worker: CPU shims, gloo, quiet warnings."""

import os
import warnings

warnings.filterwarnings("ignore")
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

from megatron_recycle import cpu  # noqa: E402

cpu.install()

import torch.distributed as dist  # noqa: E402


def init():
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def finish():
    """Leave cleanly: barrier, then reap dist_checkpointing's writer helpers."""
    import multiprocessing.util

    dist.barrier()
    dist.destroy_process_group()
    multiprocessing.util._exit_function()
