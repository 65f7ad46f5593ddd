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
