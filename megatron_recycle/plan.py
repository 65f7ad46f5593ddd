"""The growth plan: which source layer and expert every target layer and expert comes from.

Pure Python (no torch, no torch.distributed): the plan is computed once from the source
architecture and the growth options, validated against the target before a byte is read,
and then only consulted. Everything downstream (key mapping, tensor operators, the load
hook, the offline tools) derives from it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

from . import hybrid
from .errors import GrowthError

DEPTH_METHODS = ("interposition", "stack")
EXPERT_PLACEMENTS = ("append", "interleave")
TOPK_POLICIES = ("scale", "keep")
MAX_NOISE_ALPHA = 1.0  # beyond it a copy is more noise than expert
INIT_STD = 0.02  # a fresh Megatron model's init std, and the paper authors' random router's
# The largest grown model a plan describes. The plan, the manifest and the maps it prints hold
# an entry per target layer and per target expert (per layer, where keys index them), so a
# typo'd factor must be refused here, before any of them is built. Both bounds are far beyond
# any trained model (about 100 layers; DeepSeek-V3 256 and Kimi K2 384 experts per layer).
MAX_LAYERS = 2**16
MAX_EXPERTS = 2**20


@dataclass(frozen=True)
class DepthGrowth:
    """How layers are copied. Interposition `l1 l1 l2 l2 …`, stack `l1…ln l1…ln`."""

    factor: int = 1
    method: str = "interposition"
    layer_map: Optional[tuple[int, ...]] = None  # explicit target → source layer, 0-based
    skip_first: int = 0  # source layers at the start kept once, never copied
    skip_last: int = 0
    zero_copy_outputs: bool = False  # zero copies' output projections: exact identity
    # HybridModel: the blocks of the source pattern that are copied as a whole (None: each
    # mixer with its MLPs). There, layer_map and skip_* count blocks, not layers.
    hybrid_blocks: Optional[tuple[str, ...]] = None

    def __post_init__(self):
        for name in ("layer_map", "hybrid_blocks"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))


@dataclass(frozen=True)
class WidthGrowth:
    """How experts are copied: E → factor·E, copies get N(0, (noise_alpha·σ)²)."""

    factor: int = 1
    placement: str = "append"  # copy c of expert e is e + c·E; interleave: e·m + c
    topk: str = "scale"  # k → m·k (exact at α = 0) or keep k
    noise_alpha: float = 0.01
    seed: int = 1234


@dataclass(frozen=True)
class CopyInit:
    """How copies start, beyond copying: the paper authors' options and baselines. Draws
    (`random_router`, `reinit_expert_copies`) are N(0, init_std²), seeded layout-free like the
    copies' noise, on their own stream."""

    weight_multiplier: float = 1.0  # copied layers, experts and router rows x this (noise too)
    random_router: bool = False  # every router weight drawn afresh, router biases zero
    reinit_expert_copies: bool = False  # expert copies and their router rows drawn afresh
    zero_expert_bias: bool = False  # every router's expert_bias zero (the load-balancing term)
    init_std: float = INIT_STD
    # expert copies (and their router rows, expert_bias) read from a second checkpoint of the
    # same architecture (--grow-from-second): the paper authors' checkpoint merging
    from_second: bool = False

    @property
    def draws(self) -> bool:
        return self.random_router or self.reinit_expert_copies


@dataclass(frozen=True)
class Upcycling:
    """Dense MLPs → MoE layers of `experts` experts: each a copy of the dense MLP, or with
    `granularity` G of a 1/G slice of its hidden units (expert e is slice e mod G, copy e // G),
    the router zero (uniform scores), copies noised like width growth."""

    experts: int = 0  # 0: no upcycling
    topk: int = 1
    granularity: int = 1
    layers: Optional[tuple[bool, ...]] = None  # per source layer: upcycled; None: every layer
    shared_expert: bool = False  # the dense MLP also becomes a shared expert (both half-weighted)

    def __post_init__(self):
        if self.layers is not None and not isinstance(self.layers, tuple):
            object.__setattr__(self, "layers", tuple(bool(x) for x in self.layers))

    @property
    def active(self) -> bool:
        return self.experts > 0

    def routed_scale(self) -> float:
        """The factor on the routed experts' output projections that keeps the layer's output:
        the top-k weights of one token sum to 1 over K experts, and with G slices a token must
        collect every slice once; with a shared expert, routed and shared take half each."""
        return self.granularity * (0.5 if self.shared_expert else 1.0)

    def shared_scale(self) -> float:
        return 0.5


@dataclass(frozen=True)
class Architecture:
    """What growth changes or must respect, read from a checkpoint or a model config."""

    num_layers: int
    num_experts: Optional[int] = None  # None: dense model
    topk: Optional[int] = None
    # per layer, where megatron-core keys the layers by index (`--moe-layer-freq` given as a
    # list, even all ones); None: every layer is MoE and the layers are stacked in the keys
    moe_layers: Optional[tuple[bool, ...]] = None
    mtp_layers: int = 0
    router_num_groups: Optional[int] = None
    router_group_topk: Optional[int] = None
    score_function: str = "softmax"
    pre_softmax: bool = False
    # HybridModel: one symbol per decoder layer, without '|' (see hybrid.py), then the MTP part
    hybrid_pattern: Optional[str] = None

    def __post_init__(self):
        if self.moe_layers is not None and not isinstance(self.moe_layers, tuple):
            object.__setattr__(self, "moe_layers", tuple(self.moe_layers))

    @property
    def is_moe(self) -> bool:
        return bool(self.num_experts)

    @property
    def is_hybrid(self) -> bool:
        return self.hybrid_pattern is not None

    def moe_layer_freq(self) -> Optional[list[int]]:
        """Megatron's `--moe-layer-freq` list form where the layers are listed (megatron-core
        then keys them by index, all-MoE too), None where they are stacked."""
        if self.moe_layers is None:
            return None
        return [int(x) for x in self.moe_layers]


def depth_layer_map(num_layers: int, depth: DepthGrowth, unit_sizes: Optional[Sequence[int]] = None,
                    ) -> tuple[int, ...]:
    """Target layer index → source layer index (both 0-based). Growth copies units of
    `unit_sizes` consecutive layers (default: single layers; HybridModel: pattern blocks)."""
    sizes = list(unit_sizes) if unit_sizes is not None else [1] * num_layers
    starts = [sum(sizes[:u]) for u in range(len(sizes))]
    unit_map = _unit_map(len(sizes), depth, "layer" if unit_sizes is None else "block")
    return tuple(starts[u] + i for u in unit_map for i in range(sizes[u]))


def _unit_map(num_layers: int, depth: DepthGrowth, unit: str) -> tuple[int, ...]:
    """Target unit → source unit (a layer, or a block of a hybrid pattern)."""
    if depth.layer_map is not None:
        bad = [s for s in depth.layer_map if not 0 <= s < num_layers]
        if bad:
            raise GrowthError(
                f"--grow-layer-map names source {unit}(s) {bad}, but the source has "
                f"{num_layers} {unit}s (0-based indices 0..{num_layers - 1})"
            )
        missing = sorted(set(range(num_layers)) - set(depth.layer_map))
        if missing:
            raise GrowthError(
                f"--grow-layer-map leaves source {unit}(s) {missing} out; every source {unit} "
                "must appear at least once (dropping layers is pruning, not growth)"
            )
        return depth.layer_map
    if depth.factor < 1:
        raise GrowthError(f"--grow-depth must be a positive integer, got {depth.factor}")
    if depth.method not in DEPTH_METHODS:
        raise GrowthError(f"--grow-depth-method must be one of {DEPTH_METHODS}, got {depth.method!r}")
    skips = depth.skip_first + depth.skip_last
    if depth.skip_first < 0 or depth.skip_last < 0 or (skips and skips >= num_layers):
        raise GrowthError(
            f"--grow-skip-first {depth.skip_first} and --grow-skip-last {depth.skip_last} must be "
            f">= 0 and leave {unit}s to copy out of {num_layers}"
        )
    if skips and depth.factor == 1:
        raise GrowthError("--grow-skip-first / --grow-skip-last choose which layers --grow-depth "
                          "copies; with --grow-depth 1 nothing is copied: give --grow-depth K > 1 "
                          "or drop them")
    grown_units = skips + depth.factor * (num_layers - skips)
    if grown_units > MAX_LAYERS:
        raise GrowthError(f"--grow-depth {depth.factor} makes {grown_units} {unit}s out of "
                          f"{num_layers}; a plan grows to at most {MAX_LAYERS}: pick a smaller factor")
    head = list(range(depth.skip_first))
    body = list(range(depth.skip_first, num_layers - depth.skip_last))
    tail = list(range(num_layers - depth.skip_last, num_layers))
    if depth.method == "interposition":
        grown = [s for s in body for _ in range(depth.factor)]
    else:
        grown = body * depth.factor
    return tuple(head + grown + tail)


def copy_indices(sources: Sequence[int]) -> tuple[int, ...]:
    """For each target, how many earlier targets came from the same source (0 = original)."""
    seen: dict[int, int] = {}
    out = []
    for s in sources:
        out.append(seen.get(s, 0))
        seen[s] = out[-1] + 1
    return tuple(out)


def nothing_to_grow(options: str = "the --grow-* options",
                    growths: str = "--grow-depth, --grow-experts, --grow-layer-map or "
                                   "--upcycle-experts") -> GrowthError:
    """The refusal of options that ask for no growth (`options`: the ones given; `growths`:
    what would ask for one, as the front end names it): every path says the same."""
    return GrowthError(f"{options} change nothing (factor 1, identity layer map): give {growths}")


@dataclass(frozen=True)
class GrowthPlan:
    source: Architecture
    depth: DepthGrowth = field(default_factory=DepthGrowth)
    width: WidthGrowth = field(default_factory=WidthGrowth)
    upcycle: Upcycling = field(default_factory=Upcycling)
    init: CopyInit = field(default_factory=CopyInit)

    def __post_init__(self):
        w = self.width
        self._check_upcycling()
        self._check_init()
        if w.factor < 1:
            raise GrowthError(f"--grow-experts must be a positive integer, got {w.factor}")
        if w.placement not in EXPERT_PLACEMENTS:
            raise GrowthError(
                f"--grow-expert-placement must be one of {EXPERT_PLACEMENTS}, got {w.placement!r}"
            )
        if w.topk not in TOPK_POLICIES:
            raise GrowthError(f"--grow-topk must be one of {TOPK_POLICIES}, got {w.topk!r}")
        if not 0 <= w.noise_alpha <= MAX_NOISE_ALPHA:  # also refuses nan
            raise GrowthError(f"--grow-noise-alpha must be between 0 and {MAX_NOISE_ALPHA:g} (noise "
                              f"std alpha x the source's std; the paper uses 0.01), got {w.noise_alpha}")
        if w.factor > 1 and not self.source.is_moe:
            raise GrowthError(
                "--grow-experts needs a Mixture-of-Experts source, but the source checkpoint "
                "has no experts (no router / experts keys and num_experts unset)"
            )
        if (self.target_num_experts or 0) > MAX_EXPERTS:
            flag = "--upcycle-experts" if self.upcycle.active else f"--grow-experts {w.factor}"
            raise GrowthError(f"{flag} makes {self.target_num_experts} experts per layer; a plan "
                              f"grows to at most {MAX_EXPERTS}: pick a smaller number")
        self._check_groups()
        # Derived maps, computed once (the plan is immutable).
        units = None
        if self.source.is_hybrid:
            units = hybrid.block_sizes(hybrid.split(self.source.hybrid_pattern)[0], self.depth.hybrid_blocks)
        elif self.depth.hybrid_blocks:
            raise GrowthError(f"{hybrid.BLOCKS_FLAG} applies to HybridModel checkpoints only; the "
                              "source is a GPT model")
        layer_map = depth_layer_map(self.source.num_layers, self.depth, units)
        object.__setattr__(self, "layer_map", layer_map)
        object.__setattr__(self, "layer_copy", copy_indices(layer_map))

    layer_map: tuple[int, ...] = field(init=False, repr=False)
    layer_copy: tuple[int, ...] = field(init=False, repr=False)

    # --- experts -------------------------------------------------------------------------
    @property
    def target_num_experts(self) -> Optional[int]:
        if self.upcycle.active:
            return self.upcycle.experts
        if not self.source.is_moe:
            return None
        return self.source.num_experts * self.width.factor

    def expert_source(self, target_expert: int) -> tuple[int, int]:
        """Target expert id → (source expert id, copy index; 0 = the original). Upcycled: the
        source "expert" is a slice of the dense MLP (slice 0 of 1 without granularity)."""
        if self.upcycle.active:
            g = self.upcycle.granularity
            return target_expert % g, target_expert // g
        n = self.source.num_experts
        if self.width.placement == "append":
            return target_expert % n, target_expert // n
        return target_expert // self.width.factor, target_expert % self.width.factor

    def expert_map(self) -> list[tuple[int, int]]:
        return [self.expert_source(e) for e in range(self.target_num_experts or 0)]

    def expert_targets(self, source_expert: int) -> list[int]:
        """The target experts made from `source_expert` (the original first): the inverse of
        `expert_source`, without enumerating every target expert."""
        if self.upcycle.active:
            g = self.upcycle.granularity
            return [source_expert + c * g for c in range(self.upcycle.experts // g)]
        if not self.source.is_moe:
            return []
        m, n = self.width.factor, self.source.num_experts
        if self.width.placement == "append":
            return [source_expert + c * n for c in range(m)]
        return [source_expert * m + c for c in range(m)]

    def _check_groups(self):
        src, w = self.source, self.width
        groups = src.router_num_groups
        if w.factor == 1 or not groups:
            return
        size = src.num_experts // groups
        moved = [
            e for e in range(src.num_experts * w.factor)
            if self.expert_source(e)[0] // size != e // (size * w.factor)
        ]
        if moved:
            raise GrowthError(
                f"group-limited routing (--moe-router-num-groups {groups}) needs each copy in "
                f"its source expert's group, but placement {w.placement!r} moves copies such as "
                f"expert {moved[0]} out of it; use --grow-expert-placement interleave"
            )

    # --- layers ----------------------------------------------------------------------------
    @property
    def target_num_layers(self) -> int:
        return len(self.layer_map)

    def layer_source(self, target_layer: int) -> tuple[int, int]:
        """Target decoder layer → (source layer, copy index; 0 = the original)."""
        return self.layer_map[target_layer], self.layer_copy[target_layer]

    def layer_targets(self, source_layer: int) -> list[int]:
        """The target layers made from `source_layer` (the original first)."""
        return [t for t, s in enumerate(self.layer_map) if s == source_layer]

    def upcycled(self, source_layer: int) -> bool:
        """Whether the dense MLP of `source_layer` becomes an MoE layer."""
        up = self.upcycle
        return up.active and (up.layers is None or up.layers[source_layer])

    def _check_upcycling(self) -> None:
        up, src = self.upcycle, self.source
        if not up.active:
            return
        if src.is_moe:
            raise GrowthError(f"--upcycle-experts needs a dense source, but the source checkpoint is "
                              f"a Mixture-of-Experts ({src.num_experts} experts): grow its experts "
                              "with --grow-experts instead")
        if src.is_hybrid:
            raise GrowthError("--upcycle-experts: upcycling HybridModel checkpoints is not supported; "
                              "upcycle GPT checkpoints")
        if self.width.factor > 1:
            raise GrowthError("--upcycle-experts and --grow-experts both make experts; give one")
        if up.experts < 1 or not 1 <= up.topk <= up.experts:
            raise GrowthError(f"--upcycle-topk {up.topk} must be between 1 and --upcycle-experts "
                              f"{up.experts}")
        if up.granularity < 1 or up.experts % up.granularity:
            raise GrowthError(f"--upcycle-granularity {up.granularity} must divide --upcycle-experts "
                              f"{up.experts} (each slice of the dense MLP gets the same number of copies)")
        if up.layers is not None and (len(up.layers) != src.num_layers or not any(up.layers)):
            raise GrowthError(f"--upcycle-layers gives {len(up.layers)} layers with "
                              f"{sum(up.layers)} upcycled; the source has {src.num_layers} layers: "
                              "give one entry per layer, at least one of them 1")

    def _check_init(self) -> None:
        init, w = self.init, self.width
        if not (math.isfinite(init.weight_multiplier) and init.weight_multiplier > 0):
            raise GrowthError(f"--grow-weight-multiplier must be a finite number > 0 (copies x it; "
                              f"1 keeps them), got {init.weight_multiplier}")
        if init.weight_multiplier != 1 and self.upcycle.active:
            raise GrowthError("--grow-weight-multiplier scales copies of layers and experts; with "
                              "--upcycle-experts every expert is a slice of the dense MLP: drop one")
        for flag, given in (("--grow-random-router", init.random_router),
                            ("--grow-reinit-expert-copies", init.reinit_expert_copies)):
            if given and (w.factor < 2 or not self.source.is_moe):
                raise GrowthError(f"{flag} is a baseline of expert growth: give --grow-experts M > 1 "
                                  f"(now {w.factor}) with a Mixture-of-Experts source")
        if init.from_second and (w.factor < 2 or not self.source.is_moe):
            raise GrowthError(f"--grow-from-second gives the expert copies; give --grow-experts M > 1 "
                              f"(now {w.factor}) with a Mixture-of-Experts source")
        if init.from_second and init.draws:
            raise GrowthError("--grow-from-second reads the expert copies from a second checkpoint; "
                              "--grow-random-router / --grow-reinit-expert-copies draw them: give one")
        if init.zero_expert_bias and not self.source.is_moe:
            raise GrowthError("--grow-zero-expert-bias zeroes the routers' expert_bias, but the "
                              "source has no experts")
        if not (math.isfinite(init.init_std) and init.init_std > 0):
            raise GrowthError(f"--grow-init-std must be a finite number > 0, got {init.init_std}")
        if init.init_std != INIT_STD and not init.draws:
            raise GrowthError("--grow-init-std is the std of --grow-random-router / "
                              "--grow-reinit-expert-copies: give one of them or drop it")

    @property
    def target_topk(self) -> Optional[int]:
        if self.upcycle.active:
            return self.upcycle.topk
        if self.source.topk is None:
            return None
        return self.source.topk * (self.width.factor if self.width.topk == "scale" else 1)

    @property
    def target(self) -> Architecture:
        moe_layers = self.source.moe_layers
        if self.upcycle.active and self.upcycle.layers is not None and not all(self.upcycle.layers):
            moe_layers = self.upcycle.layers  # upcycling every layer keeps the stacked keys
        if moe_layers is not None:
            moe_layers = tuple(moe_layers[s] for s in self.layer_map)
        pattern = self.source.hybrid_pattern
        if pattern is not None:
            main, mtp = hybrid.split(pattern)
            pattern = "".join(main[s] for s in self.layer_map) + mtp
        return dataclasses.replace(
            self.source,
            num_layers=self.target_num_layers,
            num_experts=self.target_num_experts,
            topk=self.target_topk,
            moe_layers=moe_layers,
            hybrid_pattern=pattern,
        )

    def target_blocks(self) -> list[str]:
        """The target pattern's blocks (HybridModel): each source block's copies, in order."""
        main = hybrid.split(self.source.hybrid_pattern)[0]
        target = hybrid.split(self.target.hybrid_pattern)[0]
        sizes = hybrid.block_sizes(main, self.depth.hybrid_blocks)
        starts = {sum(sizes[:b]): size for b, size in enumerate(sizes)}
        blocks, at = [], 0
        while at < len(target):
            size = starts[self.layer_map[at]]
            blocks.append(target[at:at + size])
            at += size
        return blocks

    def target_hybrid_pattern(self, pipeline_segments: int = 1,
                              flag: str = "--pipeline-model-parallel-size") -> str:
        """The grown `--hybrid-layer-pattern`, cut into `pipeline_segments` segments (`|`)."""
        main, mtp = hybrid.split(self.target.hybrid_pattern)
        return hybrid.segmented(main, self.target_blocks(), pipeline_segments, flag) + mtp

    @property
    def is_identity(self) -> bool:
        return (self.width.factor == 1 and not self.upcycle.active
                and self.layer_map == tuple(range(self.source.num_layers)))

    def require_growth(self) -> None:
        """Refuse a plan that grows nothing: writing or loading a copy is not growth."""
        if self.is_identity:
            raise nothing_to_grow()

    def exactness_notes(self) -> list[str]:
        """Why the grown model's output will differ from the source's, if it will."""
        notes = []
        w, src, up = self.width, self.source, self.upcycle
        if up.active:
            if w.noise_alpha > 0 and up.experts > up.granularity:
                notes.append(f"expert copies get noise (alpha={w.noise_alpha})")
            if up.granularity > 1 and up.topk % up.granularity:
                notes.append(f"--upcycle-topk {up.topk} is not a multiple of --upcycle-granularity "
                             f"{up.granularity}: a token cannot take every slice of the dense MLP "
                             "equally often")
        if w.factor > 1:
            if w.noise_alpha > 0:
                notes.append(f"expert copies get noise (alpha={w.noise_alpha})")
            if w.topk == "keep":
                notes.append("top-k kept: each token reaches fewer distinct experts")
            elif src.score_function == "sigmoid" and src.topk == 1:
                notes.append("sigmoid router with top-1 source: top-k > 1 renormalises scores")
            groups, chosen = src.router_num_groups, src.router_group_topk
            if groups and chosen and chosen < groups:
                notes.append(
                    f"group-limited routing ({groups} groups, top-{chosen}): Megatron scores a "
                    f"group by its top-(top-k / {chosen}) experts, so the grown model picks the "
                    "source's groups; Hugging Face's Glm4Moe / DeepSeek-V3 score a group by its "
                    f"top-2, which after growth are copies of one expert: exported to Hugging Face, "
                    "the grown model can pick other groups than the source (not exact)")
        if any(c > 0 for c in self.layer_copy) and not self.depth.zero_copy_outputs:
            notes.append("copied layers add their output again (use zero-init copies for identity)")
        init = self.init
        if init.weight_multiplier != 1:
            notes.append(f"copies are scaled by --grow-weight-multiplier {init.weight_multiplier:g}")
        if init.random_router:
            notes.append(f"routers drawn afresh (N(0, {init.init_std:g}^2), biases zero): the "
                         "random-router baseline")
        if init.reinit_expert_copies:
            notes.append(f"expert copies and their router rows drawn afresh (N(0, "
                         f"{init.init_std:g}^2)): the re-initialised baseline")
        if init.from_second:
            notes.append("expert copies and their router rows from the second checkpoint "
                         "(--grow-from-second): the grown model computes something new")
        if init.zero_expert_bias:
            notes.append("expert_bias zeroed: routing differs where the source's bias was not zero")
        return notes

    def check_target(
        self,
        num_layers: Optional[int] = None,
        num_experts: Optional[int] = None,
        topk: Optional[int] = None,
        expert_parallel: int = 1,
        pipeline_parallel: int = 1,
        num_layers_in_first_stage: Optional[int] = None,
        num_layers_in_last_stage: Optional[int] = None,
    ) -> None:
        """Refuse a target model that does not match the plan, naming the flag to fix."""
        want_layers = self.target_num_layers
        if num_layers is not None and num_layers != want_layers:
            raise GrowthError(
                f"--num-layers {num_layers} does not match the growth plan: the source has "
                f"{self.source.num_layers} layers and the plan makes {want_layers}; pass "
                f"--num-layers {want_layers} or drop it"
            )
        want_experts = self.target_num_experts
        if num_experts is not None and want_experts is not None and num_experts != want_experts:
            raise GrowthError(
                f"--num-experts {num_experts} does not match the growth plan: "
                f"{self.source.num_experts} source experts x {self.width.factor} = {want_experts}; "
                f"pass --num-experts {want_experts} or drop it"
            )
        want_topk = self.target_topk
        if topk is not None and want_topk is not None and topk != want_topk:
            raise GrowthError(
                f"--moe-router-topk {topk} does not match the growth plan: source top-k "
                f"{self.source.topk} with --grow-topk {self.width.topk} gives {want_topk}"
            )
        k = topk if topk is not None else want_topk
        if k is not None and want_experts is not None and k > want_experts:
            raise GrowthError(
                f"--moe-router-topk {k} exceeds the {want_experts} experts after growth"
            )
        if want_experts is not None and want_experts % expert_parallel:
            raise GrowthError(
                f"--expert-model-parallel-size {expert_parallel} does not divide the "
                f"{want_experts} experts after growth ({self.source.num_experts} x "
                f"{self.width.factor}); pick a divisor of {want_experts}"
            )
        if self.source.is_hybrid:  # stages are the pattern's `|` segments, cut at block boundaries
            self.target_hybrid_pattern(pipeline_parallel)
            return
        inner = want_layers - (num_layers_in_first_stage or 0) - (num_layers_in_last_stage or 0)
        inner_stages = (
            pipeline_parallel
            - (num_layers_in_first_stage is not None)
            - (num_layers_in_last_stage is not None)
        )
        stages = {"first": num_layers_in_first_stage, "last": num_layers_in_last_stage}
        for stage, n in stages.items():
            if n is not None and not 0 < n <= want_layers:
                raise GrowthError(f"--decoder-{stage}-pipeline-num-layers {n} does not fit the "
                                  f"{want_layers} layers after growth; pick 1 to {want_layers}")
        if pipeline_parallel > 1 and (inner < 0 or (inner_stages <= 0 and inner)):
            given = " + ".join(f"--decoder-{stage}-pipeline-num-layers {n}"
                               for stage, n in stages.items() if n is not None)
            raise GrowthError(f"{given} leaves {inner} of the {want_layers} layers after growth "
                              f"for the other {max(inner_stages, 0)} pipeline stages; lower it")
        if pipeline_parallel > 1 and inner_stages > 0 and inner % inner_stages:
            raise GrowthError(
                f"--pipeline-model-parallel-size {pipeline_parallel} does not split the "
                f"{want_layers} layers after growth evenly; pick another size or set "
                "--decoder-first-pipeline-num-layers / --decoder-last-pipeline-num-layers"
            )

    def describe(self) -> dict:
        """JSON-ready summary: the options, both architectures, the layer and expert maps."""
        return {
            "depth": dataclasses.asdict(self.depth),
            "width": dataclasses.asdict(self.width),
            "upcycle": dataclasses.asdict(self.upcycle),
            "init": dataclasses.asdict(self.init),
            "source": dataclasses.asdict(self.source),
            "target": dataclasses.asdict(self.target),
            "layer_map": list(self.layer_map),
            "expert_map": [list(x) for x in self.expert_map()],
        }

    @classmethod
    def from_description(cls, d: dict) -> "GrowthPlan":
        return cls(
            source=Architecture(**d["source"]),
            depth=DepthGrowth(**d["depth"]),
            width=WidthGrowth(**d["width"]),
            upcycle=Upcycling(**d.get("upcycle", {})),
            init=CopyInit(**d.get("init", {})),
        )
