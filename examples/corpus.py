"""A real text corpus every Python installation already has: the standard library's sources.

Byte-level tokens (vocabulary 256), so there is no tokenizer to download or train. Files are
split between training and validation by a hash of their path inside the standard library,
so the held-out split never shares a file with training and does not depend on which other
files a given Python version ships. Samples are (seq + 1)-byte windows; the training order is
a seeded permutation of windows, a pure function of the sample index, so a run resumed at
`consumed_samples` sees exactly the data it would have seen without stopping.
"""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

import numpy as np
import torch

VOCAB_SIZE = 256
_SKIPPED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def _path_hash(rel: str) -> int:
    return int.from_bytes(hashlib.blake2b(rel.encode(), digest_size=8).digest(), "little")


def stdlib_files(root: Path | None = None) -> list[tuple[str, Path]]:
    """(path inside the stdlib, file) for every stdlib .py file outside the test suites,
    in a fixed pseudo-random order (by path hash), so a size cap samples every package."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = [(f.relative_to(root).as_posix(), f) for f in root.rglob("*.py")
             if not _SKIPPED_DIRS.intersection(f.relative_to(root).parts[:-1])]
    return sorted(files, key=lambda rf: (_path_hash(rf[0]), rf[0]))


class ByteCorpus:
    """Training and validation byte streams, and deterministic sample windows over them."""

    def __init__(self, max_bytes: int = 4_000_000, valid_percent: int = 5, seed: int = 1234,
                 root: Path | None = None):
        train, valid, size = [], [], 0
        for rel, path in stdlib_files(root):
            data = path.read_bytes()
            (valid if _path_hash("valid|" + rel) % 100 < valid_percent else train).append(data)
            size += len(data)
            if size >= max_bytes:
                break
        if not train or not valid:
            raise RuntimeError(f"standard library corpus too small: {size} bytes")
        self.train = np.frombuffer(b"".join(train), dtype=np.uint8)
        self.valid = np.frombuffer(b"".join(valid), dtype=np.uint8)
        self.seed = seed
        self._orders: dict[tuple[int, int], np.ndarray] = {}

    def _windows(self, split: np.ndarray, seq: int) -> int:
        return (len(split) - 1) // seq

    def train_sample(self, index: int, seq: int) -> np.ndarray:
        """Training sample `index` (a global sample counter): epoch-wise permuted windows."""
        n = self._windows(self.train, seq)
        epoch, position = divmod(index, n)
        if (epoch, seq) not in self._orders:
            self._orders = {(epoch, seq): np.random.default_rng([self.seed, epoch]).permutation(n)}
        start = int(self._orders[(epoch, seq)][position]) * seq
        return self.train[start:start + seq + 1]

    def valid_sample(self, index: int, seq: int) -> np.ndarray:
        """Validation sample `index`: consecutive windows, always the same for a given index."""
        n = self._windows(self.valid, seq)
        start = (index % n) * seq
        return self.valid[start:start + seq + 1]

    @staticmethod
    def batch(windows: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, labels) of shape [batch, seq] from (seq + 1)-byte windows."""
        stacked = torch.from_numpy(np.stack(windows).astype(np.int64))
        return stacked[:, :-1].contiguous(), stacked[:, 1:].contiguous()
