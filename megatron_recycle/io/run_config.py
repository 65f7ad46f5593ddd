"""A Megatron-Bridge checkpoint's `run_config.yaml`: the model's architecture where args are absent.

Bridge saves no `args` in the common state; it writes the whole training configuration beside
the weights (`iter_N/run_config.yaml`), whose `model:` section is the model provider's fields
(Megatron-Core `TransformerConfig` names) with `_target_` entries for classes and callables.
It is read with `yaml.safe_load` (plain data: a `_target_` stays a string, no tag builds an
object) and offered under Megatron-LM's argument names, so the rest of the code reads one
description of the model whatever framework saved it.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

from ..errors import CheckpointError

FILE = "run_config.yaml"
# TransformerConfig field → Megatron-LM argument, where the two names differ
_ARG_NAMES = {"num_moe_experts": "num_experts",
              "num_layers_in_first_pipeline_stage": "decoder_first_pipeline_num_layers",
              "num_layers_in_last_pipeline_stage": "decoder_last_pipeline_num_layers"}
_FIELD_NAMES = {arg: field for field, arg in _ARG_NAMES.items()}


def read(checkpoint_dir: Path) -> Optional[dict[str, Any]]:
    """The whole run configuration of an iteration directory, or None where it has none."""
    import yaml

    path = Path(checkpoint_dir) / FILE
    if not path.exists():
        return None
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        detail = " ".join(str(e).split())[:200]
        raise CheckpointError(f"{path}: cannot be read as YAML ({type(e).__name__}: {detail}); "
                              "the checkpoint is corrupt") from None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise CheckpointError(f"{path}: has no 'model:' section; not a Megatron-Bridge run "
                              "configuration (remove the file or restore it from the source)")
    return config


def model_args(config: dict[str, Any]) -> SimpleNamespace:
    """The `model:` section under Megatron-LM's argument names (what `args` would say)."""
    model = dict(config["model"])
    args = dict(model)
    for field, arg in _ARG_NAMES.items():
        if args.get(arg) is None:
            args[arg] = model.get(field)
    heads, groups = model.get("num_attention_heads"), model.get("num_query_groups")
    args["group_query_attention"] = bool(heads and groups and groups < heads)
    args["params_dtype"] = dtype_name(model.get("params_dtype"))
    args["bridge_provider"] = target(model)
    return SimpleNamespace(**args)


def field_name(arg: str) -> str:
    """The model section's name for the Megatron-LM argument `arg`."""
    return _FIELD_NAMES.get(arg, arg)


def target(entry: Any) -> Optional[str]:
    """The dotted name a `_target_` entry names (read as data), or None."""
    return entry.get("_target_") if isinstance(entry, dict) else None


def dtype_name(entry: Any) -> Optional[str]:
    """'float32' for `{_target_: torch.float32}` (how Bridge writes a dtype), else None."""
    name = target(entry)
    return name.rpartition(".")[2] if name and name.startswith("torch.") else None
