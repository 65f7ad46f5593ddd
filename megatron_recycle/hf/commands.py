"""The `megatron-recycle` commands on Hugging Face checkpoints (`cli.py` hands them a
directory holding config.json and no Megatron tracker)."""

from __future__ import annotations

import json
import os

from .. import cost
from ..errors import EXIT_VERIFY_FAILED, GrowthError
from ..options import growth_from_args, growth_options_given


def _single_process(args, what: str) -> None:
    if getattr(args, "ckpt_step", None) is not None:
        raise GrowthError("--ckpt-step: a Hugging Face checkpoint has no iterations; drop it")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise GrowthError(f"{what}: Hugging Face checkpoints are grown in one process; run it without "
                          "torchrun/srun")
    if getattr(args, "workers", 1) != 1:
        raise GrowthError("--workers: Hugging Face checkpoints are grown in one process; drop it")


def grow(args, batch_bytes: int) -> int:
    from .grow import grow as grow_hf

    _single_process(args, "grow")
    grow_hf(args.load, args.save, growth_from_args(args), overwrite=args.overwrite,
            batch_bytes=batch_bytes, remove_stale_staging=args.remove_stale_staging)
    return 0


def verify(args) -> int:
    from .check import verify_grown

    _single_process(args, "verify")
    growth = growth_from_args(args) if growth_options_given(args) else None
    report = verify_grown(args.source, args.grown, growth)
    print(report.summary(args.max_mismatches))
    return 0 if report.ok else EXIT_VERIFY_FAILED


def inspect(args) -> int:
    from .check import summarize, table

    _single_process(args, "inspect")
    summary = summarize(args.checkpoint)
    print(json.dumps(summary, indent=1, default=str) if args.json else table(summary))
    return 0


def plan(args) -> int:
    from .check import plan_report

    _single_process(args, "plan")
    layout = cost.Layout(tp=args.tp, ep=args.ep, pp=args.pp, dp=args.dp, gpus=args.gpus)
    report = plan_report(args.load, growth_from_args(args), layout)
    print(json.dumps(report, indent=1, default=str) if args.json else cost.table(report))
    return 0


def evaluate(args) -> int:
    from . import evaluation

    _single_process(args, "eval")
    if args.log_samples and args.output_json is None:
        raise GrowthError("--log-samples: the samples go into --output-json; name the file")
    output = evaluation.check_output(args.output_json, args.overwrite)
    results = evaluation.evaluate(args.load, args.tasks, growth_from_args(args), include_paths=args.include_path,
                                  builtin_tasks=not args.no_builtin_tasks, tokenizer=args.tokenizer,
                                  device=args.device, batch_size=args.batch_size, num_fewshot=args.num_fewshot,
                                  limit=args.limit, log_samples=args.log_samples)
    print(evaluation.table(results))
    if output is not None:
        evaluation.write_json(results, output)
        print(f"wrote {output}")
    return 0
