"""Helpers shared by the test workers (inside torchrun) and the tests (outside)."""

from __future__ import annotations

import re

import torch


def local_shards(sharded_state_dict) -> list[tuple[str, tuple, tuple, torch.Tensor]]:
    """This rank's main-replica shards as (key, global_shape, global_offset, tensor)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    apply_factories(sharded_state_dict)
    out = []
    for sh in nested_values(sharded_state_dict):
        if isinstance(sh, ShardedTensor) and not any(
            r != 0 for r in (sh.replica_id if isinstance(sh.replica_id, tuple) else (sh.replica_id,))
        ):
            out.append((sh.key, tuple(sh.global_shape), tuple(sh.global_offset),
                        sh.data.detach().clone().reshape(sh.local_shape)))
    return out


def assemble(shard_lists) -> dict[str, torch.Tensor]:
    """Global tensors from the shards of every rank; each element must be written once."""
    full, seen = {}, {}
    for shards in shard_lists:
        for key, shape, offset, t in shards:
            if key not in full:
                full[key] = torch.zeros(shape, dtype=t.dtype)
                seen[key] = torch.zeros(shape, dtype=torch.int32)
            idx = tuple(slice(o, o + s) for o, s in zip(offset, (1,) * (len(shape) - t.dim()) + tuple(t.shape)))
            full[key][idx] = t.reshape(full[key][idx].shape)
            seen[key][idx] += 1
    for key, count in seen.items():
        assert bool((count == 1).all()), f"{key}: shards overlap or leave holes"
    return full


def read_checkpoint(path) -> dict[str, torch.Tensor]:
    """All tensors of a torch_dist checkpoint directory, loaded whole in this process."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    reader = FileSystemReader(str(path))
    md = reader.read_metadata()
    sd = {k: torch.empty(m.size, dtype=m.properties.dtype)
          for k, m in md.state_dict_metadata.items() if isinstance(m, TensorStorageMetadata)}
    _load_state_dict(sd, reader, no_dist=True)
    return sd


def save_source(spec, layout, root, iteration=1, seed=1, like=None, **common):
    """Build `spec` at `layout` (weights from the checkpoint `like`, if given) and save it,
    with `common` added to its common state."""
    from megatron.core import dist_checkpointing

    from megatron_recycle.testing import toy

    toy.init_parallel(layout)
    chunks = toy.build(spec, layout, seed=seed)
    if like is not None:
        state = dist_checkpointing.load({"model": toy.sharded_state_dict(chunks)}, str(like))
        toy.load_state(chunks, state["model"])
    toy.save_checkpoint(root, iteration, {
        "model": toy.sharded_state_dict(chunks),
        "args": toy.megatron_args(spec, layout),
        "iteration": iteration,
        **common,
    })
    return chunks


def grow_into(spec, plan, layout, source_dir, seed=99, fully_parallel=False, strategy=None):
    """Build the grown model at `layout` and load `source_dir` into it through the hook."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    from megatron_recycle.testing import toy
    from megatron_recycle.load_hook import GrowthLoadStrategy

    toy.init_parallel(layout)
    chunks = toy.build(spec.grown(plan), layout, seed=seed)
    strategy = strategy or GrowthLoadStrategy(plan)
    if fully_parallel:
        from megatron.core.dist_checkpointing.strategies.fully_parallel import (
            FullyParallelLoadStrategyWrapper,
        )

        strategy = FullyParallelLoadStrategyWrapper(
            strategy, ps.get_data_parallel_group(with_context_parallel=True))
    from megatron_recycle.testing import cpu

    with cpu.cuda_to_cpu():  # the fully parallel exchange moves shards with .cuda()
        state = dist_checkpointing.load({"model": toy.sharded_state_dict(chunks)}, str(source_dir),
                                        strategy)
    toy.load_state(chunks, state["model"])
    return chunks


_OPTIMIZER_PREFIX = re.compile(r"^optimizer\.state\.([a-z_0-9]+)\.")


def model_key(key: str) -> str:
    """The model tensor an optimizer state key belongs to (the key itself for a model key)."""
    return _OPTIMIZER_PREFIX.sub("", key)


def optimizer_state_kind(key: str) -> str:
    """`exp_avg`, `exp_avg_sq`, `fp32_param`, … for an optimizer state key; `model` otherwise."""
    match = _OPTIMIZER_PREFIX.match(key)
    return match[1] if match else "model"


def indexed_by_expert(key: str) -> bool:
    return ".experts.experts." in key or key.endswith((".router.weight", ".router.expert_bias"))


def by_plan(plan, key: str, source: torch.Tensor) -> torch.Tensor:
    """The plan, written out independently of the hook: the stacked source tensor indexed by
    the layer map and (where experts index it) the expert map; no noise."""
    if not model_key(key).startswith("decoder.layers."):
        return source
    out = source[torch.tensor(plan.layer_map)]
    if indexed_by_expert(key):
        out = out[:, torch.tensor([e for e, _ in plan.expert_map()])]
    return out


def tree_digest(root) -> str:
    """One hash over every file name and byte under `root` (to prove a checkpoint unchanged)."""
    import hashlib
    from pathlib import Path

    h = hashlib.sha256()
    for p in sorted(Path(root).rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def common_state(path):
    """The common state of a checkpoint (root or iteration directory), in either form."""
    from megatron_recycle.io.checkpoint import CheckpointInfo

    return CheckpointInfo.read(path).common


def scheduler(max_lr=3e-4, **overrides):
    """A Megatron `OptimizerParamScheduler` as Megatron-LM builds it while growing (constant
    LR, the run's own settings override the checkpoint's)."""
    import torch
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    settings = dict(init_lr=0.0, max_lr=max_lr, min_lr=max_lr, lr_warmup_steps=0,
                    lr_decay_steps=1000, lr_decay_style="constant", start_wd=0.0, end_wd=0.0,
                    wd_incr_steps=1000, wd_incr_style="constant", override_opt_param_scheduler=True,
                    use_checkpoint_opt_param_scheduler=False)
    return OptimizerParamScheduler(opt, **{**settings, **overrides})


def resave(src_iteration, dst_root, alter_tensors=None, alter_common=None, common_form=None,
           extra_objects=None):
    """Copy a checkpoint iteration into a new root `dst_root`, tensors and common state passed
    through `alter_*` first (each changes its dict in place): the same objects (plus
    `extra_objects`, storage key → value), the same tracker, the common state in the source's
    form or `common_form` ("file": common.pt, "object": megatron-core 0.19's). For tests that a
    check catches an alteration, or refuses what it must not load."""
    import shutil
    from pathlib import Path

    from torch.distributed.checkpoint import DefaultSavePlanner, save

    from megatron_recycle import compat
    from megatron_recycle.io.checkpoint import CheckpointInfo
    from megatron_recycle.io.reader import read_object
    from megatron_recycle.manifest import ObjectRef

    src_iteration, dst_root = Path(src_iteration), Path(dst_root)
    info = CheckpointInfo.read(src_iteration)
    state = read_checkpoint(src_iteration)
    if alter_tensors:
        alter_tensors(state)
    common = dict(info.common)
    if alter_common:
        alter_common(common)

    # Objects as megatron-core stores them: a one-element list, which torch DCP pickles.
    for storage_key in info.objects:
        ref = ObjectRef.parse(storage_key)
        state[storage_key] = [read_object(src_iteration, ref.key, ref.global_shape, ref.offset)]
    state.update({key: [value] for key, value in (extra_objects or {}).items()})
    dst = dst_root / src_iteration.name
    legacy = (src_iteration / compat.COMMON_STATE_FILE).exists() if common_form is None else common_form == "file"
    if not legacy:
        state[compat.common_state_storage_key()] = [common]
    save(state, checkpoint_id=str(dst), no_dist=True, planner=DefaultSavePlanner(flatten_state_dict=False))
    if legacy:
        torch.save(common, dst / compat.COMMON_STATE_FILE)
    shutil.copy(src_iteration / "metadata.json", dst / "metadata.json")
    (dst_root / "latest_checkpointed_iteration.txt").write_text(str(info.iteration))
    return dst
