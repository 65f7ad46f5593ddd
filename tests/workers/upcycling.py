"""Dense → MoE upcycling at load (2 gloo ranks): the logits of each case at two target layouts
with alpha = 0 (and a noisy control), and a dense source with a model-space optimizer state for
the offline tests.

Usage: torchrun --nproc-per-node 2 upcycling.py OUT
       torchrun --nproc-per-node 2 upcycling.py compare SRC_ITER_DIR GROWN_ITER_DIR OUT
The first writes OUT/dense/ (the source, iteration 1), OUT/dense-optim/ (with an Adam state,
iteration 5), OUT/logits.json (case/layout → relative logit error), and trains with the
reference loop: OUT/loop-base (dense, 3 iterations) upcycled into OUT/loop-upcycled (to 5),
metrics in OUT/loop-*.jsonl. `compare` builds the model its common state describes, loads the
grown checkpoint's model plainly and the source through the hook (the plan from its growth
record) at two layouts, and writes OUT/compare.json (layout → tensors compared).
"""

import sys
from pathlib import Path

import _boot

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import pretrain_moe  # noqa: E402
import torch  # noqa: E402

import ckpt_tools  # noqa: E402
from function_preservation import logits
from megatron.core import dist_checkpointing  # noqa: E402

from megatron_recycle.io.checkpoint import CheckpointInfo  # noqa: E402
from megatron_recycle.load_hook import GrowthLoadStrategy  # noqa: E402
from megatron_recycle.plan import GrowthPlan  # noqa: E402
from megatron_recycle.testing import toy  # noqa: E402
from offline_roundtrip import tensors, with_optimizer  # noqa: E402
from resume_scenario import MODEL  # noqa: E402
from scenarios import DENSE, UPCYCLE_CASES, UPCYCLE_EXACT, UPCYCLE_LAYOUTS, UPCYCLE_NOISY  # noqa: E402


def main(out):
    _boot.init()
    source = logits(ckpt_tools.save_source(DENSE, toy.Layout(), f"{out}/dense", seed=3), DENSE)
    results = {}
    for name, (depth, upcycle) in UPCYCLE_CASES.items():
        for layout_name, layout in UPCYCLE_LAYOUTS.items():
            plan = GrowthPlan(DENSE.architecture(), depth, UPCYCLE_EXACT, upcycle)
            grown = logits(ckpt_tools.grow_into(DENSE, plan, layout, f"{out}/dense/iter_0000001"), DENSE)
            results[f"{name}/{layout_name}"] = float((grown - source).abs().max() / source.abs().max())
    noisy = GrowthPlan(DENSE.architecture(), upcycle=UPCYCLE_CASES["every_layer"][1], width=UPCYCLE_NOISY)
    grown = logits(ckpt_tools.grow_into(DENSE, noisy, toy.Layout(ep=2), f"{out}/dense/iter_0000001"), DENSE)
    results["noise_alpha_0.01"] = float((grown - source).abs().max() / source.abs().max())
    _boot.report(f"{out}/logits.json", results, every_rank=False)

    toy.init_parallel(toy.Layout(tp=2))
    chunks = toy.build(DENSE, toy.Layout(tp=2), seed=1)
    state = with_optimizer(chunks, seed=5)
    state.update(args=toy.megatron_args(DENSE, toy.Layout(tp=2)), iteration=5)
    toy.save_checkpoint(f"{out}/dense-optim", 5, state)

    dense = [f if f != "4" or MODEL[i - 1] != "--num-experts" else "0" for i, f in enumerate(MODEL)]
    loop = lambda name, *flags: pretrain_moe.main([*dense, *flags, "--metrics", f"{out}/loop-{name}.jsonl",  # noqa: E731
                                                   "--save", f"{out}/loop-{name}"])
    loop("base", "--train-iters", "3")
    loop("upcycled", "--grow-from", f"{out}/loop-base", "--upcycle-experts", "4", "--upcycle-topk", "2",
         "--grow-noise-alpha", "0", "--train-iters", "5")
    _boot.finish()


def compare(src, grown, out):
    _boot.init()
    info = CheckpointInfo.read(grown)
    plan = info.provenance.growth_plan()
    spec = pretrain_moe.spec_from(info.args)
    counts = {}
    for name, layout in UPCYCLE_LAYOUTS.items():
        toy.init_parallel(layout)
        chunks = toy.build(spec, layout, seed=99)
        plain = tensors(dist_checkpointing.load({"model": toy.sharded_state_dict(chunks)}, grown))
        hooked = tensors(dist_checkpointing.load({"model": toy.sharded_state_dict(chunks)}, src,
                                                 GrowthLoadStrategy(plan)))
        assert plain.keys() == hooked.keys(), plain.keys() ^ hooked.keys()
        for key, t in plain.items():
            assert torch.equal(t, hooked[key]), f"{name}: {key} differs between offline and the hook"
        counts[name] = len(plain)
    _boot.report(f"{out}/compare.json", counts, every_rank=False)
    _boot.finish()


if __name__ == "__main__":
    if sys.argv[1] == "compare":
        compare(*sys.argv[2:5])
    else:
        main(sys.argv[1])
