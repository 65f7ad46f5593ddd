"""The Megatron-LM adapter's argument handling: flags, derived target sizes, grow vs resume
(requeue), and the errors raised before any model exists. Runs without Megatron-LM: the
checkpoints are real torch_dist ones saved by megatron-core."""

import argparse
import json

import pytest

from megatron_recycle import megatron_lm
from megatron_recycle.plan import GrowthError


def megatron_parser() -> argparse.ArgumentParser:
    """The Megatron-LM arguments the adapter reads, with Megatron-LM's defaults."""
    p = argparse.ArgumentParser(allow_abbrev=False)
    for flag in ("--num-layers", "--num-experts", "--ckpt-step", "--decoder-first-pipeline-num-layers",
                 "--decoder-last-pipeline-num-layers"):
        p.add_argument(flag, type=int, default=None)
    p.add_argument("--moe-router-topk", type=int, default=2)
    for flag in ("--ffn-hidden-size", "--moe-ffn-hidden-size", "--moe-shared-expert-intermediate-size"):
        p.add_argument(flag, type=int, default=None)
    p.add_argument("--moe-use-upcycling", action="store_true")
    p.add_argument("--moe-layer-freq", default=1, type=lambda x: int(x) if x.isdigit() else json.loads(x))
    for flag in ("--tensor-model-parallel-size", "--pipeline-model-parallel-size",
                 "--expert-model-parallel-size"):
        p.add_argument(flag, type=int, default=1)
    p.add_argument("--hybrid-layer-pattern", default=None)
    p.add_argument("--load")
    p.add_argument("--save")
    p.add_argument("--ckpt-format", default="torch_dist")
    for flag in ("--no-load-optim", "--no-load-rng"):
        p.add_argument(flag, action="store_true", default=None)
    for flag in ("--use-checkpoint-args", "--finetune", "--use-distributed-optimizer",
                 "--override-opt-param-scheduler", "--use-checkpoint-opt-param-scheduler"):
        p.add_argument(flag, action="store_true")
    return megatron_lm.add_arguments(p)


def parse(argv):
    parser = megatron_parser()
    args = parser.parse_args(argv)
    return args, megatron_lm.explicit_dests(args, parser)


def configure(argv):
    args, explicit = parse(argv)
    return args, megatron_lm.configure(args, explicit)


@pytest.fixture(scope="module")
def ckpts(ranks, tmp_path_factory):
    out = tmp_path_factory.mktemp("mlm")
    ranks("megatron_lm_checkpoints.py", 1, out)
    return out


def grow(ckpts, *extra, optimizer="reset"):
    return ["--load", str(ckpts / "base"), "--grow-depth", "2", "--grow-experts", "2",
            "--grow-optimizer", optimizer, *extra]


def test_no_growth_flags_change_nothing(ckpts):
    args, decision = configure(["--load", str(ckpts / "base"), "--num-layers", "4"])
    assert decision is None and args.num_layers == 4 and args.no_load_rng is None


def test_growth_options_without_a_growth_are_refused_naming_them():
    """A launch script would train on without them, silently; the offline tools refuse alike."""
    with pytest.raises(GrowthError, match="^--grow-depth-method, --grow-noise-alpha change nothing .*"
                                          "give --grow-depth, --grow-experts"):
        configure(["--load", "unread", "--grow-noise-alpha", "0.05", "--grow-depth-method", "stack"])


def test_factors_set_the_target_sizes_from_the_checkpoint(ckpts):
    args, decision = configure(grow(ckpts))
    assert decision.grow
    assert (args.num_layers, args.num_experts, args.moe_router_topk) == (8, 8, 4)
    assert args.no_load_rng and args.no_load_optim and args.override_opt_param_scheduler
    assert args.load == str(ckpts / "base")
    assert decision.provenance.source.iteration == 5
    assert decision.provenance.plan["layer_map"] == [0, 0, 1, 1, 2, 2, 3, 3]


def test_base_run_sizes_are_replaced_and_target_sizes_accepted(ckpts):
    base, _ = configure(grow(ckpts, "--num-layers", "4", "--num-experts", "4", "--moe-router-topk", "2"))
    target, _ = configure(grow(ckpts, "--num-layers", "8", "--num-experts", "8", "--moe-router-topk", "4"))
    assert (base.num_layers, base.num_experts, base.moe_router_topk) == (8, 8, 4)
    assert (target.num_layers, target.num_experts, target.moe_router_topk) == (8, 8, 4)


@pytest.mark.parametrize("extra, flag", [
    (["--num-layers", "6"], "--num-layers 8"),
    (["--num-experts", "12"], "--num-experts 8"),
    (["--moe-router-topk", "3"], "--moe-router-topk 3"),
    (["--expert-model-parallel-size", "3"], "--expert-model-parallel-size 3"),
    (["--pipeline-model-parallel-size", "3"], "--pipeline-model-parallel-size 3"),
    (["--use-checkpoint-args"], "--use-checkpoint-args"),
    (["--ckpt-format", "torch"], "--ckpt-format torch_dist"),
    (["--ckpt-step", "99"], "--ckpt-step 99"),
    (["--grow-layer-map", "0,1,2,3"], "--grow-layer-map gives every target layer explicitly"),
])
def test_sizes_or_layouts_that_do_not_fit_are_refused_naming_the_flag(ckpts, extra, flag):
    with pytest.raises(GrowthError, match=flag):
        configure(grow(ckpts, *extra))


def test_topk_keep_explicit_layer_map_and_stack(ckpts):
    keep, _ = configure(grow(ckpts, "--grow-topk", "keep"))
    assert keep.moe_router_topk == 2
    mapped, decision = configure(["--load", str(ckpts / "base"), "--grow-layer-map", "0,0,1,2,3,3",
                                  "--grow-optimizer", "reset"])
    assert mapped.num_layers == 6 and mapped.num_experts == 4
    stack, decision = configure(grow(ckpts, "--grow-depth-method", "stack"))
    assert decision.plan.layer_map == (0, 1, 2, 3, 0, 1, 2, 3)


def test_load_that_is_not_a_torch_dist_checkpoint(ckpts, tmp_path):
    legacy = tmp_path / "legacy"
    (legacy / "iter_0000003" / "mp_rank_00").mkdir(parents=True)
    (legacy / "latest_checkpointed_iteration.txt").write_text("3")
    with pytest.raises(GrowthError, match="not a distributed .torch_dist. checkpoint"):
        configure(["--load", str(legacy), "--grow-depth", "2"])
    with pytest.raises(GrowthError, match="no such directory"):
        configure(["--load", str(tmp_path / "missing"), "--grow-depth", "2"])
    with pytest.raises(GrowthError, match="needs --load"):
        configure(["--grow-depth", "2"])


def test_optimizer_copy_needs_growable_state(ckpts):
    with pytest.raises(GrowthError, match="holds no optimizer state.*use --grow-optimizer reset"):
        configure(grow(ckpts, optimizer="copy"))
    dp = ["--load", str(ckpts / "base_dp"), "--grow-experts", "2"]
    with pytest.raises(GrowthError, match="--grow-optimizer reset.*--dist-ckpt-optim-fully-reshardable"):
        configure(dp + ["--use-distributed-optimizer"])
    args, _ = configure(dp + ["--grow-optimizer", "reset"])
    assert args.no_load_optim


def test_the_authors_options_reach_the_plan_and_its_record(ckpts):
    from megatron_recycle.plan import CopyInit

    _, decision = configure(grow(ckpts, "--grow-weight-multiplier", "0.5", "--grow-random-router",
                                 "--grow-zero-expert-bias"))
    assert decision.plan.init == CopyInit(weight_multiplier=0.5, random_router=True, zero_expert_bias=True)
    assert decision.provenance.plan["init"] == {"weight_multiplier": 0.5, "random_router": True,
                                                "reinit_expert_copies": False, "zero_expert_bias": True,
                                                "init_std": 0.02, "from_second": False}
    with pytest.raises(GrowthError, match="--grow-random-router is a baseline of expert growth"):
        configure(["--load", str(ckpts / "base"), "--grow-depth", "2", "--grow-random-router"])
    with pytest.raises(GrowthError, match="change how a growth copies"):
        configure(["--load", str(ckpts / "base"), "--grow-weight-multiplier", "2"])


def test_requeue_resumes_the_grown_checkpoint_in_save(ckpts):
    args, decision = configure(grow(ckpts, "--save", str(ckpts / "grown"), "--num-layers", "4"))
    assert not decision.grow
    assert args.load == str(ckpts / "grown") and args.ckpt_step is None
    assert (args.num_layers, args.num_experts, args.moe_router_topk) == (8, 8, 4)
    assert decision.checkpoint.iteration == 7
    assert decision.provenance.source.path.endswith("iter_0000005")


def test_requeue_with_the_grown_checkpoint_as_load(ckpts):
    """Growth in place (--save = --load): while the tracker names the base iteration the job
    grows; once it names the grown one (saved by the growing job), the requeued job resumes it."""
    root = ckpts / "inplace"
    flags = ["--load", str(root), "--save", str(root), "--grow-depth", "2", "--grow-experts", "2",
             "--grow-optimizer", "reset"]
    (root / "latest_checkpointed_iteration.txt").write_text("5")
    args, decision = configure(flags)
    assert decision.grow and args.num_layers == 8
    (root / "latest_checkpointed_iteration.txt").write_text("7")
    args, decision = configure(flags)
    assert not decision.grow and args.num_layers == 8 and decision.checkpoint.iteration == 7


def test_growing_an_offline_grown_checkpoint_reads_its_schema_1_record(ckpts):
    """An offline-grown source (its record's `source` is a path, not a dict) grows again."""
    args, decision = configure(["--load", str(ckpts / "offline_grown"), "--grow-experts", "2",
                                "--grow-optimizer", "reset"])
    assert decision.grow and (args.num_layers, args.num_experts, args.moe_router_topk) == (8, 16, 8)
    previous = decision.provenance.previous
    assert previous.grown_by == "offline" and previous.source.iteration == 5
    assert previous.source.path.endswith("base/iter_0000005")


def test_a_second_checkpoint_is_read_checked_and_recorded_before_any_model(ckpts):
    merge = ["--load", str(ckpts / "base"), "--grow-experts", "2", "--grow-optimizer", "reset"]
    args, decision = configure(merge + ["--grow-from-second", str(ckpts / "base_dp")])
    assert decision.grow and decision.plan.init.from_second and args.num_experts == 8
    assert decision.second.path == ckpts / "base_dp" / "iter_0000005"
    second = decision.provenance.second
    assert second.path.endswith("base_dp/iter_0000005") and second.iteration == 5
    assert len(second.metadata_sha256) == 64
    with pytest.raises(GrowthError, match="--grow-from-second .*dense.*not the source's architecture"):
        configure(merge + ["--grow-from-second", str(ckpts / "dense")])
    with pytest.raises(GrowthError, match="--grow-from-second .*is the source checkpoint itself"):
        configure(merge + ["--grow-from-second", str(ckpts / "base")])


def test_a_second_rewritten_between_the_plan_and_the_load_is_refused(ckpts, tmp_path):
    """The second is pinned when the job plans (the record names that one); the load strategy the
    hooks build checks it unchanged before reading it, and refuses it once rewritten."""
    import shutil

    from megatron_recycle.errors import CheckpointError
    from megatron_recycle.load_hook import GrowthLoadStrategy

    second = shutil.copytree(ckpts / "base_dp", tmp_path / "second")  # keeps the files' mtimes
    args, decision = configure(["--load", str(ckpts / "base"), "--grow-experts", "2", "--grow-optimizer",
                                "reset", "--grow-from-second", str(second)])
    strategy = GrowthLoadStrategy(decision.plan, source=decision.checkpoint.path, second=decision.second)
    assert strategy.load({}, decision.checkpoint.path) == {}  # unchanged: loads (nothing asked here)
    distcp = sorted((second / "iter_0000005").glob("*.distcp"))[0]
    distcp.write_bytes(distcp.read_bytes())  # saved again in place: same bytes, a new mtime
    with pytest.raises(CheckpointError, match=rf"^--grow-from-second \S+/{distcp.name} changed while growing"):
        strategy.load({}, decision.checkpoint.path)


def test_requeue_resumes_a_merge_only_with_the_same_second(ckpts):
    merge = ["--load", str(ckpts / "base"), "--grow-experts", "2", "--grow-optimizer", "reset",
             "--save", str(ckpts / "grown_second")]
    args, decision = configure(merge + ["--grow-from-second", str(ckpts / "base_dp")])
    assert not decision.grow and decision.checkpoint.iteration == 7 and args.num_experts == 8
    for other in (["--grow-from-second", str(ckpts / "listed")], []):  # another second, or none
        with pytest.raises(GrowthError, match="--save .* already holds a checkpoint"):
            configure(merge + other)


def test_save_holding_another_checkpoint_is_refused(ckpts):
    with pytest.raises(GrowthError, match="--save .* already holds a checkpoint"):
        configure(grow(ckpts, "--save", str(ckpts / "grown"), "--grow-experts", "4"))


def test_schedule_continues_or_rewarms(ckpts):
    from ckpt_tools import scheduler

    args, decision = configure(grow(ckpts))
    args.global_batch_size = 4
    decision.checkpoint.common["opt_param_scheduler"] = dict(scheduler().state_dict(), num_steps=40)
    continued = scheduler()
    megatron_lm.apply_schedule(continued, decision, args)
    assert continued.num_steps == 40 and continued.get_lr(continued.optimizer.param_groups[0]) == 3e-4

    args, decision = configure(grow(ckpts, "--grow-rewarmup-iters", "10"))
    args.global_batch_size = 4
    rewarmed = scheduler()
    megatron_lm.apply_schedule(rewarmed, decision, args)
    assert rewarmed.num_steps == 0
    rewarmed.step(5 * 4)
    assert rewarmed.optimizer.param_groups[0]["lr"] == pytest.approx(1.5e-4)


def test_upcycling_sets_the_moe_arguments_of_a_dense_checkpoint(ckpts):
    upcycle = ["--load", str(ckpts / "dense"), "--upcycle-experts", "8", "--upcycle-topk", "2",
               "--upcycle-granularity", "2", "--ffn-hidden-size", "64", "--grow-optimizer", "reset"]
    args, decision = configure(upcycle)
    assert decision.grow and (args.num_experts, args.moe_router_topk, args.moe_ffn_hidden_size) == (8, 2, 32)
    assert decision.provenance.plan["upcycle"]["experts"] == 8
    with pytest.raises(GrowthError, match="--moe-ffn-hidden-size 64 does not match upcycling"):
        configure(upcycle + ["--moe-ffn-hidden-size", "64"])
    with pytest.raises(GrowthError, match="--moe-use-upcycling"):
        configure(upcycle + ["--moe-use-upcycling"])
    with pytest.raises(GrowthError, match="needs a dense source"):
        configure(["--load", str(ckpts / "base"), "--upcycle-experts", "8", "--grow-optimizer", "reset"])


def test_a_listed_moe_layer_freq_grows_with_the_layers(ckpts):
    """An all-MoE base saved with `--moe-layer-freq ([1]*4)` is keyed by layer: the grown run's
    list has one entry per grown layer, whether the script passes the base list or none."""
    for given in ([], ["--moe-layer-freq", "[1,1,1,1]"], ["--moe-layer-freq", json.dumps([1] * 8)]):
        args, decision = configure(["--load", str(ckpts / "listed"), "--grow-depth", "2",
                                    "--grow-optimizer", "reset", *given])
        assert args.num_layers == 8 and args.moe_layer_freq == [1] * 8, given
    stacked, _ = configure(grow(ckpts, "--moe-layer-freq", "[1,1,1,1]"))  # a list given, by the layer map
    assert stacked.moe_layer_freq == [1] * 8
    kept, _ = configure(grow(ckpts))  # stacked layers keep the integer
    assert kept.moe_layer_freq == 1
    with pytest.raises(GrowthError, match=r"--moe-layer-freq \[1, 1, 1, 1, 1, 1\] is neither"):
        configure(grow(ckpts, "--moe-layer-freq", json.dumps([1] * 6)))


@pytest.mark.parametrize("extra, message", [
    (["--pipeline-model-parallel-size", "2", "--decoder-first-pipeline-num-layers", "9"],
     "--decoder-first-pipeline-num-layers 9 does not fit the 8 layers"),
    (["--pipeline-model-parallel-size", "2", "--decoder-last-pipeline-num-layers", "0"],
     "--decoder-last-pipeline-num-layers 0 does not fit"),
    (["--pipeline-model-parallel-size", "2", "--decoder-first-pipeline-num-layers", "3",
      "--decoder-last-pipeline-num-layers", "4"], "leaves 1 of the 8 layers after growth for the other 0"),
    (["--pipeline-model-parallel-size", "3", "--decoder-first-pipeline-num-layers", "5",
      "--decoder-last-pipeline-num-layers", "4"], "leaves -1 of the 8 layers"),
])
def test_uneven_pipeline_stages_that_do_not_fit_are_refused(ckpts, extra, message):
    with pytest.raises(GrowthError, match=message):
        configure(grow(ckpts, *extra))
    args, _ = configure(grow(ckpts, "--pipeline-model-parallel-size", "2",
                             "--decoder-first-pipeline-num-layers", "3"))
    assert args.num_layers == 8


@pytest.mark.parametrize("flag", ["--no-load-optim", "--finetune"])
def test_dropping_the_optimizer_while_growing_it_is_refused(ckpts, flag):
    """Megatron's example scripts pass --no-load-optim; with --grow-optimizer copy (the
    default) or zero, Megatron-LM would silently not load the grown state."""
    for policy in ("copy", "zero"):
        with pytest.raises(GrowthError, match=f"{flag} drops the optimizer state that "
                                              f"--grow-optimizer {policy}.*--grow-optimizer reset"):
            configure(grow(ckpts, flag, optimizer=policy))
    args, _ = configure(grow(ckpts, flag))
    assert args.no_load_optim


def test_a_source_without_args_keeps_the_scripts_topk(ckpts):
    for given, topk in (([], 4), (["--moe-router-topk", "1"], 2), (["--grow-topk", "keep"], 2)):
        args, decision = configure(["--load", str(ckpts / "noargs"), "--grow-experts", "2",
                                    "--grow-optimizer", "reset", *given])
        assert decision.plan.source.topk == topk // (1 if "keep" in given else 2)
        assert (args.num_experts, args.moe_router_topk) == (8, topk), given
