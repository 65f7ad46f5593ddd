"""Bad input gets a clear error naming the flag, key or file, before anything is loaded."""

import json

import pytest

from megatron_recycle.io.checkpoint import CheckpointInfo, resolve
from megatron_recycle.plan import GrowthError


@pytest.fixture(scope="module")
def errors(ranks, tmp_path_factory):
    out = tmp_path_factory.mktemp("bad")
    ranks("bad_input.py", 2, out)
    return json.loads((out / "errors.json").read_text())


@pytest.mark.parametrize("case, message", [
    ("wrong_layers", "has 6 layers but the growth plan makes 8; set --num-layers 8"),
    ("wrong_experts", "has 4 experts (router rows) but the growth plan makes 8; set --num-experts 8"),
    ("unmappable_key", "'decoder.layers.mlp.shared_experts.linear_fc1.weight' is not in the source"),
    ("other_hidden_size", "but the source checkpoint has (4, 4, 32, 32)"),
])
def test_every_rank_raises_before_loading(errors, case, message):
    for rank_errors in errors:
        assert rank_errors[case] is not None and message in rank_errors[case]
        assert rank_errors[f"{case}/weights_untouched"], f"{case}: weights changed before the error"


def test_missing_checkpoint(tmp_path):
    with pytest.raises(GrowthError, match=r"--load .*nowhere: no such directory"):
        resolve(tmp_path / "nowhere")


def test_not_a_checkpoint_root(tmp_path):
    with pytest.raises(GrowthError, match="latest_checkpointed_iteration.txt"):
        resolve(tmp_path)


def test_legacy_torch_checkpoint_is_refused(tmp_path):
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("10")
    (tmp_path / "iter_0000010" / "mp_rank_00").mkdir(parents=True)
    with pytest.raises(GrowthError, match="not a distributed \\(torch_dist\\) checkpoint"):
        resolve(tmp_path)


def test_other_dist_backend_is_refused(tmp_path):
    (tmp_path / "metadata.json").write_text(json.dumps({"sharded_backend": "zarr"}))
    with pytest.raises(GrowthError, match="sharded backend is 'zarr'"):
        CheckpointInfo.read(tmp_path)


def test_ckpt_step_pointing_nowhere(tmp_path):
    (tmp_path / "iter_0000010").mkdir()
    with pytest.raises(GrowthError, match=r"--ckpt-step 20: .*iter_0000020 does not exist .*iter_0000010"):
        resolve(tmp_path, step=20)


# --- the command line: every numeric flag in range, one line naming it, exit 2 -------------------
@pytest.mark.parametrize("argv, flag", [
    (["grow", "--load", "SRC", "--save", "DST", "--batch-size-mb", "inf"], "--batch-size-mb"),
    (["verify", "--source", "SRC", "--grown", "DST", "--batch-size-mb", "nan"], "--batch-size-mb"),
    (["grow", "--load", "SRC", "--save", "DST", "--batch-size-mb", "0"], "--batch-size-mb"),
    (["verify", "--source", "SRC", "--grown", "DST", "--max-mismatches", "-5"], "--max-mismatches"),
    (["grow", "--load", "SRC", "--save", "DST", "--workers", "0"], "--workers"),
    (["plan", "--load", "SRC", "--tp", "0"], "--tp"),
    (["plan", "--load", "SRC", "--tp", "-2"], "--tp"),
    (["plan", "--load", "SRC", "--gpus", "0"], "--gpus"),
    (["plan", "--load", "SRC", "--dp", "-1"], "--dp"),
    (["plan", "--load", "SRC", "--ckpt-step", "-1"], "--ckpt-step"),
    (["plan", "--load", "SRC", "--grow-experts", "0"], "--grow-experts"),
    (["plan", "--load", "SRC", "--grow-depth", "-1"], "--grow-depth"),
    (["plan", "--load", "SRC", "--grow-skip-first", "-1"], "--grow-skip-first"),
    (["plan", "--load", "SRC", "--grow-seed", "-3"], "--grow-seed"),
    (["plan", "--load", "SRC", "--upcycle-granularity", "0"], "--upcycle-granularity"),
    (["plan", "--load", "SRC", "--grow-weight-multiplier", "0"], "--grow-weight-multiplier"),
    (["grow", "--load", "SRC", "--save", "DST", "--grow-weight-multiplier", "-1"], "--grow-weight-multiplier"),
    (["plan", "--load", "SRC", "--grow-init-std", "nan"], "--grow-init-std"),
    (["grow", "--load", "SRC", "--save", "DST", "--rem"], "--rem"),  # not --remove-stale-staging
    (["inspect", "CKPT", "--js"], "--js"),  # not --json
    (["--deb", "inspect", "CKPT"], "--deb"),  # not --debug
])
def test_a_bad_flag_is_one_line_naming_it(argv, flag, capsys):
    from megatron_recycle.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and flag in lines[0] and "Traceback" not in err, err


@pytest.mark.parametrize("argv, message", [
    (["plan", "--tp", "3"], "--tp 3 does not divide the 4 attention heads"),
    (["plan", "--pp", "9", "--grow-depth", "2"], "--pp 9 exceeds the 8 layers after growth"),
    (["plan", "--ep", "2", "--dp", "3"], "--ep 2 does not divide the data-parallel size 3"),
    (["plan", "--gpus", "6", "--tp", "4"], "--gpus 6 is not a multiple of tp x pp = 4"),
    (["plan", "--grow-experts", "3000000"], "--grow-experts 3000000 makes 12000000 experts per layer"),
    (["plan", "--grow-depth", "3000000"], "--grow-depth 3000000 makes 12000000 layers out of 4"),
    (["plan", "--grow-depth", "2", "--grow-skip-first", "2", "--grow-skip-last", "2"],
     "--grow-skip-first 2 and --grow-skip-last 2 must be >= 0 and leave layers to copy out of 4"),
    (["plan", "--grow-experts", "2", "--grow-skip-first", "1"], "with --grow-depth 1 nothing is copied"),
    (["plan", "--grow-layer-map", "0,0,1,2,3", "--grow-depth-method", "stack"],
     "drop --grow-depth, --grow-depth-method"),
    (["grow", "--save", "{out}/never"], "the --grow-* options change nothing"),
    (["plan", "--grow-noise-alpha", "nan"], "--grow-noise-alpha must be between 0 and 1"),
    (["grow", "--save", "{out}/never", "--grow-zero-expert-bias"], "change how a growth copies: give --grow-depth"),
    (["grow", "--save", "{out}/never", "--grow-depth", "2", "--grow-random-router"],
     "--grow-random-router is a baseline of expert growth: give --grow-experts M > 1 (now 1)"),
])
def test_a_request_that_cannot_work_is_refused_before_anything_is_read_or_written(
        offline_sources, tmp_path, capsys, argv, message):
    from megatron_recycle.cli import main

    argv = [a.format(out=tmp_path) for a in argv]
    code = main([argv[0], "--load", str(offline_sources / "src"), *argv[1:]])
    err = capsys.readouterr().err  # (megatron-core's import warnings aside)
    lines = [line for line in err.splitlines() if line.startswith("megatron-recycle")]
    assert code == 2 and len(lines) == 1 and message in lines[0] and "Traceback" not in err, err
    assert not (tmp_path / "never").exists()


def test_offline_and_megatron_lm_refuse_an_identity_grow_alike(offline_sources, capsys, tmp_path):
    from megatron_recycle.cli import main
    from test_megatron_lm import configure

    with pytest.raises(GrowthError) as e:  # --grow-depth 1 asks for growth, the plan makes none
        configure(["--load", str(offline_sources / "src"), "--save", str(tmp_path / "save"),
                   "--grow-layer-map", "0,1,2,3", "--grow-optimizer", "reset"])
    assert main(["grow", "--load", str(offline_sources / "src"), "--save", str(tmp_path / "never"),
                 "--grow-layer-map", "0,1,2,3"]) == 2
    assert f"error: {e.value}" in capsys.readouterr().err


def test_expert_targets_invert_expert_source():
    from megatron_recycle.plan import Architecture, GrowthPlan, Upcycling, WidthGrowth

    moe = Architecture(num_layers=2, num_experts=4, topk=2)
    for plan in (GrowthPlan(moe, width=WidthGrowth(3)),
                 GrowthPlan(moe, width=WidthGrowth(3, placement="interleave")),
                 GrowthPlan(Architecture(num_layers=2), upcycle=Upcycling(experts=8, topk=2, granularity=2))):
        for source in range(4 if plan.source.is_moe else 2):
            assert plan.expert_targets(source) == [
                e for e in range(plan.target_num_experts) if plan.expert_source(e)[0] == source]
