"""The offline tools (`megatron-recycle grow | verify | inspect | plan`) on real torch_dist checkpoints."""

import os
import signal
import subprocess
import sys

import pytest
import torch

import ckpt_tools
from scenarios import COPY_INIT_PLAN, PLAN

GROW_FLAGS = ["--grow-depth", "2", "--grow-experts", "2", "--grow-noise-alpha", "0.01", "--grow-seed", "7"]


def cli(*args, check=True):
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1")
    proc = subprocess.run([sys.executable, "-m", "megatron_recycle.cli", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=600)
    if check and proc.returncode != 0:
        pytest.fail(f"megatron-recycle {args[0]} failed (rc {proc.returncode}):\n{proc.stderr[-6000:]}")
    return proc


def imports_megatron_core(*args) -> bool:
    """Run `megatron-recycle ARGS` (rc 0) in a fresh interpreter; whether it imported megatron.core."""
    code = "import sys; from megatron_recycle.cli import main; rc = main(sys.argv[1:]); " \
           "print('\\n', rc, 'megatron.core' in sys.modules)"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600)
    rc, imported = proc.stdout.split()[-2:] if proc.returncode == 0 else ("?", "?")
    assert rc == "0", f"megatron-recycle {args[0]} failed:\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}"
    return imported == "True"


def offline_tools_import_megatron_core(src, tmp_path) -> list:
    """The offline tools that imported megatron.core, run on the torch_dist checkpoint `src`."""
    out = tmp_path / "grown-without-megatron-core"
    runs = {"inspect": ("inspect", src), "plan": ("plan", "--load", src, *GROW_FLAGS),
            "grow": ("grow", "--load", src, "--save", out, *GROW_FLAGS),
            "verify": ("verify", "--source", src, "--grown", out)}
    return [name for name, args in runs.items() if imports_megatron_core(*args)]


@pytest.fixture(scope="module")
def grown(offline_sources):
    out = offline_sources
    before = ckpt_tools.tree_digest(out / "src")
    proc = cli("grow", "--load", out / "src", "--save", out / "dst", *GROW_FLAGS,
               "--workers", 2, "--batch-size-mb", 0.05)
    return out, before, proc.stderr


def test_plain_megatron_core_loads_exactly_what_the_load_hook_gives(ranks, grown):
    out, _, _ = grown
    ranks("offline_roundtrip.py", 2, "compare", out / "src" / "iter_0000005", out / "dst" / "iter_0000005", out)
    counts = __import__("json").loads((out / "compare.json").read_text())
    assert set(counts) == {"ep2", "tp2", "pp2"} and min(counts.values()) > 100, counts


def test_source_is_byte_identical_and_progress_is_shown(grown):
    out, before, log = grown
    assert ckpt_tools.tree_digest(out / "src") == before
    assert "batch 1/" in log and "wrote" in log
    assert not [p for p in out.iterdir() if p.name.startswith(".dst.")]  # no staging left


def test_common_state_describes_the_grown_model_and_its_provenance(grown):
    """In the form the installed megatron-core saves (common.pt up to 0.18, the common_state
    object from 0.19 on), read with megatron-core's own reader too."""
    from megatron.core import dist_checkpointing

    from megatron_recycle import compat
    from megatron_recycle.provenance import Provenance

    out, _, _ = grown
    assert (out / "dst" / "latest_checkpointed_iteration.txt").read_text() == "5"
    iteration = out / "dst" / "iter_0000005"
    assert (iteration / "common.pt").exists() != compat.saves_common_state_object()
    common = ckpt_tools.common_state(out / "dst")
    assert common.keys() == dist_checkpointing.load_common_state_dict(str(iteration)).keys()
    args = common["args"]
    assert (args.num_layers, args.num_experts, args.moe_router_topk) == (8, 8, 4)
    # written by a process that never imported megatron-core: its enum is megatron-core's again
    from megatron.core.transformer.enums import AttnBackend

    assert dist_checkpointing.load_common_state_dict(str(iteration))["args"].attention_backend is AttnBackend.auto
    prov = Provenance.from_dict(common["megatron_recycle"])
    assert prov.plan == PLAN.describe() and prov.grown_by == "offline" and prov.schema == 2
    assert prov.source.iteration == 5 and prov.seed == 7 and prov.optimizer == "grown"
    assert prov.source.path == str((out / "src" / "iter_0000005").resolve())


def test_the_offline_tools_start_without_megatron_core(grown, tmp_path):
    """Its import takes seconds (it runs torch.compile); a torch_dist source in this line's
    common-state form, with an enum in its args, needs none of it."""
    out, _, _ = grown
    assert offline_tools_import_megatron_core(out / "src", tmp_path) == []


def test_a_common_state_read_without_megatron_core_is_written_back_byte_for_byte(grown):
    """Its enums read as stand-ins pickle to the bytes megatron-core's own members do."""
    import io
    import zipfile

    from megatron_recycle.io.checkpoint import read_common_state

    def pickled(save) -> bytes:
        buf = io.BytesIO()
        save(buf)
        with zipfile.ZipFile(buf) as z:
            return z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))

    out, _, _ = grown
    source = out / "src" / "iter_0000005"
    common = read_common_state(source)  # here megatron-core is imported: its own enums
    assert type(common["args"].attention_backend).__module__ == "megatron.core.transformer.enums"
    code = ("import sys; from megatron_recycle.io.checkpoint import read_common_state; "
            "from megatron_recycle.io.safe_pickle import torch_save; "
            "common = read_common_state(__import__('pathlib').Path(sys.argv[1])); "
            "assert 'megatron.core' not in sys.modules; torch_save(common, sys.stdout.buffer)")
    proc = subprocess.run([sys.executable, "-c", code, source], capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    assert pickled(lambda f: f.write(proc.stdout)) == pickled(lambda f: torch.save(common, f))


def test_one_worker_and_big_batches_write_the_same_tensors(grown):
    out, _, _ = grown
    cli("grow", "--load", out / "src", "--save", out / "dst1", *GROW_FLAGS)
    a = ckpt_tools.read_checkpoint(out / "dst" / "iter_0000005")
    b = ckpt_tools.read_checkpoint(out / "dst1" / "iter_0000005")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.startswith("optimizer.state.exp_avg.decoder.layers.mlp.experts") for k in a)


def test_verify_passes_on_a_good_grow(grown):
    out, _, _ = grown
    proc = cli("verify", "--source", out / "src", "--grown", out / "dst")
    assert "verify: OK" in proc.stdout and "noisy copies" in proc.stdout


def test_verify_fails_on_one_altered_tensor(grown):
    out, _, _ = grown

    def alter(tensors):
        tensors["decoder.layers.self_attention.linear_proj.weight"][3, 1, 2] += 1e-3

    ckpt_tools.resave(out / "dst" / "iter_0000005", out / "altered", alter)
    proc = cli("verify", "--source", out / "src", "--grown", out / "altered", check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAILED: 1 mismatch" in proc.stdout
    assert "decoder.layers.self_attention.linear_proj.weight at (3, 0, 0)" in proc.stdout


# The paper authors' options against their definitions, written out by hand: copies (odd layers
# of depth x2, experts 4-7 of x2 append) are multiplied, noise std alpha x sigma of the
# multiplied copy; the baselines draw N(0, 0.02^2) (random router: every row, its biases zero;
# re-initialised copies: the copied experts and their router rows); zeroed expert bias. (The
# authors' own script also multiplies the originals; ours leaves them as the source's.)
COPY_INIT = {
    "multiplier-reinit-zero-bias": (0.5, ["--grow-reinit-expert-copies", "--grow-zero-expert-bias"]),
    "multiplier-random-router": (2.0, ["--grow-random-router"]),
}


@pytest.mark.parametrize("name", COPY_INIT)
def test_copy_init_options_grow_by_their_definition_and_verify(ranks, grown, name):
    out, _, _ = grown
    m, flags = COPY_INIT[name]
    flags = [*GROW_FLAGS, "--grow-weight-multiplier", m, *flags]
    cli("grow", "--load", out / "src", "--save", out / name, *flags)
    assert "verify: OK" in cli("verify", "--source", out / "src", "--grown", out / name).stdout
    wrong = cli("verify", "--source", out / "src", "--grown", out / name, *flags[:-1], check=False)
    assert wrong.returncode == 1 and "FAILED" in wrong.stdout  # the options are checked, not trusted
    if name == "multiplier-reinit-zero-bias":  # the load hook in three layouts: the same, bit for bit
        record = ckpt_tools.common_state(out / name)["megatron_recycle"]["plan"]
        assert record == COPY_INIT_PLAN.describe()
        ranks("offline_roundtrip.py", 2, "compare", out / "src" / "iter_0000005", out / name / "iter_0000005",
              out / name, "copy-init")
    source = ckpt_tools.read_checkpoint(out / "src" / "iter_0000005")
    tensors = ckpt_tools.read_checkpoint(out / name / "iter_0000005")
    copy_layer = torch.tensor([c > 0 for c in PLAN.layer_copy])
    copy_expert = torch.tensor([c > 0 for _, c in PLAN.expert_map()])
    checked = set()
    for key, t in tensors.items():
        kind, want = ckpt_tools.optimizer_state_kind(key), ckpt_tools.by_plan(PLAN, key, source[key])
        if not ckpt_tools.model_key(key).startswith("decoder.layers.") or kind.startswith("exp_avg"):
            continue  # (moments: the optimizer tests' business)
        factor = torch.ones(t.shape[:2] if ckpt_tools.indexed_by_expert(key) else t.shape[:1])
        factor[copy_layer] = m
        if ckpt_tools.indexed_by_expert(key):
            factor[:, copy_expert] = m
        want = want * factor.view(*factor.shape, *[1] * (want.dim() - factor.dim()))
        if key.endswith("router.expert_bias"):
            assert not t.any(), key  # zeroed, or a random router's
            checked.add("bias")
        elif key.endswith("router.weight") and "random-router" in name:
            assert abs(t.std().item() / 0.02 - 1) < 0.15 and abs(t.mean().item()) < 0.01, key
            checked.add("router")
        elif ckpt_tools.indexed_by_expert(key) and "reinit" in name:
            drawn = t[:, copy_expert]
            assert torch.equal(t[:, ~copy_expert], want[:, ~copy_expert]), key
            assert abs(drawn.std().item() / 0.02 - 1) < 0.15 and abs(drawn.mean().item()) < 0.01, key
            checked.add("drawn")
        elif ".experts.experts." in key:  # noisy copies: alpha x sigma of the multiplied copy
            assert torch.equal(t[:, ~copy_expert], want[:, ~copy_expert]), key
            noise = (t - want)[:, copy_expert].double()
            units = tuple(range(2, t.dim()))
            sigma = ckpt_tools.by_plan(PLAN, key, (m * source[key].double()).std(dim=units))[:, copy_expert]
            ratio = noise.std(dim=units) / (0.01 * sigma)
            assert ((ratio - 1).abs() < 0.2).all(), (key, ratio)
            checked.add("noisy")
        else:
            assert torch.equal(t, want), key
            checked.add("multiplied")
    assert checked == ({"bias", "drawn", "multiplied"} if "reinit" in name else
                       {"bias", "router", "noisy", "multiplied"})


@pytest.fixture(scope="module")
def second(grown):
    """OUT/second: the source's architecture, every tensor changed (x -2 + 1/4), as another
    iteration or run of the same model would be."""
    out, _, _ = grown
    ckpt_tools.resave(out / "src" / "iter_0000005", out / "second",
                      lambda tensors: [t.mul_(-2).add_(0.25) for t in tensors.values() if t.is_floating_point()])
    return out / "second"


def test_grow_from_second_takes_the_expert_copies_from_it_and_verifies(ranks, grown, second):
    """Experts 0-3 (and their router rows, expert_bias, moments) from the source, 4-7 from the
    second, layer copies from the source; exact at alpha 0. With noise: verify regenerates it
    from the second's sigma, and the load hook in three layouts gives what offline wrote."""
    from megatron_recycle.provenance import Provenance

    out, _, _ = grown
    flags = ["--grow-depth", "2", "--grow-experts", "2", "--grow-from-second", second]
    cli("grow", "--load", out / "src", "--save", out / "merged", *flags, "--grow-noise-alpha", "0")
    source = ckpt_tools.read_checkpoint(out / "src" / "iter_0000005")
    other = ckpt_tools.read_checkpoint(second / "iter_0000005")
    tensors = ckpt_tools.read_checkpoint(out / "merged" / "iter_0000005")
    copy_expert = torch.tensor([c > 0 for _, c in PLAN.expert_map()])
    kinds = set()
    for key, t in tensors.items():
        want = ckpt_tools.by_plan(PLAN, key, source[key])
        if ckpt_tools.model_key(key).startswith("decoder.layers.") and ckpt_tools.indexed_by_expert(key):
            theirs = ckpt_tools.by_plan(PLAN, key, other[key])
            assert torch.equal(t[:, ~copy_expert], want[:, ~copy_expert]), key
            assert torch.equal(t[:, copy_expert], theirs[:, copy_expert]), key
            assert not torch.equal(want[:, copy_expert], theirs[:, copy_expert]), key
            kinds.add(key.rpartition(".")[2] if "router" in key else ckpt_tools.optimizer_state_kind(key))
        else:
            assert torch.equal(t, want), key
    assert kinds == {"weight", "expert_bias", "model", "param", "exp_avg", "exp_avg_sq"}, kinds
    record = Provenance.from_dict(ckpt_tools.common_state(out / "merged")["megatron_recycle"])
    assert record.second.path == str((second / "iter_0000005").resolve()) and record.second.iteration == 5
    assert len(record.second.metadata_sha256) == 64 and record.plan["init"]["from_second"]
    assert "verify: OK" in cli("verify", "--source", out / "src", "--grown", out / "merged").stdout

    def alter(tensors):  # one element of a copy (expert 5), which the source never gave
        tensors["decoder.layers.mlp.experts.experts.linear_fc2.weight"][0, 5, 1, 2] += 1e-3

    ckpt_tools.resave(out / "merged" / "iter_0000005", out / "merged-altered", alter)
    proc = cli("verify", "--source", out / "src", "--grown", out / "merged-altered", check=False)
    assert proc.returncode == 1 and "FAILED: 1 mismatch" in proc.stdout, proc.stdout + proc.stderr
    assert "(layer 0, expert 5)" in proc.stdout

    cli("grow", "--load", out / "src", "--save", out / "merged-noisy", *flags, "--grow-seed", "7",
        "--workers", 2, "--batch-size-mb", 0.05)
    proc = cli("verify", "--source", out / "src", "--grown", out / "merged-noisy")
    assert "verify: OK" in proc.stdout and "noisy copies" in proc.stdout
    ranks("offline_roundtrip.py", 2, "compare", out / "src" / "iter_0000005", out / "merged-noisy" / "iter_0000005",
          out / "merged-noisy", f"second={second / 'iter_0000005'}")


def test_grow_from_second_of_another_architecture_is_refused_before_writing(grown, second):
    out, _, _ = grown
    flags = ["--grow-experts", "2"]
    proc = cli("grow", "--load", out / "src", "--save", out / "never", *flags, "--grow-from-second",
               out / "src-mixed", check=False)
    assert proc.returncode == 2 and "--grow-from-second" in proc.stderr, proc.stderr
    assert "not the source's architecture: tensor" in proc.stderr and "Traceback" not in proc.stderr
    proc = cli("grow", "--load", out / "src", "--save", out / "never", *flags, "--grow-from-second",
               out / "src", check=False)
    assert proc.returncode == 2 and "is the source checkpoint itself" in proc.stderr, proc.stderr
    proc = cli("grow", "--load", out / "src", "--save", out / "never", "--grow-depth", "2",
               "--grow-from-second", second, check=False)
    assert proc.returncode == 2 and "--grow-from-second gives the expert copies" in proc.stderr, proc.stderr
    ckpt_tools.resave(second / "iter_0000005", out / "second-no-optimizer",
                      lambda tensors: [tensors.pop(k) for k in list(tensors) if k.startswith("optimizer.")])
    proc = cli("grow", "--load", out / "src", "--save", out / "never", *flags, "--grow-from-second",
               out / "second-no-optimizer", check=False)
    assert proc.returncode == 2 and "optimizer state 'optimizer." in proc.stderr, proc.stderr
    assert "--grow-optimizer reset" in proc.stderr and "Traceback" not in proc.stderr
    assert not (out / "never").exists()


def test_mixed_dense_moe_with_a_layer_map_grows_and_verifies(grown):
    out, _, _ = grown
    cli("grow", "--load", out / "src-mixed", "--save", out / "mixed", "--grow-layer-map", "0,1,1,2,3,3",
        "--grow-experts", "2", "--grow-expert-placement", "interleave", "--grow-noise-alpha", "0")
    args = ckpt_tools.common_state(out / "mixed")["args"]
    assert (args.num_layers, args.num_experts, args.moe_layer_freq) == (6, 8, [1, 0, 0, 1, 0, 0])
    assert "verify: OK" in cli("verify", "--source", out / "src-mixed", "--grown", out / "mixed").stdout
    tensors = ckpt_tools.read_checkpoint(out / "mixed" / "iter_0000003")
    source = ckpt_tools.read_checkpoint(out / "src-mixed" / "iter_0000003")
    key = "decoder.layers.{}.mlp.experts.experts.linear_fc2.weight"
    assert torch.equal(tensors[key.format(3)][5], source[key.format(2)][2])  # layer 3 <- 2, expert 5 <- 2


# --- what Megatron-LM saves beside the weights, and without -----------------------------------
TOKENIZER = {"tokenizer.json": b'{"model": {"type": "BPE"}}', "nested/merges.txt": b"#version: 0.2\nt h\n"}


def save_integrity_manifest(iteration):
    """As megatron-core 0.19+ saving with `verify_integrity` does (its own function there);
    before 0.19, written out by hand: SHA-256 of every file at the top of the directory."""
    try:
        from megatron.core.dist_checkpointing.validation import save_integrity_manifest as save
    except ImportError:
        import hashlib
        import json

        files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                 for p in sorted(iteration.iterdir()) if p.is_file()}
        (iteration / "integrity.json").write_text(json.dumps({"algorithm": "sha256", "files": files}))
    else:
        save(str(iteration))


@pytest.fixture(scope="module")
def grown_without_extra_state(ranks, grown):
    """OUT/src-no-extra-state: OUT/src's model and optimizer saved by megatron-core without
    `_extra_state` (as `--ckpt-drop-redundant-extra-state` saves), with a tokenizer/ and an
    integrity.json (as Megatron-LM main's `--save-tokenizer-assets` and `--verify-integrity`
    write them); grown offline into OUT/dst-no-extra-state."""
    out, _, _ = grown
    ranks("offline_roundtrip.py", 2, "source-no-extra-state", out)
    iteration = out / "src-no-extra-state" / "iter_0000005"
    for name, data in TOKENIZER.items():
        (iteration / "tokenizer" / name).parent.mkdir(parents=True, exist_ok=True)
        (iteration / "tokenizer" / name).write_bytes(data)
    save_integrity_manifest(iteration)
    cli("grow", "--load", out / "src-no-extra-state", "--save", out / "dst-no-extra-state", *GROW_FLAGS)
    return out


def test_a_source_without_extra_state_grows_offline_and_at_load_as_one_with_it(ranks, grown_without_extra_state,
                                                                              tmp_path):
    from megatron_recycle.io.checkpoint import CheckpointInfo

    out = grown_without_extra_state
    assert CheckpointInfo.read(out / "src").objects and not CheckpointInfo.read(out / "src-no-extra-state").objects
    assert not CheckpointInfo.read(out / "dst-no-extra-state").objects  # none made up
    assert "verify: OK" in cli("verify", "--source", out / "src-no-extra-state",
                               "--grown", out / "dst-no-extra-state").stdout
    with_objects = ckpt_tools.read_checkpoint(out / "dst" / "iter_0000005")
    without = ckpt_tools.read_checkpoint(out / "dst-no-extra-state" / "iter_0000005")
    assert with_objects.keys() == without.keys() and all(torch.equal(with_objects[k], without[k]) for k in without)
    # at load, asking for no _extra_state (as that flag makes Megatron-LM's load): the hook gives
    # what plain megatron-core loads from the offline-grown checkpoint, in three layouts
    ranks("offline_roundtrip.py", 2, "compare", out / "src-no-extra-state" / "iter_0000005",
          out / "dst-no-extra-state" / "iter_0000005", tmp_path, "no-extra-state")
    counts = __import__("json").loads((tmp_path / "compare.json").read_text())
    assert set(counts) == {"ep2", "tp2", "pp2"} and min(counts.values()) > 100, counts


def test_tokenizer_and_integrity_manifest_are_carried_and_checked(grown_without_extra_state, tmp_path):
    import shutil

    from megatron_recycle.io.iteration_files import IterationFiles

    out = grown_without_extra_state
    source, iteration = out / "src-no-extra-state" / "iter_0000005", out / "dst-no-extra-state" / "iter_0000005"
    assert {n: (iteration / "tokenizer" / n).read_bytes() for n in TOKENIZER} == TOKENIZER
    manifest = __import__("json").loads((iteration / "integrity.json").read_text())
    assert manifest["algorithm"] == "sha256"
    assert sorted(manifest["files"]) == sorted(p.name for p in iteration.iterdir()
                                               if p.is_file() and p.name != "integrity.json")
    checked = IterationFiles.of(source)
    assert checked.mismatches(iteration) == []
    altered = tmp_path / "altered"
    shutil.copytree(iteration, altered)
    (altered / "tokenizer" / "nested" / "merges.txt").write_bytes(b"#version: 0.2\nt x\n")
    with open(altered / "metadata.json", "ab") as f:
        f.write(b" ")
    assert checked.mismatches(altered) == ["tokenizer/nested/merges.txt: missing or not the source's",
                                           "integrity.json: metadata.json does not match its digest"]
    from megatron.core.dist_checkpointing import validation

    if hasattr(validation, "verify_integrity_manifest"):  # megatron-core 0.19+: its own verifier
        validation.verify_integrity_manifest(str(iteration))
        with pytest.raises(Exception, match="metadata.json: hash mismatch"):
            validation.verify_integrity_manifest(str(altered))


@pytest.mark.parametrize("damage", ["file changed", "manifest garbled"])
def test_grow_refuses_a_source_its_integrity_manifest_disagrees_with(grown_without_extra_state, tmp_path, damage):
    import shutil

    out = grown_without_extra_state
    shutil.copytree(out / "src-no-extra-state", tmp_path / "src")
    iteration = tmp_path / "src" / "iter_0000005"
    if damage == "file changed":
        with open(iteration / "metadata.json", "ab") as f:
            f.write(b" ")  # changed after it was saved
    else:
        (iteration / "integrity.json").write_text('{"algorithm": "sha256", "files": {"../x": "0"}}')
    proc = cli("grow", "--load", tmp_path / "src", "--save", tmp_path / "never", *GROW_FLAGS, check=False)
    assert proc.returncode == 3 and "integrity.json" in proc.stderr, proc.stderr
    assert ("metadata.json does not match" if damage == "file changed" else "not a megatron-core") in proc.stderr
    assert not (tmp_path / "never").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]


def test_bad_options_and_existing_destination_write_nothing(grown):
    out, _, _ = grown
    proc = cli("grow", "--load", out / "src", "--save", out / "never", "--grow-layer-map", "0,1", check=False)
    assert proc.returncode == 2 and "--grow-layer-map leaves source layer(s) [2, 3] out" in proc.stderr
    proc = cli("grow", "--load", out / "nowhere", "--save", out / "never", check=False)
    assert proc.returncode == 2 and "--load" in proc.stderr and "no such directory" in proc.stderr
    proc = cli("grow", "--load", out / "src", "--save", out / "dst", check=False)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
    proc = cli("grow", "--load", out / "src", "--save", out / "src" / "inside", "--overwrite", check=False)
    assert proc.returncode == 2 and "overlaps the source" in proc.stderr
    assert not (out / "never").exists() and not (out / "src" / "inside").exists()


def test_overwrite_replaces_the_destination_and_leaves_nothing_beside_it(grown):
    out, _, _ = grown
    dest = out / "again"
    digests = []
    for alpha in ("0", "0.01"):
        cli("grow", "--load", out / "src-mixed", "--save", dest, "--grow-experts", "2",
            "--grow-noise-alpha", alpha, "--overwrite")
        digests.append(ckpt_tools.tree_digest(dest))
    assert digests[0] != digests[1]  # the second run's (noisy) checkpoint replaced the first
    assert "verify: OK" in cli("verify", "--source", out / "src-mixed", "--grown", dest).stdout
    assert not [p.name for p in out.iterdir() if p.name.startswith(".again")]


def test_killed_grow_leaves_no_loadable_destination(grown):
    out, before, _ = grown
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "megatron_recycle.cli", "grow", "--load", out / "src",
                             "--save", out / "killed", *GROW_FLAGS, "--batch-size-mb", "0.001"],
                            stderr=subprocess.PIPE, text=True, env=env)
    for line in proc.stderr:
        if "grow: batch 20/" in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "grow finished before it could be interrupted"
    assert not (out / "killed").exists()
    staging = [p for p in out.iterdir() if p.name.startswith(".killed.partial-")]
    assert staging and not any((p / "latest_checkpointed_iteration.txt").exists() for p in staging)
    assert not any((p / "iter_0000005" / ".metadata").exists() for p in staging)
    assert ckpt_tools.tree_digest(out / "src") == before


# --- inspect / plan: numbers against counts written out by hand ---------------------------------
def hand_params(spec, layers, experts, topk):
    """(total, active, routed-expert) parameters of a toy GPT-MoE, from its sizes."""
    h, f, fe, s, v = spec.hidden, spec.ffn, spec.moe_ffn, spec.shared_expert, spec.vocab
    attention = 2 * h + 3 * h * h + h * h  # fused pre-norm (weight, bias), QKV, output projection
    routed = experts * (2 * fe * h + fe * h)  # GLU fc1 + fc2 per expert
    moe = 2 * h + experts * h + routed + 3 * s * h  # pre-norm, router, experts, shared expert
    dense = 2 * h + 2 * f * h + f * h
    pattern = spec.moe_layer_freq or (1,) * spec.num_layers
    moe_layers = sum(pattern) * layers // spec.num_layers
    total = layers * attention + moe_layers * moe + (layers - moe_layers) * dense + 2 * v * h + 2 * h
    return total, total - moe_layers * routed * (experts - topk) // experts, moe_layers * routed


def test_inspect_counts_match_hand_counts_for_two_configs(grown):
    import json

    from scenarios import SPEC
    from workers.offline_specs import MIXED

    out, _, _ = grown
    for path, spec, pattern, layout in ((out / "src", SPEC, "MMMM", "layers stacked, experts stacked"),
                                        (out / "src-mixed", MIXED, "MDMD", "layers indexed in keys, experts stacked")):
        s = json.loads(cli("inspect", path, "--json").stdout)
        assert (s["params"], s["active_params"], s["expert_params"]) == hand_params(
            spec, spec.num_layers, spec.experts, spec.topk)
        assert (s["layer_pattern"], s["key_layout"], s["attention"]) == (pattern, layout, "MHA")
        assert s["architecture"]["num_experts"] == spec.experts and s["provenance"] is None
    assert json.loads(cli("inspect", path, "--json").stdout)["optimizer_format"] is None
    s = json.loads(cli("inspect", out / "dst", "--json").stdout)
    assert s["optimizer_format"] == "fully_reshardable" and s["provenance"]["layer_map"] == list(PLAN.layer_map)
    assert "grown from" in cli("inspect", out / "dst").stdout


def test_plan_before_after_match_hand_counts(grown):
    import json

    from scenarios import SPEC

    out, _, _ = grown
    r = json.loads(cli("plan", "--load", out / "src", *GROW_FLAGS, "--ep", 2, "--gpus", 4, "--json").stdout)
    for side, (layers, experts, topk) in (("before", (4, 4, 2)), ("after", (8, 8, 4))):
        total, active, routed = hand_params(SPEC, layers, experts, topk)
        assert (r[side]["params"], r[side]["active_params"]) == (total, active)
        attention_flops = 12 * layers * SPEC.seq * SPEC.hidden
        assert r[side]["train_flops_per_token"] == 6 * (active - SPEC.vocab * SPEC.hidden) + attention_flops
        dense = total - routed
        assert r[side]["gpu_weight_bytes"] == 2 * (dense + routed // 2)  # experts split over EP 2
        assert r[side]["gpu_train_bytes"] == dense * (6 + 12 / 4) + routed // 2 * (6 + 12 / 2)  # DP 4, EDP 2
    grown_bytes = sum(t.numel() * t.element_size()
                      for t in ckpt_tools.read_checkpoint(out / "dst" / "iter_0000005").values())
    assert r["after"]["checkpoint_bytes"] == grown_bytes
    assert r["layer_map"] == list(PLAN.layer_map) and r["expert_map"] == [list(x) for x in PLAN.expert_map()]
    proc = cli("plan", "--load", out / "src", *GROW_FLAGS, "--ep", 3, check=False)
    assert proc.returncode == 2 and "--expert-model-parallel-size 3" in proc.stderr
