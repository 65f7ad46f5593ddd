"""Unpickle checkpoint files without running code from them: a torch DCP `.metadata` file
(`load_metadata`) and torch pickles (`load`, `torch_load`: `common.pt`, legacy
`model_optim_rng.pt`, torch_dist objects), the latter without importing megatron-core.

torch's own `FileSystemReader.read_metadata` calls `pickle.load`: a crafted `.metadata` runs
whatever it names. The metadata of a real checkpoint only names torch DCP's plain data classes,
`torch.Size`, dtypes and a path, so this unpickler resolves exactly those (the data classes
and enums of the `torch.distributed.checkpoint` modules, never a function) and refuses
anything else, naming it.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import importlib
import io
import pickle
import re
import sys
import threading
import types
from pathlib import Path, PosixPath

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


# What megatron-core allows torch to unpickle (`megatron.core.safe_globals`, 0.16-0.19 and
# main), without importing it: its import takes seconds (it runs torch.compile). Its enums
# (args.attention_backend, …) are read as stand-ins (`MegatronEnum`) that `torch_save` writes
# back as the same members; any other megatron-core class (OptimizerConfig) is read as today,
# after importing megatron-core (`load`).
_MEGATRON_ENUMS = (
    "megatron.core.enums.ModelType",
    "megatron.core.transformer.enums.AttnBackend",
    "megatron.core.transformer.enums.CudaGraphModule",
    "megatron.core.transformer.enums.CudaGraphScope",
    "megatron.core.transformer.enums.InferenceCudaGraphScope",
    "megatron.core.rerun_state_machine.RerunDiagnostic",
    "megatron.core.rerun_state_machine.RerunMode",
    "megatron.core.rerun_state_machine.RerunState",
)


class MegatronEnum:
    """A member of a megatron-core enum read without megatron-core: its class is named after
    the enum (module and name), it holds the member's value and pickles as the member does."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def __reduce__(self):
        """Pickled by anything but `torch_save` (`--workers`, a caller's own save): as
        megatron-core's own member, importing megatron-core then; a stand-in never leaks."""
        enum_class = getattr(importlib.import_module(type(self).__module__), type(self).__qualname__)
        return enum_class, (self.value,)

    def __eq__(self, other):
        return type(self) is type(other) and self.value == other.value

    def __hash__(self):
        return hash((type(self), self.value))

    def __repr__(self):
        return f"{type(self).__qualname__}({self.value!r})"


@functools.lru_cache(maxsize=None)
def _stand_ins() -> dict:
    out = {}
    for path in _MEGATRON_ENUMS:
        module, _, name = path.rpartition(".")
        out[path] = type(name, (MegatronEnum,), {"__module__": module, "__qualname__": name, "__slots__": ()})
    return out


@functools.lru_cache(maxsize=1)
def _plain_globals() -> tuple:
    """megatron-core's safe globals that are not its own (the same objects it registers)."""
    import argparse
    import signal
    import types
    import warnings

    import numpy
    from numpy.dtypes import UInt32DType

    with warnings.catch_warnings():  # numpy 2 names numpy.core deprecated; megatron-core imports it so
        warnings.simplefilter("ignore", DeprecationWarning)
        from numpy.core.multiarray import _reconstruct

    return (types.SimpleNamespace, PosixPath, _reconstruct, numpy.ndarray, numpy.dtype, UInt32DType,
            argparse.Namespace, io.BytesIO, signal.Signals, torch._C.Generator)


def _path(g) -> str:
    return g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}"


_loading = threading.Lock()  # one allow-list context at a time: leaving one removes its globals


def load(f, mmap: bool = False):
    """`torch.load(f, weights_only=True)` with megatron-core's safe globals, imported or not:
    what torch has registered (megatron-core registers its own when imported) and, for the
    rest, the same objects or, for its enums, stand-ins. Content naming another megatron-core
    class imports megatron-core and is read with its globals (never with fewer checks)."""
    with _loading:
        registered = {_path(g) for g in torch.serialization.get_safe_globals()}
        ours = [g for g in (*_plain_globals(), *_stand_ins().values()) if _path(g) not in registered]
        with torch.serialization.safe_globals(ours):
            try:
                return torch.load(f, map_location="cpu", weights_only=True, mmap=mmap)
            except Exception as e:
                if "megatron.core" in sys.modules or not re.search(r"GLOBAL megatron\.", str(e)):
                    raise
        import megatron.core  # noqa: F401  registers the rest of its safe globals with torch

        if hasattr(f, "seek"):
            f.seek(0)
    return load(f, mmap)


def torch_load(path: Path, mmap: bool = False):
    """A torch pickle (`common.pt`, a legacy `model_optim_rng.pt`) with `weights_only=True` and
    megatron-core's safe globals (argparse.Namespace, its enums, numpy RNG state; `load`):
    anything else is refused, never loaded. `mmap`: tensors stay on disk until read."""
    try:
        return load(path, mmap=mmap)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; the checkpoint is incomplete: point at another "
                              "iteration") from None
    except Exception as e:  # truncated or garbled: whatever torch raised
        if forbidden(e):
            raise CheckpointError(f"{path}: {refusal(e)}") from None
        text = " ".join(str(e).split()) or "no detail"
        raise CheckpointError(f"{path}: cannot be read ({type(e).__name__}: {text}); the "
                              "checkpoint is corrupt") from None


class _Pickler(pickle._Pickler):
    """Python's own pickler (the C one cannot be taught a global it cannot import), writing a
    stand-in's class as the megatron-core enum it names: the bytes megatron-core's own save
    writes for the member."""

    def reducer_override(self, obj):
        if isinstance(obj, MegatronEnum):  # as an Enum member reduces
            return type(obj), (obj.value,)
        return NotImplemented

    def save_global(self, obj, name=None):
        if isinstance(obj, type) and issubclass(obj, MegatronEnum) and obj is not MegatronEnum:
            if self.proto >= 4:
                raise pickle.PicklingError("stand-ins are written with protocol 2 or 3 (torch.save's)")
            self.write(pickle.GLOBAL + f"{obj.__module__}\n{obj.__qualname__}\n".encode("ascii"))
            self.memoize(obj)
            return
        super().save_global(obj, name)


_pickle_module = types.ModuleType("megatron_recycle_pickle")
_pickle_module.Pickler = _Pickler


def torch_save(obj, f) -> None:
    """`torch.save(obj, f)`, with megatron-core enums read as stand-ins written back as themselves."""
    torch.save(obj, f, pickle_module=_pickle_module)
