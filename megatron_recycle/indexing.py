"""Checkpoint keys and the one index algebra of growth.

Megatron-Core addresses layers and experts in two ways, both handled here:
- as prepended axes of a stacked global tensor (`decoder.layers.…` with the layer on axis 0,
  `…experts.experts.…` with the expert on the next prepended axis), and
- inside the key (`decoder.layers.{i}.…` for mixed dense/MoE or heterogeneous stacks,
  `mtp.layers.{i}.…`, `…experts.{j}.…` for singleton local shards).
Router weights and `expert_bias` carry experts on their first local (row) dimension.
Optimizer state keys are the model key behind a prefix such as `optimizer.state.exp_avg.`.

For a growth plan, this module is where indices, keys and global shapes translate between
the source and the grown (target) checkpoint, in both directions: `origin` (target slab →
source slab, used by the load hook and offline growth), `target_keys` / `target_indices` /
`resized` (source → every target, used by the manifest of a grown checkpoint). `verify`
restates the target → source direction on its own, on purpose: a verifier sharing this code
could not catch its bugs. Pure Python, no torch.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Optional

from .plan import GrowthPlan

_OPTIMIZER_PREFIX = re.compile(r"^(optimizer\.state\.[A-Za-z0-9_]+\.)(.*)$")
_DECODER_INDEXED = re.compile(r"^(decoder\.layers\.)(\d+)\.")
_MTP_INDEXED = re.compile(r"^mtp\.layers\.(\d+)\.")
_EXPERT_INDEXED = re.compile(r"(\.experts\.)(\d+)\.")
_ROUTER_ROWS = (".router.weight", ".router.expert_bias", ".router.bias")
# Output projections of a layer: zeroing them in a layer copy makes the copy an identity
# (attention, GDN and Mamba mixers; dense, routed and shared-expert MLPs).
_OUTPUT_PROJECTIONS = re.compile(
    r"\.(self_attention\.linear_proj|self_attention\.out_proj|mixer\.out_proj|mlp\.linear_fc2|"
    r"mlp\.experts\..*linear_fc2|mlp\.shared_experts\.linear_fc2)\.(weight|bias)(_[wv])?$"
)
# What a HybridModel layer holds, by the keys under `decoder.layers.{i}.` (first match wins).
_HYBRID_LAYER_KEYS = (
    ("E", ".mlp.router."),
    ("-", ".mlp.linear_fc1."),
    ("M", ".mixer."),
    ("G", ".self_attention.in_proj."),
    ("D", ".self_attention.core_attention.indexer."),
    ("+", ".self_attention.linear_kv_down_proj."),
    ("*", ".self_attention.linear_qkv."),
)
# Parameters whose optimizer "param" entry is the fp32 master copy of the weight.
MASTER_PARAM_PREFIXES = ("optimizer.state.param.", "optimizer.state.fp32_param.")


@dataclass(frozen=True)
class KeyLayout:
    """Where one checkpoint key keeps its layer and expert indices."""

    prefix: str  # optimizer prefix or ''
    model_key: str  # the key without the optimizer prefix
    decoder: bool  # in the decoder stack (depth growth applies)
    layer_axis: Optional[int]  # prepended axis holding the layer, if stacked
    layer_in_key: Optional[int]  # layer index written in the key, if indexed
    expert_axis: Optional[int]  # prepended axis holding the expert
    expert_in_key: Optional[int]  # expert index written in the key
    expert_rows: bool  # experts on the first local dimension (router weight / bias)

    @property
    def has_layer(self) -> bool:
        return self.layer_axis is not None or self.layer_in_key is not None

    @property
    def has_expert_index(self) -> bool:
        """An expert index on a prepended axis or in the key (not router rows)."""
        return self.expert_axis is not None or self.expert_in_key is not None

    @property
    def has_expert(self) -> bool:
        return self.has_expert_index or self.expert_rows

    @property
    def is_output_projection(self) -> bool:
        return bool(_OUTPUT_PROJECTIONS.search("." + self.model_key))

    @property
    def is_master_param(self) -> bool:
        return self.prefix in MASTER_PARAM_PREFIXES

    @property
    def is_optimizer_moment(self) -> bool:
        return bool(self.prefix) and not self.is_master_param

    @property
    def tail(self) -> str:
        """The model key after `decoder.layers.[{i}.]` (the key itself outside the decoder)."""
        if not self.decoder:
            return self.model_key
        m = _DECODER_INDEXED.match(self.model_key)
        return self.model_key[m.end():] if m else self.model_key[len("decoder.layers."):]

    def canonical_name(self) -> str:
        """The model key with layer/expert indices removed: the noise stream's name."""
        name = _DECODER_INDEXED.sub(r"\1", self.model_key)
        return _EXPERT_INDEXED.sub(r"\1", name)

    def with_indices(self, layer: Optional[int], expert: Optional[int]) -> str:
        """The full key (prefix included) with in-key layer/expert indices replaced."""
        key = self.model_key
        if self.layer_in_key is not None and self.decoder:
            key = _DECODER_INDEXED.sub(lambda m: f"{m.group(1)}{layer}.", key, count=1)
        if self.expert_in_key is not None:
            key = _EXPERT_INDEXED.sub(lambda m: f"{m.group(1)}{expert}.", key, count=1)
        return self.prefix + key


def parse_key(key: str, prepend_axis_num: int) -> KeyLayout:
    m = _OPTIMIZER_PREFIX.match(key)
    prefix, model_key = (m.group(1), m.group(2)) if m else ("", key)

    decoder = model_key.startswith("decoder.layers.")
    layer_axis = layer_in_key = None
    next_axis = 0
    indexed = _DECODER_INDEXED.match(model_key)
    if indexed:
        layer_in_key = int(indexed.group(2))
    elif decoder:
        layer_axis, next_axis = 0, 1
    expert_axis = expert_in_key = None
    if ".experts.experts." in model_key:
        expert_axis = next_axis
    else:
        em = _EXPERT_INDEXED.search(model_key)
        if em and ".experts." in model_key and ".shared_experts." not in model_key:
            expert_in_key = int(em.group(2))
    if expert_axis is not None and expert_axis >= prepend_axis_num:
        expert_axis = None  # not stacked over experts after all (unexpected layout)
    if layer_axis is not None and layer_axis >= prepend_axis_num:
        layer_axis = None
    expert_rows = model_key.endswith(_ROUTER_ROWS)
    return KeyLayout(
        prefix=prefix,
        model_key=model_key,
        decoder=decoder,
        layer_axis=layer_axis,
        layer_in_key=layer_in_key,
        expert_axis=expert_axis,
        expert_in_key=expert_in_key,
        expert_rows=expert_rows,
    )


def layer_key(prefix: str, tail: str, layer: Optional[int]) -> str:
    """A decoder tensor's key: the layer in the key (`decoder.layers.{layer}.tail`), or stacked."""
    return f"{prefix}decoder.layers.{'' if layer is None else f'{layer}.'}{tail}"


def layers_in_keys(arch) -> bool:
    """Whether megatron-core keys this model's decoder layers by index (`decoder.layers.{i}.`):
    HybridModel always; GPT when `moe_layer_freq` lists its layers (mixed dense / MoE, or a
    list of all ones)."""
    return arch.is_hybrid or arch.moe_layers is not None


def as_stored(source_shapes: dict, key: str, index: tuple[int, ...]) -> tuple[str, tuple[int, ...]]:
    """`key` at prepended `index` in the form the source stores it: the key itself, or, where
    the source stacks the decoder layers the key names by index (a mixed dense/MoE target
    upcycled from a homogeneous source), the stacked key with the layer on its first axis."""
    if key in source_shapes:
        return key, index
    layout = parse_key(key, 0)
    if layout.decoder and layout.layer_in_key is not None:
        stacked = layer_key(layout.prefix, layout.tail, None)
        if stacked in source_shapes:
            return stacked, (layout.layer_in_key,) + tuple(index)
    return key, index


def stored_prepend_axes(key: str) -> int:
    """How many leading axes of a stored tensor index layers/experts (the prepend_axis_num
    Megatron-Core saved it with), from its key alone."""
    layout = parse_key(key, 2)
    return (layout.layer_axis is not None) + (layout.expert_axis is not None)


# --- Megatron-FSDP's `fsdp_dtensor` names --------------------------------------------------------
# Megatron-LM saves Megatron-FSDP runs with torch DCP under the modules' own parameter names:
# `model.` + the name, layers indexed in the key, experts by global expert
# (`…experts.local_experts.{e}.…`, or `…experts.linear_fc1.weight{e}` for TE's grouped GEMM), GLU
# `linear_fc1` rows split into `_w` (first half) and `_v` (second half), no `_extra_state`.
FSDP_MODEL_PREFIX = "model."
_FSDP_GLU_HALF = re.compile(r"(\.linear_fc1\.(?:weight|bias)\d*)_([wv])$")
_FSDP_LOCAL_EXPERT = re.compile(r"\.mlp\.experts\.local_experts\.(\d+)\.")
_FSDP_GROUPED_EXPERT = re.compile(r"\.mlp\.experts\.(linear_fc[12]\.(?:weight|bias))(\d+)$")


@dataclass(frozen=True)
class FsdpName:
    """Where an `fsdp_dtensor` tensor lies in the torch_dist checkpoint of the same model."""

    key: str  # the torch_dist key
    index: tuple[int, ...]  # its prepended-axis indices (layer where stacked, expert)
    half: Optional[str]  # "w" / "v": the first / second half of the key's rows (GLU fc1)


def from_fsdp_dtensor(name: str, stack_layers: bool, layer_keys_map: dict[str, str]) -> Optional[FsdpName]:
    """The torch_dist place of the stored `fsdp_dtensor` tensor `name`; None outside the model.
    `stack_layers`: megatron-core stacks this model's decoder layers (no index in its keys);
    `layer_keys_map`: the layer spec's `sharded_state_dict_keys_map` (prefix inside a layer →
    its torch_dist prefix), which torch_dist keys follow and fsdp_dtensor names do not."""
    if not name.startswith(FSDP_MODEL_PREFIX):
        return None
    key, half, expert = name[len(FSDP_MODEL_PREFIX):], None, None
    if m := _FSDP_GLU_HALF.search(key):
        key, half = key[:m.start()] + m.group(1), m.group(2)
    if m := _FSDP_LOCAL_EXPERT.search(key):
        key, expert = f"{key[:m.start()]}.mlp.experts.experts.{key[m.end():]}", int(m.group(1))
    elif m := _FSDP_GROUPED_EXPERT.search(key):
        key, expert = f"{key[:m.start()]}.mlp.experts.experts.{m.group(1)}", int(m.group(2))
    index = () if expert is None else (expert,)
    if m := _DECODER_INDEXED.match(key):
        tail = key[m.end():]
        old = next((k for k in layer_keys_map if tail.startswith(k)), None)
        if old is not None:
            tail = layer_keys_map[old] + tail[len(old):]
        layer = int(m.group(2))
        key = layer_key("", tail, None if stack_layers else layer)
        index = ((layer,) if stack_layers else ()) + index
    return FsdpName(key, index, half)


# --- what a checkpoint holds, from its keys and global shapes ----------------------------------
def decoder_layer_count(shapes: dict[str, tuple[int, ...]]) -> Optional[int]:
    """Number of decoder layers from checkpoint keys and global shapes."""
    stacked = [s[0] for k, s in shapes.items() if k.startswith("decoder.layers.") and
               not _DECODER_INDEXED.match(k) and s]
    indexed = [int(m.group(2)) for k in shapes if (m := _DECODER_INDEXED.match(k))]
    counts = stacked + [max(indexed) + 1] if indexed else stacked
    return max(counts) if counts else None


def mtp_layer_count(shapes: dict[str, tuple[int, ...]]) -> int:
    idx = [int(m.group(1)) for k in shapes if (m := _MTP_INDEXED.match(k))]
    return max(idx) + 1 if idx else 0


def expert_count(shapes: dict[str, tuple[int, ...]]) -> Optional[int]:
    """Experts per MoE layer, from router rows (which every MoE layer has)."""
    for k, s in shapes.items():
        if k.startswith("decoder.") and k.endswith(".router.weight"):
            return s[-2]
    return None


def hybrid_symbols(shapes: dict[str, tuple[int, ...]]) -> Optional[str]:
    """The HybridModel pattern its keys spell (one symbol per `decoder.layers.{i}`), or None
    when a layer holds both a sequence mixer and an MLP (a GPT layer) or is not recognised."""
    layers: dict[int, set[str]] = {}
    for key in shapes:
        m = _DECODER_INDEXED.match(key)
        if m:
            rest = key[m.end() - 1:]
            found = next((sym for sym, part in _HYBRID_LAYER_KEYS if part in rest), None)
            layers.setdefault(int(m.group(2)), set()).add(found)
    if not layers or sorted(layers) != list(range(len(layers))):
        return None
    symbols = []
    for i in range(len(layers)):
        kinds = layers[i] - {None}
        if len(kinds) != 1:  # nothing recognised, or a mixer and an MLP in one layer: not hybrid
            return None
        symbols.append(kinds.pop())
    return "".join(symbols)


def moe_layer_pattern(shapes: dict[str, tuple[int, ...]], num_layers: int) -> Optional[tuple[bool, ...]]:
    """Which decoder layers are MoE, when layers are indexed in keys (mixed stacks)."""
    routed = {int(m.group(2)) for k in shapes
              if k.endswith(".router.weight") and (m := _DECODER_INDEXED.match(k))}
    if not routed:
        return None
    return tuple(i in routed for i in range(num_layers))


_FSDP_OPTIMIZER_STATE = re.compile(r"^optimizer\.state\.module\.(.+)\.([A-Za-z0-9_]+)$")
# torch_dist keys of the `linear_fc1` tensors Megatron-LM splits into `_w` / `_v` when the run
# has `--swiglu` (handle_swiglu_in_state_dict's patterns, in torch_dist terms)
_FSDP_SWIGLU_KEY = re.compile(r"\.mlp\.(?:experts\.experts\.|shared_experts\.)?linear_fc1\.(?:weight|bias)$")


@dataclass(frozen=True)
class FsdpNaming:
    """How one run's fsdp_dtensor names are formed: whether megatron-core stacks its decoder
    layers in torch_dist keys, its layer spec's `sharded_state_dict_keys_map`, whether its
    experts are TE's grouped GEMM (`weight{e}`) or SequentialMLP's (`local_experts.{e}.`), and
    whether GLU `linear_fc1` rows are split (`--swiglu`)."""

    stack_layers: bool
    layer_keys_map: tuple[tuple[str, str], ...]
    grouped_experts: bool
    swiglu: bool

    @classmethod
    def of(cls, names, stack_layers: bool, layer_keys_map: dict[str, str]) -> "FsdpNaming":
        """The naming of a checkpoint storing `names` (experts and GLU halves as they are stored)."""
        names = [n for n in names if n.startswith(FSDP_MODEL_PREFIX)]
        return cls(stack_layers, tuple(layer_keys_map.items()),
                   grouped_experts=any(_FSDP_GROUPED_EXPERT.search(_FSDP_GLU_HALF.sub(r"\1", n)) for n in names),
                   swiglu=any(_FSDP_GLU_HALF.search(n) for n in names))

    def place(self, name: str) -> Optional[FsdpName]:
        """The torch_dist place of a stored weight or per-parameter optimizer tensor
        (`optimizer.state.module.<parameter>.<field>` → key `optimizer.state.<field>.<key>`)."""
        if m := _FSDP_OPTIMIZER_STATE.match(name):
            place = from_fsdp_dtensor(FSDP_MODEL_PREFIX + m.group(1), self.stack_layers, dict(self.layer_keys_map))
            return None if place is None else FsdpName(f"optimizer.state.{m.group(2)}.{place.key}",
                                                       place.index, place.half)
        return from_fsdp_dtensor(name, self.stack_layers, dict(self.layer_keys_map))

    def split(self, key: str) -> bool:
        """Whether the torch_dist tensor `key` (a weight or its optimizer state) is stored as
        `_w` / `_v` halves."""
        return self.swiglu and bool(_FSDP_SWIGLU_KEY.search(parse_key(key, 0).model_key))

    def name(self, key: str, index: tuple[int, ...], half: Optional[str]) -> str:
        """The stored name of the torch_dist unit `key` at prepended `index` (the GLU `half`
        where it is split): `place`'s inverse."""
        layout = parse_key(key, len(index))
        model_key, rest = layout.model_key, list(index)
        layer = rest.pop(0) if layout.decoder and layout.layer_axis is not None else None
        expert = rest.pop(0) if layout.expert_axis is not None else None
        if layout.decoder:
            tail = layout.tail
            for original, renamed in self.layer_keys_map:
                if tail.startswith(renamed):
                    tail = original + tail[len(renamed):]
                    break
            model_key = layer_key("", tail, layout.layer_in_key if layer is None else layer)
        if expert is not None:
            head, _, param = model_key.partition(".mlp.experts.experts.")
            model_key = (f"{head}.mlp.experts.{param}{expert}" if self.grouped_experts
                         else f"{head}.mlp.experts.local_experts.{expert}.{param}")
        if half is not None:
            model_key += f"_{half}"
        if layout.prefix:  # optimizer.state.<field>.
            return f"optimizer.state.module.{model_key}.{layout.prefix.split('.')[2]}"
        return FSDP_MODEL_PREFIX + model_key


# --- the index algebra of a plan -------------------------------------------------------------
@dataclass(frozen=True)
class Origin:
    """Where one target slab (a key at one prepended index) comes from."""

    key: str  # the source key
    index: tuple[int, ...]  # the source's prepended-axis indices
    layer: int  # target decoder layer, -1 outside the decoder stack
    layer_copy: int  # 0: the original layer, k: its k-th copy
    expert: Optional[int]  # target expert, None where the key has no expert index
    expert_copy: int


def origin(plan: GrowthPlan, layout: KeyLayout, target_index: tuple[int, ...]) -> Origin:
    """The source of the target slab at prepended `target_index` of `layout`'s key."""
    index = list(target_index)
    layer, layer_copy, source_layer = -1, 0, None
    if layout.decoder and layout.has_layer:
        axis = layout.layer_axis
        layer = index[axis] if axis is not None else layout.layer_in_key
        source_layer, layer_copy = plan.layer_source(layer)
        if axis is not None:
            index[axis] = source_layer
    expert, expert_copy, source_expert = None, 0, None
    if layout.has_expert_index:
        axis = layout.expert_axis
        expert = index[axis] if axis is not None else layout.expert_in_key
        source_expert, expert_copy = plan.expert_source(expert)
        if axis is not None:
            index[axis] = source_expert
    return Origin(layout.with_indices(source_layer, source_expert), tuple(index), layer,
                  layer_copy, expert, expert_copy)


def resized(plan: GrowthPlan, layout: KeyLayout, shape: tuple[int, ...], row_axis: Optional[int],
            to_target: bool = True) -> tuple[int, ...]:
    """`shape` (a global shape) with its layer, expert and router-row axes set to the target's
    sizes (`to_target`) or the source's. `row_axis`: where router rows are, if they count."""
    layers, experts = ((plan.target_num_layers, plan.target_num_experts) if to_target
                       else (plan.source.num_layers, plan.source.num_experts))
    out = list(shape)
    if layout.decoder and layout.layer_axis is not None:
        out[layout.layer_axis] = layers
    if layout.expert_axis is not None:
        out[layout.expert_axis] = experts
    if row_axis is not None and layout.expert_rows and plan.source.is_moe:
        out[row_axis] = experts
    return tuple(out)


def target_keys(plan: GrowthPlan, layout: KeyLayout) -> list[str]:
    """The target keys made from a source key: one per target layer/expert where the indices
    are written in the key, else the key itself."""
    layers = ([None] if layout.layer_in_key is None or not layout.decoder
              else plan.layer_targets(layout.layer_in_key))
    experts = [None] if layout.expert_in_key is None else plan.expert_targets(layout.expert_in_key)
    return [layout.with_indices(t, e) for t in layers for e in experts]


def target_indices(plan: GrowthPlan, layout: KeyLayout, source_index: tuple[int, ...]) -> list[tuple]:
    """Every target prepended index made from the source slab at `source_index`."""
    choices = [[i] for i in source_index]
    if layout.decoder and layout.layer_axis is not None:
        choices[layout.layer_axis] = plan.layer_targets(source_index[layout.layer_axis])
    if layout.expert_axis is not None:
        choices[layout.expert_axis] = plan.expert_targets(source_index[layout.expert_axis])
    return list(itertools.product(*choices))
