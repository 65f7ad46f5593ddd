"""Dense → MoE upcycling in the growth engine (real megatron-core, 2 gloo ranks): exact at
alpha = 0 through megatron-core's forward at two target layouts, composed with depth growth and
with some layers left dense; offline, with the optimizer state, bitwise the load hook's; the
reference loop continues from the same iteration; bad input refused before any read."""

import json

import pytest
import torch

import ckpt_tools
from scenarios import UPCYCLE_CASES, UPCYCLE_LAYOUTS
from test_offline_tools import cli
from test_trust import one_error_line

UPCYCLE = ["--upcycle-experts", "4", "--upcycle-topk", "2"]


@pytest.fixture(scope="module")
def out(ranks, tmp_path_factory):
    out = tmp_path_factory.mktemp("upcycling")
    ranks("upcycling.py", 2, out)
    return out


@pytest.mark.parametrize("layout", sorted(UPCYCLE_LAYOUTS))
@pytest.mark.parametrize("case", sorted(UPCYCLE_CASES))
def test_upcycling_at_alpha_0_keeps_the_logits(out, case, layout):
    results = json.loads((out / "logits.json").read_text())
    assert results[f"{case}/{layout}"] <= 1e-5, results
    assert results["noise_alpha_0.01"] > 1e-4  # the comparison sees real changes


def test_offline_upcycling_loads_in_stock_megatron_core_as_the_hook_grows_it(ranks, out):
    proc = cli("grow", "--load", out / "dense", "--save", out / "moe", *UPCYCLE, "--grow-noise-alpha", "0")
    assert "4 experts" in proc.stderr
    args = ckpt_tools.common_state(out / "moe")["args"]
    assert (args.num_experts, args.moe_router_topk, args.moe_ffn_hidden_size) == (4, 2, 64)
    assert "verify: OK" in cli("verify", "--source", out / "dense", "--grown", out / "moe").stdout
    ranks("upcycling.py", 2, "compare", out / "dense" / "iter_0000001", out / "moe" / "iter_0000001", out)
    counts = json.loads((out / "compare.json").read_text())
    assert set(counts) == set(UPCYCLE_LAYOUTS) and min(counts.values()) > 30, counts


@pytest.mark.parametrize("flags, check", [
    (["--upcycle-experts", "8", "--upcycle-topk", "4", "--upcycle-granularity", "4"],  # 2 copies of 4 slices
     lambda a: a.moe_ffn_hidden_size == 16),
    (["--upcycle-experts", "4", "--upcycle-shared-expert"], lambda a: a.moe_shared_expert_intermediate_size == 64),
    (["--upcycle-experts", "4", "--upcycle-layers", "1,0,1,0", "--grow-depth", "2", "--grow-zero-init-copies"],
     lambda a: a.moe_layer_freq == [1, 1, 0, 0, 1, 1, 0, 0] and a.num_layers == 8),
])
def test_offline_upcycling_variants_verify(out, flags, check):
    dest = out / ("moe-" + "-".join(f.strip("-") for f in flags))
    cli("grow", "--load", out / "dense", "--save", dest, *flags, "--grow-noise-alpha", "0.01")
    assert check(ckpt_tools.common_state(dest)["args"])
    proc = cli("verify", "--source", out / "dense", "--grown", dest)
    assert "verify: OK" in proc.stdout and "noisy copies equal their regenerated noise" in proc.stdout


def test_optimizer_state_is_upcycled_by_the_plan(out):
    cli("grow", "--load", out / "dense-optim", "--save", out / "moe-optim", *UPCYCLE, "--grow-optimizer", "copy")
    assert "verify: OK" in cli("verify", "--source", out / "dense-optim", "--grown", out / "moe-optim").stdout
    grown = ckpt_tools.read_checkpoint(out / "moe-optim" / "iter_0000005")
    dense = ckpt_tools.read_checkpoint(out / "dense-optim" / "iter_0000005")
    moments = grown["optimizer.state.exp_avg.decoder.layers.mlp.experts.experts.linear_fc2.weight"]
    source = dense["optimizer.state.exp_avg.decoder.layers.mlp.linear_fc2.weight"]
    assert all(torch.equal(moments[:, e], source) for e in range(4))  # every expert: the dense moments
    assert not grown["optimizer.state.exp_avg.decoder.layers.mlp.router.weight"].any()
    zero = out / "moe-optim-zero"
    cli("grow", "--load", out / "dense-optim", "--save", zero, *UPCYCLE, "--grow-optimizer", "zero")
    moments = ckpt_tools.read_checkpoint(zero / "iter_0000005")[
        "optimizer.state.exp_avg_sq.decoder.layers.mlp.experts.experts.linear_fc2.weight"]
    assert torch.equal(moments[:, 0], dense["optimizer.state.exp_avg_sq.decoder.layers.mlp.linear_fc2.weight"])
    assert not moments[:, 1:].any()  # copies (experts 1-3 of one slice) start at zero


def test_the_reference_loop_continues_from_the_same_iteration(out):
    base = [json.loads(x) for x in (out / "loop-base.jsonl").read_text().splitlines()]
    upcycled = [json.loads(x) for x in (out / "loop-upcycled.jsonl").read_text().splitlines()]
    assert upcycled[0]["grown_at"] == 3 and upcycled[0]["val_loss"] == base[-1]["val_loss"]
    assert [r["iteration"] for r in upcycled[1:]] == [4, 5]
    assert ckpt_tools.common_state(out / "loop-upcycled")["iteration"] == 5


@pytest.mark.parametrize("flags, fragment", [
    (["--upcycle-experts", "4", "--upcycle-topk", "5"], "--upcycle-topk 5 must be between 1 and"),
    (["--upcycle-experts", "4", "--upcycle-granularity", "3"], "--upcycle-granularity 3 must divide"),
    (["--upcycle-experts", "4", "--upcycle-layers", "1,0"], "--upcycle-layers gives 2 layers"),
    (["--upcycle-topk", "2"], "need --upcycle-experts"),
])
def test_bad_upcycling_options_are_refused_before_any_read(out, tmp_path, flags, fragment):
    one_error_line(cli("grow", "--load", out / "dense", "--save", tmp_path / "x", *flags, check=False), 2, fragment)
    assert not (tmp_path / "x").exists()


def test_an_moe_source_or_an_expert_parallel_size_that_does_not_divide_is_refused(out, offline_sources, tmp_path):
    one_error_line(cli("grow", "--load", offline_sources / "src", "--save", tmp_path / "x", *UPCYCLE,
                       check=False), 2, "needs a dense source")
    one_error_line(cli("plan", "--load", out / "dense", *UPCYCLE, "--ep", "3", check=False), 2,
                   "--expert-model-parallel-size 3 does not divide")
