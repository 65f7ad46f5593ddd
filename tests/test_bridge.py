"""Megatron-Bridge checkpoints, with the real megatron-bridge on CPU (`.venv-bridge`).

Tiny random HF MoE models (built from configs, no downloads) are imported with Bridge, grown
offline, checked with `verify`, exported with Bridge's own `export_ckpt`, and compared with the
HF model they came from. Skipped where megatron-bridge is not installed.
"""

import importlib.util
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

for needed in ("megatron.bridge", "transformers"):
    if importlib.util.find_spec(needed) is None:
        pytest.skip(f"needs {needed}: run with .venv-bridge (bash scripts/setup_venv.sh bridge)",
                    allow_module_level=True)

from conftest import REPO  # noqa: E402

from megatron_recycle import cost, inspection, offline, verify  # noqa: E402
from megatron_recycle.errors import GrowthError  # noqa: E402
from megatron_recycle.io import run_config  # noqa: E402
from megatron_recycle.options import Growth  # noqa: E402
from megatron_recycle.plan import DepthGrowth, Upcycling, WidthGrowth  # noqa: E402
from megatron_recycle.testing import bridge_cpu  # noqa: E402

GROWTHS = {
    "width": Growth(width=WidthGrowth(factor=2, noise_alpha=0.0)),
    "depth": Growth(depth=DepthGrowth(factor=2, zero_copy_outputs=True)),
    "both": Growth(depth=DepthGrowth(factor=2, zero_copy_outputs=True),
                   width=WidthGrowth(factor=2, noise_alpha=0.0)),
}


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """family → (HF config, HF model, Bridge checkpoint root), imported once per family."""
    bridge_cpu.install()
    out, made = tmp_path_factory.mktemp("bridge"), {}

    def get(family):
        if family not in made:
            config = bridge_cpu.hf_config(family)
            model = bridge_cpu.hf_model(config)
            hf = bridge_cpu.save_hf(model, out / family / "hf")
            with bridge_cpu.distributed():
                bridge_cpu.import_ckpt(hf, out / family / "megatron")
            made[family] = (config, model, out / family / "megatron")
        return made[family]

    return get


def test_inspect_and_plan_read_run_config(imported):
    """No args in a Bridge checkpoint: top-k, router and attention come from run_config.yaml."""
    _, _, ckpt = imported("qwen3_moe")
    summary = inspection.summarize(ckpt)
    arch = summary["architecture"]
    assert (arch["num_experts"], arch["topk"], arch["score_function"], arch["pre_softmax"]) == (4, 2, "softmax", True)
    assert summary["attention"] == "GQA (2 groups)"
    assert summary["bridge"]["provider"].endswith("GPTModelProvider")
    assert summary["bridge"]["params_dtype"] == "float32"
    assert "Megatron-Bridge run_config" in inspection.table(summary)
    _, _, ckpt_norm = imported("qwen3_moe_norm")
    assert inspection.summarize(ckpt_norm)["architecture"]["pre_softmax"] is False


@pytest.mark.parametrize("family,kind", [("qwen3_moe", "width"), ("qwen3_moe", "depth"),
                                         ("qwen3_moe", "both"), ("qwen3_moe_norm", "both")])
def test_grow_offline_then_export_keeps_hf_logits(imported, tmp_path, family, kind):
    """grow → a Bridge checkpoint Bridge's export_ckpt accepts; the exported HF model computes
    the source HF model's logits (alpha = 0, top-k scaled, zero-init depth copies)."""
    config, model, ckpt = imported(family)
    grown = tmp_path / "grown"
    result = offline.grow(ckpt, grown, GROWTHS[kind], log=lambda s: None)
    report = verify.verify(ckpt, grown)
    assert report.ok, report.summary()

    source_cfg = bridge_cpu.run_config_model(ckpt / "iter_0000000")
    grown_cfg = bridge_cpu.run_config_model(result.iteration_dir)
    changed = {k for k in source_cfg if source_cfg[k] != grown_cfg[k]}
    plan = result.plan
    expect = {"num_layers"} if plan.target_num_layers != plan.source.num_layers else set()
    expect |= {"num_moe_experts", "moe_router_topk"} if plan.target_num_experts != plan.source.num_experts else set()
    assert changed == expect and grown_cfg.keys() == source_cfg.keys()
    assert (grown_cfg["num_layers"], grown_cfg["num_moe_experts"]) == (plan.target_num_layers, plan.target_num_experts)
    for name in ("train_state.pt", "tokenizer/tokenizer.json"):
        assert (result.iteration_dir / name).read_bytes() == (ckpt / "iter_0000000" / name).read_bytes()
    assert (grown / "latest_train_state.pt").read_bytes() == (ckpt / "latest_train_state.pt").read_bytes()

    hf_out = tmp_path / "hf-grown"
    bridge_cpu.export_ckpt(bridge_cpu.grown_hf_config(config, grown_cfg), grown, hf_out)
    exported = bridge_cpu.load_hf(hf_out)
    assert exported.config.num_hidden_layers == plan.target_num_layers
    tokens = bridge_cpu.tokens()
    error = (bridge_cpu.logits(exported, tokens) - bridge_cpu.logits(model, tokens)).abs().max().item()
    print(f"{family} {kind}: max |logit error| {error:.2e}")
    assert error <= 1e-5


def test_verify_catches_a_wrong_run_config(imported, tmp_path):
    _, _, ckpt = imported("qwen3_moe")
    grown = tmp_path / "grown"
    offline.grow(ckpt, grown, GROWTHS["width"], log=lambda s: None)
    path = grown / "iter_0000000" / run_config.FILE
    config = yaml.safe_load(path.read_text())
    config["model"]["moe_router_topk"] = 2  # what the source had
    path.write_text(yaml.safe_dump(config))
    report = verify.verify(ckpt, grown)
    assert any("model.moe_router_topk is 2" in m for m in report.mismatches), report.summary()


def _with_groups(ckpt, dest, groups=2, group_topk=1):
    """A copy of a Bridge checkpoint whose run_config.yaml asks for group-limited routing with a
    sigmoid router (GLM-4.5 / DeepSeek-V3 style)."""
    shutil.copytree(ckpt, dest)
    path = dest / "iter_0000000" / run_config.FILE
    config = yaml.safe_load(path.read_text())
    config["model"].update(moe_router_num_groups=groups, moe_router_group_topk=group_topk,
                           moe_router_score_function="sigmoid", moe_router_pre_softmax=False)
    path.write_text(yaml.safe_dump(config))
    return dest


def test_group_limited_routing_from_run_config(imported, tmp_path):
    """Groups recorded only in run_config.yaml: append placement (which moves copies out of their
    group) is refused naming interleave, before anything is written; interleave grows, and the
    plan says the HF export cannot be exact."""
    _, _, ckpt = imported("qwen3_moe")
    source = _with_groups(ckpt, tmp_path / "grouped")
    grown = tmp_path / "grown"
    arch = inspection.summarize(source)["architecture"]
    assert (arch["router_num_groups"], arch["router_group_topk"], arch["score_function"]) == (2, 1, "sigmoid")
    with pytest.raises(GrowthError, match="interleave"):  # plan, as the load hook and grow plan
        cost.plan_report(source, GROWTHS["width"], cost.Layout(ep=2))
    with pytest.raises(GrowthError, match="interleave"):
        offline.grow(source, grown, GROWTHS["width"], log=lambda s: None)
    assert not grown.exists()
    cli = subprocess.run([sys.executable, "-m", "megatron_recycle.cli", "grow", "--load", str(source),
                          "--save", str(grown), "--grow-experts", "2"],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert cli.returncode == 2 and "interleave" in cli.stderr and "Traceback" not in cli.stderr
    interleave = Growth(width=WidthGrowth(factor=2, noise_alpha=0.0, placement="interleave"))
    result = offline.grow(source, grown, interleave, log=lambda s: None)
    assert any("Hugging Face" in n for n in result.notes), result.notes
    assert verify.verify(source, grown).ok
    assert bridge_cpu.run_config_model(result.iteration_dir)["moe_router_num_groups"] == 2


def test_unsafe_train_state_is_refused(imported, tmp_path):
    _, _, ckpt = imported("qwen3_moe")
    source = tmp_path / "source"
    shutil.copytree(ckpt, source)
    torch.save({"step": torch.tensor(0), "evil": GrowthError("x")}, source / "iter_0000000" / "train_state.pt")
    with pytest.raises(Exception, match="train_state.pt"):
        offline.grow(source, tmp_path / "grown", GROWTHS["width"], log=lambda s: None)
    assert not (tmp_path / "grown").exists()


def test_upcycle_offline_then_export_keeps_dense_logits(imported, tmp_path):
    """Dense -> MoE of a Bridge checkpoint is offline (load-time growth in Bridge refuses it):
    the upcycled checkpoint's run_config.yaml is the MoE's, and Bridge's export_ckpt writes a
    Qwen3-MoE whose logits are the dense model's (alpha = 0: every expert a copy of the MLP)."""
    config, model, ckpt = imported("qwen3")
    grown = tmp_path / "moe"
    upcycle = Growth(width=WidthGrowth(noise_alpha=0.0), upcycle=Upcycling(experts=4, topk=2))
    result = offline.grow(ckpt, grown, upcycle, log=lambda s: None)
    assert verify.verify(ckpt, grown).ok
    assert any("model.moe_ffn_hidden_size=48" in n for n in result.notes), result.notes
    moe = bridge_cpu.run_config_model(result.iteration_dir)
    assert (moe["num_moe_experts"], moe["moe_router_topk"], moe["moe_ffn_hidden_size"]) == (4, 2, 48)
    assert (moe["moe_router_score_function"], moe["moe_router_pre_softmax"]) == ("softmax", False)
    assert bridge_cpu.run_config_model(ckpt / "iter_0000000")["num_moe_experts"] is None
    moe_config = bridge_cpu.hf_config("qwen3_moe_norm", moe_intermediate_size=48)  # top-k renormalised
    bridge_cpu.export_ckpt(moe_config, grown, tmp_path / "hf-moe")
    exported = bridge_cpu.load_hf(tmp_path / "hf-moe")
    tokens = bridge_cpu.tokens()
    error = (bridge_cpu.logits(exported, tokens) - bridge_cpu.logits(model, tokens)).abs().max().item()
    print(f"qwen3 upcycled x4 top-2: max |logit error| {error:.2e}")
    assert error <= 1e-5
