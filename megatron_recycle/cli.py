"""`megatron-recycle`: offline growth tools on Megatron `torch_dist` checkpoints.

    megatron-recycle grow    --load SRC --save DST --grow-depth 2 --grow-experts 2
    megatron-recycle inspect CKPT [--json]
    megatron-recycle plan    --load SRC --grow-experts 2 [--tp 2 --ep 8 --pp 4 --gpus 256]
    megatron-recycle verify  --source SRC --grown DST

Each subcommand imports only what it needs, so `inspect` and `plan` stay quick (no
megatron-core import).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from .options import add_growth_args, growth_from_args, growth_options_given
from .plan import GrowthError, GrowthPlan


def _checkpoint_args(p: argparse.ArgumentParser, flag: str, help: str) -> None:
    p.add_argument(flag, required=True, metavar="CKPT", help=help)
    p.add_argument("--ckpt-step", type=int, default=None, metavar="N",
                   help="iteration to read instead of the one latest_checkpointed_iteration.txt names")


def _grow(args) -> int:
    from . import offline

    depth, width, optimizer = growth_from_args(args)
    offline.grow(args.load, args.save, depth, width, optimizer, step=args.ckpt_step,
                 overwrite=args.overwrite, workers=args.workers,
                 batch_bytes=int(args.batch_size_mb * 2**20))
    return 0


def _verify(args) -> int:
    from . import verify

    plan = optimizer = None
    if growth_options_given(args):
        from .checkpoint import CheckpointInfo

        depth, width, optimizer = growth_from_args(args)
        plan = GrowthPlan(CheckpointInfo.read(args.source, args.ckpt_step, "--source").architecture(),
                          depth, width)
    report = verify.verify(args.source, args.grown, plan, optimizer, step=args.ckpt_step,
                           batch_bytes=int(args.batch_size_mb * 2**20))
    print(report.summary(args.max_mismatches))
    return 0 if report.ok else 1


def _inspect(args) -> int:
    from . import inspection

    summary = inspection.summarize(args.checkpoint, args.ckpt_step)
    print(json.dumps(summary, indent=1, default=str) if args.json else inspection.table(summary))
    return 0


def _plan(args) -> int:
    from . import cost

    depth, width, _ = growth_from_args(args)
    layout = cost.Layout(tp=args.tp, ep=args.ep, pp=args.pp, dp=args.dp, gpus=args.gpus)
    report = cost.plan_report(args.load, depth, width, layout, step=args.ckpt_step)
    print(json.dumps(report, indent=1, default=str) if args.json else cost.table(report))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-recycle",
        description="Grow pretrained Megatron-Core MoE checkpoints offline, look at them, "
                    "cost them, and prove them.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("grow", help="write a grown copy of a checkpoint",
                       description="Write a grown checkpoint that stock Megatron-LM loads with the "
                                   "grown model arguments and no plugin.")
    _checkpoint_args(p, "--load", "source checkpoint (root or iter_XXXXXXX directory); never modified")
    p.add_argument("--save", required=True, metavar="DST", help="new checkpoint root to write")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="processes growing batches in parallel (default: %(default)s)")
    p.add_argument("--batch-size-mb", type=float, default=1024, metavar="MB",
                   help="grown tensor bytes per batch; memory per process stays a small "
                        "multiple of this (default: %(default)s)")
    add_growth_args(p)
    p.set_defaults(run=_grow)

    p = sub.add_parser("verify", help="prove a grown checkpoint is what its plan says",
                       description="Check every grown tensor against its source slice by the "
                                   "layer/expert maps, the copies' noise std (alpha * sigma) and "
                                   "finiteness. The plan is read from the grown checkpoint's "
                                   "provenance unless --grow-* options are given.")
    _checkpoint_args(p, "--source", "the source checkpoint")
    p.add_argument("--grown", required=True, metavar="CKPT", help="the grown checkpoint")
    p.add_argument("--batch-size-mb", type=float, default=1024, metavar="MB",
                   help="tensor bytes read per batch (default: %(default)s)")
    p.add_argument("--max-mismatches", type=int, default=10, metavar="N",
                   help="mismatches to list (default: %(default)s)")
    add_growth_args(p)
    p.set_defaults(run=_verify)

    p = sub.add_parser("inspect", help="architecture, parameter counts and provenance of a checkpoint")
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint root or iter_XXXXXXX directory")
    p.add_argument("--ckpt-step", type=int, default=None, metavar="N", help="iteration to read")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=_inspect)

    p = sub.add_parser("plan", help="what growth will cost, before any GPU-hour is spent",
                       description="Before/after parameters, active parameters and FLOPs per "
                                   "token, checkpoint bytes and memory per GPU under a target "
                                   "layout; the exact layer and expert maps.")
    _checkpoint_args(p, "--load", "source checkpoint")
    for flag, what in (("--tp", "tensor"), ("--ep", "expert"), ("--pp", "pipeline")):
        p.add_argument(flag, type=int, default=1, metavar="N",
                       help=f"target {what}-parallel size (default: %(default)s)")
    p.add_argument("--dp", type=int, default=None, metavar="N", help="target data-parallel size")
    p.add_argument("--gpus", type=int, default=None, metavar="N",
                   help="GPUs of the target job (data-parallel size = N / (tp * pp))")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_growth_args(p)
    p.set_defaults(run=_plan)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except GrowthError as e:
        print(f"megatron-recycle {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"megatron-recycle {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
