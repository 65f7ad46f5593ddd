"""HybridModel checkpoints (megatron-core 0.18+; real HybridModel on CPU over gloo, 2 ranks):
depth growth by blocks of the pattern, width growth of its MoE layers, at load in two target
layouts and offline; the logits kept with alpha = 0 and zero-initialised copies; the grown
pattern for Megatron-LM's pretrain_hybrid.py.

Mamba layers (`M`) run on megatron-core's MambaMixer with `tests/fake_mamba_ssm.py` standing in
for the mamba_ssm kernels (CUDA only): the mapping and the exactness of zero-initialised copies
are checked, not Mamba's own numerics."""

import importlib.util
import json

import pytest
import torch

import ckpt_tools
from megatron_recycle import hybrid
from megatron_recycle.errors import GrowthError
from megatron_recycle.plan import DepthGrowth, GrowthPlan
from scenarios import HYBRID_NOISY, HYBRID_SPECS, HYBRID_TARGETS
from test_offline_tools import cli

pytestmark = pytest.mark.skipif(importlib.util.find_spec("megatron.core.models.hybrid") is None,
                                reason="HybridModel is megatron-core 0.18+")


@pytest.fixture(scope="module")
def grown(ranks, tmp_path_factory):
    out = tmp_path_factory.mktemp("hybrid")
    ranks("hybrid_growth.py", 2, out)
    shards = {(name, layout): ckpt_tools.assemble(torch.load(out / f"{name}-{layout}-rank{r}.pt")
                                                  for r in range(2))
              for name in HYBRID_SPECS for layout in HYBRID_TARGETS}
    return out, shards, json.loads((out / "preservation.json").read_text())


def plan_of(name):
    return GrowthPlan(HYBRID_SPECS[name].architecture(), DepthGrowth(2), HYBRID_NOISY)


def source_key(plan, key):
    """The source key of a target key: the layer index in it mapped back by the plan."""
    parts = key.split(".")
    if key.startswith("decoder.layers."):
        parts[2] = str(plan.layer_map[int(parts[2])])
    return ".".join(parts)


@pytest.mark.parametrize("name", sorted(HYBRID_SPECS))
def test_every_grown_tensor_is_its_source_slice_by_the_plan(grown, name):
    out, shards, _ = grown
    plan = plan_of(name)
    source = ckpt_tools.read_checkpoint(out / name / "iter_0000001")
    tensors = shards[(name, "ep2")]
    experts = torch.tensor([e for e, _ in plan.expert_map()])
    copies = torch.tensor([c > 0 for _, c in plan.expert_map()])
    assert {source_key(plan, k) for k in tensors} == set(source)
    for key, t in tensors.items():
        want = source[source_key(plan, key)]
        if ".experts.experts." in key or key.endswith(".router.weight"):
            want = want[experts]
            assert torch.equal(t[~copies], want[~copies]), f"{key}: originals changed"
            noise = (t[copies] - want[copies]).double()
            assert 0 < noise.abs().max() < 6 * HYBRID_NOISY.noise_alpha * want.double().std(), key
        else:
            assert torch.equal(t, want), f"{key}: not an exact copy of {source_key(plan, key)}"
    if "M" in HYBRID_SPECS[name].hybrid_pattern:
        assert any(".mixer.in_proj.weight" in k for k in tensors) and any(".mixer.A_log" in k for k in tensors)


@pytest.mark.parametrize("name", sorted(HYBRID_SPECS))
def test_grown_weights_are_bitwise_identical_in_both_layouts(grown, name):
    _, shards, _ = grown
    ep2, pp2 = shards[(name, "ep2")], shards[(name, "pp2")]
    assert ep2.keys() == pp2.keys()
    assert all(torch.equal(ep2[k], pp2[k]) for k in ep2)


@pytest.mark.parametrize("name", sorted(HYBRID_SPECS))
def test_alpha_0_and_zero_initialised_copies_keep_the_logits(grown, name):
    _, _, results = grown
    assert results[name] <= 1e-5, f"{name}: relative logit error {results[name]:.3g}"
    assert results[f"{name}/copies_not_zeroed"] > 1e-4  # the comparison sees real changes


def test_offline_growth_inspect_plan_and_verify_read_the_pattern(grown):
    out, shards, _ = grown
    src = out / "mamba"
    s = json.loads(cli("inspect", src, "--json").stdout)
    assert s["architecture"]["hybrid_pattern"] == "M*EM*E"
    r = json.loads(cli("plan", "--load", src, "--grow-depth", "2", "--grow-experts", "2", "--pp", "2",
                       "--json").stdout)
    assert r["hybrid_pattern"] == ["M*EM*E", "MM*E*E|MM*E*E"]
    cli("grow", "--load", src, "--save", out / "mamba-grown", "--grow-depth", "2", "--grow-experts", "2",
        "--grow-noise-alpha", "0.01", "--grow-seed", "7")
    assert "verify: OK" in cli("verify", "--source", src, "--grown", out / "mamba-grown").stdout
    args = ckpt_tools.common_state(out / "mamba-grown")["args"]
    assert (args.hybrid_layer_pattern, args.num_layers, args.num_experts) == ("MM*E*EMM*E*E", 12, 8)
    offline = ckpt_tools.read_checkpoint(out / "mamba-grown" / "iter_0000001")
    at_load = shards[("mamba", "ep2")]
    assert offline.keys() == at_load.keys() and all(torch.equal(offline[k], at_load[k]) for k in offline)


def test_megatron_lm_gets_the_grown_pattern_and_refuses_another(grown):
    from test_megatron_lm import configure

    out, _, _ = grown
    grow = ["--load", str(out / "mamba"), "--grow-depth", "2", "--grow-optimizer", "reset"]
    args, decision = configure([*grow, "--hybrid-layer-pattern", "M*E|M*E", "--pipeline-model-parallel-size", "2"])
    assert args.hybrid_layer_pattern == "MM*E*E|MM*E*E" and args.num_layers == 12
    args, _ = configure([*grow, "--hybrid-layer-pattern", "MM*E|*E|MM*E|*E"])  # the grown one, cut by the user
    assert args.hybrid_layer_pattern == "MM*E|*E|MM*E|*E"
    with pytest.raises(GrowthError, match="--hybrid-layer-pattern 'M\\*E\\*E' is neither"):
        configure([*grow, "--hybrid-layer-pattern", "M*E*E"])
    with pytest.raises(GrowthError, match="run pretrain_hybrid.py with the base run's --hybrid-layer-pattern"):
        configure(grow)
    with pytest.raises(GrowthError, match=f"{hybrid.BLOCKS_FLAG} 'M\\*,EM\\*E' splits the mixer"):
        configure([*grow, "--hybrid-layer-pattern", "M*EM*E", "--grow-hybrid-blocks", "M*,EM*E"])
