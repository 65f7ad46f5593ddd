"""The files Megatron keeps in an iteration directory beside the weights, carried into a grown one.

- `tokenizer/`: Megatron-LM (main, `--save-tokenizer-assets`, written after the tracker) and
  Megatron-Bridge save the tokenizer's files there; a grown iteration gets a byte-for-byte copy.
- `integrity.json`: megatron-core 0.19+ saving with `verify_integrity` (Megatron-LM
  `--verify-integrity`) hashes every file at the top of the iteration directory,
  `{"algorithm": "sha256", "files": {name: hex digest}}`, and a load with `verify_integrity`
  checks them before reading. Where the source has one, growth checks the source's files
  against it before anything is written (a grown manifest must not vouch for a corrupt source),
  and writes one over the grown iteration's own files, after every other file of the iteration
  and before the tracker.

Offline growth and `verify` ask `of` for the source's and never name these files themselves.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import CheckpointError

TOKENIZER = "tokenizer"
INTEGRITY = "integrity.json"
ALGORITHM = "sha256"  # the only one megatron-core's verifier accepts
_CHUNK = 1 << 20


def read_manifest(path: Path) -> dict[str, str]:
    """The file → digest map of an `integrity.json`, checked to be one megatron-core can verify."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot be read as JSON ({type(e).__name__}); the "
                              "checkpoint is corrupt") from None
    files = data.get("files") if isinstance(data, dict) else None
    if (not isinstance(files, dict) or data.get("algorithm", ALGORITHM) != ALGORITHM
            or not all(isinstance(k, str) and isinstance(v, str) and k not in ("", ".", "..")
                       and os.sep not in k and "/" not in k for k, v in files.items())):
        raise CheckpointError(f"{path}: not a megatron-core integrity manifest "
                              f"({{'algorithm': '{ALGORITHM}', 'files': {{file name: digest}}}}); "
                              "the checkpoint is corrupt")
    return files


def digests(directory: Path, names) -> dict[str, str]:
    """SHA-256 of each named file of `directory`, hashed in parallel (hashlib releases the GIL)."""
    def one(name: str) -> str:
        h = hashlib.new(ALGORITHM)
        with open(directory / name, "rb") as f:
            for chunk in iter(lambda: f.read(_CHUNK), b""):
                h.update(chunk)
        return h.hexdigest()

    names = sorted(names)
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1, max(len(names), 1))) as pool:
        return dict(zip(names, pool.map(one, names)))


def top_level_files(directory: Path) -> list[str]:
    """What megatron-core's manifest lists: the files at the top of the directory but itself."""
    return sorted(p.name for p in directory.iterdir() if p.is_file() and p.name != INTEGRITY)


def manifest_problems(directory: Path, complete: bool = False) -> list[str]:
    """How the files of `directory` disagree with its `integrity.json`, as megatron-core checks
    (each listed file's digest); `complete`: every file must be listed too (a grown manifest;
    a framework may write files beside a source's after megatron-core hashed it)."""
    listed = read_manifest(directory / INTEGRITY)
    present = [n for n in listed if (directory / n).is_file()]
    have = digests(directory, present)
    out = [f"{INTEGRITY}: {n} is listed but missing" for n in sorted(set(listed) - set(present))]
    out += [f"{INTEGRITY}: {n} does not match its digest" for n in present if have[n] != listed[n]]
    if complete:
        out += [f"{INTEGRITY}: {n} is not listed" for n in top_level_files(directory) if n not in listed]
    return out


@dataclass(frozen=True)
class IterationFiles:
    """Those of one source iteration directory."""

    source: Path
    tokenizer: bool
    integrity: bool

    @classmethod
    def of(cls, iteration_dir: Path) -> "IterationFiles":
        """Read and checked before anything is written (a garbled manifest is refused)."""
        integrity = (iteration_dir / INTEGRITY).is_file()
        if integrity:
            read_manifest(iteration_dir / INTEGRITY)
        return cls(iteration_dir, (iteration_dir / TOKENIZER).is_dir(), integrity)

    def write(self, into: Path) -> list[Path]:
        """Copy the tokenizer into the staging iteration directory `into`; returns every file
        and directory written, to be fsynced."""
        if not self.tokenizer:
            return []
        shutil.copytree(self.source / TOKENIZER, into / TOKENIZER, symlinks=False)
        return sorted((into / TOKENIZER).rglob("*")) + [into / TOKENIZER]

    def check_source(self) -> None:
        """Where the source has an `integrity.json`, its files must match it (reads them all)."""
        problems = manifest_problems(self.source) if self.integrity else []
        if problems:
            raise CheckpointError(f"--load {self.source}: its files disagree with its own "
                                  f"{INTEGRITY} ({'; '.join(problems[:3])}); the source is corrupt "
                                  "or was changed after it was saved: grow from a good copy")

    def seal(self, into: Path) -> Optional[Path]:
        """Where the source has an `integrity.json`, one over `into`'s files (call it once every
        other file of the iteration is written). Returns the file written, to be fsynced, or None."""
        if not self.integrity:
            return None
        path = into / INTEGRITY
        payload = {"algorithm": ALGORITHM, "files": digests(into, top_level_files(into))}
        with open(path, "w") as f:
            json.dump(payload, f, indent=2)  # as megatron-core writes it
            f.flush()
            os.fsync(f.fileno())
        return path

    def mismatches(self, grown: Path) -> list[str]:
        """What of these files the grown iteration directory `grown` lacks or has wrong."""
        out = []
        if self.tokenizer:
            for path in sorted((self.source / TOKENIZER).rglob("*")):
                copy = grown / TOKENIZER / path.relative_to(self.source / TOKENIZER)
                if path.is_file() and (not copy.is_file() or copy.read_bytes() != path.read_bytes()):
                    out.append(f"{TOKENIZER}/{copy.relative_to(grown / TOKENIZER)}: missing or "
                               "not the source's")
        if self.integrity:
            out += [f"source {p}" for p in manifest_problems(self.source)]
            if not (grown / INTEGRITY).is_file():
                out.append(f"{INTEGRITY}: missing (the source has one)")
            else:
                out += manifest_problems(grown, complete=True)
        return out
