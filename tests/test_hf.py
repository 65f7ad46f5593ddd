"""Hugging Face MoE checkpoints: tiny random models of each family, built by transformers from
configs (no downloads), grown offline, loaded back with AutoModelForCausalLM.from_pretrained."""

import importlib.util
import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="needs transformers (requirements/common.txt)")
pytest.importorskip("safetensors", reason="needs safetensors")

from safetensors.torch import load_file, save_file  # noqa: E402

from megatron_recycle import cli, ops  # noqa: E402
from megatron_recycle.hf.grow import grow  # noqa: E402
from megatron_recycle.io import hf as hf_io  # noqa: E402
from megatron_recycle.mapping import map_shard  # noqa: E402
from megatron_recycle.options import Growth  # noqa: E402
from megatron_recycle.plan import Architecture, CopyInit, DepthGrowth, GrowthPlan, WidthGrowth  # noqa: E402

COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
MLA = dict(kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)
FAMILIES = {
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, mlp_only_layers=[1],
                      norm_topk_prob=True),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "deepseek_v3": dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, first_k_dense_replace=1,
                        n_shared_experts=1, n_group=2, topk_group=2, norm_topk_prob=True, **MLA),
    "glm4_moe": dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, first_k_dense_replace=1,
                     n_shared_experts=1, n_group=2, topk_group=2, norm_topk_prob=False),
    "deepseek_v2": dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, first_k_dense_replace=1,
                        n_shared_experts=1, topk_method="greedy", **MLA),  # its group_limited_greedy fails in transformers 5.12
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
                    layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
}
GROUPED = {"deepseek_v3", "glm4_moe", "deepseek_v2"}  # group routing: copies stay in their group
TOKENS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))


def build(model_type, path, seed=0, **save):
    """A random tiny model of `model_type` saved with save_pretrained, and its logits."""
    config = transformers.AutoConfig.for_model(model_type, **COMMON, **FAMILIES.get(model_type, {}))
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)  # routers start at zero in some families: random, so routing matters
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.normal_(0, 0.1)
    model.save_pretrained(path, **save)
    (path / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    return logits(model)


def logits(model):
    with torch.no_grad():
        return model(TOKENS).logits


def load_logits(path):
    return logits(transformers.AutoModelForCausalLM.from_pretrained(path).eval())


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {mt: (root / mt, build(mt, root / mt)) for mt in FAMILIES}


def quiet(_):
    pass


def grow_and_check(src, dst, growth):
    grow(src, dst, growth, log=quiet)
    from megatron_recycle.hf.check import verify_grown

    report = verify_grown(src, dst)
    assert report.ok, report.summary()
    return load_logits(dst)


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_width_growth_at_alpha_0_and_zero_init_depth_growth_keep_the_logits(sources, tmp_path, model_type):
    src, want = sources[model_type]
    placement = "interleave" if model_type in GROUPED else "append"
    width = WidthGrowth(factor=2, noise_alpha=0.0, placement=placement)
    got = grow_and_check(src, tmp_path / "w", Growth(width=width))
    assert (got - want).abs().max().item() <= 1e-5
    config = json.loads((tmp_path / "w" / "config.json").read_text())
    assert config["num_experts_per_tok"] == 4
    depth = DepthGrowth(factor=2, zero_copy_outputs=True)
    got = grow_and_check(src, tmp_path / "d", Growth(depth=depth, width=width))
    assert (got - want).abs().max().item() <= 1e-5
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    assert config["num_hidden_layers"] == 6
    if "first_k_dense_replace" in config:
        assert config["first_k_dense_replace"] == 2  # the dense first layer and its copy
    if model_type == "qwen3_moe":
        assert config["mlp_only_layers"] == [2, 3]
    if model_type == "gpt_oss":
        assert config["layer_types"] == ["sliding_attention"] * 2 + ["full_attention"] * 2 + ["sliding_attention"] * 2
    if model_type in ("gpt_oss", "deepseek_v3"):  # noise through the transposed / grouped layouts, verified
        grow_and_check(src, tmp_path / "n", Growth(width=WidthGrowth(factor=2, noise_alpha=0.05, placement=placement)))


@pytest.mark.parametrize("model_type", ["deepseek_v3", "gpt_oss"])
def test_copy_init_options_grow_by_their_definition_and_verify(sources, tmp_path, model_type):
    """Copies x 0.5 (a copied layer: every tensor x 0.5, the original untouched), the expert bias
    zeroed; then the baselines (a random router, expert copies drawn afresh), verified too."""
    src, _ = sources[model_type]
    placement = "interleave" if model_type in GROUPED else "append"
    grow_and_check(src, tmp_path / "m", Growth(depth=DepthGrowth(2), width=WidthGrowth(2, placement=placement),
                                               init=CopyInit(weight_multiplier=0.5, zero_expert_bias=True)))
    grow_and_check(src, tmp_path / "r", Growth(width=WidthGrowth(2, noise_alpha=0.01, placement=placement),
                                               init=CopyInit(random_router=True, reinit_expert_copies=True)))
    source = load_file(src / "model.safetensors")
    grown = load_file(tmp_path / "m" / "model.safetensors")
    layer = "model.layers.1.input_layernorm.weight"
    assert torch.equal(grown[layer.replace(".1.", ".2.")], source[layer])
    assert torch.equal(grown[layer.replace(".1.", ".3.")], source[layer] * 0.5)
    baselines = load_file(tmp_path / "r" / "model.safetensors")
    routers = [t for n, t in baselines.items() if n.endswith((".gate.weight", ".router.weight"))]
    assert routers and all(abs(t.std().item() / 0.02 - 1) < 0.3 for t in routers)
    if model_type == "deepseek_v3":  # the expert bias: zeroed by the option, and by a random router
        biases = [t for c in (grown, baselines) for n, t in c.items() if n.endswith("e_score_correction_bias")]
        assert biases and not any(t.any() for t in biases)
    else:  # a random router's bias starts at zero
        biases = [n for n in baselines if n.endswith("router.bias")]
        assert biases and not any(baselines[n].any() for n in biases)


def test_depth_options_and_noise_on_qwen3_moe(sources, tmp_path):
    """Stack, skips and an explicit map grow as the plan says (verified tensor by tensor);
    noisy copies differ from their source, originals do not."""
    src, want = sources["qwen3_moe"]
    for i, depth in enumerate([DepthGrowth(factor=2, method="stack"), DepthGrowth(factor=3, skip_first=1, skip_last=1),
                               DepthGrowth(layer_map=(0, 1, 1, 2, 0))]):
        grow_and_check(src, tmp_path / f"d{i}", Growth(depth=depth, width=WidthGrowth(factor=2, noise_alpha=0.01)))
    grown = load_file(tmp_path / "d0" / "model.safetensors")
    source = load_file(src / "model.safetensors")
    for name, tensor in source.items():  # stack: layer l + 3 is a copy of l, expert e + 4 of e
        if not name.endswith(".gate.weight"):  # router rows: below
            twin = name.replace("model.layers.0.", "model.layers.3.")
            assert torch.equal(grown[name], tensor) and torch.equal(grown[twin], tensor)
    e0, e4 = "model.layers.0.mlp.experts.0.up_proj.weight", "model.layers.0.mlp.experts.4.up_proj.weight"
    assert torch.equal(grown[e0], source[e0]) and not torch.equal(grown[e4], source[e0])
    router = grown["model.layers.0.mlp.gate.weight"]
    assert torch.equal(router[:4], source["model.layers.0.mlp.gate.weight"]) and router.shape == (8, 32)


def test_noise_is_the_megatron_paths_noise(sources, tmp_path):
    """The same (seed, layer, expert, element) gets the same noise: the Mixtral copies against
    the engine run on Megatron's stacked keys (fc1 = [gate; up], router rows), built from the
    same weights."""
    src, _ = sources["mixtral"]
    grow(src, tmp_path / "g", Growth(depth=DepthGrowth(factor=2), width=WidthGrowth(factor=2, noise_alpha=0.3, seed=5)),
         log=quiet)
    hf, grown = load_file(src / "model.safetensors"), load_file(tmp_path / "g" / "model.safetensors")
    L, E, F, H = 3, 4, 48, 32
    w = lambda layer, e, n: hf[f"model.layers.{layer}.block_sparse_moe.experts.{e}.{n}.weight"]  # noqa: E731
    megatron = {
        "decoder.layers.mlp.experts.experts.linear_fc1.weight": torch.stack(
            [torch.stack([torch.cat([w(la, e, "w1"), w(la, e, "w3")]) for e in range(E)]) for la in range(L)]),
        "decoder.layers.mlp.router.weight": torch.stack([hf[f"model.layers.{la}.block_sparse_moe.gate.weight"]
                                                         for la in range(L)]),
    }
    plan = GrowthPlan(Architecture(num_layers=L, num_experts=E, topk=2), DepthGrowth(factor=2),
                      WidthGrowth(factor=2, noise_alpha=0.3, seed=5))
    shapes = {k: tuple(v.shape) for k, v in megatron.items()}

    def engine(key, global_shape, offset, local_shape, prepend):
        fill = map_shard(plan, shapes, key, global_shape, offset, local_shape, prepend)
        source = megatron[fill.source.key][fill.source.index][ops.box(fill.source.offset, fill.source.shape)].clone()
        unit = lambda b: megatron[b.key][b.index]  # noqa: E731
        out = torch.empty(local_shape)
        ops.fill_shard(out, fill, source, lambda b: ops.sigma(unit(b)), 0.3, 5)
        return out

    for layer, expert in ((3, 6), (0, 5), (4, 1)):
        fc1 = engine("decoder.layers.mlp.experts.experts.linear_fc1.weight", (6, 8, 2 * F, H),
                     (layer, expert, 0, 0), (2 * F, H), 2)
        prefix = f"model.layers.{layer}.block_sparse_moe.experts.{expert}."
        assert torch.equal(grown[prefix + "w1.weight"], fc1[:F]) and torch.equal(grown[prefix + "w3.weight"], fc1[F:])
    router = engine("decoder.layers.mlp.router.weight", (6, 8, H), (3, 0, 0), (8, H), 1)
    assert torch.equal(grown["model.layers.3.block_sparse_moe.gate.weight"], router)
    assert not torch.equal(router[4:], router[:4])


def test_a_sharded_source_with_an_index_grows_into_shards(tmp_path):
    want = build("olmoe", tmp_path / "src", seed=1, max_shard_size="20KB")
    assert (tmp_path / "src" / hf_io.INDEX).is_file()
    code = cli.main(["grow", "--load", str(tmp_path / "src"), "--save", str(tmp_path / "dst"),
                     "--grow-depth", "2", "--grow-zero-init-copies", "--grow-experts", "2",
                     "--grow-noise-alpha", "0", "--batch-size-mb", "0.05"])
    assert code == 0
    index = json.loads((tmp_path / "dst" / hf_io.INDEX).read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert (load_logits(tmp_path / "dst") - want).abs().max().item() <= 1e-5
    assert (tmp_path / "dst" / "tokenizer_config.json").read_text() == '{"model_max_length": 64}'
    assert (tmp_path / "dst" / "generation_config.json").is_file()
    record = json.loads((tmp_path / "dst" / hf_io.RECORD).read_text())
    assert record["family"] == "OLMoE" and record["plan"]["layer_map"] == [0, 0, 1, 1, 2, 2]


def test_verify_catches_an_edit_and_inspect_plan_read_hf(sources, tmp_path, capsys):
    src, _ = sources["deepseek_v3"]
    dst = tmp_path / "dst"
    args = ["--grow-experts", "2", "--grow-expert-placement", "interleave", "--grow-noise-alpha", "0.01"]
    assert cli.main(["grow", "--load", str(src), "--save", str(dst)] + args) == 0
    assert cli.main(["verify", "--source", str(src), "--grown", str(dst)]) == 0
    assert "noisy copies equal their regenerated noise bit for bit" in capsys.readouterr().out
    tensors = load_file(dst / "model.safetensors")
    name = "model.layers.2.mlp.experts.5.down_proj.weight"
    tensors[name][3, 7] += 1e-3
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    assert cli.main(["verify", "--source", str(src), "--grown", str(dst)]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and name in out and "expert 5" in out
    assert cli.main(["inspect", str(dst), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["architecture"]["num_experts"] == 8 and summary["attention"] == "MLA"
    assert summary["layer_pattern"] == "DMM" and summary["provenance"]["family"] == "DeepSeek-V3"
    assert cli.main(["plan", "--load", str(src), "--json"] + args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["experts"] == [4, 8] and report["topk"] == [2, 4]
    assert report["after"]["params"] > report["before"]["params"]


def test_grow_from_second_reads_the_new_experts_from_it_and_verifies(tmp_path, capsys):
    """Checkpoint merging on DeepSeek-V3 (grouped routing, a score-correction bias): experts
    E..2E-1, their router rows and bias from the second, 0..E-1 the first's; verify reads the
    second the record names, catches an edit; a second of another precision is refused."""
    first, second, dst = tmp_path / "first", tmp_path / "second", tmp_path / "dst"
    build("deepseek_v3", first)
    build("deepseek_v3", second, seed=1)
    args = ["--grow-experts", "2", "--grow-expert-placement", "interleave", "--grow-noise-alpha", "0",
            "--grow-from-second", str(second)]
    assert cli.main(["grow", "--load", str(first), "--save", str(dst)] + args) == 0
    a, b, g = (load_file(p / "model.safetensors") for p in (first, second, dst))
    plan = GrowthPlan(Architecture(num_layers=3, num_experts=4, topk=2),
                      width=WidthGrowth(2, placement="interleave"))
    for layer in (1, 2):
        mlp = f"model.layers.{layer}.mlp"
        for target in range(8):
            expert, copy = plan.expert_source(target)
            want = (b if copy else a)[f"{mlp}.experts.{expert}.down_proj.weight"]
            assert torch.equal(g[f"{mlp}.experts.{target}.down_proj.weight"], want), (layer, target)
            for router in ("gate.weight", "gate.e_score_correction_bias"):
                assert torch.equal(g[f"{mlp}.{router}"][target], (b if copy else a)[f"{mlp}.{router}"][expert])
    assert not torch.equal(a["model.layers.1.mlp.gate.weight"], b["model.layers.1.mlp.gate.weight"])
    record = json.loads((dst / hf_io.RECORD).read_text())
    assert record["second"]["path"] == str(second.resolve())
    assert cli.main(["verify", "--source", str(first), "--grown", str(dst)]) == 0
    noisy = [a if a != "0" else "0.01" for a in args]  # noise with the second's sigma, regenerated
    assert cli.main(["grow", "--load", str(first), "--save", str(tmp_path / "noisy")] + noisy) == 0
    assert cli.main(["verify", "--source", str(first), "--grown", str(tmp_path / "noisy")]) == 0
    shutil.copytree(second, tmp_path / "copy")  # the same tensors elsewhere: the record names another
    given = args[:-1] + [str(tmp_path / "copy")]
    capsys.readouterr()
    assert cli.main(["verify", "--source", str(first), "--grown", str(dst)] + given) == 1
    assert "the growth record names the second checkpoint" in capsys.readouterr().out
    name = "model.layers.2.mlp.experts.5.down_proj.weight"
    g[name][3, 7] += 1e-3
    save_file(g, dst / "model.safetensors", metadata={"format": "pt"})
    assert cli.main(["verify", "--source", str(first), "--grown", str(dst)]) == 1
    assert name in capsys.readouterr().out
    other = load_file(second / "model.safetensors")
    other["model.norm.weight"] = other["model.norm.weight"].half()
    save_file(other, second / "model.safetensors", metadata={"format": "pt"})
    assert cli.main(["grow", "--load", str(first), "--save", str(tmp_path / "never")] + args) == 2
    err = capsys.readouterr().err
    assert "--grow-from-second" in err and "'model.norm.weight'" in err and "precision" in err, err
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("dense,flags", [
    ("qwen3", ["--upcycle-experts", "4", "--upcycle-topk", "2", "--upcycle-granularity", "2",
               "--upcycle-layers", "1,0,1", "--grow-depth", "2", "--grow-zero-init-copies"]),
    ("mistral", ["--upcycle-experts", "4", "--upcycle-topk", "2"]),
])
def test_dense_upcycled_into_moe_keeps_the_logits(tmp_path, dense, flags):
    want = build(dense, tmp_path / "src")
    assert cli.main(["grow", "--load", str(tmp_path / "src"), "--save", str(tmp_path / "dst"),
                     "--grow-noise-alpha", "0"] + flags) == 0
    assert cli.main(["verify", "--source", str(tmp_path / "src"), "--grown", str(tmp_path / "dst")]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dst").eval()
    assert model.config.model_type == {"qwen3": "qwen3_moe", "mistral": "mixtral"}[dense]
    assert (logits(model) - want).abs().max().item() <= 1e-5


def test_refusals_name_what_to_do(sources, tmp_path, capsys):
    src, _ = sources["deepseek_v3"]
    dst = str(tmp_path / "dst")
    assert cli.main(["grow", "--load", str(src), "--save", dst, "--grow-depth", "2",
                     "--grow-depth-method", "stack"]) == 2
    assert "--grow-skip-first 1" in capsys.readouterr().err
    assert cli.main(["grow", "--load", str(src), "--save", dst, "--grow-experts", "2"]) == 2
    assert "--grow-expert-placement interleave" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"model_type": "qwen2_moe", "num_hidden_layers": 2}')
    save_file({"x": torch.zeros(1)}, tmp_path / "other" / "model.safetensors")
    assert cli.main(["inspect", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert "qwen2_moe" in err and "Qwen2-MoE" in err and "DeepSeek-V3" in err and err.count("\n") == 1
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text('{"model_type": "mixtral"}')
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"\x80\x04payload")
    assert cli.main(["grow", "--load", str(tmp_path / "pickled"), "--save", dst, "--grow-experts", "2"]) == 3
    assert "pytorch_model.bin" in capsys.readouterr().err
    assert not (tmp_path / "dst").exists()
    good = tmp_path / "good"
    assert cli.main(["grow", "--load", str(src), "--save", str(good)]) == 2  # a copy is not growth
    assert "the --grow-* options change nothing" in capsys.readouterr().err and not good.exists()
    assert cli.main(["grow", "--load", str(src), "--save", str(good), "--grow-layer-map", "0,1,2,2"]) == 0
    before = sorted(p.name for p in good.iterdir())
    assert cli.main(["grow", "--load", str(src), "--save", str(good), "--grow-depth", "2"]) == 2  # exists, no --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main(["grow", "--load", str(src), "--save", str(good), "--overwrite", "--grow-depth", "2"]) == 0
    assert sorted(p.name for p in good.iterdir()) == before
    assert json.loads((good / "config.json").read_text())["num_hidden_layers"] == 6


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is not None,
                    reason="lm-eval is installed here: tests/test_hf_eval.py runs eval")
def test_eval_without_lm_eval_says_what_to_install(tmp_path, capsys):
    assert cli.main(["eval", "--load", str(tmp_path), "--tasks", "hellaswag"]) == 2
    err = capsys.readouterr().err
    assert "lm-eval" in err and "pip install 'megatron-recycle[eval]'" in err, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
