"""Reading what a Megatron `torch_dist` checkpoint holds, without loading any tensor.

A checkpoint *root* (`--load`) has `latest_checkpointed_iteration.txt` and `iter_XXXXXXX/`
directories; an iteration directory has `metadata.json` (backend), `.metadata` (global
shapes of every tensor) and `common.pt` (args, iteration, scheduler, optimizer groups).
Both forms are accepted wherever a checkpoint path is asked for.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from . import keys
from .plan import Architecture, GrowthError

TRACKER_FILE = "latest_checkpointed_iteration.txt"
# The distributed optimizer's dp_reshardable format: opaque per-DP-rank buckets.
DP_RESHARDABLE_KEY = re.compile(r"^(chained_\d+\.)?optimizer\.distributed\.")
PROVENANCE_KEY = "megatron_recycle"  # in common.pt: how this checkpoint was grown


def iteration_dir(root: Path, iteration: int) -> Path:
    return root / f"iter_{iteration:07d}"


def resolve(path: str | os.PathLike, step: Optional[int] = None, flag: str = "--load") -> Path:
    """The iteration directory of `path` (a root or an iteration dir), checked to be torch_dist."""
    p = Path(path)
    if not p.exists():
        raise GrowthError(f"{flag} {p}: no such directory")
    if (p / "metadata.json").exists() and step is None:
        ckpt = p
    else:
        if step is None:
            tracker = p / TRACKER_FILE
            if not tracker.exists():
                raise GrowthError(
                    f"{flag} {p}: neither a checkpoint root (no {TRACKER_FILE}) nor an "
                    "iteration directory (no metadata.json); point it at a Megatron checkpoint"
                )
            text = tracker.read_text().strip()
            if text == "release":
                ckpt = p / "release"
            else:
                ckpt = iteration_dir(p, int(text))
        else:
            ckpt = iteration_dir(p, step)
            if not ckpt.exists():
                have = sorted(d.name for d in p.glob("iter_*"))
                raise GrowthError(f"--ckpt-step {step}: {ckpt} does not exist (have: {have})")
    meta = ckpt / "metadata.json"
    if not meta.exists():
        raise GrowthError(
            f"{flag} {ckpt}: no metadata.json, so not a distributed (torch_dist) checkpoint; "
            "legacy torch checkpoints must be converted with Megatron's "
            "--ckpt-convert-format torch_dist first"
        )
    backend = json.loads(meta.read_text()).get("sharded_backend")
    if backend != "torch_dist":
        raise GrowthError(
            f"{flag} {ckpt}: sharded backend is {backend!r}, growth reads 'torch_dist' only; "
            "re-save with --ckpt-format torch_dist"
        )
    return ckpt


@dataclass
class CheckpointInfo:
    """Metadata of one iteration directory: tensor shapes and the common state."""

    path: Path
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]
    objects: list[str]  # storage keys of the ShardedObjects (`{key}/shard_{offset}_{shape}`)
    common: dict[str, Any] = field(repr=False)

    @classmethod
    def read(cls, path: str | os.PathLike, step: Optional[int] = None, flag: str = "--load"):
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

        ckpt = resolve(path, step, flag)
        metadata = FileSystemReader(str(ckpt)).read_metadata()
        shapes, dtypes, objects = {}, {}, []
        for k, md in metadata.state_dict_metadata.items():
            if isinstance(md, TensorStorageMetadata):
                shapes[k] = tuple(md.size)
                dtypes[k] = md.properties.dtype
            elif isinstance(md, BytesStorageMetadata):
                objects.append(k)
        common_file = ckpt / "common.pt"
        common = torch.load(common_file, map_location="cpu", weights_only=False) if common_file.exists() else {}
        return cls(path=ckpt, shapes=shapes, dtypes=dtypes, objects=objects, common=common)

    @property
    def args(self):
        return self.common.get("args")

    @property
    def iteration(self) -> Optional[int]:
        return self.common.get("iteration")

    @property
    def provenance(self) -> Optional[dict]:
        return self.common.get(PROVENANCE_KEY)

    @property
    def optimizer_format(self) -> Optional[str]:
        """'fully_reshardable', 'dp_reshardable', 'non_distributed' (model-space state of
        the plain optimizer), another sharding type Megatron recorded, or None (no state)."""
        state = [k for k in self.shapes if k.startswith("optimizer.")]
        sharding = (self.common.get("content_metadata") or {}).get("distrib_optim_sharding_type")
        if sharding:
            return sharding
        if any(DP_RESHARDABLE_KEY.match(k) for k in self.shapes):
            return "dp_reshardable"
        if any(k.startswith("optimizer.state.param.") for k in state):
            return "fully_reshardable"
        if state:  # fp32_param master copies (bf16 runs) or, in fp32, the moments alone
            return "non_distributed"
        return None

    def model_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: s for k, s in self.shapes.items() if not k.startswith("optimizer.")}

    def architecture(self) -> Architecture:
        """From common.pt `args` where present, else from the tensors' global shapes."""
        shapes = self.model_shapes()
        num_layers = keys.decoder_layer_count(shapes)
        if num_layers is None:
            raise GrowthError(f"{self.path}: no decoder.layers.* tensors; not a GPT checkpoint")
        experts = keys.expert_count(shapes)
        args = self.args
        get = (lambda name, default=None: getattr(args, name, default)) if args is not None else (
            lambda name, default=None: default)
        if get("num_layers") not in (None, num_layers):
            raise GrowthError(
                f"{self.path}: common.pt args say num_layers={get('num_layers')} but the tensors "
                f"hold {num_layers} layers; the checkpoint is inconsistent"
            )
        moe_layers = keys.moe_layer_pattern(shapes, num_layers)
        return Architecture(
            num_layers=num_layers,
            num_experts=experts,
            topk=get("moe_router_topk") if experts else None,
            moe_layers=moe_layers,
            mtp_layers=keys.mtp_layer_count(shapes),
            router_num_groups=get("moe_router_num_groups"),
            router_group_topk=get("moe_router_group_topk"),
            score_function=get("moe_router_score_function", "softmax") or "softmax",
            pre_softmax=bool(get("moe_router_pre_softmax", False)),
        )
