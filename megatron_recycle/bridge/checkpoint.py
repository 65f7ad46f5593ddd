"""A Megatron-Bridge checkpoint's files beside the weights, for offline growth and `verify`.

Bridge builds the model from `iter_N/run_config.yaml` (its checkpoints have no args), resumes
counters from `iter_N/train_state.pt` and the root's `latest_train_state.pt` (its tracker),
and exports with the tokenizer in `iter_N/tokenizer/`. A grown Bridge checkpoint carries all
of them: the run configuration with exactly the sizes growth changes rewritten (every other
entry, `_target_` ones included, as it was), the training state unchanged (step, consumed
samples, FLOPs); the tokenizer is copied as for any source (`io/iteration_files.py`).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import CheckpointError, GrowthError
from ..io import run_config
from ..io.safe_pickle import forbidden, refusal

TRAIN_STATE = "train_state.pt"
TRACKER = "latest_train_state.pt"
_COUNTERS = ("step", "consumed_train_samples", "floating_point_operations_so_far")


def read_train_state(path: Path) -> dict[str, Any]:
    """Bridge's `TrainState.state_dict()` (a dict of scalar tensors), unpickled with
    `weights_only=True`; anything else is refused."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if forbidden(e):
            raise CheckpointError(f"{path}: {refusal(e)}") from None
        raise CheckpointError(f"{path}: cannot be read ({type(e).__name__}); the checkpoint is "
                              "corrupt") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) and v.numel() == 1
                                               for v in state.values()) or "step" not in state:
        raise CheckpointError(f"{path}: not a Megatron-Bridge training state (a dict of scalar "
                              "tensors with a 'step'); restore it from the source run")
    return state


@dataclass
class BridgeFiles:
    """The companion files of one Bridge iteration directory, and how growth changes them."""

    source: Path  # the iteration directory
    config: dict[str, Any]  # its run_config.yaml
    train_state: Optional[dict[str, Any]]

    @classmethod
    def of(cls, info) -> Optional["BridgeFiles"]:
        """Those of `info` (a CheckpointInfo), read and checked; None if Bridge did not save it."""
        if info.run_config is None:
            return None
        state = info.path / TRAIN_STATE
        return cls(info.path, info.run_config, read_train_state(state) if state.exists() else None)

    def grown_config(self, plan, dense_hidden: Optional[int]) -> dict[str, Any]:
        """run_config.yaml for the grown model: the sizes growth changes, nothing else."""
        from ..offline import grown_model_args

        model = self.config["model"]
        args = run_config.model_args(self.config)
        changes = {run_config.field_name(k): v for k, v in
                   grown_model_args(plan, lambda name: getattr(args, name, None), dense_hidden).items()}
        missing = sorted(k for k in changes if k not in model)
        if missing:
            raise GrowthError(f"{self.source / run_config.FILE}: its model section has no "
                              f"{', '.join(missing)}, which growth must set; re-save the checkpoint "
                              "with this Megatron-Bridge release")
        if model.get("pipeline_model_parallel_layout") and plan.target_num_layers != plan.source.num_layers:
            raise GrowthError(f"{self.source / run_config.FILE}: model.pipeline_model_parallel_layout "
                              "names the source's layers and cannot be grown; set it to null there "
                              "(a copy of the checkpoint) or grow at load time with the new layout")
        return {**self.config, "model": {**model, **changes}}

    def write(self, root: Path, iteration_dir: Path, plan, dense_hidden: Optional[int]) -> list[Path]:
        """Write the grown companion files under `root` (the staging checkpoint root, whose
        `iteration_dir` holds the grown weights). Returns every file written, to be fsynced."""
        import yaml

        written = [iteration_dir / run_config.FILE]
        written[0].write_text(yaml.safe_dump(self.grown_config(plan, dense_hidden)))
        if self.train_state is not None:
            for path in (iteration_dir / TRAIN_STATE, root / TRACKER):
                shutil.copyfile(self.source / TRAIN_STATE, path)  # carried byte for byte
                written.append(path)
        return written

    def mismatches(self, grown, plan, dense_hidden: Optional[int]) -> list[str]:
        """What in the grown checkpoint `grown` (a CheckpointInfo) differs from what growth of
        these files makes."""
        out = []
        if grown.run_config is None:
            return [f"{run_config.FILE}: missing (the source is a Megatron-Bridge checkpoint)"]
        want, have = self.grown_config(plan, dense_hidden), grown.run_config
        for section in sorted(want.keys() | have.keys()):
            if section != "model" and want.get(section) != have.get(section):
                out.append(f"{run_config.FILE}: section {section!r} differs from the source's")
        for key in sorted(want["model"].keys() | have["model"].keys()):
            if want["model"].get(key) != have["model"].get(key):
                out.append(f"{run_config.FILE}: model.{key} is {have['model'].get(key)!r}, "
                           f"the grown model has {want['model'].get(key)!r}")
        if self.train_state is not None:
            for path in (grown.path / TRAIN_STATE, grown.path.parent / TRACKER):
                if not path.exists():
                    out.append(f"{path.name}: missing (the source has {TRAIN_STATE})")
                    continue
                state = read_train_state(path)
                for name in _COUNTERS:
                    if name in self.train_state and not torch.equal(state.get(name), self.train_state[name]):
                        out.append(f"{path.name}: {name} is {state.get(name)}, the source's is "
                                   f"{self.train_state[name]}")
        return out

    def notes(self, plan, dense_hidden: Optional[int]) -> list[str]:
        """What a user resuming the grown checkpoint with Bridge must set: Bridge builds the
        model from the recipe it runs, not from run_config.yaml, and loads no optimizer state
        grown offline from a Bridge checkpoint (it has none that is model-space). An upcycled
        model also needs its experts' size and router (an MoE recipe of the family)."""
        from .. import upcycling

        target = plan.target
        sets = [f"model.num_layers={target.num_layers}"]
        if target.is_moe:
            sets += [f"model.num_moe_experts={target.num_experts}", f"model.moe_router_topk={target.topk}"]
        if target.moe_layer_freq() is not None:
            sets.append(f"model.moe_layer_freq={target.moe_layer_freq()}")
        sets += [f"model.{run_config.field_name(k)}={v}" for k, v in upcycling.model_args(plan, dense_hidden).items()]
        return ["Megatron-Bridge: export_ckpt and load_megatron_model read the grown run_config.yaml; "
                "to continue pretraining, set in the recipe " + " ".join(sets)
                + " and checkpoint.load=<this checkpoint> checkpoint.load_optim=False"]
