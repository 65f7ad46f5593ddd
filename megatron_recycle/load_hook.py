"""The load hook: a `torch_dist` load strategy that grows the checkpoint while it loads.

`dist_checkpointing.load(model.sharded_state_dict(), src, GrowthLoadStrategy(...))` gives
every rank its shards of the *grown* model. Per rank:
1. map each requested target shard to a source box (`mapping.py`); every rank agrees that
   mapping succeeded before anything is read;
2. read each distinct source box once, in one collective `torch_dist` read, straight into a
   target shard where one takes the box whole (so memory stays near the rank's own shards);
3. fill copies, router rows and noise (`ops.py`).
Steps 1 and 3 are `engine.py`'s, which offline growth runs too, with its own reader.
Works under `FullyParallelLoadStrategyWrapper` (each call is one collective read).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.dict_utils import dict_list_map_outplace, nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.dist_checkpointing.strategies.torch import TorchDistLoadShardedStrategy

from . import merge, policy
from .engine import execute, prepare
from .errors import CheckpointError
from .io.checkpoint import CheckpointInfo
from .io.reader import read_boxes
from .mapping import Box
from .plan import CopyInit, DepthGrowth, GrowthError, GrowthPlan, Upcycling, WidthGrowth


class GrowthLoadStrategy(TorchDistLoadShardedStrategy):
    """Load a source checkpoint into a grown model's sharded state dict."""

    def __init__(
        self,
        plan: Optional[GrowthPlan] = None,
        depth: Optional[DepthGrowth] = None,
        width: Optional[WidthGrowth] = None,
        optimizer_policy: str = "copy",
        source: Optional[str | os.PathLike] = None,
        upcycle: Optional[Upcycling] = None,
        init: Optional[CopyInit] = None,
        second: Optional[str | os.PathLike | merge.Second] = None,
    ):
        """`optimizer_policy` (`--grow-optimizer`): copy / zero grow optimizer state the load
        asks for; reset means none is asked for. `source`: grow only what is loaded from this
        checkpoint directory and load any other plainly (for a training framework that builds
        its load strategy before it knows the directory). `second`: the iteration directory the
        expert copies are read from (`--grow-from-second`; the plan's `init.from_second`),
        pinned when first read; or the `merge.Second` a framework adapter read when it planned
        (its messages name the adapter's setting). Either way its files are checked unchanged
        before and after each load reads it: a second rewritten meanwhile is refused on every
        rank, never grown into a model that mixes two checkpoints."""
        super().__init__()
        # megatron-core 0.19.0 can dequantize FP8 targets tensor by tensor inside its reader;
        # growth writes into the targets itself, so they are dequantized before the load.
        self.stream_ckpt_dequant = False
        if plan is not None and any(o is not None for o in (depth, width, upcycle, init)):
            raise GrowthError("give either a GrowthPlan or depth/width/upcycle/init options, not both")
        policy.check_optimizer_policy(optimizer_policy)
        self.plan = plan
        self.depth = depth or DepthGrowth()
        self.width = width or WidthGrowth()
        self.upcycle = upcycle or Upcycling()
        self.init = init or CopyInit()
        self.optimizer_policy = optimizer_policy
        self.source = None if source is None else os.path.realpath(source)
        self.second = second if second is None or isinstance(second, merge.Second) else Path(second)
        self._second: Optional[merge.Second] = second if isinstance(second, merge.Second) else None
        self._info: dict[Path, CheckpointInfo] = {}

    def source_info(self, checkpoint_dir) -> CheckpointInfo:
        path = Path(checkpoint_dir)
        if path not in self._info:
            self._info[path] = CheckpointInfo.read(path)
        return self._info[path]

    def plan_for(self, checkpoint_dir) -> GrowthPlan:
        if self.plan is None:
            arch = self.source_info(checkpoint_dir).architecture()
            self.plan = GrowthPlan(arch, self.depth, self.width, self.upcycle, self.init)
        if self.plan.init.from_second != (self.second is not None):
            raise GrowthError("--grow-from-second: the plan reads expert copies from a second "
                              "checkpoint exactly when one is given (GrowthLoadStrategy(second=...))")
        return self.plan

    def second_info(self, checkpoint_dir) -> Optional[merge.Second]:
        """The second checkpoint, checked to have the source's architecture, and unchanged since
        it was pinned (read and pinned here on first use, unless given pinned)."""
        if self.second is None:
            return None
        if self._second is None:
            self._second = merge.Second.read(self.source_info(checkpoint_dir), self.second)
        else:
            self._second.check_unchanged()  # still what the plan read and the record names
        return self._second

    @torch.no_grad()
    def load(self, sharded_state_dict, checkpoint_dir, *args, **kwargs):
        """`*args`: what this megatron-core passes on to its own reader (0.17+: the async
        strategy), forwarded unchanged."""
        if self.source is not None and os.path.realpath(checkpoint_dir) != self.source:
            return super().load(sharded_state_dict, checkpoint_dir, *args, **kwargs)
        try:
            info = self.source_info(checkpoint_dir)
            plan, second = self.plan_for(checkpoint_dir), self.second_info(checkpoint_dir)
            work = prepare(plan, info.shapes, nested_values(sharded_state_dict), self.optimizer_policy,
                           set(info.objects), None if second is None else second.info, _box_request)
            error = None
        except GrowthError as e:  # agree on failure before the collective read
            work, error = None, e
        _raise_if_any_rank_failed(error)

        def read(request: dict) -> dict:
            if not request and not _distributed():
                return {}
            return super(GrowthLoadStrategy, self).load(request, checkpoint_dir, *args, **kwargs)

        try:
            # the second checkpoint's boxes are read by this rank alone (io.reader), outside
            # megatron-core's collective read of the source
            read_second = None if second is None else second.info.read_boxes
            results = execute(work, self.plan, read, lambda request: read_boxes(checkpoint_dir, request),
                              read_second)
            loaded = dict_list_map_outplace(lambda v: results.get(id(v), v), sharded_state_dict)
            if second is not None:
                second.check_unchanged()  # after this rank's last read of it
        except CheckpointError as e:  # a non-finite grown shard, a changed second: every rank stops
            loaded, error = None, e
        _raise_if_any_rank_failed(error)
        return loaded


def _box_request(box: Box, dtype, data: Optional[torch.Tensor]) -> ShardedTensor:
    """A read of `box` into `data` (a fresh tensor if None), as megatron-core's reader takes
    it: a regular grid over the unit, so the fragmentation is the unit over the box."""
    prepend = len(box.index)
    if data is None:
        data = torch.empty(box.shape, dtype=dtype)
    fragments = tuple(box.global_shape[:prepend]) + tuple(
        g // s if s else 1 for g, s in zip(box.unit_shape, box.shape))
    return ShardedTensor(
        key=box.key,
        data=data,
        dtype=data.dtype,
        local_shape=tuple(box.shape),
        global_shape=tuple(box.global_shape),
        global_offset=box.global_offset,
        axis_fragmentations=fragments,
        replica_id=0,
        prepend_axis_num=prepend,
    )


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _raise_if_any_rank_failed(error: Optional[Exception]) -> None:
    """Every rank raises if one could not map its shards, instead of hanging in the read."""
    if not _distributed():
        if error is not None:
            raise error
        return
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, None if error is None else str(error))
    if error is not None:
        raise error
    first = next((e for e in errors if e), None)
    if first is not None:
        raise GrowthError(f"growth failed on rank {errors.index(first)}: {first}")
