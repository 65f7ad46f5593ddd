"""`megatron-recycle eval`: a tiny random Qwen3-MoE (built by transformers from a config, no
downloads) grown in memory and scored by lm-evaluation-harness on a 5-example multiple-choice
task from a local jsonl. Runs in the Bridge venv (requirements/bridge.txt has lm-eval)."""

import json

import pytest

pytest.importorskip("transformers", reason="needs transformers (requirements/common.txt)")
for module in ("lm_eval", "accelerate"):
    pytest.importorskip(module, reason="needs lm-eval and accelerate (pip install 'megatron-recycle[eval]'; "
                                       "requirements/bridge.txt)")

from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from megatron_recycle import cli  # noqa: E402
from test_hf import COMMON, build  # noqa: E402

TASK = "recycle_tiny_mc"
WORDS = ["<unk>", "<eos>"] + [f"w{i}" for i in range(COMMON["vocab_size"] - 2)]
WIDTH_DEPTH_EXACT = ["--grow-experts", "2", "--grow-noise-alpha", "0", "--grow-depth", "2", "--grow-zero-init-copies"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The source checkpoint (with a word-level tokenizer of its vocabulary) and a task directory."""
    root = tmp_path_factory.mktemp("hf_eval")
    build("qwen3_moe", root / "src")
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="<eos>",
                            model_max_length=64).save_pretrained(root / "src")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"question": f"w{i} w{i + 1} w{i + 2}", "answer": i % 3,
                                        "choices": [f"w{i + 3}", f"w{i + 9} w{i}", f"w{i + 20}"]}) + "\n"
                            for i in range(5)))
    (root / "tasks").mkdir()
    (root / "tasks" / "tiny.yaml").write_text(f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {root / "datasets-cache"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    return root


def run_eval(setup, out, *flags, load=None):
    assert cli.main(["eval", "--load", str(load or setup / "src"), "--tasks", TASK, "--include-path",
                     str(setup / "tasks"), "--no-builtin-tasks", "--device", "cpu", "--batch-size", "4", "--output-json", str(out),
                     "--log-samples", *flags]) == 0
    return json.loads(out.read_text())


def loglikelihoods(results):
    return [ll for s in results["samples"][TASK] for ll, _ in s["filtered_resps"]]


def max_difference(a, b):
    assert len(a) == len(b) == 15  # 5 examples x 3 choices
    return max(abs(x - y) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def source_results(setup, tmp_path_factory):
    return run_eval(setup, tmp_path_factory.mktemp("source") / "results.json")


def test_width_at_alpha_0_and_zero_init_depth_grown_in_memory_score_as_the_source(setup, source_results,
                                                                                 tmp_path, capsys):
    grown = run_eval(setup, tmp_path / "grown.json", *WIDTH_DEPTH_EXACT)
    assert max_difference(loglikelihoods(grown), loglikelihoods(source_results)) <= 1e-5
    assert 0 <= grown["results"][TASK]["acc,none"] <= 1
    assert grown["results"][TASK]["acc,none"] == source_results["results"][TASK]["acc,none"]
    plan = grown["megatron_recycle"]["plan"]
    assert source_results["megatron_recycle"]["plan"] != plan
    assert grown["megatron_recycle"]["family"] == "Qwen3-MoE"
    assert grown["config"]["model_num_parameters"] > 1.9 * source_results["config"]["model_num_parameters"]
    out = capsys.readouterr().out
    assert TASK in out and "acc" in out and f"wrote {tmp_path / 'grown.json'}" in out
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary file left


def test_noisy_growth_in_memory_scores_as_the_checkpoint_grow_writes(setup, source_results, tmp_path):
    noisy = ["--grow-experts", "2", "--grow-noise-alpha", "0.5"]
    in_memory = run_eval(setup, tmp_path / "memory.json", *noisy)
    assert cli.main(["grow", "--load", str(setup / "src"), "--save", str(tmp_path / "grown"), *noisy]) == 0
    written = run_eval(setup, tmp_path / "written.json", load=tmp_path / "grown")
    assert max_difference(loglikelihoods(in_memory), loglikelihoods(written)) == 0  # one code path
    assert max_difference(loglikelihoods(in_memory), loglikelihoods(source_results)) > 1e-4


def test_refusals_name_what_to_do(setup, tmp_path, capsys):
    def refused(*flags, code=2):
        assert cli.main(["eval", "--load", str(setup / "src"), "--tasks", TASK, *flags]) == code
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        return err

    include = ["--include-path", str(setup / "tasks"), "--no-builtin-tasks"]
    assert "--tasks: lm-eval knows no task nonesuch" in refused(*include, "--tasks", "nonesuch")
    assert "--include-path" in refused("--include-path", str(tmp_path / "none"))
    assert "--include-path" in refused("--no-builtin-tasks")
    existing = tmp_path / "results.json"
    existing.write_text("keep")
    assert "--overwrite" in refused(*include, "--output-json", str(existing))
    assert existing.read_text() == "keep"
    assert "--output-json" in refused(*include, "--log-samples")
    assert "--tokenizer" in refused(*include, "--tokenizer", str(tmp_path))
    assert "not a Hugging Face checkpoint" in refused(*include, "--load", str(tmp_path))
