"""A new checkpoint root appears at `--save` whole or not at all, and nothing else is touched.

- Staging: a private directory with an unpredictable name (`mkdtemp`, mode 0700) beside the
  destination, marked as ours; the checkpoint is written there and renamed into place at the
  end. Megatron never picks up a staging directory (it is not at `--save`, and it holds no
  tracker file until it is complete).
- Lock: an exclusive `flock` on `.NAME.megatron-recycle.lock` beside the destination, held for
  the whole run, so two grows into one destination cannot both succeed.
- Replace: only with `--overwrite`, and only a directory that is a Megatron checkpoint root
  (tracker file naming an existing iteration directory); the destination is checked again
  right before the rename, which must find it as it was at the start. The old checkpoint is
  moved aside and removed only once the rename is durable.
- `--save` a symlink to a directory: the checkpoint replaces the directory it points to (the
  link keeps working); a dangling link is refused.
- Staging directories that interrupted runs left (kill -9) are reported, and removed with
  `--remove-stale-staging`: only directories holding our marker, and only while we hold the
  lock, so none of them can belong to a live run.
- Free space: the output size is known before anything is written, and checked.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

from ..cost import human
from ..errors import CheckpointError, GrowthError
from .checkpoint import is_checkpoint_root
from .writer import fsync

MARKER = ".megatron-recycle-staging"
_MARGIN_BYTES = 64 << 20  # .metadata, common state and file-system slack


class Destination:
    """The root a grown checkpoint goes to. Use as a context manager around the writing:
    `staging` is where to write; `commit()` makes it the destination."""

    def __init__(self, save: str | os.PathLike, overwrite: bool, flag: str = "--save",
                 replaceable: Callable[[Path], bool] = is_checkpoint_root,
                 kind: str = "a Megatron checkpoint root (no latest_checkpointed_iteration.txt naming "
                             "an existing iteration)",
                 identity_file: str = "latest_checkpointed_iteration.txt"):
        """`replaceable`, `kind`, `identity_file`: what `--overwrite` may replace, how it is
        described, and the file whose change between start and rename means someone else wrote."""
        self.flag, self.overwrite, self._identity_file = flag, overwrite, identity_file
        given = Path(save)
        if given.is_symlink():
            if not given.exists():
                raise GrowthError(f"{flag} {given} is a symlink to {os.readlink(given)}, which "
                                  "does not exist; remove the link or create its target")
            if not given.resolve().is_dir():
                raise GrowthError(f"{flag} {given} is a symlink to a file, not a directory")
        self.given = given
        self.path = Path(os.path.realpath(given))  # where the checkpoint lands
        if self.path.exists():
            if not self.path.is_dir():
                raise GrowthError(f"{flag} {given} exists and is not a directory; pick a new path")
            if not overwrite:
                raise GrowthError(f"{flag} {given} already exists; pick a new directory or pass "
                                  "--overwrite to replace the checkpoint in it")
            if not replaceable(self.path):
                raise GrowthError(f"{flag} {given} exists and is not {kind}: --overwrite only "
                                  "replaces a checkpoint; pick a new directory")
        self.parent = self.path.parent
        self._identity = _identity(self.path, identity_file)
        self._lock_fd: Optional[int] = None
        self.staging: Optional[Path] = None

    # --- before writing ---------------------------------------------------------------------
    def check_overlap(self, source: Path, include_parent: bool = True) -> None:
        """Refuse a destination inside the source's root (the parent of an iteration directory,
        `include_parent`), or the other way round."""
        source_dir = Path(os.path.realpath(source))
        for other in (source_dir, source_dir.parent) if include_parent else (source_dir,):
            if self.path == other or other in self.path.parents or self.path in other.parents:
                raise GrowthError(f"{self.flag} {self.given} overlaps the source checkpoint "
                                  f"{source}; write the grown checkpoint somewhere else")

    def __enter__(self) -> "Destination":
        try:
            self.parent.mkdir(parents=True, exist_ok=True)
            self._lock()
            self.staging = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.partial-", dir=self.parent))
            (self.staging / MARKER).write_text(json.dumps(_owner(self.path)))
        except OSError as e:
            self._release()
            raise CheckpointError(f"{self.flag} {self.given}: cannot write in {self.parent} "
                                  f"({e.strerror or e}); pick a writable directory") from None
        return self

    def check_space(self, nbytes: int) -> None:
        free = shutil.disk_usage(self.parent).free
        if free < nbytes + _MARGIN_BYTES:
            raise CheckpointError(
                f"{self.flag} {self.given}: the grown checkpoint needs {human(nbytes, 'B')} but "
                f"{self.parent} has {human(free, 'B')} free; free space or pick another file system")

    def stale_staging(self) -> list[Path]:
        """Staging directories of earlier runs into this destination (ours: marked; not live:
        we hold the lock)."""
        prefixes = (f".{self.path.name}.partial-", f".{self.path.name}.replaced-")
        return sorted(p for p in self.parent.iterdir()
                      if p.name.startswith(prefixes) and p != self.staging and (p / MARKER).is_file())

    def remove_stale_staging(self, log: Callable[[str], None]) -> None:
        for path in self.stale_staging():
            size = tree_bytes(path)
            shutil.rmtree(path)
            log(f"removed {path} ({human(size, 'B')}), left by an interrupted run")

    # --- making it the destination --------------------------------------------------------------
    def commit(self) -> None:
        """Rename the finished staging directory to the destination; an old checkpoint there
        is moved aside first and removed once the rename is durable."""
        os.chmod(self.staging, 0o777 & ~_umask())  # mkdtemp made it private while it was partial
        fsync(self.staging)
        if _identity(self.path, self._identity_file) != self._identity:
            raise GrowthError(
                f"{self.flag} {self.given} changed while growing (created, replaced or removed "
                "by something else); nothing was replaced. Check it and run again")
        aside = None
        if self._identity is not None:
            aside = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.replaced-", dir=self.parent))
            (aside / MARKER).write_text(json.dumps(_owner(self.path)))
            os.rename(self.path, aside / "old")
        os.rename(self.staging, self.path)
        fsync(self.parent)
        (self.path / MARKER).unlink()
        self.staging = None
        if aside is not None:
            shutil.rmtree(aside)

    def __exit__(self, *exc) -> None:
        try:
            if self.staging is not None:  # not committed: remove what we created
                shutil.rmtree(self.staging, ignore_errors=True)
                self.staging = None
        finally:
            self._release()

    # --- the lock -----------------------------------------------------------------------
    @property
    def lock_path(self) -> Path:
        return self.parent / f".{self.path.name}.megatron-recycle.lock"

    def _lock(self) -> None:
        while True:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = os.read(fd, 256).decode(errors="replace").strip()
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise GrowthError(f"{self.flag} {self.given}: another megatron-recycle grow is "
                                      f"writing it ({holder or 'lock held'}); wait for it to "
                                      "finish or pick another directory") from None
                raise
            if _same_file(fd, self.lock_path):  # not unlinked by a run that just finished
                os.ftruncate(fd, 0)
                os.write(fd, json.dumps(_owner(self.path)).encode())
                self._lock_fd = fd
                return
            os.close(fd)

    def _release(self) -> None:
        if self._lock_fd is not None:
            try:
                self.lock_path.unlink()
            except FileNotFoundError:
                pass
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None


def _identity(path: Path, identity_file: str) -> Optional[tuple]:
    """What must not change between the start and the rename: absent, or the same directory
    holding the same tracker (or config) file."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return None
    tracker = path / identity_file
    tracked = os.stat(tracker).st_mtime_ns if tracker.exists() else None
    return st.st_dev, st.st_ino, tracked


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _owner(destination: Path) -> dict:
    return {"destination": str(destination), "host": socket.gethostname(), "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def _umask() -> int:
    """The process umask, read without setting it (os.umask would, for every thread)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


