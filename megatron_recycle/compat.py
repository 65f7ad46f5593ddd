"""Everything that differs between the megatron-core releases we support, in one place.

Supported: megatron-core 0.16.x to 0.19.x and Megatron-LM main (0.20 pre-releases). The rest
of the package is written once against these functions; no other module asks for a version.

- The common state (args, iteration, scheduler, provenance): `common.pt` beside the
  `.distcp` files up to 0.18; from 0.19 on a `common_state` ShardedObject inside them (and
  no common.pt). 0.19+ loads both, 0.16-0.18 only common.pt. We read both forms on any
  release (`io.checkpoint.read_common_state`) and write the form the installed release
  saves, so what we write loads wherever a checkpoint saved here would.
- `TorchDistLoadShardedStrategy.load` takes a third argument from 0.17 on (the async
  strategy): the load hook forwards whatever it is given.
"""

from __future__ import annotations

import functools
import importlib.util
import re
import sys
from pathlib import Path

from packaging.version import Version

from .errors import GrowthError

COMMON_STATE_FILE = "common.pt"
COMMON_STATE_OBJECT = "common_state"  # the ShardedObject key megatron-core 0.19+ saves it under


@functools.lru_cache(maxsize=1)
def megatron_core_version() -> Version:
    """The version of the megatron-core `import megatron.core` gives, read from its
    `package_info.py` without importing it (seconds: its import runs torch.compile)."""
    info = sys.modules.get("megatron.core.package_info")
    spec = None if info is not None else importlib.util.find_spec("megatron.core")
    if spec is not None and spec.submodule_search_locations:
        text = (Path(list(spec.submodule_search_locations)[0]) / "package_info.py").read_text()
        fields = dict(re.findall(r"^(MAJOR|MINOR|PATCH|PRE_RELEASE) = ['\"]?([\w.]*)['\"]?\s*$", text, re.M))
        if {"MAJOR", "MINOR", "PATCH"} <= set(fields):
            return Version(f"{fields['MAJOR']}.{fields['MINOR']}.{fields['PATCH']}{fields.get('PRE_RELEASE', '')}")
    from megatron.core import package_info  # not laid out as we read it: ask it

    return Version(package_info.__version__)


def saves_common_state_object() -> bool:
    """Whether this megatron-core keeps the common state inside the `.distcp` files (and
    so also loads checkpoints that keep it there)."""
    return megatron_core_version().release >= (0, 19)


def check_loadable(info, flag: str = "--load") -> None:
    """Refuse, before anything is built, a checkpoint (`io.checkpoint.CheckpointInfo`) that growth
    at load time cannot read: one not in torch_dist form (a legacy torch or a Megatron-FSDP
    fsdp_dtensor one, which the offline tools read: megatron-core's torch_dist load never opens
    them), or one this megatron-core cannot open (up to 0.18 it needs common.pt, which 0.19+ no
    longer writes)."""
    checkpoint_dir = info.path
    if info.format != "torch_dist":
        what = {"torch": "a legacy torch checkpoint (mp_rank_*/ files)",
                "fsdp_dtensor": "a Megatron-FSDP (fsdp_dtensor) checkpoint"}[info.format]
        raise GrowthError(
            f"{flag} {checkpoint_dir}: {what}, which growth at load time cannot read: grow it "
            "offline with `megatron-recycle grow --load <it> --save <new>`, which writes a "
            "torch_dist checkpoint, and load that")
    if not saves_common_state_object() and not (Path(checkpoint_dir) / COMMON_STATE_FILE).exists():
        raise GrowthError(
            f"{flag} {checkpoint_dir}: saved by megatron-core 0.19 or later (its common state is "
            f"inside the .distcp files, no {COMMON_STATE_FILE}), which megatron-core "
            f"{megatron_core_version()} cannot load; use megatron-core >= 0.19, or grow it "
            "offline here with `megatron-recycle grow`, which writes the form this release loads")


def common_state_storage_key() -> str:
    """The storage key of the common state object: `common_state/shard_0_1`."""
    from .mapping import object_storage_key

    return object_storage_key(COMMON_STATE_OBJECT, (1,), (0,))


def torch_dist_metadata() -> dict:
    """The `metadata.json` megatron-core writes for a torch_dist checkpoint (its
    CheckpointingConfig): up to 0.18 it also names the common state's backend."""
    config = {"sharded_backend": "torch_dist", "sharded_backend_version": 1}
    if not saves_common_state_object():
        config.update(common_backend="torch", common_backend_version=1)
    return config


def is_common_state_object(storage_key: str) -> bool:
    return storage_key.split("/", 1)[0] == COMMON_STATE_OBJECT
