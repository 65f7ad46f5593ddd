"""The stock Megatron-LM `pretrain_gpt.py` through the launcher, on CPU/gloo with mock data:
a base run, a grown run in another layout (EP2), and the same grown command requeued.

Needs a Megatron-LM checkout named by MEGATRON_LM_PATH (CI cannot fetch it; measured with
core_v0.16.1, core_v0.19.0 and main d98e8a64dd), its Python deps (six, regex, yaml, pydantic,
triton), pybind11 for its dataset helpers, and Python >= 3.12 for checkouts from core_v0.18 on
(their training code imports `typing.override`); skipped otherwise, saying which.
"""

import importlib.util
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

import ckpt_tools
from conftest import REPO, TESTS, _free_port
from megatron_recycle.io.checkpoint import CheckpointInfo

MEGATRON_LM = os.environ.get("MEGATRON_LM_PATH")
MISSING = [m for m in ("six", "regex", "yaml", "pydantic", "triton", "pybind11")
           if importlib.util.find_spec(m) is None]


def _needs_python_312() -> bool:
    """Megatron-LM from core_v0.18 on imports typing.override (Python 3.12) in its training code."""
    if sys.version_info >= (3, 12) or not MEGATRON_LM:
        return False
    config = Path(MEGATRON_LM) / "megatron" / "training"
    return any("override" in line and "from typing import" in line
               for f in config.rglob("*.py") for line in f.read_text(errors="ignore").splitlines())


pytestmark = [
    pytest.mark.skipif(not MEGATRON_LM, reason="MEGATRON_LM_PATH (a Megatron-LM checkout) is not set"),
    pytest.mark.skipif(bool(MISSING), reason=f"Megatron-LM needs the Python packages {MISSING}"),
    pytest.mark.skipif(_needs_python_312(), reason=f"this Megatron-LM checkout needs Python >= 3.12 "
                                                   f"(typing.override); running {sys.version.split()[0]}"),
]
EXT = sysconfig.get_config_var("EXT_SUFFIX")
TINY = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --ffn-hidden-size 64 "
        "--seq-length 16 --max-position-embeddings 16 --micro-batch-size 2 --min-lr 0 "
        "--lr-decay-style constant --mock-data --tokenizer-type NullTokenizer --vocab-size 64 "
        "--num-experts 4 --moe-router-topk 2 --moe-ffn-hidden-size 16 "
        "--moe-token-dispatcher-type allgather --moe-aux-loss-coeff 0 "
        "--no-bias-gelu-fusion --no-bias-dropout-fusion --no-bias-swiglu-fusion "
        "--normalization RMSNorm --position-embedding-type rope --swiglu "
        "--disable-bias-linear --use-cpu-initialization --eval-iters 0 --eval-interval 1000 "
        "--log-interval 1 --ckpt-format torch_dist").split()


@pytest.fixture(scope="module")
def megatron_lm():
    """The checkout, with its dataset helpers built for this interpreter (Megatron-LM would
    run `make` with whatever `python3` is first on PATH)."""
    root = Path(MEGATRON_LM)
    datasets = root / "megatron" / "core" / "datasets"
    includes = subprocess.run([sys.executable, "-m", "pybind11", "--includes"], check=True,
                              capture_output=True, text=True).stdout.strip()
    subprocess.run(["make", "-C", str(datasets), f"LIBEXT={EXT}", f"CPPFLAGS={includes}"],
                   check=True, capture_output=True)
    return root


def launch(megatron_lm, nproc, *args, check=True, tiny=TINY):
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1", MAKEFLAGS=f"LIBEXT={EXT}",
               PYTHONPATH=os.pathsep.join([str(REPO), str(TESTS), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={_free_port()}", "-m", "megatron_recycle.launch",
           str(megatron_lm / "pretrain_gpt.py"), *tiny, *map(str, args)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    if check and proc.returncode != 0:
        pytest.fail(f"pretrain_gpt.py failed (rc {proc.returncode}):\n{out[-12000:]}")
    return proc.returncode, out


MOE_FLAGS = ("--num-experts", "--moe-router-topk", "--moe-ffn-hidden-size")
DENSE = [f for i, f in enumerate(TINY) if f not in MOE_FLAGS and (i == 0 or TINY[i - 1] not in MOE_FLAGS)]


def test_a_dense_run_is_upcycled_through_megatron_lm(megatron_lm, tmp_path):
    """pretrain_gpt.py dense, then the same script with --upcycle-experts at EP2: every expert
    is the dense MLP, the router zero (lr 0 after upcycling keeps the loaded weights)."""
    assert "--num-experts" not in DENSE and "--moe-token-dispatcher-type" in DENSE
    dense, moe = tmp_path / "dense", tmp_path / "moe"
    launch(megatron_lm, 1, "--lr", "1e-3", "--global-batch-size", 2, "--train-iters", 2,
           "--save-interval", 2, "--save", dense, tiny=DENSE)
    _, log = launch(megatron_lm, 2, "--lr", "0", "--global-batch-size", 4, "--train-iters", 3,
                    "--save-interval", 3, "--load", dense, "--save", moe, "--expert-model-parallel-size", 2,
                    "--upcycle-experts", 4, "--upcycle-topk", 2, "--grow-noise-alpha", 0,
                    "--grow-optimizer", "reset", tiny=DENSE)
    assert "growth: " in log and "iteration        3/       3" in log
    info = CheckpointInfo.read(moe)
    assert (info.args.num_experts, info.args.moe_router_topk, info.args.moe_ffn_hidden_size) == (4, 2, 64)
    source = ckpt_tools.read_checkpoint(dense / "iter_0000002")
    grown = ckpt_tools.read_checkpoint(info.path)
    for fc in ("linear_fc1", "linear_fc2"):
        experts = grown[f"decoder.layers.mlp.experts.experts.{fc}.weight"]
        assert all(torch.equal(experts[:, e], source[f"decoder.layers.mlp.{fc}.weight"]) for e in range(4)), fc
    assert not grown["decoder.layers.mlp.router.weight"].any()


@pytest.fixture(scope="module")
def runs(megatron_lm, tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain")
    base, grown = out / "base", out / "grown"
    logs = {"base": launch(megatron_lm, 1, "--lr", "1e-3", "--global-batch-size", 2,
                           "--train-iters", 2, "--save-interval", 2, "--save", base)[1]}
    # lr 0 after growth: weights stay exactly as loaded, so the saved ones show the growth.
    # --exit-interval 4: the job stops at iteration 4 of 6 (as if preempted) and is requeued.
    grown_cmd = ["--lr", "0", "--global-batch-size", 4, "--train-iters", 6, "--save-interval", 4,
                 "--exit-interval", 4, "--load", base, "--save", grown,
                 "--expert-model-parallel-size", 2, "--grow-depth", 2, "--grow-experts", 2,
                 "--grow-optimizer", "reset"]
    logs["grown"] = launch(megatron_lm, 2, *grown_cmd)[1]
    logs["requeued"] = launch(megatron_lm, 2, *grown_cmd)[1]
    return out, logs


def test_grown_run_loads_the_base_grown_and_keeps_training(runs):
    out, logs = runs
    # the CPU flags come from the launcher (TINY has none of them)
    assert "megatron-recycle: no CUDA: running on CPU with --distributed-backend gloo" in logs["base"]
    assert "loading distributed checkpoint from" in logs["grown"]
    assert "growth: " in logs["grown"]  # the strategy's summary: growth happened in this run
    assert "iteration        4/       6 | consumed samples:           12" in logs["grown"]
    assert "iteration        5/" not in logs["grown"]
    info = CheckpointInfo.read(out / "grown", 4)
    assert info.iteration == 4
    arch = info.architecture()
    assert (arch.num_layers, arch.num_experts, arch.topk) == (4, 8, 4)
    prov = info.provenance
    assert prov.source.path == os.path.realpath(out / "base" / "iter_0000002")
    assert prov.version and prov.plan["width"]["noise_alpha"] == 0.01 and prov.grown_by == "megatron-lm"

    plan = prov.growth_plan()
    base = ckpt_tools.read_checkpoint(out / "base" / "iter_0000002")
    grown = ckpt_tools.read_checkpoint(out / "grown" / "iter_0000004")
    layers = list(plan.layer_map)
    n_source_experts = plan.source.num_experts
    for key, src in base.items():
        if key.startswith("optimizer.") or not key.startswith("decoder.layers."):
            continue
        t = grown[key]
        if ".experts." in key or key.endswith("router.weight"):
            assert torch.equal(t[:, :n_source_experts], src[layers]), key  # originals exact
            copies = t[:, n_source_experts:] - src[layers]
            assert 0 < copies.abs().max() < 0.1 * src.abs().max(), key  # copies: small noise
        else:
            assert torch.equal(t, src[layers]), key


def test_requeued_run_resumes_the_grown_checkpoint_without_growing_again(runs):
    out, logs = runs
    log = logs["requeued"]
    assert "growth: " not in log
    assert "already grown" in log
    assert f"loading distributed checkpoint from {out / 'grown'} at iteration 4" in log
    assert "megatron_recycle.load_hook" not in log
    assert "Unable to load rng state" not in log  # the RNG state saved on CPU restores
    # ... and trains on to --train-iters: iterations 5 and 6 ran, and 6 was saved
    assert "iteration        4/" not in log
    assert "iteration        5/       6 | consumed samples:           16" in log
    assert "iteration        6/       6 | consumed samples:           20" in log
    info = CheckpointInfo.read(out / "grown")
    assert info.iteration == 6 and info.provenance.source.iteration == 2
    resumed = ckpt_tools.read_checkpoint(info.path)
    grown = ckpt_tools.read_checkpoint(out / "grown" / "iter_0000004")
    weights = [k for k in grown if k.startswith("decoder.layers.")]
    assert weights and all(torch.equal(resumed[k], grown[k]) for k in weights)  # lr 0: as grown
    assert CheckpointInfo.read(out / "base").iteration == 2  # the source untouched


def test_bad_input_fails_before_any_model_is_built(megatron_lm, runs):
    out, _ = runs
    rc, log = launch(megatron_lm, 1, "--lr", "0", "--global-batch-size", 2, "--train-iters", 2,
                     "--load", out / "base", "--ckpt-step", 9, "--grow-depth", 2, check=False)
    assert rc != 0
    assert "megatron-recycle: error: --ckpt-step 9" in log
    assert "building GPT model" not in log


def test_a_listed_moe_layer_freq_grows_with_the_layers(megatron_lm, tmp_path):
    """`--moe-layer-freq ([1]*2)` (all MoE, as a list): megatron-core keys the layers by index;
    grown by 2, the run gets `[1]*4` (Megatron would assert the list's length), with the
    example scripts' --no-load-optim --no-load-rng and a fresh optimizer. Without
    --grow-optimizer reset, --no-load-optim is refused: it would silently drop what
    --grow-optimizer copy (the default) grows."""
    base, grown = tmp_path / "base", tmp_path / "grown"
    listed = ["--moe-layer-freq", "([1]*2)"]
    launch(megatron_lm, 1, "--lr", "1e-3", "--global-batch-size", 2, "--train-iters", 2,
           "--save-interval", 2, "--save", base, *listed)
    rc, log = launch(megatron_lm, 1, "--lr", "0", "--global-batch-size", 2, "--train-iters", 3,
                     "--load", base, "--save", grown, *listed, "--grow-depth", 2, "--no-load-optim",
                     check=False)
    assert rc != 0
    assert ("megatron-recycle: error: --no-load-optim drops the optimizer state that "
            "--grow-optimizer copy (the default) grows") in log
    assert "building GPT model" not in log and not grown.exists()
    _, log = launch(megatron_lm, 2, "--lr", "0", "--global-batch-size", 4, "--train-iters", 3,
                    "--save-interval", 3, "--load", base, "--save", grown, *listed,
                    "--expert-model-parallel-size", 2, "--grow-depth", 2, "--grow-optimizer", "reset",
                    "--no-load-optim", "--no-load-rng")
    assert "growth: " in log and "iteration        3/       3" in log
    info = CheckpointInfo.read(grown)
    assert (info.args.num_layers, info.args.moe_layer_freq) == (4, [1] * 4)
    source = ckpt_tools.read_checkpoint(base / "iter_0000002")
    tensors = ckpt_tools.read_checkpoint(info.path)
    fc1 = "decoder.layers.{}.mlp.experts.experts.linear_fc1.weight"
    assert fc1.format(1) in source
    for layer in range(4):  # interposition: layer l comes from l // 2, exactly (one expert per source)
        assert torch.equal(tensors[fc1.format(layer)], source[fc1.format(layer // 2)]), layer


@pytest.fixture(scope="module")
def copy_runs(megatron_lm, tmp_path_factory):
    """Base at EP2 with a growable (fully_reshardable) distributed optimizer, then grown with
    --grow-optimizer copy. --train-iters equals the base's iteration and --save-interval does
    not divide it, so the grown run saves exactly the state it loaded."""
    out = tmp_path_factory.mktemp("pretrain_copy")
    optimizer = ["--use-distributed-optimizer", "--dist-ckpt-optim-fully-reshardable",
                 "--expert-model-parallel-size", 2, "--global-batch-size", 4, "--train-iters", 2]
    launch(megatron_lm, 2, "--lr", "1e-3", "--save-interval", 2, "--save", out / "base", *optimizer)
    launch(megatron_lm, 2, "--lr", "1e-3", "--save-interval", 3, "--load", out / "base",
           "--save", out / "grown", "--grow-depth", 2, "--grow-experts", 2,
           "--grow-optimizer", "copy", *optimizer)
    return out


def test_optimizer_copy_grows_the_adam_state_through_megatron_lm(copy_runs):
    grown_info = CheckpointInfo.read(copy_runs / "grown")
    assert grown_info.provenance.optimizer_policy == "copy"
    assert grown_info.optimizer_format == "fully_reshardable"
    plan = grown_info.provenance.growth_plan()
    base = ckpt_tools.read_checkpoint(copy_runs / "base" / "iter_0000002")
    grown = ckpt_tools.read_checkpoint(grown_info.path)
    moments = [k for k in base if k.startswith(("optimizer.state.exp_avg.decoder.layers.",
                                                 "optimizer.state.exp_avg_sq.decoder.layers."))]
    assert len(moments) > 10
    for key in moments:  # moments: the source's, by the mapping
        assert torch.equal(grown[key], ckpt_tools.by_plan(plan, key, base[key])), key
    for key in (k for k in grown if k.startswith("optimizer.state.param.")):
        weight = key[len("optimizer.state.param."):]
        assert torch.equal(grown[key], grown[weight]), key  # main params got the weights' noise


def test_a_legacy_torch_save_grows_offline_and_trains_on_at_another_layout(megatron_lm, tmp_path):
    """pretrain_gpt.py --ckpt-format torch at EP2 (files mp_rank_00_000, mp_rank_00_001; TP > 1
    does not start on CPU: its validate_args asks CUDA for the device architecture), grown
    offline into torch_dist, loaded plainly by pretrain_gpt.py on one rank (EP1, another layout)
    with the grown model arguments, trains on from iteration 2 (lr 0: the weights it saves at
    iteration 4 are the grown checkpoint's, so the load was exact). The legacy optimizer and RNG
    state are not carried: --no-load-optim --no-load-rng."""
    from test_offline_tools import cli

    base, grown, trained = tmp_path / "base", tmp_path / "grown", tmp_path / "trained"
    assert TINY[-2:] == ["--ckpt-format", "torch_dist"]
    legacy = TINY[:-1] + ["torch"]
    launch(megatron_lm, 2, "--lr", "1e-3", "--global-batch-size", 4, "--train-iters", 2, "--save-interval", 2,
           "--save", base, "--expert-model-parallel-size", 2, tiny=legacy)
    files = sorted(p.parent.name for p in (base / "iter_0000002").glob("mp_rank_*/model_optim_rng.pt"))
    assert files == ["mp_rank_00_000", "mp_rank_00_001"]
    log = cli("grow", "--load", base, "--save", grown, "--grow-depth", 2, "--grow-experts", 2).stderr
    assert "optimizer state (legacy torch, per rank) cannot be grown into torch_dist" in log
    assert "without the source's RNG state" in log
    info = CheckpointInfo.read(grown)
    assert info.format == "torch_dist" and (info.args.num_layers, info.args.num_experts) == (4, 8)
    grown_model = ["--num-layers", 4, "--num-experts", 8, "--moe-router-topk", 4]
    _, out = launch(megatron_lm, 1, "--lr", "0", "--global-batch-size", 4, "--train-iters", 4,
                    "--save-interval", 4, "--load", grown, "--save", trained,
                    "--no-load-optim", "--no-load-rng", *grown_model)
    assert f"loading distributed checkpoint from {grown} at iteration 2" in out
    assert "iteration        3/       4" in out and "iteration        4/       4" in out
    saved = ckpt_tools.read_checkpoint(trained / "iter_0000004")
    loaded = ckpt_tools.read_checkpoint(info.path)
    weights = [k for k in loaded if not k.startswith("optimizer.")]
    assert len(weights) == 9 and all(torch.equal(saved[k], loaded[k]) for k in weights)
