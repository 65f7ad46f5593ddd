"""Grow at load into many layouts (real megatron-core, 4 gloo ranks) and check every tensor."""

import pytest
import torch

import ckpt_tools
from scenarios import PLAN, SOURCES, TARGETS

ALPHA = PLAN.width.noise_alpha


@pytest.fixture(scope="module")
def grown(ranks, tmp_path_factory):
    out = tmp_path_factory.mktemp("matrix")
    ranks("grow_matrix.py", 4, out)
    source = ckpt_tools.read_checkpoint(out / "s1" / "iter_0000005")
    results = {
        (src, name): ckpt_tools.assemble(torch.load(out / f"{src}-{name}-rank{r}.pt") for r in range(4))
        for src in SOURCES for name in TARGETS
    }
    return out, source, results


def test_every_tensor_matches_its_source_by_the_plan(grown):
    _, source, results = grown
    tensors = results[("s1", "ep2")]
    assert set(tensors) == set(source)
    n_copies = 0
    for key, t in tensors.items():
        want = ckpt_tools.by_plan(PLAN, key, source[key])  # the plan, written out independently
        assert t.shape == want.shape, key
        copy_mask = torch.zeros(t.shape[:2], dtype=torch.bool) if t.dim() >= 2 else None
        is_expert_keyed = ".experts.experts." in key or key.endswith(".router.weight")
        if is_expert_keyed:
            copy_mask = torch.tensor([[c > 0 for _, c in PLAN.expert_map()]] * t.shape[0])
        if copy_mask is None or not copy_mask.any():
            assert torch.equal(t, want), f"{key}: not an exact copy of its source"
            continue
        assert torch.equal(t[~copy_mask], want[~copy_mask]), f"{key}: originals changed"
        for layer in range(t.shape[0]):
            src_layer = PLAN.layer_map[layer]
            for expert, (src_expert, copy) in enumerate(PLAN.expert_map()):
                if not copy:
                    continue
                noise = (t[layer, expert] - want[layer, expert]).double()
                if key.endswith(".router.weight"):
                    sigma = source[key][src_layer].double().std()
                    assert noise.abs().max() < 6 * ALPHA * sigma
                else:
                    sigma = source[key][src_layer, src_expert].double().std()
                    ratio = float(noise.std() / (ALPHA * sigma))
                    assert 0.85 < ratio < 1.15, f"{key}[{layer},{expert}]: noise std {ratio}·ασ"
                    n_copies += 1
        if key.endswith(".router.weight"):  # the whole layer's router σ, measured over rows
            noise = (t - want)[copy_mask].double()
            ratio = float(noise.std() / (ALPHA * source[key].double().std()))
            assert 0.75 < ratio < 1.25, f"{key}: router noise std {ratio}·ασ"
    assert n_copies == 2 * 8 * 4  # fc1, fc2 x 8 layers x 4 copies


def test_grown_weights_are_bitwise_identical_whatever_the_layouts(grown):
    _, _, results = grown
    (ref_name, ref), *others = results.items()
    for name, tensors in others:
        for key, t in tensors.items():
            assert torch.equal(t, ref[key]), f"{key} differs between {ref_name} and {name}"


def test_source_checkpoint_left_untouched(grown):
    out, _, _ = grown
    assert ckpt_tools.tree_digest(out / "s1") == (out / "s1.sha256").read_text()
