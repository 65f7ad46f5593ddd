"""Hugging Face checkpoints on disk: `config.json` and safetensors weights (one
`model.safetensors`, or shards named by `model.safetensors.index.json`), read box by box and
written shard by shard.

Only safetensors is read: a header of JSON and raw little-endian tensors, nothing that runs
code. A directory whose weights are PyTorch pickles (`pytorch_model*.bin`, `*.pt`, `*.pth`) is
refused, never unpickled. Headers are parsed here (and every tensor's byte range checked
against its file's size, so a truncated shard is refused before anything is written); data is
read through safetensors' own slices, one box at a time.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..errors import CheckpointError, GrowthError
from .writer import fsync

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
RECORD = "megatron_recycle.json"  # the growth record of a grown HF checkpoint
PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_HEADER_LIMIT = 100 << 20  # safetensors' own bound on the JSON header
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
          "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
          "F8_E5M2": torch.float8_e5m2}


def is_hf_checkpoint(path) -> bool:
    """A directory with a config.json and no Megatron checkpoint markers (tracker file,
    `metadata.json` of an iteration)."""
    p = Path(path)
    return (p.is_dir() and (p / CONFIG).is_file() and not (p / "metadata.json").exists()
            and not (p / "latest_checkpointed_iteration.txt").exists())


def hf_members(path: Path) -> Optional[set[str]]:
    """The entries of the HF checkpoint at `path` that `--overwrite` replaces: its files (weights,
    config, tokenizer and generation files, model card); a directory in it is not ours to delete."""
    if not is_hf_checkpoint(path):
        return None
    return {i.name for i in path.iterdir() if i.is_file() and not i.is_symlink()}


@dataclass
class HFCheckpoint:
    """What an HF checkpoint holds: its config and, per tensor, file, shape and dtype."""

    path: Path
    config: dict
    files: dict[str, str]  # tensor name → file name
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]
    record: Optional[dict] = None  # the growth record, for a checkpoint we grew
    _open: dict = field(default_factory=dict, repr=False)

    @classmethod
    def read(cls, path, flag: str = "--load") -> "HFCheckpoint":
        p = Path(path)
        if not p.is_dir():
            raise GrowthError(f"{flag} {p}: no such directory")
        config = _json(p / CONFIG, flag)
        if not isinstance(config, dict):
            raise CheckpointError(f"{flag} {p / CONFIG}: not a JSON object")
        if (p / INDEX).is_file():
            index = _json(p / INDEX, flag)
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{flag} {p / INDEX}: no weight_map; the index is garbled")
            names = sorted(set(weight_map.values()))
        elif (p / WEIGHTS).is_file():
            weight_map, names = None, [WEIGHTS]
        else:
            names = sorted(f.name for f in p.glob("*.safetensors"))
            weight_map = None
            if len(names) > 1:
                raise CheckpointError(f"{flag} {p}: {len(names)} .safetensors files and no {INDEX} "
                                      "saying which tensor is where; add the index")
        if not names:
            pickled = sorted(f.name for f in p.iterdir() if f.suffix in PICKLED)
            what = (f"its weights are PyTorch pickles ({', '.join(pickled[:3])}), which megatron-recycle "
                    "never loads (unpickling runs code); re-save them as safetensors "
                    "(save_pretrained(..., safe_serialization=True)) from a trusted environment"
                    if pickled else "no model.safetensors, shards or index")
            raise CheckpointError(f"{flag} {p}: {what}")
        files, shapes, dtypes = {}, {}, {}
        for name in names:
            for tensor, (shape, dtype) in _header(p / name, flag).items():
                if weight_map is not None and weight_map.get(tensor) != name:
                    continue  # the index is what from_pretrained follows
                files[tensor], shapes[tensor], dtypes[tensor] = name, shape, dtype
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(files))
            if missing:
                raise CheckpointError(f"{flag} {p / INDEX}: names {missing[0]!r} in "
                                      f"{weight_map[missing[0]]}, which does not hold it "
                                      f"({len(missing)} such tensors); the shards are incomplete")
        record = _json(p / RECORD, flag) if (p / RECORD).is_file() else None
        return cls(p, config, files, shapes, dtypes, record)

    def read_box(self, name: str, offset: tuple[int, ...], shape: tuple[int, ...]) -> torch.Tensor:
        """Tensor `name`'s box at `offset` of `shape` (a fresh tensor)."""
        safe_open = _safetensors().safe_open
        file = self.files[name]
        if file not in self._open:
            try:
                self._open[file] = safe_open(str(self.path / file), framework="pt")
            except Exception as e:  # a safetensors error: the file changed or is corrupt
                raise CheckpointError(f"{self.path / file}: cannot be read ({e})") from None
        piece = self._open[file].get_slice(name)
        if tuple(shape) == self.shapes[name]:
            return self._open[file].get_tensor(name)
        return piece[tuple(slice(o, o + s) for o, s in zip(offset, shape))]

    def close(self) -> None:
        self._open.clear()


def _safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise GrowthError("Hugging Face checkpoints need the safetensors package: pip install "
                          "'megatron-recycle[hf]'") from None
    return safetensors


def _json(path: Path, flag: str):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{flag} {path}: unreadable ({type(e).__name__}: {e})") from None


def _header(path: Path, flag: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """A safetensors file's tensors, from its header, each checked to lie inside the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if not 0 < length <= min(_HEADER_LIMIT, size - 8):
                raise ValueError(f"header length {length} for a file of {size} bytes")
            header = json.loads(f.read(length))
    except (OSError, ValueError, struct.error) as e:
        raise CheckpointError(f"{flag} {path}: not a readable safetensors file ({e}); the file is "
                              "truncated or corrupt") from None
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = DTYPES[entry["dtype"]], tuple(int(x) for x in entry["shape"])
            start, stop = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{flag} {path}: tensor {name!r} has an unsupported or garbled "
                                  f"header entry {entry!r}") from None
        if stop - start != math.prod(shape) * dtype.itemsize or stop > size - 8 - length:
            raise CheckpointError(f"{flag} {path}: tensor {name!r} lies outside the file (bytes "
                                  f"{start}..{stop} of {size - 8 - length}); the file is truncated")
        out[name] = (shape, dtype)
    return out


# --- writing ---------------------------------------------------------------------------------
def shard_name(number: int, count: int) -> str:
    return WEIGHTS if count == 1 else f"model-{number + 1:05d}-of-{count:05d}.safetensors"


def write_shard(out_dir: Path, number: int, count: int, tensors: dict[str, torch.Tensor]) -> str:
    """One safetensors shard, durable before this returns."""
    name = shard_name(number, count)
    _safetensors().torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_dir / name), metadata={"format": "pt"})
    fsync(out_dir / name)
    return name


def finish(out_dir: Path, source: HFCheckpoint, weight_map: dict[str, str], total_bytes: int,
           config: dict, record: dict) -> None:
    """The index (for shards), the grown config, the record and the source's other files
    (tokenizer, generation config, chat template, ...), all durable."""
    written = []
    if len(set(weight_map.values())) > 1:
        index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        written.append(_write_json(out_dir / INDEX, index))
    written.append(_write_json(out_dir / CONFIG, config))
    written.append(_write_json(out_dir / RECORD, record))
    for item in sorted(source.path.iterdir()):
        if item.is_file() and not item.is_symlink() and not _is_weights(item.name):
            shutil.copyfile(item, out_dir / item.name)
            written.append(out_dir / item.name)
    for path in written:
        fsync(path)


def side_files(path: Path) -> list[str]:
    """The files `finish` copies from a source: everything but weights, index, config, record."""
    return sorted(i.name for i in path.iterdir() if i.is_file() and not i.is_symlink()
                  and not _is_weights(i.name))


def _is_weights(name: str) -> bool:
    return (name.endswith(".safetensors") or name in (INDEX, CONFIG, RECORD)
            or name.endswith(PICKLED) or name.endswith(".index.json"))


def _write_json(path: Path, data) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path
