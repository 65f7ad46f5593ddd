"""`megatron-recycle eval`: a Hugging Face checkpoint grown in memory and run through
lm-evaluation-harness, without writing the grown checkpoint (as the paper's authors evaluate
grown models).

The grown tensors are `grow`'s own (`grow.prepare` → `grow.grown_state_dict`: the same plan,
mapping, operators and noise), loaded by `AutoModelForCausalLM.from_pretrained` from that state
dict and the grown `config.json`, so transformers converts them as it converts the files `grow`
writes. Every flag is checked before anything is grown: lm-eval installed, the tasks known, the
output writable, the growth options valid for the source.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from .. import __version__
from ..errors import CheckpointError, GrowthError
from ..io.destination import write_file
from ..options import Growth
from . import grow as hf_grow

Log = Callable[[str], None]
# the modules `eval` imports, and the packages that bring them (setup.py extra `eval`)
NEEDED = {"lm_eval": "lm-eval", "accelerate": "accelerate", "transformers": "transformers"}
INSTALL = "pip install 'megatron-recycle[eval]' (or: pip install lm-eval==0.4.13 accelerate==1.15.0)"


def require_lm_eval() -> None:
    missing = [package for module, package in NEEDED.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise GrowthError(f"eval runs lm-evaluation-harness, and {' and '.join(missing)} "
                          f"{'is' if len(missing) == 1 else 'are'} not installed: {INSTALL}")


def check_output(path, overwrite: bool) -> Optional[Path]:
    """`--output-json`, refused before anything is grown if it cannot be written."""
    if path is None:
        return None
    path = Path(path)
    if path.is_dir():
        raise GrowthError(f"--output-json {path}: is a directory; name a file")
    if path.exists() and not overwrite:
        raise GrowthError(f"--output-json {path}: exists; pass --overwrite to replace it, or name another file")
    if not path.parent.is_dir():
        raise GrowthError(f"--output-json {path}: {path.parent} is not a directory; create it first")
    return path


def task_manager(tasks: Sequence[str], include_paths: Sequence[str] = (), builtin_tasks: bool = True):
    """lm-eval's task index with `include_paths` (and its own tasks unless not `builtin_tasks`:
    indexing those reads some 15,000 YAML files); every name in `tasks` must be in it."""
    from lm_eval.tasks import TaskManager

    for directory in include_paths:
        if not Path(directory).is_dir():
            raise GrowthError(f"--include-path {directory}: not a directory; name the directory "
                              "holding your task YAML files")
    if not builtin_tasks and not include_paths:
        raise GrowthError("--no-builtin-tasks: leaves no task to run; name your task directory with --include-path")
    manager = TaskManager(include_path=list(include_paths) or None, include_defaults=builtin_tasks)
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        raise GrowthError(f"--tasks: lm-eval knows no task {', '.join(unknown)}; list them with "
                          "`lm-eval ls tasks`, and put your own task YAML files in a directory "
                          "named by --include-path")
    return manager


def load_tokenizer(path, flag: str):
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:  # no tokenizer files, or ones transformers cannot read
        raise GrowthError(f"{flag} {path}: no tokenizer transformers can load ({str(e).splitlines()[0]}); "
                          "name the source model's tokenizer directory with --tokenizer") from None


def grown_model(prepared: hf_grow.Prepared, device: str):
    """The grown model as `AutoModelForCausalLM.from_pretrained` makes it of the grown checkpoint."""
    import transformers

    config = transformers.CONFIG_MAPPING[prepared.config["model_type"]].from_dict(prepared.config)
    model_class = transformers.MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]  # AutoModelForCausalLM's choice
    model, info = model_class.from_pretrained(None, config=config, state_dict=hf_grow.grown_state_dict(prepared),
                                              dtype="auto", output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}  # a weight left at random init skews every score
    if problems:
        raise CheckpointError(f"--load {prepared.source.ckpt.path}: transformers did not load the grown "
                              f"state dict whole: {problems}")
    return model.to(device).eval()


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def evaluate(load, tasks: Sequence[str], growth: Growth = Growth(), *, include_paths: Sequence[str] = (),
             builtin_tasks: bool = True, tokenizer=None, device: Optional[str] = None, batch_size: int = 1,
             num_fewshot: Optional[int] = None, limit: Optional[int] = None, log_samples: bool = False,
             log: Log = lambda s: print(s, file=sys.stderr, flush=True)) -> dict:
    """lm-eval's results of the model `growth` makes of `load`, with the growth beside them
    (`megatron_recycle`); per-example loglikelihoods under `samples` with `log_samples`."""
    require_lm_eval()
    manager = task_manager(tasks, include_paths, builtin_tasks)
    prepared = hf_grow.prepare(load, growth)
    tok = load_tokenizer(tokenizer or prepared.source.ckpt.path, "--tokenizer" if tokenizer else "--load")
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    log(f"eval: growing {hf_grow.describe(prepared)} in memory")
    model = grown_model(prepared, device or default_device())
    results = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size),
                                      tasks=list(tasks), task_manager=manager, num_fewshot=num_fewshot,
                                      limit=limit, log_samples=log_samples)
    results["megatron_recycle"] = {"source": str(prepared.source.ckpt.path), "family": prepared.source.family.name,
                                   "plan": prepared.plan.describe(), "notes": prepared.notes,
                                   "version": __version__}
    for note in prepared.notes:
        log(f"eval: note: {note}")
    return results


def table(results: dict) -> str:
    from lm_eval.utils import make_table

    return make_table(results) + (make_table(results, "groups") if results.get("groups") else "")


def write_json(results: dict, path: Path) -> None:
    from lm_eval.utils import handle_non_serializable

    text = json.dumps(results, indent=1, default=handle_non_serializable, ensure_ascii=False) + "\n"
    try:
        write_file(path, lambda f: f.write(text.encode()))
    except OSError as e:
        raise CheckpointError(f"--output-json {path}: cannot write ({e.strerror or e})") from None
