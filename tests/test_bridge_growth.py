"""Load-time growth inside Megatron-Bridge: the real megatron-bridge 0.6.2 `pretrain()` on CPU.

A tiny random HF Qwen3-MoE imported with Bridge, a 2-iteration base run, then Bridge's training
entry grows it at load (depth x2 with zero-init copies, experts x2 at alpha 0, top-k x2) into
pipeline parallel 2 on 2 gloo ranks, continues the base run's train state and trains; a requeue
resumes the grown checkpoint plainly. The base run grown offline is resumed by Bridge's own
pretrain(); grown at load into EP2 and PP2 it holds the offline growth's tensors bit for bit.
Needs megatron-bridge (the `.venv-bridge` of
`scripts/setup_venv.sh bridge`); skips elsewhere.
"""

import importlib.util
import json
import math

import pytest
import torch

for needed in ("megatron.bridge", "transformers"):
    if importlib.util.find_spec(needed) is None:
        pytest.skip(f"needs {needed} (bash scripts/setup_venv.sh bridge)", allow_module_level=True)

from megatron_recycle.bridge import GrowthConfig, split_overrides  # noqa: E402
from megatron_recycle.errors import GrowthError  # noqa: E402
from megatron_recycle.plan import Architecture, CopyInit  # noqa: E402
from megatron_recycle.io.checkpoint import CheckpointInfo  # noqa: E402
from megatron_recycle.testing import bridge_cpu  # noqa: E402

bridge_cpu.install()  # Bridge's import chain on CPU, for the in-process tests


@pytest.fixture(scope="module")
def runs(tmp_path_factory, ranks):
    out = tmp_path_factory.mktemp("bridge")
    ranks("bridge_growth.py", 1, "source", out)
    logs = {"grow": ranks("bridge_growth.py", 2, "grow", out)}
    logs["requeue"] = ranks("bridge_growth.py", 2, "requeue", out)
    return out, logs


def record(out, phase):
    return json.loads((out / f"{phase}.json").read_text())


def test_base_run_starts_from_the_hf_model(runs):
    out, _ = runs
    base = record(out, "base")
    assert base["max_logit_diff"] < 1e-5 and base["iterations"] == [1, 2]


def test_grown_at_load_keeps_the_function_and_the_train_state(runs):
    out, logs = runs
    grow = record(out, "grow")
    grows = [line for line in logs["grow"].splitlines() if "megatron-recycle: growing /" in line]
    assert len(grows) == 2  # the EP2 run's (test below), then this one's
    assert all("2 -> 4 layers, 4 -> 8 experts, top-k 2 -> 4" in line for line in grows)
    assert grow["max_logit_diff"] < 1e-5  # zero-init copies, alpha 0, top-k scaled: exact
    assert grow["start_step"] == 2 and grow["consumed_samples"] == 8  # the base run's
    assert grow["iterations"] == [3, 4]


def test_grown_checkpoint_records_the_growth_and_the_grown_run_config(runs):
    out, _ = runs
    info = CheckpointInfo.read(out / "grown", step=4)
    prov = info.provenance
    assert prov.grown_by == "megatron-bridge" and prov.source.iteration == 2
    assert prov.source.load == str((out / "base").resolve()) and prov.optimizer == "grown"
    assert prov.layout["pipeline_model_parallel_size"] == 2
    model = info.run_config["model"]
    assert (model["num_layers"], model["num_moe_experts"], model["moe_router_topk"]) == (4, 8, 4)
    arch = info.architecture()
    assert (arch.num_layers, arch.num_experts, arch.topk) == (4, 8, 4)
    assert info.optimizer_format == "non_distributed"  # the Adam moments, grown and trained on


def test_requeue_resumes_the_grown_checkpoint_without_growing_again(runs):
    out, logs = runs
    requeue = record(out, "requeue")
    assert "already grown from" in logs["requeue"] and "growing /" not in logs["requeue"]
    assert requeue["start_step"] == 4 and requeue["iterations"] == [5, 6]
    assert requeue["max_logit_diff"] > 1e-4  # the trained grown model, not a fresh growth
    info = CheckpointInfo.read(out / "grown")
    assert info.iteration == 6 and info.provenance.source.iteration == 2


def test_offline_grown_checkpoint_resumes_in_bridge_pretrain(runs):
    """The base run grown offline, then continued by Bridge's own pretrain(): the step and
    consumed samples from train_state.pt, the base run's function right after the load, and
    iteration 3's loss that of the same batch on the model grown at load (both are the base
    run's function)."""
    out, _ = runs
    offline, grow = record(out, "offline"), record(out, "grow")
    assert offline["start_step"] == 2 and offline["consumed_samples"] == 8
    assert offline["iterations"] == [3, 4] and offline["max_logit_diff"] < 1e-5
    losses = [step["lm loss"] for step in offline["losses"]]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    assert abs(losses[0] - grow["losses"][0]["lm loss"]) < 1e-5
    info = CheckpointInfo.read(out / "offline-run")
    assert info.iteration == 4 and info.run_config["model"]["num_layers"] == 4


@pytest.mark.parametrize("phase,offline", [("ep2", "offline-noisy"), ("grow", "offline")])
def test_grown_at_load_in_another_layout_equals_offline_growth_bit_for_bit(runs, phase, offline):
    """Grown at load by Bridge into EP2 with noise (ep2), or into PP2 with zero-init copies
    (grow), from the EP1 PP1 base run: every tensor the model holds right after the load is
    the offline growth's of the same options, bit for bit."""
    from ckpt_tools import assemble, read_checkpoint

    out, _ = runs
    assert record(out, "ep2")["expert_parallel"] == 2 and record(out, "ep2")["iterations"] == []
    loaded = assemble([torch.load(out / f"{phase}-rank{r}.pt", weights_only=True) for r in (0, 1)])
    grown = read_checkpoint(CheckpointInfo.read(out / offline).path)
    assert set(loaded) == {k for k in grown if not k.startswith("optimizer.")}
    different = [k for k in loaded if not torch.equal(loaded[k], grown[k])]
    assert not different, different
    fc1 = next(k for k in loaded if "experts" in k and k.endswith("linear_fc1.weight"))
    copies_equal = torch.equal(loaded[fc1][:, 0], loaded[fc1][:, 4])  # expert 4 is 0's copy
    assert copies_equal == (phase == "grow")  # noisy at alpha 0.05, exact at alpha 0


def test_manager_without_growth_configured_is_refused(runs, ranks):
    out, _ = runs
    ranks("bridge_growth.py", 1, "unconfigured", out)
    error = json.loads((out / "unconfigured.json").read_text())["error"]
    assert "no growth is configured" in error and "install(cfg, growth)" in error


def test_mismatched_model_load_fails_loudly():
    import torch

    from megatron_recycle.bridge.manager import strict_model_load

    module = torch.nn.Linear(2, 2)
    with pytest.raises(GrowthError, match="does not match the model.*'bias'"):
        strict_model_load(module, {"weight": torch.zeros(2, 2)}, strict=True)
    strict_model_load(module, {"weight": torch.zeros(2, 2), "bias": torch.zeros(2),
                               "x._extra_state": None}, strict=True)
    with pytest.raises(RuntimeError, match="size mismatch"):
        strict_model_load(module, {"weight": torch.zeros(3, 2), "bias": torch.zeros(2)}, strict=True)


def test_growth_overrides():
    growth, rest = split_overrides(["growth.depth=2", "growth.experts=2", "growth.noise_alpha=0",
                                    "growth.layer_map=[0,0,1]", "train.train_iters=3"])
    assert rest == ["train.train_iters=3"]
    assert (growth.depth, growth.experts, growth.noise_alpha, growth.layer_map) == (2, 2, 0.0, [0, 0, 1])
    with pytest.raises(GrowthError, match="growth.depth=two: expected int"):
        split_overrides(["growth.depth=two"])
    with pytest.raises(GrowthError, match="growth.<field>=<value>"):
        split_overrides(["growth.depht=2"])
    with pytest.raises(GrowthError, match="upcycling is not supported inside Megatron-Bridge; upcycle offline"):
        split_overrides(["growth.upcycle_experts=8"])
    with pytest.raises(GrowthError, match="growth.topk='x': must be one of"):
        GrowthConfig(topk="x").growth()
    assert not GrowthConfig().growth().asked
    assert GrowthConfig(depth=2, experts=2).growth().width.factor == 2
    growth, _ = split_overrides(["growth.experts=2", "growth.weight_multiplier=0.5", "growth.random_router=true",
                                 "growth.zero_expert_bias=true", "growth.init_std=0.01"])
    assert growth.growth().init == CopyInit(weight_multiplier=0.5, random_router=True, zero_expert_bias=True,
                                            init_std=0.01)
    with pytest.raises(GrowthError, match="--grow-reinit-expert-copies is a baseline of expert growth"):
        GrowthConfig(depth=2, reinit_expert_copies=True).growth().plan(Architecture(2, 4, 2))
    growth, _ = split_overrides(["growth.experts=2", "growth.from_second=runs/0005"])  # a path, not YAML's 5
    assert growth.from_second == "runs/0005" and growth.given() == ["growth.experts", "growth.from_second"]
    merge = growth.growth()
    assert merge.second == "runs/0005" and merge.init.from_second
    import dataclasses

    from megatron_recycle.bridge.config import RAW_STRING

    # the raw-string marker, not the field's name, keeps the text as written (YAML: a bool, a list)
    assert [f.name for f in dataclasses.fields(GrowthConfig) if f.metadata.get(RAW_STRING)] == ["from_second"]
    assert split_overrides(["growth.from_second=true"])[0].from_second == "true"
    assert split_overrides(["growth.from_second=[a, b]"])[0].from_second == "[a, b]"
    from megatron_recycle.bridge import decide

    assert decide.configure(None, GrowthConfig()) is None  # no growth configured: Bridge as it is
    with pytest.raises(GrowthError, match=r"growth.noise_alpha, growth.seed change nothing .* give growth.depth"):
        decide.configure(None, GrowthConfig(noise_alpha=0.0, seed=7))  # before the config is touched


def _config(out, save, **checkpoint):
    from megatron_recycle.testing import bridge_training

    bridge_training.install()
    from workers.bridge_growth import provider

    cfg = bridge_training.tiny_config(provider(out), save, train_iters=2, lr=1e-3)
    for name, value in checkpoint.items():
        setattr(cfg.checkpoint, name, value)
    return cfg


def test_pretrained_checkpoint_grows_the_weights_only(runs, tmp_path):
    from megatron_recycle.bridge import decide

    out, _ = runs
    cfg = _config(out, tmp_path / "run", pretrained_checkpoint=str(out / "import"))
    decision = decide.configure(cfg, GrowthConfig(depth=2, experts=2))
    assert decision.grow and decision.weights_only and decision.provenance.optimizer == "dropped"
    assert (cfg.model.num_layers, cfg.model.num_moe_experts, cfg.model.moe_router_topk) == (4, 8, 4)
    assert not cfg.checkpoint.load_rng


def test_refusals_name_the_setting(runs, tmp_path):
    from megatron_recycle.bridge import decide

    out, _ = runs
    cfg = _config(out, out / "grown", load=str(out / "base"))
    with pytest.raises(GrowthError, match="checkpoint.save .* already holds a checkpoint"):
        decide.configure(cfg, GrowthConfig(depth=3))  # other options than the grown one's
    cfg = _config(out, tmp_path / "run", load=str(out / "base"))
    cfg.model.num_layers = 3
    with pytest.raises(GrowthError, match="model.num_layers=3 is neither"):
        decide.configure(cfg, GrowthConfig(depth=2))
    cfg = _config(out, tmp_path / "run", load=None)
    with pytest.raises(GrowthError, match="set checkpoint.load .* or checkpoint.pretrained_checkpoint"):
        decide.configure(cfg, GrowthConfig(depth=2))
    cfg = _config(out, tmp_path / "run", load=str(out / "base"))
    cfg.optimizer.use_distributed_optimizer = True
    with pytest.raises(GrowthError, match="optimizer.use_distributed_optimizer"):
        decide.configure(cfg, GrowthConfig(depth=2))
    for second, what in ((out / "base", "is the source checkpoint itself"), (tmp_path / "none", "no such directory")):
        cfg = _config(out, tmp_path / "run", load=str(out / "base"))
        with pytest.raises(GrowthError, match=f"^growth.from_second .*: {what}"):  # Bridge's key, not the flag
            decide.configure(cfg, GrowthConfig(experts=2, optimizer="reset", from_second=str(second)))
