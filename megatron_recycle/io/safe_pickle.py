"""Unpickle checkpoint files without running code from them: a torch DCP `.metadata` file
(`load_metadata`) and torch pickles (`torch_load`: `common.pt`, legacy `model_optim_rng.pt`).

torch's own `FileSystemReader.read_metadata` calls `pickle.load`: a crafted `.metadata` runs
whatever it names. The metadata of a real checkpoint only names torch DCP's plain data classes,
`torch.Size`, dtypes and a path, so this unpickler resolves exactly those (the data classes
and enums of the `torch.distributed.checkpoint` modules, never a function) and refuses
anything else, naming it.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import pickle
import re
from pathlib import Path

import torch

from ..errors import CheckpointError

_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner",
                "torch.distributed.checkpoint.filesystem")
_ALLOWED = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a layout by its name
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
}


class _Forbidden(pickle.UnpicklingError):
    """A global a checkpoint's metadata never names."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module in _DCP_MODULES:
            value = getattr(importlib.import_module(module), name, None)
            # a plain data class or enum of torch DCP's own, never a function or a class with
            # behaviour (a reader, a writer) or one it merely imports
            if (isinstance(value, type) and value.__module__ == module
                    and (dataclasses.is_dataclass(value) or issubclass(value, enum.Enum))):
                return value
        raise _Forbidden(f"it names {module}.{name}, which is not part of a checkpoint's metadata")


def load_metadata(path: Path):
    """The torch DCP `Metadata` in `path` (a `.metadata` file), unpickled safely."""
    try:
        with open(path, "rb") as f:
            return _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; the checkpoint is incomplete (its save did not "
                              "finish?): point at another iteration") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
    except pickle.UnpicklingError as e:
        if forbidden(e):
            raise CheckpointError(f"{path}: {refusal(e)}") from None
        raise CheckpointError(f"{path}: garbled or truncated ({e}); the checkpoint is corrupt: "
                              "point at another iteration") from None
    except Exception as e:  # truncated or garbled pickle: EOFError, ValueError, …
        raise CheckpointError(f"{path}: garbled or truncated ({type(e).__name__}: {e}); the "
                              "checkpoint is corrupt: point at another iteration") from None


def forbidden(e: Exception) -> bool:
    """Whether an unpickling error is a refusal (a global not allowed), not damaged data."""
    return isinstance(e, _Forbidden) or bool(re.search(r"Unsupported global|GLOBAL ", str(e)))


def refusal(e: Exception) -> str:
    """Why a pickle was not loaded, for a message that names the file first."""
    text = " ".join(str(e).split())
    named = re.search(r"GLOBAL ([\w.]+)", text)  # torch's weights_only message names it so
    detail = f"it names {named.group(1)}" if named else text[:200]
    return (f"refused: loading it would run code or build objects a checkpoint never holds "
            f"({detail}); do not load it")


def torch_load(path: Path, mmap: bool = False):
    """A torch pickle (`common.pt`, a legacy `model_optim_rng.pt`) with `weights_only=True` and
    megatron-core's safe globals (argparse.Namespace, its enums, numpy RNG state): anything else
    is refused, never loaded. `mmap`: tensors stay on disk until read."""
    import megatron.core  # noqa: F401  registers megatron-core's safe globals with torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; the checkpoint is incomplete: point at another "
                              "iteration") from None
    except Exception as e:  # truncated or garbled: whatever torch raised
        if forbidden(e):
            raise CheckpointError(f"{path}: {refusal(e)}") from None
        text = " ".join(str(e).split()) or "no detail"
        raise CheckpointError(f"{path}: cannot be read ({type(e).__name__}: {text}); the "
                              "checkpoint is corrupt") from None
