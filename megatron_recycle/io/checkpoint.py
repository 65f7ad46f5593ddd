"""What a Megatron `torch_dist` checkpoint holds, without loading any tensor.

A checkpoint *root* (`--load`) has `latest_checkpointed_iteration.txt` and `iter_XXXXXXX/`
directories; an iteration directory has `metadata.json` (backend), `.metadata` (global
shapes of every tensor) and the common state (args, iteration, scheduler, optimizer groups):
`common.pt` up to megatron-core 0.18, a `common_state` object inside the `.distcp` files
from 0.19 on (`read_common_state` reads both). Both path forms are accepted wherever
a checkpoint is asked for. Megatron-FSDP's `fsdp_dtensor` checkpoints are presented in the
same terms (`fsdp_dtensor.py`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from .. import compat, consistency, hybrid, indexing
from ..errors import CheckpointError, GrowthError
from ..plan import Architecture
from ..policy import DP_RESHARDABLE_KEY
from ..provenance import Provenance
from . import fsdp_dtensor, run_config
from .reader import SafeFileSystemReader, read_object
from .safe_pickle import torch_load

TRACKER_FILE = "latest_checkpointed_iteration.txt"


def read_common_state(checkpoint_dir: Path) -> dict[str, Any]:
    """The common state of an iteration directory, in either form, unpickled with
    `weights_only=True` and megatron-core's safe globals (args, its enums; `safe_pickle.load`). Content that needs
    unsafe unpickling is refused, never loaded. (megatron-core 0.19's own
    `load_common_state_dict` reads the object form through torch DCP's default planner, which
    unpickles with `weights_only=False`.)"""
    common_file = checkpoint_dir / compat.COMMON_STATE_FILE
    if not common_file.exists():
        stored = SafeFileSystemReader(checkpoint_dir).read_metadata().state_dict_metadata
        if compat.common_state_storage_key() not in stored:
            raise CheckpointError(
                f"{checkpoint_dir}: no common state (neither {compat.COMMON_STATE_FILE} nor a "
                f"{compat.COMMON_STATE_OBJECT!r} object in the .distcp files); the checkpoint is "
                "incomplete: point at another iteration")
        common = read_object(checkpoint_dir, compat.COMMON_STATE_OBJECT)
    else:
        common = torch_load(common_file)
    if not isinstance(common, dict):
        raise CheckpointError(f"{checkpoint_dir}: the common state is a {type(common).__name__}, "
                              "not a dict; the checkpoint is corrupt")
    return common


def iteration_dir(root: Path, iteration: int) -> Path:
    return root / f"iter_{iteration:07d}"


def read_tracker(root: Path, flag: str = "--load") -> Path:
    """The iteration directory the tracker file of `root` names."""
    tracker = root / TRACKER_FILE
    try:
        text = tracker.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{flag} {tracker}: cannot be read ({e})") from None
    if text == "release":
        return root / "release"
    if not text.isdigit():
        raise CheckpointError(
            f"{flag} {tracker}: says {text[:40]!r}, not an iteration number or 'release'; fix it "
            f"to name one of {sorted(d.name for d in root.glob('iter_*'))[-3:]} or pass --ckpt-step")
    return iteration_dir(root, int(text))


def is_checkpoint_root(path: Path) -> bool:
    """A directory Megatron-LM would load: a tracker file naming an existing iteration."""
    try:
        return path.is_dir() and read_tracker(path).is_dir()
    except CheckpointError:
        return False


def resolve(path: str | os.PathLike, step: Optional[int] = None, flag: str = "--load") -> Path:
    """The iteration directory of `path` (a root or an iteration dir), checked to be torch_dist,
    Megatron-FSDP's fsdp_dtensor (`io.fsdp_dtensor`) or legacy torch (`io.legacy_torch`)."""
    from .legacy_torch import is_legacy_iteration

    p = Path(path)
    if not p.exists():
        raise GrowthError(f"{flag} {p}: no such directory")
    if not p.is_dir():
        raise GrowthError(f"{flag} {p}: not a directory; point it at a checkpoint root or an "
                          "iter_XXXXXXX directory")
    if ((p / "metadata.json").exists() or fsdp_dtensor.is_candidate(p) or is_legacy_iteration(p)) \
            and step is None:
        ckpt = p
    elif step is not None:
        ckpt = iteration_dir(p, step)
        if not ckpt.exists():
            have = sorted(d.name for d in p.glob("iter_*"))
            raise GrowthError(f"--ckpt-step {step}: {ckpt} does not exist (have: {have})")
    elif (p / TRACKER_FILE).exists():
        ckpt = read_tracker(p, flag)
        if not ckpt.is_dir():
            raise CheckpointError(f"{flag} {p}: {TRACKER_FILE} names {ckpt.name}, which does not "
                                  "exist; fix the tracker file or pass --ckpt-step")
    else:
        raise GrowthError(
            f"{flag} {p}: neither a checkpoint root (no {TRACKER_FILE}) nor an "
            "iteration directory (no metadata.json); point it at a Megatron checkpoint"
        )
    meta = ckpt / "metadata.json"
    if not meta.exists() and is_legacy_iteration(ckpt):
        return ckpt
    if fsdp_dtensor.open_checkpoint(ckpt, flag) is not None:  # refuses other torch DCP formats
        return ckpt
    if not meta.exists():
        raise GrowthError(
            f"{flag} {ckpt}: no metadata.json, so not a distributed (torch_dist) checkpoint, no "
            "torch DCP .metadata (an fsdp_dtensor one) and no mp_rank_*/model_optim_rng.pt (a "
            "legacy torch one); point it at a Megatron checkpoint"
        )
    try:
        backend = json.loads(meta.read_text()).get("sharded_backend")
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{meta}: garbled ({type(e).__name__}: {e}); the checkpoint is "
                              "corrupt or not a Megatron checkpoint") from None
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
    run_config: Optional[dict[str, Any]] = field(default=None, repr=False)  # Megatron-Bridge's
    # the optimizer state's format where it is not presented as tensors (Megatron-FSDP's)
    stored_optimizer: Optional[str] = None

    @classmethod
    def read(cls, path: str | os.PathLike, step: Optional[int] = None, flag: str = "--load"):
        from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

        ckpt = resolve(path, step, flag)
        fsdp = fsdp_dtensor.open_checkpoint(ckpt, flag)
        if fsdp is not None:
            return cls(path=ckpt, shapes=fsdp.shapes, dtypes=fsdp.dtypes, objects=[], common=fsdp.common,
                       stored_optimizer=fsdp_dtensor.FORMAT if fsdp.has_optimizer else None)
        if cls is CheckpointInfo and not (ckpt / "metadata.json").exists():
            from .legacy_torch import LegacyTorchCheckpoint

            return LegacyTorchCheckpoint.read_iteration(ckpt)
        metadata = SafeFileSystemReader(ckpt).read_metadata()
        shapes, dtypes, objects = {}, {}, []
        for k, md in metadata.state_dict_metadata.items():
            if isinstance(md, TensorStorageMetadata):
                shapes[k] = tuple(md.size)
                dtypes[k] = md.properties.dtype
            elif isinstance(md, BytesStorageMetadata) and not compat.is_common_state_object(k):
                objects.append(k)
        common = read_common_state(ckpt)
        return cls(path=ckpt, shapes=shapes, dtypes=dtypes, objects=objects, common=common,
                   run_config=run_config.read(ckpt))

    @property
    def format(self) -> str:
        """What the checkpoint is on disk: torch_dist, or Megatron-FSDP's fsdp_dtensor (read
        through `io.fsdp_dtensor`); `io.legacy_torch`'s subclass says "torch"."""
        return "torch_dist" if (self.path / "metadata.json").exists() else fsdp_dtensor.FORMAT

    def read_boxes(self, requests: dict) -> dict:
        """`requests` (name → megatron-core ShardedTensor or ShardedObject) read from this
        checkpoint, as `io.reader.read_boxes`."""
        from .reader import read_boxes

        return read_boxes(self.path, requests)

    def metadata_json(self) -> bytes:
        """The `metadata.json` a torch_dist checkpoint of this content carries: its own, or
        megatron-core's for the torch_dist backend."""
        own = self.path / "metadata.json"
        if own.exists():
            return own.read_bytes()
        return json.dumps(compat.torch_dist_metadata()).encode()

    def reading_notes(self) -> list[str]:
        """What of this checkpoint a grown copy does not carry, beyond its optimizer state."""
        return []

    @property
    def args(self):
        return self.common.get("args")

    @property
    def model_args(self):
        """The model's configuration under Megatron-LM's argument names: the common state's
        args, else a Megatron-Bridge checkpoint's run_config.yaml model section, else None."""
        if self.args is not None or self.run_config is None:
            return self.args
        return run_config.model_args(self.run_config)

    @property
    def model_args_source(self) -> str:
        return "the common state's args" if self.args is not None else run_config.FILE

    @property
    def iteration(self) -> Optional[int]:
        return self.common.get("iteration")

    @property
    def provenance(self) -> Optional[Provenance]:
        return Provenance.of(self.common)

    @property
    def optimizer_format(self) -> Optional[str]:
        """'fully_reshardable', 'dp_reshardable', 'non_distributed' (model-space state of
        the plain optimizer), another sharding type Megatron recorded, or None (no state)."""
        if self.stored_optimizer:
            return self.stored_optimizer
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

    def dense_hidden(self) -> Optional[int]:
        """The hidden units of the dense MLPs (`--ffn-hidden-size`), from `linear_fc2`'s columns."""
        return next((s[-1] for k, s in self.model_shapes().items()
                     if k.startswith("decoder.layers.") and k.endswith(".mlp.linear_fc2.weight")), None)

    def model_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: s for k, s in self.shapes.items() if not k.startswith("optimizer.")}

    def architecture(self) -> Architecture:
        """From `model_args` (args or run_config.yaml) where present, else from the tensors'
        global shapes."""
        shapes = self.model_shapes()
        num_layers = indexing.decoder_layer_count(shapes)
        if num_layers is None:
            raise GrowthError(f"{self.path}: no decoder.layers.* tensors; not a GPT or hybrid checkpoint")
        experts = indexing.expert_count(shapes)
        args = self.model_args

        def get(name, default=None):
            return getattr(args, name, default) if args is not None else default

        # every reader of the args (or of run_config.yaml) goes through here
        consistency.check(self.path, shapes, args, "the common state's args" if self.args is not None
                          else f"the model arguments in {run_config.FILE}")
        pattern = self._hybrid_pattern(shapes, get("hybrid_layer_pattern") or get("hybrid_override_pattern"))
        moe_layers = indexing.moe_layer_pattern(shapes, num_layers)
        return Architecture(
            num_layers=num_layers,
            num_experts=experts,
            topk=get("moe_router_topk") if experts else None,
            moe_layers=moe_layers,
            mtp_layers=indexing.mtp_layer_count(shapes),
            router_num_groups=get("moe_router_num_groups"),
            router_group_topk=get("moe_router_group_topk"),
            score_function=get("moe_router_score_function", "softmax") or "softmax",
            pre_softmax=bool(get("moe_router_pre_softmax", False)),
            hybrid_pattern=pattern,
        )

    def _hybrid_pattern(self, shapes, recorded: Optional[str]) -> Optional[str]:
        """A HybridModel's pattern (no `|`), from its args, checked against what its keys spell;
        or spelled from the keys where the args do not record it. None for a GPT model."""
        spelled = indexing.hybrid_symbols(shapes)
        if recorded:
            main, mtp = hybrid.split(recorded)
            if spelled is not None and spelled != main:
                raise CheckpointError(f"{self.path}: {self.model_args_source} gives the hybrid layer "
                                      f"pattern {recorded!r} but the tensors spell {spelled!r}; "
                                      "the checkpoint is inconsistent")
            return main + mtp
        if spelled is None:
            return None
        depths = indexing.mtp_layer_count(shapes)
        inner = "mtp.layers.0.mtp_model_layer."
        mtp = indexing.hybrid_symbols({"decoder." + k[len(inner):]: s for k, s in shapes.items()
                                       if k.startswith(inner + "layers.")}) if depths else None
        return spelled + (f"{hybrid.MTP}{mtp}" * depths if mtp else "")
