"""A new checkpoint root appears at `--save` whole or not at all, and nothing else is touched.

- Staging: a private directory with an unpredictable name (`mkdtemp`, mode 0700) beside the
  destination, marked as ours; the checkpoint is written there and renamed into place at the
  end. Megatron never picks up a staging directory (it is not at `--save`, and it holds no
  tracker file until it is complete).
- Lock: an exclusive `flock` on `.NAME.megatron-recycle.lock` beside the destination, held for
  the whole run, so two grows into one destination cannot both succeed.
- Replace: only with `--overwrite`, and only a Megatron checkpoint root that holds nothing but
  a checkpoint (its tracker file and the iteration directory that names, or the one the grown
  checkpoint writes): anything else (an old run's other iterations, tensorboard/, notes) is
  named and the grow refused, before anything is written. The destination is checked again right before the rename, which must
  find it as it was at the start. The old checkpoint is moved aside and removed only once the
  rename is durable; an interruption between the two renames leaves it aside, marked, and the
  next grow into that place puts it back (or names it, with the command that does).
- `--save` a symlink to a directory: the checkpoint replaces the directory it points to (the
  link keeps working); a dangling link is refused.
- Staging directories that interrupted runs left (kill -9) are reported, and removed with
  `--remove-stale-staging`: only directories holding our marker, never an old checkpoint that
  was moved aside, and only while we hold the lock, so none of them can belong to a live run.
- Names beside the destination (`.NAME.partial-*`, `.NAME.replaced-*`, the lock) stay within
  NAME_MAX for any legal NAME: a long one is shortened to a prefix and a hash of it.
- Free space: the output size is known before anything is written, and checked.
- Parent directories of `--save` that a failed run created are removed again.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import secrets
import shlex
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from ..cost import human
from ..errors import CheckpointError, GrowthError
from .checkpoint import TRACKER_FILE, is_checkpoint_root, read_tracker
from .writer import fsync

MARKER = ".megatron-recycle-staging"
_MARGIN_BYTES = 64 << 20  # .metadata, common state and file-system slack
_OLD = "old"  # the replaced checkpoint's name inside its `.NAME.replaced-*` directory
# The marker's "state": a staging directory being written; an old checkpoint moved aside while
# the new one is not yet in place (never removed by us); one the new checkpoint has replaced.
PARTIAL, MOVED_ASIDE, REPLACED = "partial", "moved aside", "replaced"
_LONGEST_SUFFIX = len(".megatron-recycle.lock") + 1  # and the leading dot


@dataclass(frozen=True)
class RootKind:
    """What `--overwrite` may replace at a destination: `members(root)` names the entries of a
    checkpoint of this kind at `root` (None: `root` is not one); `identity_file`'s change between
    the start and the rename means someone else wrote there."""

    name: str
    members: Callable[[Path], Optional[set[str]]]
    identity_file: str


def _megatron_members(root: Path) -> Optional[set[str]]:
    return {TRACKER_FILE, read_tracker(root).name} if is_checkpoint_root(root) else None


MEGATRON_ROOT = RootKind(f"a Megatron checkpoint root (no {TRACKER_FILE} naming an existing "
                         "iteration)", _megatron_members, TRACKER_FILE)


class Destination:
    """The root a grown checkpoint goes to. Use as a context manager around the writing:
    `staging` is where to write; `commit()` makes it the destination.

    `parts`: the entries of the root the grown checkpoint consists of (tracker file, iteration
    directory); an old checkpoint may hold nothing but those and the iteration its tracker
    names for `--overwrite` to replace it. `kind`: what a checkpoint there is (RootKind)."""

    def __init__(self, save: str | os.PathLike, overwrite: bool, parts: Sequence[str] = (),
                 flag: str = "--save", log: Callable[[str], None] = lambda s: None,
                 kind: RootKind = MEGATRON_ROOT):
        self.flag, self.overwrite, self.log, self.kind = flag, overwrite, log, kind
        self.parts = frozenset(parts) | {MARKER}  # a marker a commit cut short did not unlink
        given = Path(save)
        self.given = given
        self.path = Path(os.path.realpath(given))  # where the checkpoint lands
        self.parent = self.path.parent
        self._stem = _short_name(self.path.name)
        self._lock_fd: Optional[int] = None
        self._created: list[Path] = []  # parent directories this run made
        self.staging: Optional[Path] = None
        if given.is_symlink() and not self.path.exists() and not self._moved_aside():
            raise GrowthError(f"{flag} {given} is a symlink to {os.readlink(given)}, which "
                              "does not exist; remove the link or create its target")
        if given.is_symlink() and self.path.exists() and not self.path.is_dir():
            raise GrowthError(f"{flag} {given} is a symlink to a file, not a directory")
        self._check_replaceable()
        self._identity = _identity(self.path, self.kind.identity_file)

    # --- before writing ---------------------------------------------------------------------
    def _check_replaceable(self) -> None:
        """What is at the destination (or, moved aside by an interrupted replace, will be put
        back there) may be replaced: only with --overwrite, only our parts of a checkpoint."""
        moved = self._moved_aside()
        existing = self.path if self.path.exists() else (moved[0] / _OLD if moved else None)
        if existing is None:
            return
        if not existing.is_dir():
            raise GrowthError(f"{self.flag} {self.given} exists and is not a directory; pick a new path")
        if not self.overwrite:
            if existing != self.path:
                raise GrowthError(
                    f"{self.flag} {self.given}: an interrupted `grow --overwrite` moved the old "
                    f"checkpoint to {existing} and did not finish; put it back with "
                    f"{_restore_command(existing, self.path)} (or pass --overwrite: it is put back, "
                    "then replaced)")
            raise GrowthError(f"{self.flag} {self.given} already exists; pick a new directory or pass "
                              "--overwrite to replace the checkpoint in it")
        members = self.kind.members(existing)
        if members is None:
            raise GrowthError(
                f"{self.flag} {self.given} exists and is not {self.kind.name}: --overwrite only "
                "replaces a checkpoint; pick a new directory")
        foreign = _entries(existing) - self.parts - members
        if foreign:
            more = f" and {len(foreign) - 8} more" if len(foreign) > 8 else ""
            raise GrowthError(
                f"{self.flag} {self.given} also holds {_listing(existing, sorted(foreign)[:8])}{more}: "
                f"--overwrite replaces a checkpoint ({_listing(existing, sorted(members))}) and "
                "nothing else (an old run's other iterations beside the grown one would load into "
                "the grown model); move them out or pick a new directory")

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
            self._make_parents()
            self._lock()
            self._put_back_moved_aside()
            self.staging = Path(tempfile.mkdtemp(prefix=f".{self._stem}.partial-", dir=self.parent))
            _mark(self.staging, PARTIAL, self.path)
        except OSError as e:
            self.__exit__()
            raise CheckpointError(f"{self.flag} {self.given}: cannot write in {self.parent} "
                                  f"({e.strerror or e}); pick a writable directory") from None
        except BaseException:
            self.__exit__()
            raise
        return self

    def _make_parents(self) -> None:
        missing = [p for p in (self.parent, *self.parent.parents) if not p.exists()]
        for path in reversed(missing):
            path.mkdir()
            self._created.append(path)

    def _put_back_moved_aside(self) -> None:
        """An interrupted replace left the old checkpoint aside and nothing in its place: put
        it back (we hold the lock, so no live run is between its two renames)."""
        moved = self._moved_aside()
        if not moved or os.path.lexists(self.path):
            return
        os.rename(moved[0] / _OLD, self.path)
        fsync(self.parent)
        shutil.rmtree(moved[0])
        self.log(f"put the old checkpoint back at {self.given}: an interrupted --overwrite had "
                 f"moved it to {moved[0] / _OLD}")
        self._identity = _identity(self.path, self.kind.identity_file)
        self._check_replaceable()

    def check_space(self, nbytes: int) -> None:
        free = shutil.disk_usage(self.parent).free
        if free < nbytes + _MARGIN_BYTES:
            raise CheckpointError(
                f"{self.flag} {self.given}: the grown checkpoint needs {human(nbytes, 'B')} but "
                f"{self.parent} has {human(free, 'B')} free; free space or pick another file system")

    def _beside(self) -> list[tuple[Path, Optional[str]]]:
        """Our staging and moved-aside directories beside the destination, with their state."""
        if not self.parent.is_dir():
            return []
        prefixes = (f".{self._stem}.partial-", f".{self._stem}.replaced-")
        found = []
        for p in sorted(self.parent.iterdir()):
            if p.name.startswith(prefixes) and p != self.staging and (p / MARKER).is_file():
                found.append((p, _state(p)))
        return found

    def _moved_aside(self) -> list[Path]:
        """Old checkpoints an interrupted replace moved aside (never removed by us)."""
        return [p for p, state in self._beside()
                if p.name.startswith(f".{self._stem}.replaced-") and state != REPLACED
                and (p / _OLD).is_dir()]

    def stale_staging(self) -> list[Path]:
        """Staging directories of earlier runs into this destination (ours: marked; not live:
        we hold the lock); not the old checkpoints of `moved_aside_notes`."""
        kept = set(self._moved_aside())
        return [p for p, _ in self._beside() if p not in kept]

    def moved_aside_notes(self) -> list[str]:
        """One line per old checkpoint an interrupted replace moved aside, with its commands."""
        return [f"{p / _OLD} is the checkpoint an interrupted `grow --overwrite` replaced "
                f"(kept; --remove-stale-staging never removes it): remove it with "
                f"rm -r {shlex.quote(str(p))}, or put it back with "
                f"mv {shlex.quote(str(self.given))} {shlex.quote(str(self.given) + '.grown')} && "
                f"{_restore_command(p / _OLD, self.given)}" for p in self._moved_aside()]

    def remove_stale_staging(self, log: Callable[[str], None]) -> None:
        for path in self.stale_staging():
            size = tree_bytes(path)
            shutil.rmtree(path)
            log(f"removed {path} ({human(size, 'B')}), left by an interrupted run")

    # --- making it the destination --------------------------------------------------------------
    def commit(self) -> None:
        """Rename the finished staging directory to the destination; an old checkpoint there
        is moved aside first (marked, so that an interruption before the second rename leaves
        it recoverable) and removed once the rename is durable."""
        os.chmod(self.staging, 0o777 & ~_umask())  # mkdtemp made it private while it was partial
        fsync(self.staging)
        if _identity(self.path, self.kind.identity_file) != self._identity:
            raise GrowthError(
                f"{self.flag} {self.given} changed while growing (created, replaced, removed or "
                "written into by something else); nothing was replaced. Check it and run again")
        aside = None
        if self._identity is not None:
            aside = Path(tempfile.mkdtemp(prefix=f".{self._stem}.replaced-", dir=self.parent))
            _mark(aside, MOVED_ASIDE, self.path)
            fsync(self.parent)
            os.rename(self.path, aside / _OLD)
        os.rename(self.staging, self.path)
        fsync(self.parent)
        self.staging = None
        if aside is not None:
            _mark(aside, REPLACED, self.path)  # from now on it is ours to remove
        (self.path / MARKER).unlink()
        if aside is not None:
            shutil.rmtree(aside)
        self._created = []

    def __exit__(self, *exc) -> None:
        try:
            if self.staging is not None:  # not committed: remove what we created
                shutil.rmtree(self.staging, ignore_errors=True)
                self.staging = None
        finally:
            self._release()
            for path in reversed(self._created):  # only if still empty: never what others put there
                try:
                    path.rmdir()
                except OSError:
                    break
            self._created = []

    # --- the lock -----------------------------------------------------------------------
    @property
    def lock_path(self) -> Path:
        return self.parent / f".{self._stem}.megatron-recycle.lock"

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


def _short_name(name: str) -> str:
    """`name`, or a prefix of it and a hash of all of it where `.NAME` plus our longest suffix
    would pass NAME_MAX (255 bytes)."""
    raw = os.fsencode(name)
    if len(raw) + _LONGEST_SUFFIX <= 255:
        return name
    return os.fsdecode(raw[:120]) + "~" + hashlib.sha256(raw).hexdigest()[:16]


def _entries(path: Path) -> set[str]:
    return set(os.listdir(path))


def _listing(directory: Path, names) -> str:
    """Entry names as a user reads them: directories with a trailing slash."""
    return ", ".join(n + ("/" if (directory / n).is_dir() else "") for n in names)


def _restore_command(moved: Path, path: Path) -> str:
    return f"mv {shlex.quote(str(moved))} {shlex.quote(str(path))} && rm -r {shlex.quote(str(moved.parent))}"


def _mark(directory: Path, state: str, destination: Path) -> None:
    """Write our marker into `directory`, durably, replacing an earlier one whole."""
    tmp = directory / (MARKER + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(dict(_owner(destination), state=state)))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / MARKER)
    fsync(directory)


def _state(directory: Path) -> Optional[str]:
    """The marker's state; None when it records none (written by an earlier version: treated
    like MOVED_ASIDE, so an old checkpoint is kept)."""
    try:
        return json.loads((directory / MARKER).read_text()).get("state")
    except (OSError, ValueError, AttributeError):
        return None


def _identity(path: Path, identity_file: str) -> Optional[tuple]:
    """What must not change between the start and the rename: absent, or the same directory
    holding the same entries and the same tracker (or config) file."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return None
    tracker = path / identity_file
    tracked = os.stat(tracker).st_mtime_ns if tracker.exists() else None
    return st.st_dev, st.st_ino, tracked, tuple(sorted(_entries(path)))


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


def write_file(path: Path, fill: Callable) -> Path:
    """One file at `path`, whole or not at all: `fill` writes it under a temporary name beside it,
    which is renamed into place."""
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"  # the umask's mode, unlike mkstemp
    try:
        with open(tmp, "xb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


