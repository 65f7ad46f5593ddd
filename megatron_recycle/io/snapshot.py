"""What a grow read is what it commits: the source iteration directory is pinned at the start
and checked unchanged before the commit, so a source replaced or rewritten meanwhile (a `mv`
of a `.distcp` or `.metadata`, a save into the same place) cannot mix two checkpoints in one
grown checkpoint. The second checkpoint of `--grow-from-second` is pinned alike, offline and
in a training job (from the plan to the load's last read of it: `merge.Second`).

Pinned: every file's inode, size and mtime_ns (a `mv` changes the inode, a rewrite the mtime),
in the directory and its subdirectories (a legacy torch checkpoint's `mp_rank_*/`),
and the bytes of `.metadata`, `metadata.json` and the common state (`common.pt`, or its byte
range in a `.distcp` file from megatron-core 0.19 on), hashed: small, and what the grown
checkpoint's layout and args are made from.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .. import compat
from ..errors import CheckpointError


@dataclass(frozen=True)
class SourceSnapshot:
    directory: Path
    files: dict  # name → (inode, size, mtime_ns)
    digests: dict  # name → sha256 of the pinned bytes

    @classmethod
    def take(cls, directory: Path) -> "SourceSnapshot":
        """Pin `directory` (an iteration directory); take it before reading from it."""
        return cls(directory, _stats(directory), _digests(directory))

    def check(self, flag: str = "--load") -> None:
        """Raise CheckpointError naming the first pinned file that changed."""
        now = _stats(self.directory)
        changed = next((n for n in sorted(self.files) if now.get(n) != self.files[n]), None)
        if changed is None:
            digests = _digests(self.directory)
            changed = next((n for n in sorted(self.digests) if digests.get(n) != self.digests[n]), None)
        if changed is not None:
            raise CheckpointError(
                f"{flag} {self.directory / changed} changed while growing (replaced, rewritten or "
                "removed): the grown model would mix two checkpoints, so nothing was written or "
                "loaded; run again once it is no longer being written")


def _stats(directory: Path, prefix: str = "") -> dict:
    out = {}
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.is_file(follow_symlinks=True):
                st = entry.stat(follow_symlinks=True)
                out[prefix + entry.name] = (st.st_ino, st.st_size, st.st_mtime_ns)
            elif entry.is_dir(follow_symlinks=False) and not prefix:
                out.update(_stats(Path(entry.path), f"{entry.name}/"))
    return out


def _digests(directory: Path) -> dict:
    out = {}
    for name in (".metadata", "metadata.json", compat.COMMON_STATE_FILE):
        data = _read(directory / name)
        if data is not None:
            out[name] = hashlib.sha256(data).hexdigest()
    where = _common_state_object(directory)
    if where is not None:
        data = _read(directory / where.relative_path, where.offset, where.length)
        out[f"{where.relative_path} ({compat.COMMON_STATE_OBJECT})"] = (
            None if data is None else hashlib.sha256(data).hexdigest())
    return out


def _common_state_object(directory: Path):
    """Where the common state object is stored (megatron-core 0.19+), or None."""
    from .reader import SafeFileSystemReader

    if not (directory / ".metadata").is_file():
        return None
    try:
        storage = SafeFileSystemReader(directory).read_metadata().storage_data
    except CheckpointError:
        return None  # garbled now: the .metadata digest differs
    return next((v for k, v in storage.items() if k.fqn == compat.common_state_storage_key()), None)


def _read(path: Path, offset: int = 0, length: Optional[int] = None) -> Optional[bytes]:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read() if length is None else f.read(length)
    except OSError:
        return None
