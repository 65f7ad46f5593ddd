"""Resume pretraining after growth with the reference loop: model, optimizer state, iteration,
LR schedule and data position carried across growth and layouts (2 gloo ranks, real
megatron-core, examples/pretrain_moe.py)."""

import json
import math

import pytest
import torch

import ckpt_tools
from megatron_recycle.io.checkpoint import iteration_dir
from megatron_recycle.plan import GrowthError
from megatron_recycle.policy import apply_schedule_after_growth, load_moment_policy
from workers.resume_scenario import BASE_ITERS, GROWN_ITERS, PLAN

BETA1, BETA2 = 0.9, 0.95  # the loop's Adam
GLOBAL_BATCH = 8


@pytest.fixture(scope="module")
def out(ranks, tmp_path_factory):
    out = tmp_path_factory.mktemp("resume")
    ranks("resume_growth.py", 2, out)
    return out


def metrics(out, name):
    return [json.loads(line) for line in (out / f"{name}.jsonl").read_text().splitlines()]


def tensors(out, name, iteration):
    return ckpt_tools.read_checkpoint(iteration_dir(out / name, int(iteration)))


def common(out, name, iteration):
    return ckpt_tools.common_state(iteration_dir(out / name, int(iteration)))


def adam_steps(state):
    """Adam's step counts in every param group of a common state (one or chained optimizers)."""
    if not isinstance(state, dict):
        return set()
    steps = {g["step"] for g in state.get("param_groups", [])}
    return steps.union(*(adam_steps(v) for v in state.values()))


def copies(key, shape, layers_too):
    """Mask over [layer, expert] (or [layer]) of entries that are copies, not originals."""
    if not ckpt_tools.model_key(key).startswith("decoder.layers."):
        return torch.zeros(shape[:1], dtype=torch.bool)
    layer = torch.tensor([c > 0 for c in PLAN.layer_copy]) & layers_too
    if not ckpt_tools.indexed_by_expert(key):
        return layer
    expert = torch.tensor([c > 0 for _, c in PLAN.expert_map()])
    return layer[:, None] | expert[None, :]


def test_width_growth_at_alpha_zero_keeps_the_validation_loss(out):
    before = metrics(out, "base")[-1]
    after = metrics(out, "width_alpha0")[0]
    assert before["iteration"] == after["iteration"] == int(BASE_ITERS)
    assert after["val_loss"] == pytest.approx(before["val_loss"], rel=1e-5, abs=0)


def test_depth_and_width_growth_continue_iteration_schedule_and_data(out):
    grown = metrics(out, "grown")
    assert grown[0]["grown_at"] == int(BASE_ITERS)
    steps = [r for r in grown if "train_loss" in r]
    assert [r["iteration"] for r in steps] == list(range(int(BASE_ITERS) + 1, int(GROWN_ITERS) + 1))
    assert all(math.isfinite(r["train_loss"]) and math.isfinite(r["val_loss"]) for r in steps)
    # The LR the base run itself would have used next (it resumed at another layout).
    resumed = {r["iteration"]: r["lr"] for r in metrics(out, "resumed_base") if "lr" in r}
    assert {r["iteration"]: r["lr"] for r in steps} == resumed
    assert all(lr > 0 for lr in resumed.values())
    saved = common(out, "grown", GROWN_ITERS)
    assert saved["iteration"] == int(GROWN_ITERS)
    assert saved["args"].consumed_train_samples == int(GROWN_ITERS) * GLOBAL_BATCH
    # One Adam step per iteration for every parameter (a shared `step` tensor would race).
    assert adam_steps(saved) == {float(GROWN_ITERS)}


def test_optimizer_copy_maps_moments_and_main_params_like_the_weights(out):
    source, grown = tensors(out, "base", BASE_ITERS), tensors(out, "grown_copy", BASE_ITERS)
    assert set(grown) == set(source)
    kinds = set()
    for key, t in grown.items():
        want = ckpt_tools.by_plan(PLAN, key, source[key])
        kind = ckpt_tools.optimizer_state_kind(key)
        kinds.add(kind)
        if kind in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(t, want), f"{key}: moments not copied by the growth mapping"
            continue
        noisy = copies(key, t.shape, layers_too=False)
        assert torch.equal(t[~noisy], want[~noisy]), f"{key}: originals changed"
        if noisy.any():
            assert not torch.equal(t[noisy], want[noisy]), f"{key}: copies got no noise"
        if kind == "param":
            assert torch.equal(t, grown[ckpt_tools.model_key(key)]), f"{key}: main param != weight"
    assert {"model", "param", "exp_avg", "exp_avg_sq"} <= kinds
    assert adam_steps(common(out, "grown_copy", BASE_ITERS)) == {float(BASE_ITERS)}


def check_zero_policy(out, keys):
    source, grown = tensors(out, "base", BASE_ITERS), tensors(out, "grown_zero", BASE_ITERS)
    zeroed = 0
    for key, t in grown.items():
        if not key.startswith(("optimizer.state.exp_avg.", "optimizer.state.exp_avg_sq.")) or not keys(key):
            continue
        want, copy = ckpt_tools.by_plan(PLAN, key, source[key]), copies(key, t.shape, layers_too=True)
        assert torch.equal(t[~copy], want[~copy]), f"{key}: original moments changed"
        assert not t[copy].any(), f"{key}: copies' moments not zero"
        zeroed += int(copy.any())
    assert zeroed > 0


def test_optimizer_zero_zeroes_the_moments_of_copies_only(out):
    check_zero_policy(out, lambda key: not key.endswith(".router.weight"))


def test_optimizer_zero_keeps_the_router_moments_of_original_experts(out):
    check_zero_policy(out, lambda key: key.endswith(".router.weight"))


def test_optimizer_reset_starts_fresh_and_rewarmup_restarts_the_schedule(out):
    run = metrics(out, "reset")
    steps = [r for r in run if "train_loss" in r]
    assert [r["iteration"] for r in steps] == [2]  # the iteration still continues
    assert steps[0]["lr"] == 0.0  # first step of a restarted warm-up
    saved = tensors(out, "reset", 2)
    assert adam_steps(common(out, "reset", 2)) == {1.0}
    # After one step from fresh state m = (1-β1)·g and v = (1-β2)·g², whatever g is.
    checked = 0
    for key, m in saved.items():
        if key.startswith("optimizer.state.exp_avg."):
            v = saved[key.replace(".exp_avg.", ".exp_avg_sq.", 1)]
            live = v > 1e-20
            ratio = m[live].double() ** 2 / v[live].double()
            assert torch.allclose(ratio, torch.full_like(ratio, (1 - BETA1) ** 2 / (1 - BETA2)),
                                  rtol=1e-3), f"{key}: moments are not fresh"
            checked += int(live.any())
    assert checked > 0


def test_dp_reshardable_source_refuses_copy_and_names_the_ways_out(out):
    message = (out / "refusal.txt").read_text()
    assert "dp_reshardable" in message
    assert "--grow-optimizer reset" in message
    assert "--dist-ckpt-optim-fully-reshardable" in message
    assert not (out / "dp_copy").exists()


def test_grown_checkpoint_round_trips_exactly_at_a_third_layout(out):
    saved, reloaded = tensors(out, "grown", GROWN_ITERS), tensors(out, "reloaded", GROWN_ITERS)
    assert set(saved) == set(reloaded)
    for key, t in saved.items():
        assert torch.equal(t, reloaded[key]), f"{key} changed through load + save at DP2"
    assert adam_steps(common(out, "reloaded", GROWN_ITERS)) == {float(GROWN_ITERS)}
    before, after = metrics(out, "grown")[-1], metrics(out, "reloaded")[0]
    assert after["val_loss"] == pytest.approx(before["val_loss"], rel=1e-5, abs=0)


# --- the pure policy and schedule logic (no ranks) -------------------------------------------
def test_schedule_continues_by_default_and_restarts_with_rewarmup():
    saved = dict(ckpt_tools.scheduler(max_lr=3e-3, lr_warmup_steps=16,
                                      lr_decay_style="cosine").state_dict(), num_steps=240)
    continued = ckpt_tools.scheduler()
    apply_schedule_after_growth(continued, saved, 0, 8)
    assert continued.num_steps == 240
    restarted = ckpt_tools.scheduler()
    apply_schedule_after_growth(restarted, saved, 5, 8)
    assert (restarted.num_steps, restarted.lr_warmup_steps) == (0, 40)
    already_loaded = ckpt_tools.scheduler()
    already_loaded.load_state_dict(saved)
    apply_schedule_after_growth(already_loaded, None, 0, 8)  # the load restored it: not twice
    assert already_loaded.num_steps == 240
    with pytest.raises(GrowthError, match="rewarmup"):
        apply_schedule_after_growth(ckpt_tools.scheduler(), saved, -1, 8)


@pytest.mark.parametrize("policy,fmt,moments", [
    ("copy", "fully_reshardable", "copy"), ("zero", "non_distributed", "zero"),
    ("reset", "dp_reshardable", None), ("reset", None, None)])
def test_optimizer_policy_accepts(policy, fmt, moments):
    assert load_moment_policy(policy, fmt) == moments


@pytest.mark.parametrize("policy,fmt,match", [
    ("copy", "dp_reshardable", "--dist-ckpt-optim-fully-reshardable"),
    ("zero", "dp_reshardable", "--grow-optimizer reset"),
    ("copy", None, "no optimizer state"), ("keep", "fully_reshardable", "must be one of")])
def test_optimizer_policy_refuses(policy, fmt, match):
    with pytest.raises(GrowthError, match=match):
        load_moment_policy(policy, fmt)
