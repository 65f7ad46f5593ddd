"""Growth with alpha = 0 (and zero-init depth copies) keeps megatron-core's forward output."""

import json

import pytest

from scenarios import CHANGING_CASES, PRESERVATION_CASES


@pytest.fixture(scope="module")
def results(ranks, tmp_path_factory):
    out = tmp_path_factory.mktemp("preservation")
    ranks("function_preservation.py", 2, out)
    return json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("case", sorted(PRESERVATION_CASES))
def test_growth_preserves_the_output(results, case):
    assert results[case] <= 1e-5, f"{case}: relative logit error {results[case]:.3g}"


def test_mtp_layers_are_width_grown_not_depth_grown(results):
    assert results["mtp_layer/mtp_tensors"] == 0.0


@pytest.mark.parametrize("case", sorted(CHANGING_CASES))
def test_the_comparison_sees_real_changes(results, case):
    assert results[case] > 1e-4, f"{case}: the output should change, got {results[case]:.3g}"
