"""The load hook: a `torch_dist` load strategy that grows the checkpoint while it loads.

`dist_checkpointing.load(model.sharded_state_dict(), src, GrowthLoadStrategy(...))` gives
every rank its shards of the *grown* model: the rank maps each requested target shard to a
source region (`mapping.py`), reads each distinct source region once in one collective
`torch_dist` read, then fills copies, router rows and noise (`ops.py`). Regions are read
straight into a target shard where one is a plain copy, so memory stays near the rank's own
shards. Works under `FullyParallelLoadStrategyWrapper` (each call is one collective read).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.dict_utils import dict_list_map_outplace, nested_values
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
from megatron.core.dist_checkpointing.strategies.torch import TorchDistLoadShardedStrategy

from . import keys, ops
from .checkpoint import DP_RESHARDABLE_KEY, CheckpointInfo
from .mapping import Fill, Region, Unit, map_object, map_shard
from .plan import DepthGrowth, GrowthError, GrowthPlan, WidthGrowth
from .resume import MOMENT_POLICIES, load_moment_policy

logger = logging.getLogger(__name__)


class GrowthLoadStrategy(TorchDistLoadShardedStrategy):
    """Load a source checkpoint into a grown model's sharded state dict."""

    def __init__(
        self,
        plan: Optional[GrowthPlan] = None,
        depth: Optional[DepthGrowth] = None,
        width: Optional[WidthGrowth] = None,
        moment_policy: str = "copy",
    ):
        super().__init__()
        if plan is not None and (depth is not None or width is not None):
            raise GrowthError("give either a GrowthPlan or depth/width options, not both")
        if moment_policy not in MOMENT_POLICIES:
            raise GrowthError(f"moment_policy must be one of {MOMENT_POLICIES} (--grow-optimizer "
                              "reset means: do not load the optimizer)")
        self.plan = plan
        self.depth = depth or DepthGrowth()
        self.width = width or WidthGrowth()
        self.moment_policy = moment_policy
        self._info: dict[Path, CheckpointInfo] = {}

    def source_info(self, checkpoint_dir) -> CheckpointInfo:
        path = Path(checkpoint_dir)
        if path not in self._info:
            self._info[path] = CheckpointInfo.read(path)
        return self._info[path]

    def plan_for(self, checkpoint_dir) -> GrowthPlan:
        if self.plan is None:
            arch = self.source_info(checkpoint_dir).architecture()
            self.plan = GrowthPlan(arch, self.depth, self.width)
        return self.plan

    # --- the hook --------------------------------------------------------------------------
    @torch.no_grad()
    def load(self, sharded_state_dict, checkpoint_dir):
        items = [v for v in nested_values(sharded_state_dict)
                 if isinstance(v, (ShardedTensor, ShardedObject))]
        try:
            work = self._map(items, checkpoint_dir)
            error = None
        except GrowthError as e:  # agree on failure before the collective read
            work, error = None, e
        _raise_if_any_rank_failed(error)
        request, fills, objects = work

        loaded = super().load(request, checkpoint_dir) if request or _distributed() else {}
        buffers = {region: loaded[f"r{i}"] for i, region in enumerate(fills.regions)}
        sigma_units = list(fills.sigma_units())
        sigmas = dict(zip(sigma_units, ops.parallel(
            lambda unit: ops.sigma(ops.region_view(buffers, unit.whole())), sigma_units)))
        width = self.plan.width

        def fill(item: tuple[ShardedTensor, Fill]) -> None:  # targets are disjoint: thread-safe
            sh, how = item
            ops.fill_shard(_local(sh), how, ops.region_view(buffers, how.region), sigmas.__getitem__,
                           width.noise_alpha, width.seed)

        ops.parallel(fill, fills.first())
        ops.parallel(fill, fills.last)
        results = {id(sh): _local(sh) for sh, _ in fills.items}
        results.update({id(sh): loaded[name] for name, sh in fills.passthrough})
        results.update({id(sh): loaded[name] for sh, name in objects})
        return dict_list_map_outplace(lambda v: results.get(id(v), v), sharded_state_dict)

    def _map(self, items, checkpoint_dir):
        plan = self.plan_for(checkpoint_dir)
        shapes = self.source_info(checkpoint_dir).shapes
        fills = _Fills()
        objects, object_requests = [], {}
        for sh in items:
            if DP_RESHARDABLE_KEY.match(sh.key) and not plan.is_identity:
                load_moment_policy(self.moment_policy, "dp_reshardable")  # raises, saying what to do
            if isinstance(sh, ShardedObject):
                key, shape, offset = map_object(plan, sh.key, sh.global_shape, sh.global_offset)
                src = ShardedObject(key, None, shape, offset, replica_id=0)
                name = object_requests.setdefault(src.unique_key, (f"o{len(object_requests)}", src))[0]
                objects.append((sh, name))
                continue
            lay = keys.parse_key(sh.key, sh.prepend_axis_num)
            if not (lay.has_layer or lay.has_expert) or plan.is_identity:
                fills.passthrough.append((f"p{len(fills.passthrough)}", sh))
                continue
            fill = map_shard(plan, shapes, sh.key, sh.global_shape, sh.global_offset,
                             sh.local_shape, sh.prepend_axis_num, self.moment_policy)
            fills.add(sh, fill)
        request = {name: sh for name, sh in fills.passthrough}
        request.update({name: src for name, src in object_requests.values()})
        request.update(fills.requests())
        logger.info("growth: %d target shards from %d source regions (%d passed through)",
                    len(fills.items), len(fills.regions), len(fills.passthrough))
        return request, fills, objects


class _Fills:
    """Target shards with their fills, and the distinct source regions they read."""

    def __init__(self):
        self.items: list[tuple[ShardedTensor, Fill]] = []
        self.passthrough: list[tuple[str, ShardedTensor]] = []
        self.regions: list[Region] = []
        self.last: list[tuple[ShardedTensor, Fill]] = []  # noisy fills that hold their region

    def add(self, sh: ShardedTensor, fill: Fill):
        self.items.append((sh, fill))

    def sigma_units(self) -> set[Unit]:
        return {f.noise.sigma_unit for _, f in self.items if f.noise is not None}

    def requests(self) -> dict[str, ShardedTensor]:
        """One read per distinct region, of whole units where σ is needed. A region is read
        straight into the shard of a target that takes it whole: preferably one that copies it
        unchanged, else one that adds noise to it (its fill then runs in `last`, after
        every fill that reads the region). Other regions get a buffer."""
        sigma_units = self.sigma_units()
        holders: dict[Region, tuple[ShardedTensor, bool]] = {}  # region → (shard, noisy)
        dtypes: dict[Region, torch.dtype] = {}
        for sh, fill in self.items:
            region = fill.region.unit.whole() if fill.region.unit in sigma_units else fill.region
            dtypes.setdefault(region, sh.data.dtype)
            takes_whole = (fill.rows is None and not fill.zero and region == fill.region
                           and sh.data.is_contiguous())
            if not takes_whole:
                continue
            noisy = fill.noise is not None
            if region not in holders or (holders[region][1] and not noisy):
                holders[region] = (sh, noisy)
        for unit in sigma_units:
            dtypes.setdefault(unit.whole(), torch.float32)
        self.regions = list(dtypes)
        self.last = [(sh, fill) for sh, fill in self.items
                     if holders.get(fill.region, (None,))[0] is sh and fill.noise is not None]
        return {f"r{i}": _region_tensor(r, _local(holders[r][0]) if r in holders else None, dtypes[r])
                for i, r in enumerate(self.regions)}

    def first(self) -> list[tuple[ShardedTensor, Fill]]:
        last = {id(sh) for sh, _ in self.last}
        return [(sh, fill) for sh, fill in self.items if id(sh) not in last]


def _local(sh: ShardedTensor) -> torch.Tensor:
    """The shard's data in its local shape (a previous torch_dist load leaves it viewed with
    the prepended axes as leading 1s)."""
    return sh.data.view(sh.local_shape)


def _region_tensor(region: Region, data: Optional[torch.Tensor], dtype) -> ShardedTensor:
    unit = region.unit
    p = len(unit.index)
    if data is None:
        data = torch.empty(region.shape, dtype=dtype)
    frags = tuple(unit.global_shape[:p]) + tuple(
        g // s if s else 1 for g, s in zip(unit.shape, region.shape))
    return ShardedTensor(
        key=unit.key,
        data=data,
        dtype=data.dtype,
        local_shape=tuple(region.shape),
        global_shape=tuple(unit.global_shape),
        global_offset=tuple(unit.index) + tuple(region.offset),
        axis_fragmentations=frags,
        replica_id=0,
        prepend_axis_num=p,
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
