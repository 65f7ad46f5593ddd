"""`megatron-recycle norms` and the growth advisor of `plan` / `inspect`, on checkpoints saved
by megatron-core: the norms against a hand computation, streaming in bounded batches, the
command's outputs and errors; the advisor on checkpoints placed where the paper-findings
bases are (its default setting's architecture, batch and sequence length)."""

import csv
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import ckpt_tools
from conftest import REPO


def cli(*args, env=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "megatron_recycle.cli", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=600)


def normed(t: torch.Tensor) -> float:
    return float(t.double().norm()) / math.sqrt(t.numel())


def expert_norm(fc1: torch.Tensor, fc2: torch.Tensor) -> float:
    """The paper's per-expert norm, by hand: GLU gate and up rows, then down, each
    ||W|| / sqrt(numel), averaged."""
    gate, up = fc1[: fc1.shape[0] // 2], fc1[fc1.shape[0] // 2:]
    return (normed(gate) + normed(up) + normed(fc2)) / 3


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_norms_equal_a_hand_computation_on_a_tensor_parallel_checkpoint(offline_sources, tmp_path):
    """scenarios.SPEC saved at TP2 (stacked layers and experts, shared experts left out),
    read one unit per batch."""
    proc = cli("norms", offline_sources / "src", "--out", tmp_path / "out", "--batch-size-mb", 0.001)
    assert proc.returncode == 0, proc.stderr[-4000:]
    t = ckpt_tools.read_checkpoint(offline_sources / "src" / "iter_0000005")
    fc1 = t["decoder.layers.mlp.experts.experts.linear_fc1.weight"]
    fc2 = t["decoder.layers.mlp.experts.experts.linear_fc2.weight"]
    rows = read_csv(tmp_path / "out" / "expert_norms.csv")
    assert [(int(r["layer"]), int(r["expert"])) for r in rows] == [(l, e) for l in range(4) for e in range(4)]
    for r in rows:
        l, e = int(r["layer"]), int(r["expert"])
        assert float(r["gate"]) == pytest.approx(normed(fc1[l, e, :16]), rel=1e-12)
        assert float(r["down"]) == pytest.approx(normed(fc2[l, e]), rel=1e-12)
        assert float(r["norm"]) == pytest.approx(expert_norm(fc1[l, e], fc2[l, e]), rel=1e-12)
    layers = read_csv(tmp_path / "out" / "layer_norms.csv")
    for l, r in enumerate(layers):
        by_hand = sum(expert_norm(fc1[l, e], fc2[l, e]) for e in range(4)) / 4
        assert (int(r["layer"]), r["kind"], int(r["experts"])) == (l, "moe", 4)
        assert float(r["norm"]) == pytest.approx(by_hand, rel=1e-12)
    assert "profile: flat" in proc.stdout  # freshly initialised weights
    assert (tmp_path / "out" / "layer_norms.png").stat().st_size > 5_000


def test_norms_of_a_mixed_stack_count_a_dense_mlp_as_one_expert(offline_sources, tmp_path):
    """Layers indexed in the keys, dense layers 1 and 3 (their MLP: one row, no expert)."""
    proc = cli("norms", offline_sources / "src-mixed", "--out", tmp_path, "--json")
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout)
    t = ckpt_tools.read_checkpoint(offline_sources / "src-mixed" / "iter_0000003")
    for layer in out["layers"]:
        l = layer["layer"]
        if l % 2:
            by_hand = expert_norm(t[f"decoder.layers.{l}.mlp.linear_fc1.weight"],
                                  t[f"decoder.layers.{l}.mlp.linear_fc2.weight"])
            assert (layer["kind"], layer["experts"]) == ("dense", 1)
        else:
            fc1 = t[f"decoder.layers.{l}.mlp.experts.experts.linear_fc1.weight"]
            fc2 = t[f"decoder.layers.{l}.mlp.experts.experts.linear_fc2.weight"]
            by_hand = sum(expert_norm(fc1[e], fc2[e]) for e in range(4)) / 4
            assert (layer["kind"], layer["experts"]) == ("moe", 4)
        assert layer["norm"] == pytest.approx(by_hand, rel=1e-12)
    assert [layer["layer"] for layer in out["layers"]] == [0, 1, 2, 3]
    assert [r["expert"] for r in out["experts"] if r["layer"] == 1] == [""]


def test_norms_are_read_in_batches_of_the_given_size(offline_sources):
    """Never more than `batch_bytes` at once (one unit at least), and the same norms at any size."""
    from megatron_recycle import norms
    from megatron_recycle.io.checkpoint import CheckpointInfo
    from megatron_recycle.io.reader import box_request, read_boxes

    info = CheckpointInfo.read(offline_sources / "src")
    sizes = []

    def read(requests):
        got = read_boxes(info.path, {n: box_request(b, d) for n, (b, d) in requests.items()})
        sizes.append(sum(t.numel() * t.element_size() for t in got.values()))
        return got

    unit = 32 * 32 * 4  # one expert's fc1, the largest unit
    small = norms.expert_norms(info.model_shapes(), info.dtypes, read, batch_bytes=3 * unit)
    assert sum(sizes) == 16 * (unit + unit // 2)  # every expert's fc1 and fc2, each read once
    assert max(sizes) <= 3 * unit and len(sizes) == 8
    assert small == norms.checkpoint_norms(info)


@pytest.mark.parametrize("norms_by_layer, verdict", [
    ([1.0, 1.1, 1.2, 1.3], "rising"), ([1.0, 1.002, 0.999, 1.001], "flat"),
    ([1.3, 1.2, 1.1, 1.0], "falling"), ([1.0, 1.4, 0.9, 1.3, 0.8, 1.6], "irregular"), ([1.0], "unknown")])
def test_profile_shape(norms_by_layer, verdict):
    from megatron_recycle.norms import ExpertNorm, NormProfile

    profile = NormProfile(tuple(ExpertNorm(l, 0, (("down", x),)) for l, x in enumerate(norms_by_layer)))
    assert profile.shape()["shape"] == verdict


def test_norms_without_matplotlib_write_the_csvs_and_say_so(offline_sources, tmp_path):
    blocker = tmp_path / "no-matplotlib" / "matplotlib"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('matplotlib is not installed here')\n")
    path = os.pathsep.join([str(blocker.parent), str(REPO), os.environ.get("PYTHONPATH", "")])
    proc = cli("norms", offline_sources / "src", "--out", tmp_path / "out", env={"PYTHONPATH": path})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["expert_norms.csv", "layer_norms.csv"]
    assert "no layer_norms.png: matplotlib is not installed" in proc.stderr


def test_norms_refuse_bad_input_in_one_line(offline_sources, tmp_path):
    proc = cli("norms", tmp_path / "nothing", "--out", tmp_path / "out")
    assert proc.returncode == 2 and "CKPT" in proc.stderr and "Traceback" not in proc.stderr
    (tmp_path / "file").write_text("x")
    proc = cli("norms", offline_sources / "src", "--out", tmp_path / "file")
    assert proc.returncode == 2 and "--out" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert (tmp_path / "file").read_text() == "x" and not (tmp_path / "out").exists()


# --- the advisor ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def paper_bases(tmp_path_factory, ranks):
    out = tmp_path_factory.mktemp("paper-bases")
    ranks("advisor_sources.py", 1, out)
    return out, json.loads((out / "setting.json").read_text())


def active_params_by_hand(c: dict) -> int:
    """The paper-findings toy (the reference loop's model) counted by hand: attention (qkv,
    proj), two LayerNorms (weight, bias), the router, top-k of E SwiGLU experts per layer;
    embedding, output layer, final LayerNorm."""
    h, f, e, k, vocab = c["hidden"], c["hidden"], c["experts"], c["topk"], 256
    layer = 3 * h * h + h * h + 2 * 2 * h + e * h + k * (2 * f * h + f * h)
    return c["layers"] * layer + 2 * vocab * h + 2 * h


@pytest.mark.parametrize("base, method", [("early", "stack"), ("late", "interposition")])
def test_advice_at_the_paper_findings_bases_is_the_papers(paper_bases, base, method):
    out, setting = paper_bases
    c, iteration = setting["config"], setting["iterations"][base]
    proc = cli("plan", "--load", out / base, "--grow-depth", 2, "--norms", "--json")
    assert proc.returncode == 0, proc.stderr[-4000:]
    advice = json.loads(proc.stdout)["advice"]
    n_a = active_params_by_hand(c)
    tokens = iteration * c["global_batch"] * c["seq"]
    compute = advice["sunk_compute"]
    assert (compute["active_params"], compute["tokens"]) == (n_a, tokens)
    assert compute["flops"] == 6 * n_a * tokens and compute["chinchilla_flops"] == 6 * n_a * 20 * n_a
    assert compute["over_chinchilla"] == pytest.approx(tokens / (20 * n_a), rel=1e-12)
    assert (compute["over_chinchilla"] < 1) == (base == "early")
    assert advice["recommendation"] == {"depth_method": method, "zero_init_copies": False, "noise_alpha": 0.01}
    assert advice["norm_profile"]["shape"] == ("rising" if base == "late" else "flat")
    assert advice["signals_agree"] is True and advice["missing"] == []
    if base == "early":  # the sunk-cost finding: where this run would reach 1x
        assert compute["boundary_iteration"] == math.ceil(20 * n_a / (c["global_batch"] * c["seq"]))
    assert advice["plan"] == ([] if method == "interposition" else
                              ["--grow-depth-method interposition: the advice is stack"])


def test_advice_says_when_the_profile_disagrees_or_was_not_read(paper_bases):
    out, _ = paper_bases
    proc = cli("plan", "--load", out / "late-flat", "--grow-depth", 2, "--norms")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "advice: grow depth by interposition" in proc.stdout
    assert "not visible, so the compute boundary alone decides" in proc.stdout
    proc = cli("inspect", out / "late", "--json")
    advice = json.loads(proc.stdout)["advice"]
    assert advice["recommendation"]["depth_method"] == "interposition"
    assert advice["norm_profile"]["shape"] is None and "--norms" in advice["norm_profile"]["why"]
    assert advice["signals_agree"] is None


def test_advice_names_what_is_missing_instead_of_guessing(offline_sources):
    """The offline source's args have no global batch size and no consumed samples."""
    proc = cli("inspect", offline_sources / "src", "--json")
    assert proc.returncode == 0, proc.stderr[-4000:]
    advice = json.loads(proc.stdout)["advice"]
    assert advice["recommendation"]["depth_method"] is None
    assert advice["sunk_compute"]["over_chinchilla"] is None
    assert any("global_batch_size" in m for m in advice["missing"]), advice["missing"]
    text = cli("inspect", offline_sources / "src").stdout
    assert "advice: grow depth by ? (missing data)" in text and "cannot say without" in text
