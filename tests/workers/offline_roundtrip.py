"""Source checkpoints for the offline tools, and the check that plain megatron-core loads an
offline-grown checkpoint to exactly what the load hook gives.

Usage: torchrun --nproc-per-node 2 offline_roundtrip.py source OUT
       torchrun --nproc-per-node 2 offline_roundtrip.py source-listed OUT
       torchrun --nproc-per-node 2 offline_roundtrip.py source-no-extra-state OUT
       torchrun --nproc-per-node 2 offline_roundtrip.py compare SRC_ITER_DIR GROWN_ITER_DIR OUT [plain] [listed] [no-extra-state]
                [copy-init] [second=SECOND_ITER_DIR]
`source` writes OUT/src (scenarios.SPEC at TP2, with a model-space optimizer state) and
OUT/src-mixed (a mixed dense/MoE model whose layers are indexed in the keys); `source-listed`
writes OUT/src-listed (offline_specs.LISTED at EP2 with a model-space optimizer state: all-MoE,
layers indexed in the keys); `source-no-extra-state` writes OUT/src-no-extra-state: OUT/src's
model saved without its `_extra_state` objects, as Megatron-LM's
`--ckpt-drop-redundant-extra-state` saves them.
`compare` loads the grown checkpoint with plain `dist_checkpointing.load` at several layouts,
loads the source through the hook at the same layouts (unless `plain`: where this
megatron-core cannot open the source), and writes OUT/compare.json; `listed`: the models are
LISTED and LISTED_PLAN instead of scenarios.SPEC and PLAN; `no-extra-state`: both loads ask
for no `_extra_state` (as that flag makes Megatron-LM's load ask); `copy-init`: the plan is
COPY_INIT_PLAN; `second=DIR`: SECOND_PLAN, the hook reading the expert copies from DIR.
"""

import dataclasses
import sys

import _boot

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace, nested_values
from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedObject, ShardedTensor
from megatron.core.transformer.enums import AttnBackend

import ckpt_tools
from megatron_recycle.testing import toy
from megatron_recycle.load_hook import GrowthLoadStrategy
from megatron_recycle.plan import DepthGrowth, GrowthPlan, WidthGrowth
from offline_specs import LISTED, MIXED
from scenarios import COPY_INIT_PLAN, PLAN, SECOND_PLAN, SPEC

LAYOUTS = {"ep2": toy.Layout(ep=2), "tp2": toy.Layout(tp=2), "pp2": toy.Layout(pp=2)}
# what test_offline_tools' GROW_FLAGS make of LISTED
LISTED_PLAN = GrowthPlan(LISTED.architecture(), DepthGrowth(2), WidthGrowth(2, noise_alpha=0.01, seed=7))


def with_optimizer(chunks, seed):
    """The model's sharded state dict plus an Adam state in model space (Megatron-LM's
    `fully_reshardable` keys): fp32 master params and moments with the weights' shapes."""
    model = toy.sharded_state_dict(chunks)
    gen = torch.Generator().manual_seed(seed + torch.distributed.get_rank())
    optimizer = {}
    for i, sh in enumerate(nested_values(model)):
        if not isinstance(sh, ShardedTensor):
            continue  # GLU factories: left out of the synthetic optimizer state
        for name in ("param", "exp_avg", "exp_avg_sq"):
            data = sh.data.detach().clone() if name == "param" else torch.rand(
                sh.data.shape, generator=gen, dtype=sh.data.dtype)
            optimizer[f"{name}.{i}"] = dataclasses.replace(
                sh, key=f"optimizer.state.{name}.{sh.key}", data=data)
    return {"model": model, "optimizer": optimizer}


def without_extra_state(state):
    """`_extra_state` objects made local, as `--ckpt-drop-redundant-extra-state` does (for
    extra state with no FP8 delayed scaling): megatron-core's save then drops them, and a load
    fills them from the model instead of asking the checkpoint."""
    def localize(value):
        if isinstance(value, ShardedObject) and value.key.endswith("_extra_state"):
            return LocalNonpersistentObject(value.data)
        return value

    dict_list_map_inplace(localize, state)
    return state


def save_sources(out, extra_state=True):
    toy.init_parallel(toy.Layout(tp=2))
    chunks = toy.build(SPEC, toy.Layout(tp=2), seed=1)
    state = with_optimizer(chunks, seed=5)
    # an enum in the args, as Megatron-LM's (--attention-backend): read and written back as itself
    state.update(args=toy.megatron_args(SPEC, toy.Layout(tp=2), attention_backend=AttnBackend.auto),
                 iteration=5)
    if not extra_state:
        toy.save_checkpoint(f"{out}/src-no-extra-state", 5, without_extra_state(state))
        return
    toy.save_checkpoint(f"{out}/src", 5, state)

    ckpt_tools.save_source(MIXED, toy.Layout(ep=2), f"{out}/src-mixed", iteration=3, seed=2)


def save_listed_source(out):
    layout = toy.Layout(ep=2)
    toy.init_parallel(layout)
    state = with_optimizer(toy.build(LISTED, layout, seed=3), seed=6)
    state.update(args=toy.megatron_args(LISTED, layout), iteration=3)
    toy.save_checkpoint(f"{out}/src-listed", 3, state)


def tensors(state):
    return {k: v for k, v in _flatten(state) if isinstance(v, torch.Tensor)}


def _flatten(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}/")
        else:
            yield f"{prefix}{k}", v


def compare(src, grown, out, plain_only=False, spec=SPEC, plan=PLAN, extra_state=True, second=None):
    rank, _ = _boot.init()
    counts = {}

    def request(chunks):
        state = with_optimizer(chunks, seed=0)
        return state if extra_state else without_extra_state(state)

    for name, layout in LAYOUTS.items():
        toy.init_parallel(layout)
        chunks = toy.build(spec.grown(plan), layout, seed=99)
        plain = tensors(dist_checkpointing.load(request(chunks), grown))
        counts[name] = len(plain)
        if plain_only:
            continue
        hooked = dist_checkpointing.load(request(chunks), src, GrowthLoadStrategy(plan, second=second))
        hooked = tensors(hooked)
        assert plain.keys() == hooked.keys(), (name, plain.keys() ^ hooked.keys())
        for key, t in plain.items():
            assert t.dtype == hooked[key].dtype and torch.equal(t, hooked[key]), (
                f"{name}: {key} differs between the offline-grown checkpoint and the load hook")
    _boot.report(f"{out}/compare.json", counts, every_rank=False)
    _boot.finish()


if __name__ == "__main__":
    if sys.argv[1] == "source":
        _boot.init()
        save_sources(sys.argv[2])
        _boot.finish()
    elif sys.argv[1] == "source-no-extra-state":
        _boot.init()
        save_sources(sys.argv[2], extra_state=False)
        _boot.finish()
    elif sys.argv[1] == "source-listed":
        _boot.init()
        save_listed_source(sys.argv[2])
        _boot.finish()
    else:
        models = {"spec": LISTED, "plan": LISTED_PLAN} if "listed" in sys.argv[5:] else {}
        if "copy-init" in sys.argv[5:]:
            models = {"plan": COPY_INIT_PLAN}
        second = [a.partition("=")[2] for a in sys.argv[5:] if a.startswith("second=")]
        if second:
            models = {"plan": SECOND_PLAN, "second": second[0]}
        compare(*sys.argv[2:5], plain_only="plain" in sys.argv[5:],
                extra_state="no-extra-state" not in sys.argv[5:], **models)
