"""The load hook: a `torch_dist` load strategy that grows the checkpoint while it loads.

`dist_checkpointing.load(model.sharded_state_dict(), src, GrowthLoadStrategy(...))` gives
every rank its shards of the *grown* model. Per rank:
1. map each requested target shard to a source box (`mapping.py`); every rank agrees that
   mapping succeeded before anything is read;
2. read each distinct source box once, in one collective `torch_dist` read, straight into a
   target shard where one takes the box whole (so memory stays near the rank's own shards);
3. fill copies, router rows and noise (`ops.py`).
Steps 1 and 3 (`grow_state_dict`) are also what offline growth runs, with its own reader.
Works under `FullyParallelLoadStrategyWrapper` (each call is one collective read).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.dict_utils import dict_list_map_outplace, nested_values
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
from megatron.core.dist_checkpointing.strategies.torch import TorchDistLoadShardedStrategy

from . import indexing, merge, ops, policy
from .errors import CheckpointError
from .io.checkpoint import CheckpointInfo
from .io.reader import read_boxes
from .mapping import Box, Fill, map_object, map_shard
from .plan import CopyInit, DepthGrowth, GrowthError, GrowthPlan, Upcycling, WidthGrowth

logger = logging.getLogger(__name__)

_OPTIMIZER_KEYS = ("optimizer.", "chained_")
# Reads a request (name → ShardedTensor / ShardedObject) from the source checkpoint and
# returns name → tensor / object, as `TorchDistLoadShardedStrategy.load` does.
Reader = Callable[[dict], dict]


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
            work = prepare(plan, info.shapes, sharded_state_dict, self.optimizer_policy, set(info.objects),
                           None if second is None else second.info)
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
            loaded = execute(work, self.plan, read, lambda request: read_boxes(checkpoint_dir, request),
                             read_second)
            if second is not None:
                second.check_unchanged()  # after this rank's last read of it
        except CheckpointError as e:  # a non-finite grown shard, a changed second: every rank stops
            loaded, error = None, e
        _raise_if_any_rank_failed(error)
        return loaded


def grow_state_dict(plan: GrowthPlan, source: CheckpointInfo, sharded_state_dict, read: Reader,
                    optimizer_policy: str = "copy", second: Optional[CheckpointInfo] = None):
    """`sharded_state_dict` (target shards) filled from the source that `read` reads (and the
    `second` checkpoint, `--grow-from-second`): the hook's work without its collective
    agreement, for one process."""
    work = prepare(plan, source.shapes, sharded_state_dict, optimizer_policy, set(source.objects), second)
    return execute(work, plan, read, read, None if second is None else second.read_boxes)


@dataclass
class Work:
    """A rank's growth, decided from metadata alone: what to read and how to fill."""

    sharded_state_dict: object
    request: dict = field(default_factory=dict)  # name → tensor to read from the source
    second_request: dict = field(default_factory=dict)  # name → tensor of the second checkpoint
    object_request: dict = field(default_factory=dict)  # name → object to read from the source
    fills: list[tuple[ShardedTensor, Fill]] = field(default_factory=list)
    boxes: list[Box] = field(default_factory=list)  # the box read under request name r{i}
    late: set[int] = field(default_factory=set)  # ids of noisy shards that hold their box
    passthrough: list[tuple[str, ShardedTensor]] = field(default_factory=list)
    objects: list[tuple[ShardedObject, str]] = field(default_factory=list)


def prepare(plan: GrowthPlan, source_shapes: dict, sharded_state_dict, optimizer_policy: str,
            source_objects: set, second: Optional[CheckpointInfo] = None) -> Work:
    """Map every requested shard and object; raises GrowthError before anything is read."""
    work = Work(sharded_state_dict)
    object_requests: dict[str, tuple[str, ShardedObject]] = {}
    for sh in nested_values(sharded_state_dict):
        if not isinstance(sh, (ShardedTensor, ShardedObject)):
            continue
        if sh.key.startswith(_OPTIMIZER_KEYS) and not plan.is_identity:
            if not policy.grows_optimizer(optimizer_policy):
                raise GrowthError(f"key {sh.key!r}: optimizer state is asked for, but "
                                  "--grow-optimizer reset loads none; do not request it "
                                  "(--no-load-optim)")
            if policy.DP_RESHARDABLE_KEY.match(sh.key):
                policy.load_moment_policy(optimizer_policy, "dp_reshardable")  # raises, saying what to do
        if isinstance(sh, ShardedObject):
            key, shape, offset = map_object(plan, source_objects, sh.key, sh.global_shape, sh.global_offset)
            source = ShardedObject(key, None, shape, offset, replica_id=0)
            name = object_requests.setdefault(source.unique_key, (f"o{len(object_requests)}", source))[0]
            work.objects.append((sh, name))
            continue
        layout = indexing.parse_key(sh.key, sh.prepend_axis_num)
        if not (layout.has_layer or layout.has_expert) or plan.is_identity:
            work.passthrough.append((f"p{len(work.passthrough)}", sh))
            continue
        work.fills.append((sh, map_shard(plan, source_shapes, sh.key, sh.global_shape,
                                         sh.global_offset, sh.local_shape, sh.prepend_axis_num,
                                         optimizer_policy)))
    work.request.update({name: sh for name, sh in work.passthrough})
    work.object_request.update(object_requests.values())
    _plan_reads(work)
    merge.check_reads(work.boxes, second)
    logger.info("growth: %d target shards from %d source regions (%d passed through)",
                len(work.fills), len(work.boxes), len(work.passthrough))
    return work


def _plan_reads(work: Work) -> None:
    """One read per distinct source box, of whole units where σ is needed. A box is read
    straight into the shard of a target that takes it whole: preferably one that copies it
    unchanged, else one that adds noise to it (that fill then runs late, after every fill
    that reads the box). Other boxes get a buffer."""
    sigma_units = _sigma_units(work.fills)
    holders: dict[Box, tuple[ShardedTensor, bool]] = {}  # box → (shard, noisy)
    dtypes: dict[Box, torch.dtype] = {}
    for sh, fill in work.fills:
        if fill.second is not None:  # router rows of the second: a buffer, like any rows
            dtypes.setdefault(fill.second, sh.data.dtype)
        if fill.source is None or fill.zero:  # nothing to read: zeroed, whatever its source holds
            continue
        read = fill.source.unit() if fill.source.unit() in sigma_units else fill.source
        dtypes.setdefault(read, sh.data.dtype)
        takes_whole = (fill.rows is None and not fill.zero and read == fill.source
                       and sh.data.is_contiguous())
        if not takes_whole:
            continue
        if read not in holders or (holders[read][1] and not fill.modifies):
            holders[read] = (sh, fill.modifies)
    for unit in sigma_units:
        dtypes.setdefault(unit, torch.float32)
    work.boxes = list(dtypes)
    work.late = {id(sh) for sh, fill in work.fills
                 if fill.modifies and holders.get(fill.source, (None,))[0] is sh}
    for i, box in enumerate(work.boxes):
        into = _local(holders[box][0]) if box in holders else None
        requests = work.second_request if box.second else work.request
        requests[f"r{i}"] = _box_request(box, into, dtypes[box])


def execute(work: Work, plan: GrowthPlan, read: Reader, read_objects: Reader,
            read_second: Optional[Reader] = None):
    """Read what `work` asks for and fill every target shard; returns the loaded state dict.
    Objects are read apart, by `read_objects`: megatron-core's reader unpickles them with
    `weights_only=False`, the hook reads them with `io.reader` (this rank alone: they are small).
    `read_second` reads the second checkpoint's boxes (`--grow-from-second`)."""
    loaded = read(work.request)
    loaded.update(read_objects(work.object_request) if work.object_request else {})
    loaded.update(read_second(work.second_request) if work.second_request else {})
    buffers = {box: loaded[f"r{i}"] for i, box in enumerate(work.boxes)}
    units = list(_sigma_units(work.fills))
    sigmas = dict(zip(units, ops.parallel(lambda unit: ops.sigma(buffers[unit]), units)))
    width = plan.width

    def fill(item: tuple[ShardedTensor, Fill]) -> None:  # targets are disjoint: thread-safe
        sh, how = item
        source = None if how.source is None or how.zero else ops.box_view(buffers, how.source)
        second = None if how.second is None else ops.box_view(buffers, how.second)
        try:
            ops.fill_shard(_local(sh), how, source, sigmas.__getitem__, width.noise_alpha, width.seed,
                           second)
        except ops.NotFinite as e:
            raise _not_finite(sh, how, e.overflow, width.noise_alpha) from None

    ops.parallel(fill, [item for item in work.fills if id(item[0]) not in work.late])
    ops.parallel(fill, [item for item in work.fills if id(item[0]) in work.late])
    results = {id(sh): _local(sh) for sh, _ in work.fills}
    results.update({id(sh): loaded[name] for name, sh in work.passthrough})
    results.update({id(sh): loaded[name] for sh, name in work.objects})
    return dict_list_map_outplace(lambda v: results.get(id(v), v), work.sharded_state_dict)


def _not_finite(sh: ShardedTensor, how: Fill, overflow: bool, alpha: float) -> CheckpointError:
    """Which tensor, layer and experts of a grown shard are not finite, and what to do."""
    target, where = _local(sh), f"tensor {sh.key!r} at {tuple(sh.global_offset)}"
    if how.noise is not None:
        bad = [expert for expert, row in how.noise.experts
               if not torch.isfinite(target if row < 0 else target[row]).all()]
        where += f" (layer {how.noise.layer}, expert {', '.join(map(str, bad))})"
    if overflow:
        return CheckpointError(
            f"{where}: growth would write Inf/NaN: the noise pushed values near the edge of "
            f"{target.dtype}'s range out of it; grow with a lower --grow-noise-alpha (now {alpha:g}) "
            "or from an fp32/bf16 copy of the source")
    return CheckpointError(f"{where}: the source values it grows from are not finite (Inf/NaN); "
                           "growth refuses to spread them: fix the source checkpoint")


def _sigma_units(fills) -> set[Box]:
    return {f.noise.sigma_unit for _, f in fills if f.noise is not None and f.noise.sigma_unit is not None}


def _local(sh: ShardedTensor) -> torch.Tensor:
    """The shard's data in its local shape (a previous torch_dist load leaves it viewed with
    the prepended axes as leading 1s)."""
    return sh.data.view(sh.local_shape)


def _box_request(box: Box, data: Optional[torch.Tensor], dtype) -> ShardedTensor:
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
