"""What a training job that grows at load time decides, whatever framework runs it.

A job names a source checkpoint and growth options. Before any model exists it decides between
*grow* (load the source through the growth strategy) and *resume* (a checkpoint grown from this
source with these options already exists — a requeued job: load it plainly, never grow twice),
and refuses what cannot work, naming the setting to change. The framework adapters
(`megatron_lm/`, `bridge/`) map their own settings onto these functions. Reads checkpoint
metadata only: no torch.distributed, no tensors.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from . import __version__, merge
from .errors import GrowthError
from .io.checkpoint import CheckpointInfo, is_checkpoint_root, resolve
from .options import Growth
from .plan import Architecture, GrowthPlan
from .policy import load_moment_policy
from .provenance import Provenance, SourceRef


def real_path(path) -> str:
    return os.path.realpath(os.fspath(path))


def has_checkpoint(root) -> bool:
    return bool(root) and is_checkpoint_root(Path(root))


def made(growth: Growth, provenance: Optional[Provenance], source_root: str, step: Optional[int],
         second_flag: str = merge.FLAG) -> bool:
    """Whether `provenance` records this very growth of `source_root` (at `step`), with the
    same second checkpoint (`--grow-from-second`, set with `second_flag`: the iteration it
    names now)."""
    return (provenance is not None and provenance.source.load == source_root
            and (step is None or provenance.source.iteration == step)
            and growth.same_plan(provenance.plan)
            and (growth.second is None or (provenance.second is not None and provenance.second.path
                                           == real_path(resolve(growth.second, None, second_flag)))))


@dataclass
class GrownCheckpoint:
    """A checkpoint that this growth already wrote: the job resumes it plainly."""

    root: str  # the checkpoint root holding it
    info: CheckpointInfo
    provenance: Provenance
    plan: GrowthPlan

    def note(self) -> str:
        return (f"{self.info.path} was already grown from {self.provenance.source.path} with "
                "these options: resuming it, no growth")


def find_grown(request: Growth, roots: Iterable[tuple[str, str]], source_roots: Iterable[str],
               step: Optional[int], second_flag: str = merge.FLAG) -> Optional[GrownCheckpoint]:
    """The first of `roots` ((root, the setting naming it)) holding a checkpoint grown from one
    of `source_roots` with `request`'s options; raises if it is not what its record says.
    `second_flag`: the setting the second checkpoint is given with."""
    sources = [real_path(s) for s in source_roots if s]
    for root, setting in roots:
        if not has_checkpoint(root):
            continue
        info = CheckpointInfo.read(root, flag=setting)
        prov = info.provenance
        if not any(made(request, prov, source, step, second_flag) for source in sources):
            continue
        plan = prov.growth_plan()
        have = info.architecture()
        if (have.num_layers, have.num_experts) != (plan.target.num_layers, plan.target.num_experts):
            raise GrowthError(
                f"{info.path} records growth to {plan.target.num_layers} layers / "
                f"{plan.target.num_experts} experts but holds {have.num_layers} / "
                f"{have.num_experts}; the checkpoint is inconsistent")
        return GrownCheckpoint(str(root), info, prov, plan)
    return None


def plan_growth(request: Growth, source: Architecture) -> GrowthPlan:
    plan = request.plan(source)
    plan.require_growth()
    return plan


def read_second(request: Growth, info: CheckpointInfo, optimizer_loaded: bool,
                flag: str = merge.FLAG) -> Optional[merge.Second]:
    """The second checkpoint of `--grow-from-second` (None without it; `flag`: the setting it is
    given with), pinned and checked against the source `info`: its architecture, and its
    optimizer state where the source's is grown. The load strategy takes it as it is (pinned
    here: what the growth record names is what the load reads)."""
    if request.second is None:
        return None
    second = merge.Second.read(info, request.second, flag)
    if optimizer_loaded:
        merge.check_optimizer(info, second.info, flag)
    return second


def growth_provenance(request: Growth, plan: GrowthPlan, info: CheckpointInfo, source_root: str,
                      grown_by: str, layout: dict, optimizer_loaded: bool,
                      second: Optional[merge.Second] = None) -> Provenance:
    """The record every checkpoint of the growing job carries. `optimizer_loaded`: whether the
    source's optimizer state is grown into the job (else it starts fresh); `second`: the
    checkpoint the expert copies come from (`read_second`)."""
    return Provenance(
        source=SourceRef(real_path(info.path), info.iteration, load=real_path(source_root)),
        plan=plan.describe(),
        optimizer_policy=request.optimizer,
        optimizer="grown" if optimizer_loaded else "dropped",
        grown_by=grown_by,
        version=__version__,
        rewarmup_iters=request.rewarmup_iters,
        layout=layout,
        previous=info.provenance,
        second=None if second is None else merge.reference(second.info),
    )


def growth_notes(info: CheckpointInfo, plan: GrowthPlan) -> list[str]:
    return [f"growing {info.path}: {plan.source.num_layers} -> {plan.target_num_layers} layers, "
            f"{plan.source.num_experts} -> {plan.target_num_experts} experts, top-k "
            f"{plan.source.topk} -> {plan.target_topk}"] + plan.exactness_notes()


def check_optimizer_growth(policy: str, info: CheckpointInfo, distributed_optimizer: bool,
                           source_expert_parallel: int, expert_parallel: int,
                           distributed_setting: str, expert_parallel_setting: str) -> None:
    """Refuse an optimizer-state growth (`copy` / `zero`) the source cannot provide, naming the
    job's settings (`*_setting`) to change."""
    fmt = info.optimizer_format
    load_moment_policy(policy, fmt)  # refuses what cannot be grown, saying why
    if (fmt == "non_distributed") == bool(distributed_optimizer):
        raise GrowthError(
            f"--grow-optimizer {policy}: {info.path} was saved "
            f"{'without' if fmt == 'non_distributed' else 'with'} {distributed_setting} "
            "and this run differs; match it or use --grow-optimizer reset")
    if (source_expert_parallel == 1) != (expert_parallel == 1):  # one optimizer vs dense + expert
        raise GrowthError(
            f"--grow-optimizer {policy}: Megatron's optimizer state cannot move between "
            f"{expert_parallel_setting} 1 and > 1 (source {source_expert_parallel}, now "
            f"{expert_parallel}); use --grow-optimizer reset")
