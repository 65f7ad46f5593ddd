"""The ranks of an offline job (`torchrun … -m megatron_recycle.cli grow …`), or one process.

A `Job` runs a step on rank 0 and shares its result, or on every rank and gathers the results;
when a rank fails, every rank raises (naming the rank), so none is left waiting in a
collective. Without torch.distributed the same calls run in this one process.
"""

from __future__ import annotations

import datetime
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

from .errors import CheckpointError, GrowthError

T = TypeVar("T")


def init_from_environment(timeout_minutes: float = 30) -> bool:
    """Join the torch.distributed job the launcher describes (torchrun sets RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT), over gloo: the ranks exchange only small objects. False when
    there is no such job (one process)."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=timeout_minutes))
    return True


@contextmanager
def joined_from_environment(timeout_minutes: float = 30) -> Iterator[None]:
    """`init_from_environment` for the length of a command; the ranks leave together and
    destroy the process group (rank 0 hosts the store the others' gloo threads still use: a
    rank that exits without it can abort another at exit)."""
    import torch.distributed as dist

    joined = init_from_environment(timeout_minutes)
    try:
        yield
        if joined:
            dist.barrier()
    except (GrowthError, CheckpointError):
        # A `Job` raises these on every rank at once; leave together then too: the launcher
        # stops the other ranks when the first one exits, which would cut rank 0 short while
        # it removes its staging directory.
        if joined:
            _leave_together()
        raise
    finally:
        if joined:
            dist.destroy_process_group()


def _leave_together(timeout: datetime.timedelta = datetime.timedelta(minutes=2)) -> None:
    """A barrier that gives up (gloo names the ranks it missed) rather than hang."""
    import torch.distributed as dist

    try:
        dist.monitored_barrier(timeout=timeout)
    except RuntimeError:
        pass  # a rank that did not come: the error being raised already says what failed


@dataclass(frozen=True)
class Job:
    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> "Job":
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    def on_rank0(self, step: Callable[[], T]) -> T:
        """`step()` on rank 0, its result on every rank."""
        if self.world == 1:
            return step()
        outcome = _attempt(step) if self.rank == 0 else None
        box = [outcome]
        _dist().broadcast_object_list(box, src=0)
        return _unwrap(box[0], 0)

    def on_every_rank(self, step: Callable[[], T]) -> list[T]:
        """`step()` on every rank; the list of results, by rank, on every rank."""
        if self.world == 1:
            return [step()]
        outcomes = [None] * self.world
        _dist().all_gather_object(outcomes, _attempt(step))
        return [_unwrap(outcome, rank) for rank, outcome in enumerate(outcomes)]


def _dist():
    import torch.distributed as dist

    return dist


def _attempt(step: Callable[[], Any]) -> tuple:
    try:
        return ("ok", step())
    except GrowthError as e:
        return ("error", type(e).__name__, str(e))
    except Exception as e:
        return ("error", "CheckpointError", f"{type(e).__name__}: {e}")


def _unwrap(outcome: tuple, rank: int):
    if outcome[0] == "ok":
        return outcome[1]
    kind, message = outcome[1], outcome[2]
    error = CheckpointError if kind == "CheckpointError" else GrowthError
    raise error(message if rank == 0 else f"rank {rank}: {message}")
