"""The second checkpoint of `--grow-from-second`: expert copies read from another checkpoint.

The paper authors' checkpoint merging (their `--use-ckpt-merge --second-ckpt-step`): the new
experts of width growth, their router rows and expert_bias come from a second checkpoint of the
same architecture (another iteration, another branch) instead of copies of the source's. The
mapping marks those boxes `Box.second`; this module reads the second checkpoint's metadata and
refuses one that does not have the source's architecture, before anything is read or written.
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


def read_second(source: CheckpointInfo, second: str | os.PathLike, step: Optional[int] = None) -> CheckpointInfo:
    """The second checkpoint (a root or an iteration directory), checked to have `source`'s
    architecture: the same model tensors with the same global shapes, and the same args
    (the consistency check every reader runs is run on it too)."""
    info = CheckpointInfo.read(second, step, FLAG)
    if Path(os.path.realpath(info.path)) == Path(os.path.realpath(source.path)):
        raise GrowthError(f"{FLAG} {second}: is the source checkpoint itself; give another "
                          "iteration or run (without it the copies are the source's experts)")
    mine, theirs = source.model_shapes(), info.model_shapes()
    for key in sorted(mine.keys() | theirs.keys()):
        if mine.get(key) != theirs.get(key):
            raise GrowthError(f"{FLAG} {info.path}: not the source's architecture: tensor {key!r} has "
                              f"global shape {_shape(theirs.get(key))} there, {_shape(mine.get(key))} in "
                              f"the source {source.path}; give a checkpoint of the same model")
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
    """Every box the growth reads from the second checkpoint is there (optimizer state: the
    second may have none, while the source's is grown)."""
    for box in boxes:
        if not box.second:
            continue
        if second is None:
            raise GrowthError(f"the plan reads expert copies from a second checkpoint ({FLAG}) but "
                              "none is given")
        if second.shapes.get(box.key) != box.global_shape:
            what = "optimizer state" if box.key.startswith("optimizer.") else "tensor"
            raise GrowthError(f"{FLAG} {second.path}: {what} {box.key!r} is not there with global shape "
                              f"{box.global_shape}, and the copies read it; "
                              + ("give --grow-optimizer zero or reset, or a second checkpoint saved "
                                 "with its optimizer state" if what != "tensor" else
                                 "give a checkpoint of the source's architecture"))


def _shape(shape) -> str:
    return "(absent)" if shape is None else str(tuple(shape))
