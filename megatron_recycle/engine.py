"""The growth of a set of target shards, from metadata to filled tensors: what the load hook
(`load_hook.py`, inside megatron-core's load) and offline growth (`offline.py`) both run.

1. `prepare`: map each requested target shard to a source box (`mapping.py`) and plan one
   read per distinct box, straight into a target shard where one takes the box whole;
2. `execute`: read, then fill copies, router rows and noise (`ops.py`).
Requests are ours (`io.reader`) or megatron-core's ShardedTensor / ShardedObject, which
carry the same fields; megatron-core is not imported here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch

from . import indexing, merge, ops, policy
from .errors import CheckpointError
from .io.checkpoint import CheckpointInfo
from .io.reader import ObjectRequest, TensorRequest, box_request, is_object_request, is_tensor_request
from .mapping import Box, Fill, map_object, map_shard
from .plan import GrowthError, GrowthPlan

logger = logging.getLogger(__name__)

_OPTIMIZER_KEYS = ("optimizer.", "chained_")
# Reads a request (name → tensor / object request) from a checkpoint and returns name →
# tensor / object, as `TorchDistLoadShardedStrategy.load` does.
Reader = Callable[[dict], dict]
# The request reading a source box, of a dtype, into a tensor (None: a fresh one).
BoxRequest = Callable[[Box, torch.dtype, Optional[torch.Tensor]], object]


def grow_state_dict(plan: GrowthPlan, source: CheckpointInfo, requests: dict, read: Reader,
                    optimizer_policy: str = "copy", second: Optional[CheckpointInfo] = None) -> dict:
    """`requests` (name → target shard) filled from the source that `read` reads (and the
    `second` checkpoint, `--grow-from-second`): the hook's work without its collective
    agreement, for one process. Returns name → tensor or object."""
    work = prepare(plan, source.shapes, requests.values(), optimizer_policy, set(source.objects), second)
    results = execute(work, plan, read, read, None if second is None else second.read_boxes)
    return {name: results.get(id(sh), sh) for name, sh in requests.items()}


@dataclass
class Work:
    """A rank's growth, decided from metadata alone: what to read and how to fill."""

    request: dict = field(default_factory=dict)  # name → tensor to read from the source
    second_request: dict = field(default_factory=dict)  # name → tensor of the second checkpoint
    object_request: dict = field(default_factory=dict)  # name → object to read from the source
    fills: list[tuple[TensorRequest, Fill]] = field(default_factory=list)
    boxes: list[Box] = field(default_factory=list)  # the box read under request name r{i}
    late: set[int] = field(default_factory=set)  # ids of noisy shards that hold their box
    passthrough: list[tuple[str, TensorRequest]] = field(default_factory=list)
    objects: list[tuple[ObjectRequest, str]] = field(default_factory=list)


def prepare(plan: GrowthPlan, source_shapes: dict, requests: Iterable, optimizer_policy: str,
            source_objects: set, second: Optional[CheckpointInfo] = None,
            box_request: BoxRequest = box_request) -> Work:
    """Map every requested shard and object (other values are left alone); raises GrowthError
    before anything is read. `box_request(box, dtype, into)`: the request that reads a source
    box, as `read` takes it (default: `io.reader`'s)."""
    work = Work()
    object_requests: dict[str, tuple[str, ObjectRequest]] = {}
    for sh in requests:
        if not (is_tensor_request(sh) or is_object_request(sh)):
            continue
        if sh.key.startswith(_OPTIMIZER_KEYS) and not plan.is_identity:
            if not policy.grows_optimizer(optimizer_policy):
                raise GrowthError(f"key {sh.key!r}: optimizer state is asked for, but "
                                  "--grow-optimizer reset loads none; do not request it "
                                  "(--no-load-optim)")
            if policy.DP_RESHARDABLE_KEY.match(sh.key):
                policy.load_moment_policy(optimizer_policy, "dp_reshardable")  # raises, saying what to do
        if is_object_request(sh):
            key, shape, offset = map_object(plan, source_objects, sh.key, sh.global_shape, sh.global_offset)
            source = ObjectRequest(key, shape, offset)
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
    _plan_reads(work, box_request)
    merge.check_reads(work.boxes, second)
    logger.info("growth: %d target shards from %d source regions (%d passed through)",
                len(work.fills), len(work.boxes), len(work.passthrough))
    return work


def _plan_reads(work: Work, box_request: BoxRequest) -> None:
    """One read per distinct source box, of whole units where σ is needed. A box is read
    straight into the shard of a target that takes it whole: preferably one that copies it
    unchanged, else one that adds noise to it (that fill then runs late, after every fill
    that reads the box). Other boxes get a buffer."""
    sigma_units = _sigma_units(work.fills)
    holders: dict[Box, tuple[TensorRequest, bool]] = {}  # box → (shard, noisy)
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
        requests[f"r{i}"] = box_request(box, dtypes[box], into)


def execute(work: Work, plan: GrowthPlan, read: Reader, read_objects: Reader,
            read_second: Optional[Reader] = None):
    """Read what `work` asks for and fill every target shard; returns id(request) → its value.
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

    def fill(item: tuple[TensorRequest, Fill]) -> None:  # targets are disjoint: thread-safe
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
    return results


def _not_finite(sh: TensorRequest, how: Fill, overflow: bool, alpha: float) -> CheckpointError:
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


def _local(sh: TensorRequest) -> torch.Tensor:
    """The shard's data in its local shape (a previous torch_dist load leaves it viewed with
    the prepended axes as leading 1s)."""
    return sh.data.view(sh.local_shape)
