"""The growth options, defined once: the offline CLI, the reference loop and the Megatron-LM
adapter add them to their argparse parser with `add_growth_args` and read them back with
`growth_from_args` as one `Growth`, so flag names, defaults and help text cannot drift apart.
The flag names are the ones `GrowthError` messages tell users to change."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Callable, Optional

from .plan import (
    DEPTH_METHODS,
    EXPERT_PLACEMENTS,
    TOPK_POLICIES,
    Architecture,
    CopyInit,
    DepthGrowth,
    GrowthError,
    GrowthPlan,
    Upcycling,
    WidthGrowth,
)
from .policy import OPTIMIZER_POLICIES, check_rewarmup_iters

_DEPTH, _WIDTH, _UPCYCLE, _INIT = DepthGrowth(), WidthGrowth(), Upcycling(), CopyInit()


@dataclass(frozen=True)
class Growth:
    """The `--grow-*` and `--upcycle-*` options, as given."""

    depth: DepthGrowth = DepthGrowth()
    width: WidthGrowth = WidthGrowth()
    upcycle: Upcycling = Upcycling()
    optimizer: str = "copy"  # --grow-optimizer: copy / zero (copies' moments) / reset
    rewarmup_iters: int = 0  # 0: the LR schedule continues
    init: CopyInit = CopyInit()
    second: Optional[str] = None  # --grow-from-second: the checkpoint the expert copies come from

    @property
    def asked(self) -> bool:
        """Whether any growth is asked for (a factor > 1, a layer map, upcycling)."""
        return (self.depth.factor > 1 or self.depth.layer_map is not None or self.width.factor > 1
                or self.upcycle.active)

    def plan(self, source: Architecture) -> GrowthPlan:
        if self.init.from_second != (self.second is not None):
            raise GrowthError("--grow-from-second: the plan reads expert copies from a second "
                              "checkpoint exactly when one is given (Growth.second)")
        return GrowthPlan(source, self.depth, self.width, self.upcycle, self.init)

    def same_plan(self, plan_description: dict) -> bool:
        """Whether a recorded plan was made with these options."""
        try:
            recorded = GrowthPlan.from_description(plan_description)
        except (KeyError, TypeError, GrowthError):  # written by another version: not ours
            return False
        return ((recorded.depth, recorded.width, recorded.upcycle, recorded.init)
                == (self.depth, self.width, self.upcycle, self.init))


def integer(low: int, high: Optional[int] = None) -> Callable[[str], int]:
    """An argparse `type`: an integer in [low, high]; argparse names the flag in its error."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(
                f"give an integer >= {low}" + (f" and <= {high}" if high is not None else "")
                + f", not {text!r}")
        return value
    parse.__name__ = "integer"
    return parse


def number(low: float = 0.0, high: float = math.inf, low_open: bool = False) -> Callable[[str], float]:
    """An argparse `type`: a finite number in [low, high] (or (low, high] with `low_open`)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and (value > low if low_open else value >= low) and value <= high):
            bounds = f"{'>' if low_open else '>='} {low:g}" + (f" and <= {high:g}" if math.isfinite(high) else "")
            raise argparse.ArgumentTypeError(f"give a finite number {bounds}, not {text!r}")
        return value
    parse.__name__ = "number"
    return parse


def _layer_map(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.replace(" ", "").split(",") if x != "")
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--grow-layer-map {text!r}: give 0-based source layer indices separated by commas, "
            "one per target layer, e.g. 0,0,1,1,2,3"
        ) from None


def _layer_flags(text: str) -> tuple[int, ...]:
    """`--upcycle-layers`: 1 / 0 per source layer, comma-separated."""
    try:
        flags = tuple(int(x) for x in text.replace(" ", "").split(",") if x != "")
    except ValueError:
        flags = ()
    if not flags or any(f not in (0, 1) for f in flags):
        raise argparse.ArgumentTypeError(f"--upcycle-layers {text!r}: give 1 (upcycle) or 0 (keep "
                                         "dense) per source layer, separated by commas, e.g. 1,0,1,0")
    return flags


def _blocks(text: str) -> tuple[str, ...]:
    return tuple(b for b in text.replace(" ", "").split(",") if b)


def add_growth_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the `--grow-*` options to `parser` (in their own argument group)."""
    g = parser.add_argument_group("growth", "grow the loaded checkpoint: more layers, more experts")
    g.add_argument("--grow-depth", type=integer(1), default=_DEPTH.factor, metavar="K",
                   help="multiply the number of decoder layers by K (default: %(default)s)")
    g.add_argument("--grow-depth-method", choices=DEPTH_METHODS, default=None,
                   help=f"interposition: l1 l1 l2 l2 ...; stack: l1..ln l1..ln (default: {_DEPTH.method})")
    g.add_argument("--grow-layer-map", type=_layer_map, default=None, metavar="S0,S1,...",
                   help="explicit 0-based source layer for every target layer; "
                        "overrides --grow-depth/--grow-depth-method/--grow-skip-*")
    g.add_argument("--grow-skip-first", type=integer(0), default=_DEPTH.skip_first, metavar="N",
                   help="keep the first N source layers once, uncopied (default: %(default)s)")
    g.add_argument("--grow-skip-last", type=integer(0), default=_DEPTH.skip_last, metavar="N",
                   help="keep the last N source layers once, uncopied (default: %(default)s)")
    g.add_argument("--grow-hybrid-blocks", type=_blocks, default=None, metavar="B0,B1,...",
                   help="HybridModel: the blocks of the source pattern copied as a whole, e.g. "
                        "M*E,M*E (default: each mixer with its MLPs, e.g. M,*E,M,*E); "
                        "--grow-layer-map and --grow-skip-* then count blocks")
    g.add_argument("--grow-zero-init-copies", action="store_true",
                   help="zero the output projections of copied layers, so the grown model "
                        "computes exactly what the source did")
    g.add_argument("--grow-experts", type=integer(1), default=_WIDTH.factor, metavar="M",
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
    g.add_argument("--grow-seed", type=integer(0, 2**63 - 1), default=_WIDTH.seed,
                   help="seed of the copies' noise; the result does not depend on the layout "
                        "(default: %(default)s)")
    g.add_argument("--grow-weight-multiplier", type=number(0, low_open=True),
                   default=_INIT.weight_multiplier, metavar="X",
                   help="copied layers, copied experts and their router rows x X, before their "
                        "noise (whose std scales with them); originals unchanged (default: %(default)s)")
    g.add_argument("--grow-random-router", action="store_true",
                   help="baseline: every router of the grown model drawn afresh from "
                        "N(0, --grow-init-std^2), its biases zero (needs --grow-experts)")
    g.add_argument("--grow-reinit-expert-copies", action="store_true",
                   help="baseline: expert copies and their router rows drawn afresh from "
                        "N(0, --grow-init-std^2) instead of copied (needs --grow-experts)")
    g.add_argument("--grow-zero-expert-bias", action="store_true",
                   help="zero every router's expert_bias (the aux-loss-free load-balancing term)")
    g.add_argument("--grow-from-second", default=None, metavar="CKPT",
                   help="checkpoint merging: the expert copies (ids E..M*E-1), their router rows "
                        "and expert_bias from this checkpoint of the same architecture (a root or "
                        "an iter_XXXXXXX directory: another iteration or run), not from the "
                        "source; --grow-noise-alpha still applies, with the second's sigma "
                        "(needs --grow-experts)")
    g.add_argument("--grow-init-std", type=number(0, low_open=True), default=_INIT.init_std,
                   metavar="STD", help="std of the fresh draws of the two baselines (default: %(default)s)")
    g.add_argument("--grow-optimizer", choices=OPTIMIZER_POLICIES, default="copy",
                   help="copy: grow the optimizer state with the weights (copies get their "
                        "source's Adam moments); zero: the same, but copies' moments start at "
                        "zero; reset: a fresh optimizer (default: %(default)s)")
    g.add_argument("--grow-rewarmup-iters", type=integer(0), default=0, metavar="N",
                   help="training runs: restart the LR schedule at growth with an N-iteration "
                        "warm-up (default 0: iteration and schedule continue from the source)")
    u = parser.add_argument_group("upcycling", "turn a dense checkpoint's MLPs into MoE layers "
                                  "(composes with --grow-depth; noise and seed as --grow-noise-alpha)")
    u.add_argument("--upcycle-experts", type=integer(0), default=_UPCYCLE.experts, metavar="E",
                   help="dense MLP -> E experts (default: %(default)s, no upcycling)")
    u.add_argument("--upcycle-topk", type=integer(1), default=None, metavar="K",
                   help="experts per token after upcycling (default: 2, or E if fewer)")
    u.add_argument("--upcycle-granularity", type=integer(1), default=_UPCYCLE.granularity, metavar="G",
                   help="each expert a 1/G slice of the dense MLP's hidden units (exact when "
                        "K is a multiple of G) (default: %(default)s)")
    u.add_argument("--upcycle-layers", type=_layer_flags, default=None, metavar="1,0,...",
                   help="upcycle only these source layers (1) and keep the others dense (0) "
                        "(default: every layer)")
    u.add_argument("--upcycle-shared-expert", action="store_true",
                   help="the dense MLP also becomes a shared expert beside the routed ones")
    return parser


def growth_from_args(args: argparse.Namespace) -> Growth:
    """The growth the parsed `--grow-*` / `--upcycle-*` options ask for."""
    if args.grow_layer_map is not None and (args.grow_depth != _DEPTH.factor or args.grow_skip_first
                                            or args.grow_skip_last or args.grow_depth_method is not None):
        raise GrowthError(
            "--grow-layer-map gives every target layer explicitly; drop --grow-depth, "
            "--grow-depth-method, --grow-skip-first and --grow-skip-last, or drop --grow-layer-map"
        )
    check_rewarmup_iters(args.grow_rewarmup_iters)
    depth = DepthGrowth(
        factor=args.grow_depth,
        method=args.grow_depth_method or _DEPTH.method,
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
    experts = args.upcycle_experts
    topk = args.upcycle_topk if args.upcycle_topk is not None else min(2, max(experts, 1))
    upcycle = Upcycling(experts=experts, topk=topk, granularity=args.upcycle_granularity,
                        layers=args.upcycle_layers, shared_expert=args.upcycle_shared_expert)
    if not upcycle.active and (args.upcycle_topk is not None or args.upcycle_layers is not None
                               or args.upcycle_shared_expert or args.upcycle_granularity != 1):
        raise GrowthError("--upcycle-topk/-granularity/-layers/-shared-expert need --upcycle-experts E")
    init = CopyInit(weight_multiplier=args.grow_weight_multiplier, random_router=args.grow_random_router,
                    reinit_expert_copies=args.grow_reinit_expert_copies,
                    zero_expert_bias=args.grow_zero_expert_bias, init_std=args.grow_init_std,
                    from_second=args.grow_from_second is not None)
    growth = Growth(depth, width, upcycle, args.grow_optimizer, args.grow_rewarmup_iters, init,
                    args.grow_from_second)
    if init != _INIT and not growth.asked:  # else a launch script would ignore them silently
        raise GrowthError("--grow-weight-multiplier / --grow-random-router / --grow-reinit-expert-copies"
                          " / --grow-zero-expert-bias / --grow-init-std / --grow-from-second change how a "
                          "growth copies: give --grow-depth, --grow-experts or --grow-layer-map too")
    return growth


def given_options(args: argparse.Namespace) -> list[str]:
    """The `--grow-*` / `--upcycle-*` flags whose value differs from its default."""
    defaults = vars(add_growth_args(argparse.ArgumentParser()).parse_args([]))
    return ["--" + name.replace("_", "-") for name, value in defaults.items() if getattr(args, name) != value]


def growth_options_given(args: argparse.Namespace) -> bool:
    """Whether any `--grow-*` option differs from its default (e.g. to override a plan that
    would otherwise be read from a checkpoint's provenance)."""
    return bool(given_options(args))
