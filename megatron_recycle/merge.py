"""The second checkpoint of `--grow-from-second`: expert copies read from another checkpoint.

The paper authors' checkpoint merging (their `--use-ckpt-merge --second-ckpt-step`): the new
experts of width growth, their router rows and expert_bias come from a second checkpoint of the
same architecture (another iteration, another branch) instead of copies of the source's. The
mapping marks those boxes `Box.second`; this module reads the second checkpoint's metadata and
refuses one that does not have the source's architecture (or precision), before anything is
read or written (`check_same_tensors`: the tensor check, for Hugging Face seconds too). The
flag or key named in its messages is the caller's: `--grow-from-second` by default, a
framework adapter's own config key (Megatron-Bridge's `growth.from_second`).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from .errors import GrowthError
from .io.checkpoint import CheckpointInfo, resolve
from .io.snapshot import SourceSnapshot
from .mapping import Box
from .provenance import SourceRef

FLAG = "--grow-from-second"


@dataclass(frozen=True)
class Second:
    """The second checkpoint as a growth plan read it: its metadata, checked against the
    source; its files, pinned before that read (`io/snapshot.py`), so a training job's load can
    refuse a second rewritten since the plan (whose record names the planned one); and the flag
    or config key it was given with, which every message names."""

    info: CheckpointInfo
    pinned: SourceSnapshot
    flag: str = FLAG

    @classmethod
    def read(cls, source: CheckpointInfo, second: str | os.PathLike, flag: str = FLAG) -> "Second":
        pinned = SourceSnapshot.take(resolve(second, None, flag))  # before anything is read from it
        return cls(read_second(source, second, flag), pinned, flag)

    @property
    def path(self) -> Path:
        return self.info.path

    def check_unchanged(self) -> None:
        """Raise CheckpointError naming the first of its files that changed since `read`."""
        self.pinned.check(self.flag)


def read_second(source: CheckpointInfo, second: str | os.PathLike, flag: str = FLAG) -> CheckpointInfo:
    """The second checkpoint (a root or an iteration directory), checked to have `source`'s
    architecture: the same model tensors with the same global shapes and dtypes, and the same
    args (the consistency check every reader runs is run on it too). `flag`: what the user set
    it with (`--grow-from-second`, a framework's config key), named in every refusal."""
    info = CheckpointInfo.read(second, None, flag)
    if info.format == "torch":  # the growth record pins a second by its .metadata digest
        raise GrowthError(f"{flag} {second}: a legacy torch checkpoint, which a growth record cannot "
                          "pin; give a torch_dist or fsdp_dtensor one (Megatron-LM's --ckpt-convert-format "
                          "torch_dist re-saves it)")
    check_same_tensors(flag, info.path, source.path, _tensors(info), _tensors(source))
    if info.architecture() != source.architecture():
        raise GrowthError(f"{flag} {info.path}: not the source's architecture: {info.architecture()} "
                          f"there, {source.architecture()} in the source {source.path}")
    return info


def check_same_tensors(flag: str, second: Path, source: Path, theirs: dict, mine: dict) -> None:
    """The second checkpoint (at `second`, given with `flag`) is not the source itself and holds
    the source's tensors: `theirs` and `mine` (name → (shape, dtype), of the second and of the
    source) name the same tensors with the same shapes and dtypes (the copies are not cast).
    Any checkpoint format: its reader gives the maps."""
    if os.path.realpath(second) == os.path.realpath(source):
        raise GrowthError(f"{flag} {second}: is the source checkpoint itself; give another "
                          "iteration or run (without it the copies are the source's experts)")
    for name in sorted(mine.keys() | theirs.keys()):
        (shape, dtype), (want_shape, want_dtype) = theirs.get(name, (None, None)), mine.get(name, (None, None))
        if _tuple(shape) != _tuple(want_shape):
            raise GrowthError(f"{flag} {second}: not the source's architecture: tensor {name!r} has "
                              f"shape {_shape(shape)} there, {_shape(want_shape)} in the source "
                              f"{source}; give a checkpoint of the same model")
        if dtype != want_dtype:
            raise GrowthError(f"{flag} {second}: tensor {name!r} is {dtype} there, {want_dtype} in "
                              f"the source {source}; give a checkpoint saved in the source's precision")


def _tensors(info: CheckpointInfo) -> dict:
    return {name: (shape, info.dtypes[name]) for name, shape in info.model_shapes().items()}


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


def check_optimizer(source: CheckpointInfo, second: CheckpointInfo, flag: str = FLAG) -> None:
    """Where the source's optimizer state is grown, the copies' state comes from the second's:
    checked before anything is written (the second may have been saved without it)."""
    for key, shape in sorted(source.shapes.items()):
        if key.startswith("optimizer."):
            _require(second, key, shape, flag)


def _require(second: CheckpointInfo, key: str, shape, flag: str = FLAG) -> None:
    if second.shapes.get(key) == tuple(shape):
        return
    if key.startswith("optimizer."):
        raise GrowthError(f"{flag} {second.path}: optimizer state {key!r} is not there with global shape "
                          f"{tuple(shape)}, and the copies' state is read from it; give --grow-optimizer "
                          "reset, or a second checkpoint saved with its optimizer state")
    raise GrowthError(f"{flag} {second.path}: tensor {key!r} is not there with global shape {tuple(shape)}; "
                      "give a checkpoint of the source's architecture")


def _tuple(shape) -> Optional[tuple]:
    return None if shape is None else tuple(shape)


def _shape(shape) -> str:
    return "(absent)" if shape is None else str(tuple(shape))
