"""What `grow` commits can be trusted: `--overwrite` deletes nothing that is not the checkpoint
it replaces, an interrupted replace is recoverable, the source cannot change under a grow, and
no Inf/NaN is written. (tests/test_trust.py: payloads, foreign directories, races, signals.)"""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import ckpt_tools
from test_offline_tools import GROW_FLAGS, cli
from test_trust import SRC_ITER, one_error_line, slow_grow, wait_for_batch

from megatron_recycle.errors import GrowthError
from megatron_recycle.io.checkpoint import TRACKER_FILE
from megatron_recycle.io.destination import MARKER, MOVED_ASIDE, Destination

EXPERTS = "decoder.layers.mlp.experts.experts.linear_fc1.weight"


def fake_root(path, iteration=5, extra=()):
    """A checkpoint root as far as the destination sees it: a tracker naming an iteration."""
    (path / f"iter_{iteration:07d}").mkdir(parents=True)
    (path / f"iter_{iteration:07d}" / "data").write_text(f"iteration {iteration}")
    (path / TRACKER_FILE).write_text(str(iteration))
    for name in extra:
        (path / name).write_text("theirs")
    return path


def destination(path, overwrite=True, iteration=5):
    return Destination(path, overwrite, parts=(TRACKER_FILE, f"iter_{iteration:07d}"))


def commit_a_checkpoint(dest, iteration=5):
    with dest:
        fake_root(dest.staging, iteration)
        dest.commit()


def beside(path):
    return sorted(p.name for p in path.parent.iterdir() if p != path)


# --- --overwrite deletes nothing but the checkpoint it replaces ---------------------------------
def test_overwrite_refuses_a_training_root_naming_everything_it_would_delete(offline_sources, tmp_path):
    ow = tmp_path / "ow"
    shutil.copytree(offline_sources / "src", ow)
    (ow / "iter_0000002").mkdir()
    (ow / "tensorboard").mkdir()
    (ow / "NOTES.txt").write_text("n")
    before = ckpt_tools.tree_digest(ow)
    proc = cli("grow", "--load", offline_sources / "src", "--save", ow, *GROW_FLAGS, "--overwrite", check=False)
    one_error_line(proc, 2, "NOTES.txt", "iter_0000002/", "tensorboard/", "move them out")
    assert ckpt_tools.tree_digest(ow) == before and beside(ow) == []


def test_overwrite_replaces_the_tracker_and_what_it_names_and_the_grown_iteration(tmp_path):
    old = fake_root(tmp_path / "dest", iteration=3)
    commit_a_checkpoint(destination(old, iteration=5), iteration=5)  # iter_0000003 was the checkpoint
    assert sorted(os.listdir(old)) == ["iter_0000005", TRACKER_FILE] and beside(old) == []
    fake_root(old, iteration=7)  # now two iterations: 7 (tracked) and 5, an old run's
    with pytest.raises(GrowthError, match=r"also holds iter_0000005/: .*\(iter_0000007/, "):
        destination(old, iteration=9)


def test_an_entry_added_while_growing_is_not_deleted(tmp_path):
    root = fake_root(tmp_path / "dest")
    dest = destination(root)
    with pytest.raises(GrowthError, match="changed while growing"):
        with dest:
            fake_root(dest.staging)
            (root / "events.out.tfevents").write_text("written meanwhile")
            dest.commit()
    assert (root / "events.out.tfevents").read_text() == "written meanwhile" and beside(root) == []


# --- an interrupted replace is recoverable --------------------------------------------------------
KILLED_BETWEEN_THE_RENAMES = """
import os, signal, sys
from megatron_recycle import cli
rename = os.rename
def rename_unless_the_staging(src, dst, *args, **kwargs):
    if os.path.basename(os.fspath(src)).startswith(".dest.partial-"):
        os.kill(os.getpid(), signal.SIGKILL)  # the old checkpoint is aside, the new not in place
    return rename(src, dst, *args, **kwargs)
os.rename = rename_unless_the_staging
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_replace_killed_between_its_two_renames_is_put_back(offline_sources, tmp_path):
    dest = tmp_path / "dest"
    cli("grow", "--load", offline_sources / "src-mixed", "--save", dest, "--grow-experts", "2")
    old = ckpt_tools.tree_digest(dest)
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1")
    killed = subprocess.run([sys.executable, "-c", KILLED_BETWEEN_THE_RENAMES, "grow", "--load",
                             offline_sources / "src", "--save", dest, *GROW_FLAGS, "--overwrite"],
                            env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    (aside,) = tmp_path.glob(".dest.replaced-*")
    assert not dest.exists() and ckpt_tools.tree_digest(aside / "old") == old

    # never staging to remove, and named with the command that puts it back
    proc = cli("grow", "--load", offline_sources / "src", "--save", dest, *GROW_FLAGS,
               "--remove-stale-staging", check=False)
    one_error_line(proc, 2, str(aside / "old"), f"mv {aside / 'old'} {dest}", "--overwrite")
    assert ckpt_tools.tree_digest(aside / "old") == old

    proc = cli("grow", "--load", offline_sources / "src", "--save", dest, *GROW_FLAGS, "--overwrite",
               "--remove-stale-staging")
    assert "put the old checkpoint back" in proc.stderr
    assert ckpt_tools.common_state(dest)["args"].num_layers == 8  # src's growth replaced it
    assert [p.name for p in tmp_path.iterdir()] == ["dest"]


def _moved_aside(root, marker=True, state=MOVED_ASIDE):
    """The state a replace interrupted between its renames leaves (an earlier version's
    marker held no state)."""
    aside = root.parent / f".{root.name}.replaced-interrupted"
    aside.mkdir()
    if marker:
        (aside / MARKER).write_text(json.dumps({"state": state} if state else {}))
    root.rename(aside / "old")
    return aside


@pytest.mark.parametrize("state", [MOVED_ASIDE, None])
def test_the_printed_command_puts_the_old_checkpoint_back(tmp_path, state):
    root = fake_root(tmp_path / "with space")
    aside = _moved_aside(root, state=state)
    with pytest.raises(GrowthError, match="interrupted `grow --overwrite`") as refused:
        destination(root, overwrite=False)
    command = str(refused.value).split("put it back with ")[1].split(" (or pass")[0]
    subprocess.run(["bash", "-c", command], check=True)
    assert (root / TRACKER_FILE).read_text() == "5" and not aside.exists()


def test_an_old_checkpoint_aside_is_never_stale_staging(tmp_path):
    root = fake_root(tmp_path / "dest")
    aside = _moved_aside(root)
    fake_root(root, iteration=6)  # someone put a checkpoint there since
    dest = destination(root, iteration=6)
    with dest:
        assert dest.stale_staging() == []
        (note,) = dest.moved_aside_notes()
        assert str(aside / "old") in note and f"rm -r {aside}" in note
        dest.remove_stale_staging(print)
        fake_root(dest.staging, 6)
        dest.commit()
    assert (aside / "old" / TRACKER_FILE).read_text() == "5"


# --- names and directories around --save ------------------------------------------------------
def test_a_250_character_save_name_works(tmp_path):
    root = fake_root(tmp_path / ("n" * 250))
    commit_a_checkpoint(destination(root, iteration=6), iteration=6)  # staging, lock, aside beside it
    assert (root / TRACKER_FILE).read_text() == "6" and beside(root) == []


def test_parent_directories_a_failed_run_created_are_removed(tmp_path):
    (tmp_path / "kept").mkdir()
    dest = destination(tmp_path / "kept" / "new" / "deeper" / "dest")
    with pytest.raises(RuntimeError):
        with dest:
            raise RuntimeError("the grow failed")
    assert os.listdir(tmp_path) == ["kept"] and os.listdir(tmp_path / "kept") == []


# --- the source is what it was --------------------------------------------------------------------
def _replace_with_a_copy(path):
    shutil.copy(path, path.with_name(path.name + ".new"))
    os.replace(path.with_name(path.name + ".new"), path)


def test_a_source_file_replaced_while_growing_is_refused(offline_sources, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(offline_sources / "src", src)
    distcp = sorted((src / SRC_ITER).glob("*.distcp"))[-1]
    proc = slow_grow(src, tmp_path / "dest")
    wait_for_batch(proc)
    _replace_with_a_copy(distcp)  # same bytes, another file: the one a later read would open
    proc.stderr = proc.stderr.read()
    proc.wait(timeout=600)
    one_error_line(proc, 3, str(distcp), "changed while growing")
    assert [p.name for p in tmp_path.iterdir()] == ["src"]


def test_a_distributed_grow_checks_the_source_too(offline_sources, tmp_path):
    from conftest import _free_port

    src = tmp_path / "src"
    shutil.copytree(offline_sources / "src", src)
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                             f"--master-port={_free_port()}", "-m", "megatron_recycle.cli", "grow",
                             "--load", src, "--save", tmp_path / "dest", *GROW_FLAGS,
                             "--batch-size-mb", "0.002"], stderr=subprocess.PIPE, text=True, env=env)
    wait_for_batch(proc)
    _replace_with_a_copy(src / SRC_ITER / ".metadata")
    err = proc.stderr.read()
    assert proc.wait(timeout=600) != 0 and f"{src / SRC_ITER / '.metadata'} changed while growing" in err, err[-3000:]
    assert [p.name for p in tmp_path.iterdir()] == ["src"]


def test_a_metadata_rewritten_in_place_with_its_mtime_kept_is_caught(offline_sources, tmp_path):
    from megatron_recycle.errors import CheckpointError
    from megatron_recycle.io.snapshot import SourceSnapshot

    iteration = tmp_path / SRC_ITER
    shutil.copytree(offline_sources / "src" / SRC_ITER, iteration)
    pinned = SourceSnapshot.take(iteration)
    pinned.check()
    metadata = iteration / ".metadata"
    st = metadata.stat()
    data = bytearray(metadata.read_bytes())
    data[-2] ^= 1
    with open(metadata, "r+b") as f:  # same inode, same size
        f.write(data)
    os.utime(metadata, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(CheckpointError, match=r"\.metadata changed while growing"):
        pinned.check()


# --- no Inf/NaN is written or loaded ------------------------------------------------------------
@pytest.fixture(scope="module")
def fp16_near_its_range(offline_sources):
    """src with fp16 experts at ±65000: α·σ noise pushes some past fp16's 65504."""
    def near_the_edge(tensors):
        tensors[EXPERTS] = (65000 * torch.randn(tensors[EXPERTS].shape).sign()).half()

    ckpt_tools.resave(offline_sources / "src" / SRC_ITER, offline_sources / "fp16", near_the_edge)
    return offline_sources / "fp16"


def test_grow_refuses_to_write_a_value_noise_made_infinite(fp16_near_its_range, tmp_path):
    proc = cli("grow", "--load", fp16_near_its_range, "--save", tmp_path / "new" / "dest", *GROW_FLAGS,
               check=False)
    one_error_line(proc, 3, EXPERTS, "layer", "expert", "--grow-noise-alpha", "fp32/bf16")
    assert list(tmp_path.iterdir()) == []  # nor the parent it created


def test_the_load_hook_refuses_to_load_it_on_every_rank(ranks, fp16_near_its_range, tmp_path):
    ranks("not_finite.py", 2, fp16_near_its_range / SRC_ITER, tmp_path)
    first, second = json.loads((tmp_path / "errors.json").read_text())
    assert first.startswith("CheckpointError") and "(layer 1, expert 6)" in first, first
    assert "--grow-noise-alpha" in first
    assert second and "rank 0" in second, second
