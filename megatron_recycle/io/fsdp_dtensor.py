"""Megatron-LM's `--ckpt-format fsdp_dtensor` checkpoints (Megatron-FSDP's), read as the
`torch_dist` checkpoint of the same model, so every tool takes them unchanged.

On disk (Megatron-LM's `save_checkpoint`: `generate_state_dict`, then
`preprocess_fsdp_dtensor_state_dict`, then torch DCP's `save` with its default planner): the
same root, tracker file and `iter_XXXXXXX/` as torch_dist, holding `.metadata` and
`__{rank}_0.distcp`, no `metadata.json` and no `common.pt`. torch DCP flattens the state dict
with dots: the weights are `model.<parameter name>` (DTensors: `.metadata` has their global
shapes; names as `indexing.from_fsdp_dtensor` reads them), the optimizer
`optimizer.state.module.<name>.exp_avg|exp_avg_sq` and `optimizer.param_to_group_meta.…`, and
the objects `args`, `iteration`, `checkpoint_version`, `num_floating_point_operations_so_far`,
`opt_param_scheduler.<field>`, `rng_state.…`, `rerun_state_machine.…`.

Read here: the weights (under torch_dist keys, GLU halves joined), the per-parameter optimizer
state of the parameter's shape (as `optimizer.state.<field>.<torch_dist key>`, model-space
moments; growth carries them into fsdp_dtensor only, `io.formats`), the names of the
parameter groups' objects (`group_meta`, for the writer), and a common state of args,
iteration, checkpoint version, FLOPs, scheduler and growth record. Not presented: RNG and
rerun state (not carried across a layout change).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from .. import indexing
from ..errors import CheckpointError, GrowthError
from ..provenance import KEY as PROVENANCE_KEY
from .reader import SafeFileSystemReader, StoredObject, is_tensor_request, read_stored, tensor_request

FORMAT = "fsdp_dtensor"
COMMON_OBJECTS = ("args", "iteration", "checkpoint_version", "num_floating_point_operations_so_far",
                  "opt_param_scheduler", PROVENANCE_KEY)
_OPTIMIZER_PREFIX = "optimizer."
OPTIMIZER_STATE_PREFIX = "optimizer.state.module."  # + the parameter's name + "." + the field
GROUP_META_PREFIX = "optimizer.param_to_group_meta.module."  # + the parameter's name + "." + field


def is_candidate(checkpoint_dir: Path) -> bool:
    """A torch DCP directory without megatron-core's `metadata.json`."""
    return (checkpoint_dir / ".metadata").is_file() and not (checkpoint_dir / "metadata.json").exists()


@dataclass(frozen=True)
class _Stored:
    key: str  # the fsdp_dtensor name
    shape: tuple[int, ...]


class FsdpDtensorCheckpoint:
    """One iteration directory, its tensors under torch_dist keys."""

    def __init__(self, checkpoint_dir: Path, flag: str = "--load"):
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.path = checkpoint_dir
        metadata = SafeFileSystemReader(checkpoint_dir).read_metadata()
        stored = metadata.state_dict_metadata
        if "args" not in stored:
            raise GrowthError(
                f"{flag} {checkpoint_dir}: no metadata.json, so not a distributed (torch_dist) "
                "checkpoint, and no args object, so not Megatron-LM's fsdp_dtensor either; point "
                "at a complete Megatron checkpoint")
        self.args = self._object("args")
        saved_as = getattr(self.args, "ckpt_format", None)
        if saved_as != FORMAT:
            raise GrowthError(
                f"{flag} {checkpoint_dir}: a torch DCP checkpoint without metadata.json whose args "
                f"say --ckpt-format {saved_as!r}; growth reads 'torch_dist' and 'fsdp_dtensor': "
                "re-save with --ckpt-format torch_dist")
        tensors = {n: md for n, md in stored.items() if isinstance(md, TensorStorageMetadata)}
        self.naming = indexing.FsdpNaming.of(tensors, _layers_stacked(self.args), _layer_keys_map(self.args))
        halves: dict[tuple[str, tuple], dict[Optional[str], _Stored]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self.has_optimizer = any(n.startswith(_OPTIMIZER_PREFIX) for n in stored)
        self.group_meta = _group_meta(metadata)
        for name, md in tensors.items():
            place = self.naming.place(name)
            if place is None or (name.startswith(_OPTIMIZER_PREFIX) and not _per_element(name, md, tensors)):
                continue
            halves.setdefault((place.key, place.index), {})[place.half] = _Stored(name, tuple(md.size))
            if self.dtypes.setdefault(place.key, md.properties.dtype) != md.properties.dtype:
                raise CheckpointError(f"{checkpoint_dir}: {name} is {md.properties.dtype}, other parts of "
                                      f"{place.key} are {self.dtypes[place.key]}; the checkpoint is inconsistent")
        self.units = {unit: _joined(checkpoint_dir, unit, parts) for unit, parts in halves.items()}
        self.shapes = _global_shapes(checkpoint_dir, self.units)
        self.common = self._common(metadata)

    def _object(self, name: str):
        return read_stored(self.path, {"o": StoredObject(name)})["o"]

    def _common(self, metadata) -> dict[str, Any]:
        """The common state torch_dist keeps: these objects, nested again by torch DCP's own
        record of where each flattened key came from."""
        from torch.distributed.checkpoint.metadata import BytesStorageMetadata

        paths = metadata.planner_data or {}
        wanted = {name: tuple(paths.get(name, name.split(".")))
                  for name, md in metadata.state_dict_metadata.items()
                  if isinstance(md, BytesStorageMetadata) and name.split(".")[0] in COMMON_OBJECTS}
        values = read_stored(self.path, {n: StoredObject(n) for n in wanted})
        common: dict[str, Any] = {}
        for name, path in sorted(wanted.items()):
            node = common
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = values[name]
        return common

    def stored_requests(self, requests: dict) -> dict:
        """`requests` (torch_dist keys) as requests of the stored tensors, filling the same
        destination tensors (a GLU half each its rows); objects pass through."""
        out = {}
        for name, sh in requests.items():
            if not is_tensor_request(sh):
                out[name] = sh
                continue
            prepend = sh.prepend_axis_num
            index, offset = tuple(sh.global_offset[:prepend]), tuple(sh.global_offset[prepend:])
            parts = self.units.get((sh.key, index))
            if parts is None:
                raise GrowthError(f"tensor {sh.key!r} at {index} is not in the checkpoint")
            data = sh.data.view(tuple(sh.local_shape))
            if not offset:  # a scalar: one part
                out[(name, 0)] = tensor_request(parts[0][0].key, data, parts[0][0].shape, ())
                continue
            start, stop = offset[0], offset[0] + data.shape[0]
            for i, (part, first) in enumerate(parts):
                lo, hi = max(start, first), min(stop, first + part.shape[0])
                if lo < hi:
                    out[(name, i)] = tensor_request(part.key, data.narrow(0, lo - start, hi - lo),
                                                    part.shape, (lo - first,) + offset[1:])
        return out


def _group_meta(metadata) -> dict[str, tuple[str, str]]:
    """The stored parameter-group objects: name → (parameter, field), the parameter taken from
    torch DCP's record of where each flattened name came from (parameter names hold dots)."""
    paths = metadata.planner_data or {}
    out = {}
    for name in metadata.state_dict_metadata:
        if not name.startswith(GROUP_META_PREFIX):
            continue
        path = paths.get(name)
        if path:  # ("optimizer", "param_to_group_meta", "module.<parameter>", field)
            out[name] = (path[2][len("module."):], ".".join(map(str, path[3:])))
        else:
            param, _, field = name[len(GROUP_META_PREFIX):].rpartition(".")
            out[name] = (param, field)
    return out


def _per_element(name: str, md, tensors: dict) -> bool:
    """Whether an optimizer state tensor is its parameter's shape (a moment, a master copy),
    so the growth mapping applies to it."""
    param = indexing.FSDP_MODEL_PREFIX + name[len(OPTIMIZER_STATE_PREFIX):].rpartition(".")[0]
    return param in tensors and tuple(tensors[param].size) == tuple(md.size)


def _joined(checkpoint_dir: Path, unit, parts: dict) -> tuple[tuple[_Stored, int], ...]:
    """A torch_dist unit's stored parts, each with the first row it holds: one tensor, or a
    GLU `linear_fc1`'s `_w` and `_v` halves (rows of `_w` first, as torch_dist stacks them)."""
    if set(parts) == {None}:
        return ((parts[None], 0),)
    if set(parts) != {"w", "v"} or parts["w"].shape[1:] != parts["v"].shape[1:]:
        raise CheckpointError(f"{checkpoint_dir}: {unit[0]} at {unit[1]}: stored as "
                              f"{sorted(p.key for p in parts.values())}, not one tensor or matching "
                              "_w/_v halves; the checkpoint is inconsistent")
    return (parts["w"], 0), (parts["v"], parts["w"].shape[0])


def _global_shapes(checkpoint_dir: Path, units: dict) -> dict[str, tuple[int, ...]]:
    """Each torch_dist key's global shape: prepended axes as many as the indices its units
    have, then the unit's shape. Every unit must be there (a torch_dist tensor has no holes)."""
    inner: dict[str, tuple[int, ...]] = {}
    indices: dict[str, set] = {}
    for (key, index), parts in units.items():
        rows = sum(p.shape[0] for p, _ in parts) if len(parts) > 1 else None
        shape = parts[0][0].shape if rows is None else (rows,) + parts[0][0].shape[1:]
        if inner.setdefault(key, shape) != shape:
            raise CheckpointError(f"{checkpoint_dir}: {key} at {index} has shape {shape}, other "
                                  f"units {inner[key]}; the checkpoint is inconsistent")
        indices.setdefault(key, set()).add(index)
    shapes = {}
    for key, seen in indices.items():
        sizes = tuple(max(i[a] for i in seen) + 1 for a in range(len(next(iter(seen)))))
        if len(seen) != math.prod(sizes):
            raise CheckpointError(f"{checkpoint_dir}: {key}: {math.prod(sizes) - len(seen)} of its "
                                  f"{math.prod(sizes)} layer/expert units are missing; the checkpoint is "
                                  "incomplete (saved by fewer ranks than it names?)")
        shapes[key] = sizes + inner[key]
    return shapes


def _layers_stacked(args) -> bool:
    """Whether megatron-core's torch_dist form stacks this model's decoder layers: not for a
    HybridModel or when `moe_layer_freq` (or `linear_attention_freq`) is a list or an int > 1
    (`TransformerBlock.sharded_state_dict`'s rule)."""
    if getattr(args, "hybrid_layer_pattern", None) or getattr(args, "hybrid_override_pattern", None):
        return False
    for name in ("moe_layer_freq", "linear_attention_freq"):
        value = getattr(args, name, None)
        if isinstance(value, list) or (isinstance(value, int) and value > 1):
            return False
    return True


def _layer_keys_map(args) -> dict[str, str]:
    """The `sharded_state_dict_keys_map` of the run's layer spec, taken from megatron-core: the
    local spec renames its norms in torch_dist keys (`input_layernorm.` →
    `self_attention.linear_qkv.layer_norm_`); Transformer Engine's GPT layers keep their
    parameter names (its MLA spec's map is not applied: not tested)."""
    if getattr(args, "transformer_impl", "transformer_engine") != "local":
        return {}
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return dict(get_gpt_layer_local_spec().submodules.sharded_state_dict_keys_map)


def open_checkpoint(checkpoint_dir: Path, flag: str = "--load") -> Optional[FsdpDtensorCheckpoint]:
    """The fsdp_dtensor checkpoint in `checkpoint_dir`, or None where it is not one (read once
    per process while its `.metadata` is unchanged)."""
    if not is_candidate(checkpoint_dir):
        return None
    stat = (checkpoint_dir / ".metadata").stat()
    return _opened(str(checkpoint_dir.resolve()), stat.st_mtime_ns, stat.st_size, flag)


@functools.lru_cache(maxsize=2)
def _opened(path: str, mtime_ns: int, size: int, flag: str) -> FsdpDtensorCheckpoint:
    return FsdpDtensorCheckpoint(Path(path), flag)
