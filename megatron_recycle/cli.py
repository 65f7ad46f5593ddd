"""`megatron-recycle`: offline growth tools on Megatron `torch_dist` checkpoints.

    megatron-recycle grow    --load SRC --save DST --grow-depth 2 --grow-experts 2
    megatron-recycle inspect CKPT [--json]
    megatron-recycle plan    --load SRC --grow-experts 2 [--tp 2 --ep 8 --pp 4 --gpus 256]
    megatron-recycle verify  --source SRC --grown DST
    megatron-recycle norms   CKPT --out DIR
    megatron-recycle eval    --load HF_SRC --grow-experts 2 --tasks TASK [--include-path DIR]

`grow` also runs as a torch.distributed job (`torchrun … -m megatron_recycle.cli grow …`): the
ranks share the batches, rank 0 commits.

Exit codes: 0 done; 1 `verify` found mismatches; 2 a usage error (a flag, a size, a
destination); 3 a checkpoint that cannot be read as it should, or an I/O failure; 130 / 143
interrupted by SIGINT / SIGTERM (what was being written is removed). Errors are one line
naming the flag or file and what to do; `--debug` adds the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import traceback
from typing import Optional, Sequence

from .errors import EXIT_IO, EXIT_SIGINT, EXIT_SIGTERM, EXIT_VERIFY_FAILED, GrowthError
from .io import formats
from .options import add_growth_args, growth_from_args, growth_options_given, integer, number


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that cleanup runs as for Ctrl-C."""


def _checkpoint_args(p: argparse.ArgumentParser, flag: str, help: str) -> None:
    p.add_argument(flag, required=True, metavar="CKPT", help=help)
    p.add_argument("--ckpt-step", type=integer(0), default=None, metavar="N",
                   help="iteration to read instead of the one latest_checkpointed_iteration.txt names")


def _batch_bytes(args) -> int:
    return max(1, int(args.batch_size_mb * 2**20))  # finite and > 0: parsed by `number`


def _hf_commands(path):
    """The Hugging Face commands if `path` is an HF checkpoint (config.json + safetensors)."""
    from .io.hf import is_hf_checkpoint

    if not is_hf_checkpoint(path):
        return None
    from .hf import commands

    return commands


def _grow(args) -> int:
    from . import distributed, offline

    if (hf := _hf_commands(args.load)) is not None:
        return hf.grow(args, _batch_bytes(args))
    growth = growth_from_args(args)
    with distributed.joined_from_environment():
        offline.grow(args.load, args.save, growth, step=args.ckpt_step,
                     overwrite=args.overwrite, workers=args.workers, batch_bytes=_batch_bytes(args),
                     remove_stale_staging=args.remove_stale_staging, ckpt_format=args.ckpt_format)
    return 0


def _verify(args) -> int:
    from . import verify

    if (hf := _hf_commands(args.source)) is not None:
        return hf.verify(args)
    plan = optimizer = second = None
    if growth_options_given(args):
        from .io.checkpoint import CheckpointInfo

        growth = growth_from_args(args)
        optimizer, second = growth.optimizer, growth.second
        plan = growth.plan(CheckpointInfo.read(args.source, args.ckpt_step, "--source").architecture())
    report = verify.verify(args.source, args.grown, plan, optimizer, step=args.ckpt_step,
                           batch_bytes=_batch_bytes(args), second=second)
    print(report.summary(args.max_mismatches))
    return 0 if report.ok else EXIT_VERIFY_FAILED


def _inspect(args) -> int:
    from . import advisor, inspection

    if (hf := _hf_commands(args.checkpoint)) is not None:
        return hf.inspect(args)
    summary = inspection.summarize(args.checkpoint, args.ckpt_step)
    summary["advice"] = advisor.advise_checkpoint(args.checkpoint, args.ckpt_step, "CKPT",
                                                  read_norms=args.norms)
    print(json.dumps(summary, indent=1, default=str) if args.json
          else inspection.table(summary) + "\n" + advisor.table(summary["advice"]))
    return 0


def _plan(args) -> int:
    from . import advisor, cost

    if (hf := _hf_commands(args.load)) is not None:
        return hf.plan(args)
    layout = cost.Layout(tp=args.tp, ep=args.ep, pp=args.pp, dp=args.dp, gpus=args.gpus)
    growth = growth_from_args(args)
    report = cost.plan_report(args.load, growth, layout, step=args.ckpt_step)
    report["advice"] = advisor.advise_checkpoint(args.load, args.ckpt_step, growth=growth,
                                                 read_norms=args.norms)
    print(json.dumps(report, indent=1, default=str) if args.json
          else cost.table(report) + "\n" + advisor.table(report["advice"]))
    return 0


def _norms(args) -> int:
    from . import norms
    from .io.checkpoint import CheckpointInfo

    norms.check_out(args.out)
    info = CheckpointInfo.read(args.checkpoint, args.ckpt_step, "CKPT")
    profile = norms.checkpoint_norms(info, _batch_bytes(args))
    result = norms.write(profile, args.out, title=f"{info.path.name}: per-layer expert weight norms")
    if args.json:
        print(json.dumps({"path": str(info.path), "layers": norms.layer_rows(profile),
                          "experts": norms.expert_rows(profile), "profile": profile.shape(),
                          "written": [str(p) for p in result["written"]]}, indent=1))
    else:
        print(norms.table(profile))
        print("wrote " + ", ".join(str(p) for p in result["written"]))
    if result["plot"]:
        print(result["plot"], file=sys.stderr)
    return 0


def _eval(args) -> int:
    from .hf.evaluation import require_lm_eval

    require_lm_eval()
    if (hf := _hf_commands(args.load)) is None:
        raise GrowthError(f"--load {args.load}: not a Hugging Face checkpoint (config.json + safetensors); "
                          "eval grows those in memory. Export a Megatron checkpoint to Hugging Face "
                          "first (Megatron-Bridge's export_ckpt), or evaluate it with Megatron-LM")
    return hf.evaluate(args)


def _advice_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--norms", action="store_true",
                   help="read the expert weights (streaming) for the norm profile the growth "
                        "advice weighs; without it the advice rests on the sunk compute alone")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-recycle",
        description="Grow pretrained Megatron-Core MoE checkpoints offline, look at them, "
                    "cost them, and prove them.",
        epilog="exit codes: 0 done, 1 verify found mismatches, 2 usage error, 3 unreadable "
               "checkpoint or I/O failure, 130/143 interrupted",
        allow_abbrev=False)  # a prefix of one flag must not silently mean another
    parser.add_argument("--debug", action="store_true", help="print tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("grow", help="write a grown copy of a checkpoint", allow_abbrev=False,
                       description="Write a grown checkpoint that stock Megatron-LM loads with the "
                                   "grown model arguments and no plugin. Runs as one process, or "
                                   "as a torch.distributed job (torchrun) whose ranks share the work.")
    _checkpoint_args(p, "--load", "source checkpoint (root or iter_XXXXXXX directory); never modified")
    p.add_argument("--save", required=True, metavar="DST", help="new checkpoint root to write")
    p.add_argument("--overwrite", action="store_true",
                   help="replace DST if it is a Megatron checkpoint root (nothing else is replaced)")
    p.add_argument("--remove-stale-staging", action="store_true",
                   help="remove the staging directories interrupted grows into DST left behind")
    p.add_argument("--workers", type=integer(1), default=1, metavar="N",
                   help="processes growing batches in parallel, per rank: at most the cores it may "
                        "use, and no more than its batches (default: %(default)s)")
    p.add_argument("--batch-size-mb", type=number(0, low_open=True), default=1024, metavar="MB",
                   help="grown tensor bytes per batch; memory per process stays a small "
                        "multiple of this (default: %(default)s)")
    p.add_argument("--ckpt-format", choices=formats.WRITTEN, default=None,
                   help="format to write (Megatron-LM's --ckpt-format): by default the source's, "
                        "torch_dist for a legacy torch source; fsdp_dtensor from fsdp_dtensor sources only")
    add_growth_args(p)
    p.set_defaults(run=_grow)

    p = sub.add_parser("verify", help="prove a grown checkpoint is what its plan says", allow_abbrev=False,
                       description="Check every grown tensor against its source slice by the "
                                   "layer/expert maps, every noisy copy against its regenerated "
                                   "noise (bit for bit), finiteness, and the grown common state. "
                                   "The plan is read from the grown checkpoint's growth record "
                                   "unless --grow-* options are given.")
    _checkpoint_args(p, "--source", "the source checkpoint")
    p.add_argument("--grown", required=True, metavar="CKPT", help="the grown checkpoint")
    p.add_argument("--batch-size-mb", type=number(0, low_open=True), default=1024, metavar="MB",
                   help="tensor bytes read per batch (default: %(default)s)")
    p.add_argument("--max-mismatches", type=integer(0), default=10, metavar="N",
                   help="mismatches to list (default: %(default)s)")
    add_growth_args(p)
    p.set_defaults(run=_verify)

    p = sub.add_parser("inspect", help="architecture, parameter counts and provenance of a checkpoint",
                       allow_abbrev=False)
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint root or iter_XXXXXXX directory")
    p.add_argument("--ckpt-step", type=integer(0), default=None, metavar="N", help="iteration to read")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _advice_args(p)
    p.set_defaults(run=_inspect)

    p = sub.add_parser("plan", help="what growth will cost, before any GPU-hour is spent", allow_abbrev=False,
                       description="Before/after parameters, active parameters and FLOPs per "
                                   "token, checkpoint bytes and memory per GPU under a target "
                                   "layout; the exact layer and expert maps.")
    _checkpoint_args(p, "--load", "source checkpoint")
    for flag, what in (("--tp", "tensor"), ("--ep", "expert"), ("--pp", "pipeline")):
        p.add_argument(flag, type=integer(1), default=1, metavar="N",
                       help=f"target {what}-parallel size (default: %(default)s)")
    p.add_argument("--dp", type=integer(1), default=None, metavar="N", help="target data-parallel size")
    p.add_argument("--gpus", type=integer(1), default=None, metavar="N",
                   help="GPUs of the target job (data-parallel size = N / (tp * pp))")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _advice_args(p)
    add_growth_args(p)
    p.set_defaults(run=_plan)

    p = sub.add_parser("norms", help="per-layer and per-expert weight norms (the paper's Figure 2)",
                       description="Each expert projection's Frobenius norm / sqrt(numel) (GLU "
                                   "gate and up apart), their mean per expert and per layer, "
                                   "as the paper normalises them; read in batches, never the "
                                   "whole checkpoint. Writes DIR/expert_norms.csv and "
                                   "DIR/layer_norms.csv, and DIR/layer_norms.png where "
                                   "matplotlib is installed.")
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint root or iter_XXXXXXX directory")
    p.add_argument("--ckpt-step", type=int, default=None, metavar="N", help="iteration to read")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for the CSVs and the plot")
    p.add_argument("--batch-size-mb", type=float, default=256, metavar="MB",
                   help="weight bytes read per batch; memory stays a small multiple of this "
                        "(default: %(default)s)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=_norms)

    p = sub.add_parser("eval", help="grow a Hugging Face checkpoint in memory and run lm-evaluation-harness",
                       allow_abbrev=False,
                       description="Grow a Hugging Face checkpoint in memory with the --grow-* options "
                                   "(grow's own tensors; nothing is written), load it into "
                                   "AutoModelForCausalLM and run lm-evaluation-harness tasks on it. "
                                   "Without --grow-* options the source itself is evaluated. Needs "
                                   "pip install 'megatron-recycle[eval]'.")
    p.add_argument("--load", required=True, metavar="CKPT",
                   help="source Hugging Face checkpoint directory; never modified")
    p.add_argument("--tasks", required=True, nargs="+", metavar="TASK",
                   help="lm-eval task, group or tag names (glob patterns as lm-eval takes them)")
    p.add_argument("--include-path", action="append", default=[], metavar="DIR",
                   help="a directory of your own lm-eval task YAML files (repeatable)")
    p.add_argument("--no-builtin-tasks", action="store_true",
                   help="index only the --include-path tasks, not lm-eval's own (saves indexing "
                        "its ~15,000 task files)")
    p.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="tokenizer directory (default: --load's)")
    p.add_argument("--device", default=None, metavar="DEVICE",
                   help="torch device of the model (default: cuda where available, else cpu)")
    p.add_argument("--batch-size", type=integer(1), default=1, metavar="N",
                   help="lm-eval batch size (default: %(default)s)")
    p.add_argument("--num-fewshot", type=integer(0), default=None, metavar="N",
                   help="few-shot examples per prompt (default: each task's own)")
    p.add_argument("--limit", type=integer(1), default=None, metavar="N",
                   help="evaluate only the first N examples of each task")
    p.add_argument("--output-json", default=None, metavar="FILE",
                   help="also write lm-eval's results and the growth plan to FILE (atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output-json FILE")
    p.add_argument("--log-samples", action="store_true",
                   help="put each example's inputs and loglikelihoods into --output-json (samples)")
    add_growth_args(p)
    p.set_defaults(run=_eval)
    return parser


_NOTHING_LEFT = {"grow": "; the partial output was removed, --save is as it was"}


def _raise_terminated(signum, frame):
    raise Terminated()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return args.run(args)
    except GrowthError as e:
        _report(args, f"error: {e}")
        return e.exit_code
    except OSError as e:  # an I/O failure outside the checks (disk gone, permissions changed)
        where = f"{e.filename}: " if e.filename else ""
        _report(args, f"error: {where}{e.strerror or e}")
        return EXIT_IO
    except KeyboardInterrupt:
        _report(args, "interrupted (SIGINT)" + _NOTHING_LEFT.get(args.command, ""))
        return EXIT_SIGINT
    except Terminated:
        _report(args, "terminated (SIGTERM)" + _NOTHING_LEFT.get(args.command, ""))
        return EXIT_SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous)


def _report(args, message: str) -> None:
    if args.debug:
        traceback.print_exc()
    print(f"megatron-recycle {args.command}: {message}", file=sys.stderr, flush=True)


def run() -> None:
    """The command line's entry point: `main`, then exit without the interpreter's teardown of
    the ~3,000 modules torch loads (1.2 s measured, after a grow of 1 GB). Everything a command
    writes is durable and every thread, process and process group it started has ended by
    the time `main` returns."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
