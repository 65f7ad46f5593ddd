"""The offline tools can be trusted with a checkpoint: they never run code from one, never touch
what is not theirs, leave nothing half-written, and say in one line what went wrong.

Exit codes: 2 a usage error, 3 an unreadable checkpoint or an I/O failure, 1 verify found a
mismatch, 130 / 143 interrupted."""

import os
import pickle
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import ckpt_tools
from test_offline_tools import GROW_FLAGS, cli

SRC_ITER = "iter_0000005"


def started(*args, env_extra=None):
    """A `megatron-recycle` process, as a terminal's foreground job would run it."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1", **(env_extra or {}))
    return subprocess.Popen([sys.executable, "-m", "megatron_recycle.cli", *map(str, args)],
                            stderr=subprocess.PIPE, text=True, env=env, preexec_fn=_default_sigint)


def _default_sigint():
    # A shell without job control starts background jobs with SIGINT ignored, and the tool
    # rightly keeps that; a user's Ctrl-C reaches a foreground job with the default disposition.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for_batch(proc, number=2):
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if f"grow: batch {number}/" in line:
            return lines
    pytest.fail("the grow ended before batch %d:\n%s" % (number, "".join(lines)))


def slow_grow(src, dest, *extra):
    return started("grow", "--load", src, "--save", dest, *GROW_FLAGS, "--batch-size-mb", "0.002", *extra)


def one_error_line(proc, code, *fragments):
    assert proc.returncode == code, (proc.returncode, proc.stderr[-3000:])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("megatron-recycle")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


# --- never execute checkpoint content ---------------------------------------------------------
class Payload:
    """Unpickling this runs `touch MARKER`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def payloads(offline_sources, tmp_path_factory):
    out = tmp_path_factory.mktemp("payloads")
    marker = out / "MARKER"
    src = offline_sources / "src"
    made = {}

    shutil.copytree(src, out / "common_pt")  # the 0.16 form, wherever the source keeps it
    torch.save({"args": Payload(marker), "iteration": 5}, out / "common_pt" / SRC_ITER / "common.pt")
    made["common_pt"] = (out / "common_pt", "common.pt")

    ckpt_tools.resave(src / SRC_ITER, out / "common_state", common_form="object",
                      alter_common=lambda c: c.update(args=Payload(marker)))
    made["common_state"] = (out / "common_state", "common_state")

    shutil.copytree(src, out / "metadata")
    (out / "metadata" / SRC_ITER / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    made["metadata"] = (out / "metadata", ".metadata")

    obj = "decoder.layers.mlp.router._extra_state/shard_0_4"  # layer 0 of a 4-layer stack
    ckpt_tools.resave(src / SRC_ITER, out / "object", extra_objects={obj: Payload(marker)})
    made["object"] = (out / "object", "_extra_state")
    assert not marker.exists()
    return out, marker, made


@pytest.mark.parametrize("where", ["common_pt", "common_state", "metadata", "object"])
def test_no_command_runs_code_from_a_checkpoint(payloads, offline_sources, where):
    out, marker, made = payloads
    ckpt, named = made[where]
    commands = [["grow", "--load", ckpt, "--save", out / f"grown-{where}", *GROW_FLAGS]]
    if where != "object":  # objects are only read by grow
        commands += [["inspect", ckpt], ["plan", "--load", ckpt, "--grow-experts", "2"],
                     ["verify", "--source", ckpt, "--grown", ckpt],
                     ["verify", "--source", offline_sources / "src", "--grown", ckpt]]
    for command in commands:
        proc = cli(*command, check=False)
        one_error_line(proc, 3, named, "refused")
        assert not marker.exists(), f"{command[0]} ran code from the {where} of a checkpoint"
    assert not (out / f"grown-{where}").exists()


def test_megatron_lm_refuses_it_before_megatron_core_would_load_it(payloads):
    """megatron-core itself unpickles `.metadata` and (0.19) the common state object unsafely;
    the Megatron-LM adapter reads both safely first, at argument time."""
    from megatron_recycle.errors import CheckpointError
    from test_megatron_lm import configure

    out, marker, made = payloads
    for where in ("common_pt", "common_state", "metadata"):
        ckpt, named = made[where]
        with pytest.raises(CheckpointError, match=f"{named}.*refused"):
            configure(["--load", str(ckpt), "--grow-experts", "2", "--grow-optimizer", "reset"])
    assert not marker.exists()


def test_the_load_hook_reads_objects_safely(payloads):
    """megatron-core's reader unpickles sharded objects (`_extra_state`) unsafely; the load hook
    reads the ones it grows itself."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from megatron_recycle import DepthGrowth, GrowthLoadStrategy
    from megatron_recycle.errors import CheckpointError

    out, marker, made = payloads
    ckpt, _ = made["object"]
    target = ShardedObject("decoder.layers.mlp.router._extra_state", None, (8,), (1,), replica_id=0)
    with pytest.raises(CheckpointError, match="_extra_state.*refused"):
        GrowthLoadStrategy(depth=DepthGrowth(2)).load({"o": target}, ckpt / SRC_ITER)
    assert not marker.exists()


# --- never touch what is not ours ---------------------------------------------------------------
def test_overwrite_replaces_only_a_checkpoint(offline_sources, tmp_path):
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "chapter1.tex").write_text("months of work")
    proc = cli("grow", "--load", offline_sources / "src", "--save", thesis, *GROW_FLAGS, "--overwrite",
               check=False)
    one_error_line(proc, 2, str(thesis), "not a Megatron checkpoint root")
    assert (thesis / "chapter1.tex").read_text() == "months of work"
    (tmp_path / "a-file").write_text("x")
    one_error_line(cli("grow", "--load", offline_sources / "src", "--save", tmp_path / "a-file",
                       "--overwrite", check=False), 2, "not a directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "thesis"]  # nothing beside them


def test_a_symlinked_save_replaces_the_checkpoint_it_points_to(offline_sources, tmp_path):
    real = tmp_path / "real"
    cli("grow", "--load", offline_sources / "src-mixed", "--save", real, "--grow-experts", "2")
    link = tmp_path / "link"
    link.symlink_to(real)
    cli("grow", "--load", offline_sources / "src", "--save", link, *GROW_FLAGS, "--overwrite")
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert ckpt_tools.common_state(link)["args"].num_layers == 8  # src's growth, not src-mixed's
    assert "verify: OK" in cli("verify", "--source", offline_sources / "src", "--grown", link).stdout
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    one_error_line(cli("grow", "--load", offline_sources / "src", "--save", dangling, check=False), 2,
                   "symlink", "does not exist")
    assert not (tmp_path / "nowhere").exists()


def test_two_grows_into_one_destination_cannot_both_succeed(offline_sources, tmp_path):
    dest = tmp_path / "dest"
    first = slow_grow(offline_sources / "src", dest)
    wait_for_batch(first)
    second = cli("grow", "--load", offline_sources / "src-mixed", "--save", dest, "--grow-experts", "2",
                 "--overwrite", check=False)
    one_error_line(second, 2, "another megatron-recycle grow is writing it")
    first.stderr.read()
    assert first.wait(timeout=600) == 0
    assert ckpt_tools.common_state(dest)["args"].num_layers == 8  # the first one's


def test_a_destination_created_while_growing_is_left_alone(offline_sources, tmp_path):
    dest = tmp_path / "dest"
    proc = slow_grow(offline_sources / "src", dest, "--overwrite")
    wait_for_batch(proc)
    dest.mkdir()
    (dest / "notes.txt").write_text("someone else's")
    proc.stderr = proc.stderr.read()
    proc.wait(timeout=600)
    one_error_line(proc, 2, "changed while growing")
    assert [p.name for p in dest.iterdir()] == ["notes.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".dest.")]  # staging, lock removed


def test_stale_staging_is_reported_and_removed_only_when_ours_and_asked(offline_sources, tmp_path):
    from megatron_recycle.io.destination import MARKER

    dest = tmp_path / "dest"
    ours, foreign = tmp_path / ".dest.partial-kill9", tmp_path / ".dest.partial-notours"
    for d in (ours, foreign):
        d.mkdir()
        (d / "data").write_bytes(b"x" * 1000)
    (ours / MARKER).write_text("{}")
    proc = cli("grow", "--load", offline_sources / "src-mixed", "--save", dest, "--grow-experts", "2")
    assert ".dest.partial-kill9" in proc.stderr and "--remove-stale-staging" in proc.stderr
    assert ".dest.partial-notours" not in proc.stderr and ours.exists()
    cli("grow", "--load", offline_sources / "src-mixed", "--save", dest, "--grow-experts", "2",
        "--overwrite", "--remove-stale-staging")
    assert not ours.exists() and (foreign / "data").exists()


def _mount_tmpfs(path, options):
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.decode().strip() or 'not root'})")


@pytest.mark.parametrize("options, message", [("size=512k", "free"), ("ro", "cannot write")])
def test_a_full_or_read_only_file_system_is_refused_before_writing(offline_sources, tmp_path, options, message):
    mount = tmp_path / "fs"
    _mount_tmpfs(mount, options)
    try:
        proc = cli("grow", "--load", offline_sources / "src", "--save", mount / "dest", *GROW_FLAGS,
                   check=False)
        one_error_line(proc, 3, message)
        assert not list(mount.iterdir())
    finally:
        subprocess.run(["umount", str(mount)], check=False)


# --- every bad input: one line, the file, what to do ------------------------------------------
@pytest.fixture()
def broken(offline_sources, tmp_path):
    """A copy of the source to break."""
    root = tmp_path / "broken"
    shutil.copytree(offline_sources / "src", root)
    return root


def _truncate(path, keep=100):
    path.write_bytes(path.read_bytes()[:keep])


def _garble_common_state(root):
    """Zero the common state's bytes, in whichever form it is stored."""
    from megatron_recycle import compat
    from megatron_recycle.io.safe_pickle import load_metadata

    iteration = root / SRC_ITER
    if (iteration / "common.pt").exists():
        return _truncate(iteration / "common.pt")
    metadata = load_metadata(iteration / ".metadata")
    where = next(v for k, v in metadata.storage_data.items() if k.fqn == compat.common_state_storage_key())
    with open(iteration / where.relative_path, "r+b") as f:
        f.seek(where.offset)
        f.write(b"\0" * where.length)


@pytest.mark.parametrize("damage, commands, fragment", [
    (lambda r: (r / "latest_checkpointed_iteration.txt").write_text("hello"), ("inspect", "grow"),
     "latest_checkpointed_iteration.txt"),
    (lambda r: (r / "latest_checkpointed_iteration.txt").write_text("9"), ("inspect", "grow"),
     "iter_0000009, which does not exist"),
    (lambda r: (r / SRC_ITER / ".metadata").unlink(), ("inspect", "grow"), ".metadata: missing"),
    (lambda r: _truncate(r / SRC_ITER / ".metadata"), ("inspect", "grow"), ".metadata: garbled"),
    (lambda r: (r / SRC_ITER / "metadata.json").write_text("{not json"), ("inspect", "grow"), "metadata.json"),
    (lambda r: [_truncate(f, 2000) for f in sorted((r / SRC_ITER).glob("*.distcp"))], ("grow",),
     "iter_0000005"),  # "reading its tensors failed", or its common state object garbled (0.19)
    (_garble_common_state, ("inspect", "grow"), "common"),
])
def test_a_damaged_checkpoint_is_one_line_exit_3(broken, tmp_path, damage, commands, fragment):
    damage(broken)
    for command in commands:
        args = ["inspect", broken] if command == "inspect" else ["grow", "--load", broken, "--save",
                                                                  tmp_path / "out", *GROW_FLAGS]
        one_error_line(cli(*args, check=False), 3, fragment)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, fragment", [
    (["--grow-noise-alpha", "inf"], "--grow-noise-alpha must be between 0 and 1"),
    (["--grow-noise-alpha", "1e300"], "--grow-noise-alpha"),
    (["--batch-size-mb", "0"], "--batch-size-mb"),
    (["--workers", "0"], "--workers"),
])
def test_bad_options_are_one_line_exit_2(offline_sources, tmp_path, flags, fragment):
    proc = cli("grow", "--load", offline_sources / "src", "--save", tmp_path / "out", "--grow-experts", "2",
               *flags, check=False)
    one_error_line(proc, 2, fragment)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"),
                                             (signal.SIGTERM, 143, "terminated")])
def test_interrupted_grow_cleans_up_and_exits_like_a_signal(offline_sources, tmp_path, sig, code, word):
    dest = tmp_path / "dest"
    proc = slow_grow(offline_sources / "src", dest)
    wait_for_batch(proc)
    proc.send_signal(sig)
    proc.stderr = proc.stderr.read()
    proc.wait(timeout=120)
    one_error_line(proc, code, word, "--save is as it was")
    assert not dest.exists() and not list(tmp_path.glob(".dest*"))


# --- exact verify -------------------------------------------------------------------------
EXPERTS = "decoder.layers.mlp.experts.experts.linear_fc1.weight"


@pytest.fixture(scope="module")
def grown_once(offline_sources):
    dest = offline_sources / "trusted"
    cli("grow", "--load", offline_sources / "src", "--save", dest, *GROW_FLAGS)
    return dest


def _swap_layers(t):
    t[EXPERTS][[2, 3]] = t[EXPERTS][[3, 2]]  # layers 2 and 3 both copy source layer 1


def _edit_noisy_copy(t):
    t[EXPERTS][1, 6, 0, 0] += 1e-3  # expert 6 is a noisy copy of expert 2


@pytest.mark.parametrize("name, tensors, common, fragment", [
    ("noisy_copy_edited", _edit_noisy_copy, None,
     f"{EXPERTS} at (1, 6, 0, 0) (layer 1, expert 6): differs from its regenerated noisy copy: 1 element(s), first at (0, 0)"),
    ("copies_swapped_between_layers", _swap_layers, None, "(layer 2, expert 4): differs from its regenerated noisy copy"),
    ("wrong_num_experts", None, lambda c: setattr(c["args"], "num_experts", 4), "args.num_experts is 4"),
    ("wrong_num_layers", None, lambda c: setattr(c["args"], "num_layers", 4), "args.num_layers is 4"),
    ("wrong_topk", None, lambda c: setattr(c["args"], "moe_router_topk", 2), "args.moe_router_topk is 2"),
    ("wrong_iteration", None, lambda c: c.update(iteration=7), "iteration 7"),
])
def test_verify_catches_every_alteration(offline_sources, grown_once, name, tensors, common, fragment):
    def alter_common(c):
        c["args"] = __import__("copy").copy(c["args"])
        common(c)

    altered = offline_sources / f"altered-{name}"
    ckpt_tools.resave(grown_once / SRC_ITER, altered, tensors, alter_common if common else None)
    proc = cli("verify", "--source", offline_sources / "src", "--grown", altered, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr[-2000:]
    assert "verify: FAILED" in proc.stdout and fragment in proc.stdout, proc.stdout


def test_verify_passes_an_unaltered_resave(offline_sources, grown_once):
    again = ckpt_tools.resave(grown_once / SRC_ITER, offline_sources / "resaved")
    proc = cli("verify", "--source", offline_sources / "src", "--grown", again.parent)
    assert "verify: OK" in proc.stdout and "bit for bit" in proc.stdout


# --- growing as a torch.distributed job ---------------------------------------------------------
def test_a_distributed_grow_writes_what_one_process_writes(offline_sources, grown_once, tmp_path):
    from conftest import _free_port

    dest = tmp_path / "distributed"
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                           f"--master-port={_free_port()}", "-m", "megatron_recycle.cli", "grow",
                           "--load", offline_sources / "src", "--save", dest, *GROW_FLAGS,
                           "--batch-size-mb", "0.05"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "2 rank(s)" in proc.stderr
    one = ckpt_tools.read_checkpoint(grown_once / SRC_ITER)
    many = ckpt_tools.read_checkpoint(dest / SRC_ITER)
    assert one.keys() == many.keys() and all(torch.equal(one[k], many[k]) for k in one)
    assert ckpt_tools.common_state(dest).keys() == ckpt_tools.common_state(grown_once).keys()
    assert "verify: OK" in cli("verify", "--source", offline_sources / "src", "--grown", dest).stdout
    assert not [p for p in tmp_path.iterdir() if p.name != "distributed"]
