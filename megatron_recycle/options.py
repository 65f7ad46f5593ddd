"""The growth options, defined once: the offline CLI and the Megatron-LM adapter both add
them to their argparse parser with `add_growth_args` and read them back with
`growth_from_args`, so flag names, defaults and help text cannot drift apart. The flag
names are the ones `plan.GrowthError` messages tell users to change."""

from __future__ import annotations

import argparse

from .plan import DEPTH_METHODS, EXPERT_PLACEMENTS, TOPK_POLICIES, DepthGrowth, GrowthError, WidthGrowth
from .policy import OPTIMIZER_POLICIES, check_rewarmup_iters

_DEPTH, _WIDTH = DepthGrowth(), WidthGrowth()


def _layer_map(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.replace(" ", "").split(",") if x != "")
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--grow-layer-map {text!r}: give 0-based source layer indices separated by commas, "
            "one per target layer, e.g. 0,0,1,1,2,3"
        ) from None


def _blocks(text: str) -> tuple[str, ...]:
    return tuple(b for b in text.replace(" ", "").split(",") if b)


def add_growth_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the `--grow-*` options to `parser` (in their own argument group)."""
    g = parser.add_argument_group("growth", "grow the loaded checkpoint: more layers, more experts")
    g.add_argument("--grow-depth", type=int, default=_DEPTH.factor, metavar="K",
                   help="multiply the number of decoder layers by K (default: %(default)s)")
    g.add_argument("--grow-depth-method", choices=DEPTH_METHODS, default=_DEPTH.method,
                   help="interposition: l1 l1 l2 l2 ...; stack: l1..ln l1..ln (default: %(default)s)")
    g.add_argument("--grow-layer-map", type=_layer_map, default=None, metavar="S0,S1,...",
                   help="explicit 0-based source layer for every target layer; "
                        "overrides --grow-depth/--grow-depth-method/--grow-skip-*")
    g.add_argument("--grow-skip-first", type=int, default=_DEPTH.skip_first, metavar="N",
                   help="keep the first N source layers once, uncopied (default: %(default)s)")
    g.add_argument("--grow-skip-last", type=int, default=_DEPTH.skip_last, metavar="N",
                   help="keep the last N source layers once, uncopied (default: %(default)s)")
    g.add_argument("--grow-hybrid-blocks", type=_blocks, default=None, metavar="B0,B1,...",
                   help="HybridModel: the blocks of the source pattern copied as a whole, e.g. "
                        "M*E,M*E (default: each mixer with its MLPs, e.g. M,*E,M,*E); "
                        "--grow-layer-map and --grow-skip-* then count blocks")
    g.add_argument("--grow-zero-init-copies", action="store_true",
                   help="zero the output projections of copied layers, so the grown model "
                        "computes exactly what the source did")
    g.add_argument("--grow-experts", type=int, default=_WIDTH.factor, metavar="M",
                   help="multiply the number of experts by M (default: %(default)s)")
    g.add_argument("--grow-expert-placement", choices=EXPERT_PLACEMENTS, default=_WIDTH.placement,
                   help="append: copy c of expert e is e + c*E; interleave: e*M + c "
                        "(default: %(default)s)")
    g.add_argument("--grow-topk", choices=TOPK_POLICIES, default=_WIDTH.topk,
                   help="scale: top-k becomes M*k (exact at alpha 0); keep: top-k unchanged "
                        "(default: %(default)s)")
    g.add_argument("--grow-noise-alpha", type=float, default=_WIDTH.noise_alpha, metavar="ALPHA",
                   help="expert copies get Gaussian noise of std ALPHA * std(source expert) "
                        "(default: %(default)s)")
    g.add_argument("--grow-seed", type=int, default=_WIDTH.seed,
                   help="seed of the copies' noise; the result does not depend on the layout "
                        "(default: %(default)s)")
    g.add_argument("--grow-optimizer", choices=OPTIMIZER_POLICIES, default="copy",
                   help="copy: grow the optimizer state with the weights (copies get their "
                        "source's Adam moments); zero: the same, but copies' moments start at "
                        "zero; reset: a fresh optimizer (default: %(default)s)")
    g.add_argument("--grow-rewarmup-iters", type=int, default=0, metavar="N",
                   help="training runs: restart the LR schedule at growth with an N-iteration "
                        "warm-up (default 0: iteration and schedule continue from the source)")
    return parser


def growth_from_args(args: argparse.Namespace) -> tuple[DepthGrowth, WidthGrowth, str]:
    """(DepthGrowth, WidthGrowth, optimizer policy) from parsed `--grow-*` options."""
    if args.grow_layer_map is not None and (args.grow_depth != _DEPTH.factor
                                            or args.grow_skip_first or args.grow_skip_last):
        raise GrowthError(
            "--grow-layer-map gives every target layer explicitly; drop --grow-depth, "
            "--grow-skip-first and --grow-skip-last, or drop --grow-layer-map"
        )
    check_rewarmup_iters(args.grow_rewarmup_iters)
    depth = DepthGrowth(
        factor=args.grow_depth,
        method=args.grow_depth_method,
        layer_map=args.grow_layer_map,
        skip_first=args.grow_skip_first,
        skip_last=args.grow_skip_last,
        zero_copy_outputs=args.grow_zero_init_copies,
        hybrid_blocks=args.grow_hybrid_blocks,
    )
    width = WidthGrowth(
        factor=args.grow_experts,
        placement=args.grow_expert_placement,
        topk=args.grow_topk,
        noise_alpha=args.grow_noise_alpha,
        seed=args.grow_seed,
    )
    return depth, width, args.grow_optimizer


def growth_options_given(args: argparse.Namespace) -> bool:
    """Whether any `--grow-*` option differs from its default (e.g. to override a plan that
    would otherwise be read from a checkpoint's provenance)."""
    defaults = vars(add_growth_args(argparse.ArgumentParser()).parse_args([]))
    return any(getattr(args, name) != value for name, value in defaults.items())
