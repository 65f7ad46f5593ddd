"""The second checkpoint of `--grow-from-second`: expert copies read from another checkpoint.

The paper authors' checkpoint merging (their `--use-ckpt-merge --second-ckpt-step`): the new
experts of width growth, their router rows and expert_bias come from a second checkpoint of the
same architecture (another iteration, another branch) instead of copies of the source's. The
mapping marks those boxes `Box.second`; this module reads the second checkpoint's metadata and
refuses one that does not have the source's architecture (or precision), before anything is
read or written.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable, Optional

from .errors import GrowthError
from .io.checkpoint import CheckpointInfo
from .mapping import Box
from .provenance import SourceRef

FLAG = "--grow-from-second"


def read_second(source: CheckpointInfo, second: str | os.PathLike) -> CheckpointInfo:
    """The second checkpoint (a root or an iteration directory), checked to have `source`'s
    architecture: the same model tensors with the same global shapes, and the same args
    (the consistency check every reader runs is run on it too)."""
    info = CheckpointInfo.read(second, None, FLAG)
    if info.format == "torch":  # the growth record pins a second by its .metadata digest
        raise GrowthError(f"{FLAG} {second}: a legacy torch checkpoint, which a growth record cannot "
                          "pin; give a torch_dist or fsdp_dtensor one (Megatron-LM's --ckpt-convert-format "
                          "torch_dist re-saves it)")
    if Path(os.path.realpath(info.path)) == Path(os.path.realpath(source.path)):
        raise GrowthError(f"{FLAG} {second}: is the source checkpoint itself; give another "
                          "iteration or run (without it the copies are the source's experts)")
    mine, theirs = source.model_shapes(), info.model_shapes()
    for key in sorted(mine.keys() | theirs.keys()):
        if mine.get(key) != theirs.get(key):
            raise GrowthError(f"{FLAG} {info.path}: not the source's architecture: tensor {key!r} has "
                              f"global shape {_shape(theirs.get(key))} there, {_shape(mine.get(key))} in "
                              f"the source {source.path}; give a checkpoint of the same model")
        if source.dtypes[key] != info.dtypes[key]:  # copies take the source's dtype: none is cast
            raise GrowthError(f"{FLAG} {info.path}: tensor {key!r} is {info.dtypes[key]} there, "
                              f"{source.dtypes[key]} in the source; give a checkpoint saved in the "
                              "source's precision")
    if info.architecture() != source.architecture():
        raise GrowthError(f"{FLAG} {info.path}: not the source's architecture: {info.architecture()} "
                          f"there, {source.architecture()} in the source {source.path}")
    return info


def reference(second: CheckpointInfo) -> SourceRef:
    """What the growth record says of the second checkpoint: where, which iteration, and the
    digest of its `.metadata` (which lists every tensor, chunk and file of it)."""
    digest = hashlib.sha256((second.path / ".metadata").read_bytes()).hexdigest()
    return SourceRef(os.path.realpath(second.path), second.iteration, metadata_sha256=digest)


def check_reads(boxes: Iterable[Box], second: Optional[CheckpointInfo]) -> None:
    """Every box the growth reads from the second checkpoint is there."""
    for box in boxes:
        if not box.second:
            continue
        if second is None:
            raise GrowthError(f"the plan reads expert copies from a second checkpoint ({FLAG}) but "
                              "none is given")
        _require(second, box.key, box.global_shape)


def check_optimizer(source: CheckpointInfo, second: CheckpointInfo) -> None:
    """Where the source's optimizer state is grown, the copies' state comes from the second's:
    checked before anything is written (the second may have been saved without it)."""
    for key, shape in sorted(source.shapes.items()):
        if key.startswith("optimizer."):
            _require(second, key, shape)


def _require(second: CheckpointInfo, key: str, shape) -> None:
    if second.shapes.get(key) == tuple(shape):
        return
    if key.startswith("optimizer."):
        raise GrowthError(f"{FLAG} {second.path}: optimizer state {key!r} is not there with global shape "
                          f"{tuple(shape)}, and the copies' state is read from it; give --grow-optimizer "
                          "reset, or a second checkpoint saved with its optimizer state")
    raise GrowthError(f"{FLAG} {second.path}: tensor {key!r} is not there with global shape {tuple(shape)}; "
                      "give a checkpoint of the source's architecture")


def _shape(shape) -> str:
    return "(absent)" if shape is None else str(tuple(shape))
