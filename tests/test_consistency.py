"""A checkpoint's common-state args must describe its tensors, for every reader; `verify`
checks what a grown checkpoint claims (its args, its iteration directory, its growth record's
maps) instead of trusting it; `inspect` shows every growth a checkpoint went through."""

import argparse
import json
import shutil

import pytest

import ckpt_tools
from megatron_recycle import consistency
from megatron_recycle.errors import CheckpointError
from test_offline_tools import GROW_FLAGS, cli
from test_trust import one_error_line

SRC_ITER = "iter_0000005"


def tampered(src_root, dst_root, **args):
    """A copy of `src_root` whose common-state args say `args` (the tensors unchanged)."""
    if not (dst_root / "latest_checkpointed_iteration.txt").exists():
        def alter(common):
            common["args"] = argparse.Namespace(**{**vars(common["args"]), **args})

        iteration = next(src_root.glob("iter_*"))
        ckpt_tools.resave(iteration, dst_root, alter_common=alter)
    return dst_root


# --- A: one check, every reader -----------------------------------------------------------------
@pytest.mark.parametrize("source, args, fragments", [
    ("src", {"hidden_size": 999}, ["args.hidden_size=999", "embedding.word_embeddings.weight has 32"]),
    ("src", {"moe_router_topk": 8}, ["args.moe_router_topk=8", "4 experts"]),
    ("src", {"num_experts": 8}, ["args.num_experts=8", "hold 4 experts"]),
    ("src", {"num_layers": 6}, ["args.num_layers=6", "hold 4 decoder layers"]),
    ("src", {"moe_ffn_hidden_size": 32}, ["args.moe_ffn_hidden_size=32",
                                          "decoder.layers.mlp.experts.experts.linear_fc2.weight has 16"]),
    ("src", {"moe_shared_expert_intermediate_size": 8},
     ["args.moe_shared_expert_intermediate_size=8", "shared_experts.linear_fc2.weight has 16"]),
    ("src-mixed", {"ffn_hidden_size": 48}, ["args.ffn_hidden_size=48", "mlp.linear_fc2.weight has 64"]),
    ("src", {"num_attention_heads": 8}, ["num_attention_heads=8", "linear_qkv.weight"]),
    ("src", {"kv_channels": 4}, ["kv_channels=4", "linear_qkv.weight"]),
    ("src", {"group_query_attention": True, "num_query_groups": 2}, ["num_query_groups=2", "linear_qkv.weight"]),
    ("src", {"padded_vocab_size": 128}, ["args.padded_vocab_size=128", "has 64"]),
    ("src", {"moe_router_num_groups": 3}, ["args.moe_router_num_groups=3", "does not divide the 4 experts"]),
    ("src", {"moe_router_num_groups": 2, "moe_router_group_topk": 3}, ["args.moe_router_group_topk=3"]),
])
def test_args_that_disagree_with_the_tensors_are_an_inconsistent_checkpoint(
        offline_sources, tmp_path, source, args, fragments):
    from megatron_recycle.io.checkpoint import CheckpointInfo

    bad = tampered(offline_sources / source, tmp_path / "bad", **args)
    with pytest.raises(CheckpointError) as e:
        CheckpointInfo.read(bad).architecture()
    assert "disagree with the tensors" in str(e.value) and "\n" not in str(e.value)
    for fragment in fragments:
        assert fragment in str(e.value)


@pytest.fixture(scope="module")
def inconsistent(offline_sources, tmp_path_factory):
    """The source with top-k 8 for its 4 experts and hidden size 999."""
    out = tmp_path_factory.mktemp("inconsistent")
    return tampered(offline_sources / "src", out / "bad", moe_router_topk=8, hidden_size=999)


def test_every_command_refuses_an_inconsistent_checkpoint(inconsistent, offline_sources, tmp_path):
    for command in (["inspect", inconsistent], ["inspect", inconsistent, "--json"],
                    ["plan", "--load", inconsistent, "--grow-experts", "2"],
                    ["grow", "--load", inconsistent, "--save", tmp_path / "never", "--grow-experts", "2"],
                    ["verify", "--source", inconsistent, "--grown", inconsistent, "--grow-experts", "2"]):
        one_error_line(cli(*command, check=False), 3, "args.moe_router_topk=8",
                       "args.hidden_size=999 but embedding.word_embeddings.weight has 32",
                       "the checkpoint is inconsistent")
    assert not (tmp_path / "never").exists()


def test_the_load_hook_and_the_megatron_lm_adapter_refuse_it(inconsistent, tmp_path):
    from megatron_recycle.load_hook import GrowthLoadStrategy
    from megatron_recycle.plan import DepthGrowth
    from test_megatron_lm import configure

    with pytest.raises(CheckpointError, match="args.moe_router_topk=8"):
        GrowthLoadStrategy(depth=DepthGrowth(2)).plan_for(inconsistent / SRC_ITER)
    with pytest.raises(CheckpointError, match="args.hidden_size=999"):
        configure(["--load", str(inconsistent), "--save", str(tmp_path / "save"), "--grow-depth", "2",
                   "--grow-optimizer", "reset"])


H, HEADS, KV, F = 32, 4, 8, 16


@pytest.mark.parametrize("name, shapes, args", [
    ("no args: nothing to check against", {"embedding.word_embeddings.weight": (64, H)}, None),
    ("GLU: fc1 is twice fc2's columns", {
        "decoder.layers.mlp.experts.experts.linear_fc1.weight": (2, 4, 2 * F, H),
        "decoder.layers.mlp.experts.experts.linear_fc2.weight": (2, 4, H, F),
        "decoder.layers.mlp.router.weight": (2, 4, H)},
     dict(num_layers=2, num_experts=4, moe_ffn_hidden_size=F, hidden_size=H, moe_router_topk=2)),
    ("singleton experts indexed in keys", {
        "decoder.layers.0.mlp.experts.3.linear_fc2.weight": (H, F),
        "decoder.layers.0.mlp.router.weight": (4, H)},
     dict(num_layers=1, num_experts=4, moe_ffn_hidden_size=F, hidden_size=H)),
    ("GQA: 2 query groups", {"decoder.layers.self_attention.linear_qkv.weight": (2, (HEADS + 2 * 2) * KV, H),
                             "decoder.layers.self_attention.linear_proj.weight": (2, H, HEADS * KV)},
     dict(num_layers=2, hidden_size=H, num_attention_heads=HEADS, kv_channels=KV,
          group_query_attention=True, num_query_groups=2)),
    ("MHA: Megatron-LM's num_query_groups default ignored", {
        "decoder.layers.self_attention.linear_qkv.weight": (2, 3 * HEADS * KV, H)},
     dict(hidden_size=H, num_attention_heads=HEADS, kv_channels=KV, group_query_attention=False,
          num_query_groups=1)),
    ("attention output gate", {"decoder.layers.self_attention.linear_qkv.weight": (2, 4 * HEADS * KV, H)},
     dict(hidden_size=H, num_attention_heads=HEADS, kv_channels=KV, attention_output_gate=True)),
    ("MLA: linear_proj takes heads x v_head_dim", {
        "decoder.layers.self_attention.linear_q_down_proj.weight": (2, 16, H),
        "decoder.layers.self_attention.linear_kv_down_proj.weight": (2, 24, H),
        "decoder.layers.self_attention.linear_proj.weight": (2, H, HEADS * 12)},
     dict(hidden_size=H, num_attention_heads=HEADS, kv_channels=KV, multi_latent_attention=True)),
    ("heterogeneous layers set their own sizes", {"decoder.layers.0.mlp.linear_fc2.weight": (H, 48)},
     dict(hidden_size=H, ffn_hidden_size=F, heterogeneous_layers_config_path="layers.json")),
    ("MTP layer and hybrid layers", {
        "decoder.layers.0.mixer.in_proj.weight": (200, H),
        "decoder.layers.1.mlp.experts.experts.linear_fc2.weight": (4, H, F),
        "decoder.layers.1.mlp.router.weight": (4, H),
        "mtp.layers.0.eh_proj.weight": (H, 2 * H),
        "mtp.layers.0.mtp_model_layer.layers.0.self_attention.linear_qkv.weight": (3 * HEADS * KV, H)},
     dict(num_layers=2, num_experts=4, hidden_size=H, moe_ffn_hidden_size=F, num_attention_heads=HEADS,
          kv_channels=KV, hybrid_layer_pattern="ME/*")),
])
def test_valid_layouts_have_no_problems(name, shapes, args):
    assert consistency.problems(shapes, None if args is None else argparse.Namespace(**args)) == [], name


def test_one_problem_per_argument_names_the_tensor():
    shapes = {"decoder.layers.self_attention.linear_qkv.weight": (2, 3 * HEADS * KV, H),
              "decoder.layers.self_attention.linear_proj.weight": (2, H, HEADS * KV),
              "embedding.word_embeddings.weight": (64, H)}
    found = consistency.problems(shapes, argparse.Namespace(hidden_size=48, num_attention_heads=3, kv_channels=KV))
    assert found[0] == ("args.hidden_size=48 but embedding.word_embeddings.weight has 32 "
                        "(shape (64, 32)) (and 2 more tensor(s))")
    assert ("args.num_attention_heads=3 x kv_channels=8 = 24 but decoder.layers.self_attention."
            "linear_proj.weight has 32 (shape (2, 32, 32))") in found, found
    assert any(p.startswith("args.num_attention_heads=3, num_query_groups=3, kv_channels=8 make 72 "
                            "query/key/value rows") for p in found), found


# --- B: verify checks what the grown checkpoint claims -------------------------------------------
@pytest.fixture(scope="module")
def grown(offline_sources, tmp_path_factory):
    """SRC grown once (all in one batch, with --workers 2: capped), and that grown again."""
    out = tmp_path_factory.mktemp("claims")
    src = offline_sources / "src"
    log = cli("grow", "--load", src, "--save", out / "once", *GROW_FLAGS, "--workers", 2,
              "--batch-size-mb", 1000).stderr
    cli("grow", "--load", out / "once", "--save", out / "twice", "--grow-depth", "2",
        "--grow-optimizer", "reset")
    return src, out, log


def test_workers_are_capped_by_the_batches(grown):
    _, _, log = grown
    assert "--workers 2, but this rank has 1 batch(es)" in log and "running 1 process(es)" in log


def test_verify_passes_the_real_growth(grown):
    src, out, _ = grown
    assert "verify: OK" in cli("verify", "--source", src, "--grown", out / "once").stdout


def failed_verify(src, grown, *fragments):
    proc = cli("verify", "--source", src, "--grown", grown, check=False)
    assert proc.returncode == 1 and "verify: FAILED" in proc.stdout, proc.stdout + proc.stderr
    for fragment in fragments:
        assert fragment in proc.stdout, proc.stdout
    return proc.stdout


@pytest.mark.parametrize("name, value, fragment", [
    ("layer_map", [0, 1, 0, 1, 2, 3, 2, 3], "its layer_map says 1 at 1 where its options make 0"),
    ("expert_map", [[0, 0]] * 8, "its expert_map says [0, 0] at 1 where its options make [1, 0]"),
])
def test_a_growth_record_whose_maps_are_not_its_options_fails_and_inspect_flags_it(
        grown, tmp_path, name, value, fragment):
    src, out, _ = grown

    def alter(common):
        common["megatron_recycle"]["plan"][name] = value

    ckpt_tools.resave(out / "once" / SRC_ITER, tmp_path / "fake", alter_common=alter)
    failed_verify(src, tmp_path / "fake", "the growth record disagrees with itself", fragment)
    table = cli("inspect", tmp_path / "fake").stdout
    assert "INCONSISTENT: " + fragment in table, table
    summary = json.loads(cli("inspect", tmp_path / "fake", "--json").stdout)
    assert summary["provenance"]["disagreements"] == [fragment]


@pytest.mark.parametrize("args, fragment", [
    ({"hidden_size": 999}, "args.hidden_size=999 but"),
    ({"moe_ffn_hidden_size": 8}, "args.moe_ffn_hidden_size=8 but"),
])
def test_grown_args_are_checked_against_the_grown_tensors(grown, tmp_path, args, fragment):
    src, out, _ = grown
    failed_verify(src, tampered(out / "once", tmp_path / "fake", **args), "common state: " + fragment)


def test_an_iteration_directory_named_for_another_iteration_fails(grown, tmp_path):
    src, out, _ = grown
    shutil.copytree(out / "once", tmp_path / "renamed")
    (tmp_path / "renamed" / SRC_ITER).rename(tmp_path / "renamed" / "iter_0000007")
    (tmp_path / "renamed" / "latest_checkpointed_iteration.txt").write_text("7")
    failed_verify(src, tmp_path / "renamed",
                  "iter_0000007: the iteration directory's name disagrees with the common state's iteration 5")


# --- D: inspect shows the chain of growths --------------------------------------------------------
def test_inspect_shows_every_growth_of_a_checkpoint_grown_twice(grown):
    src, out, _ = grown
    summary = json.loads(cli("inspect", out / "twice", "--json").stdout)
    last, before = summary["provenance"], summary["provenance"]["previous"]
    assert last["source"].endswith(f"once/{SRC_ITER}") and last["depth"]["factor"] == 2
    assert before["source"].endswith(f"src/{SRC_ITER}") and before["width"]["factor"] == 2
    assert before["previous"] is None and last["disagreements"] == before["disagreements"] == []
    table = cli("inspect", out / "twice").stdout
    assert f"once/{SRC_ITER}" in table and "earlier growth 1: grown from" in table
    assert f"src/{SRC_ITER}" in table.split("earlier growth 1: grown from")[1]
