"""HF tensor names ↔ the Megatron-Core tensors they are parts of, so that growth of an HF
checkpoint is the engine's growth: the plan, `mapping.map_shard` and `ops` see Megatron keys.

Every HF tensor is a box of one Megatron-equivalent tensor, its *place*: with decoder layers
indexed in the key (`decoder.layers.{i}.`) and routed experts on one prepended axis, as
megatron-core keys a mixed dense/MoE stack. An expert's `gate_proj` and `up_proj` are rows
[0, F) and [F, 2F) of that expert's `mlp.experts.experts.linear_fc1.weight` unit ([gate; up],
as Megatron's GLU stores it), `down_proj` is its `linear_fc2`; a fused 3-D
`experts.gate_up_proj` [E, 2F, H] is the whole stack at once. The router is
`mlp.router.weight`, the score-correction bias `mlp.router.expert_bias`, shared experts
`mlp.shared_experts.linear_fc{1,2}`, the dense MLP `mlp.linear_fc{1,2}`, `o_proj`
`self_attention.linear_proj`, the pre-MLP norm `pre_mlp_layernorm`. Anything else in a layer
keeps its HF name under `decoder.layers.{i}.` (attention, norms: copied with their layer).
GPT-OSS stores its experts transposed ([E, H, 2F], gate and up columns interleaved, and
[E, F, H]) with biases: those tensors carry a `layout` that turns them into Megatron's and back.

So the noise of a copied HF expert tensor is, element for element, the noise the Megatron
path draws for the same (seed, layer, expert) in the same place of the fc1/fc2 unit: the
noise stream is named by the Megatron key (`decoder.layers.mlp.experts.experts.linear_fc1.weight`,
layer index removed, as in a stacked checkpoint), and σ is the std of the whole Megatron unit
(gate and up together). A `gate_proj` copy gets rows 0..F-1 of the fc1 unit's noise.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional

import torch

from .. import upcycling
from ..errors import CheckpointError, GrowthError
from ..io.hf import HFCheckpoint
from ..mapping import Box
from ..plan import GrowthPlan
from .families import Family

LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
OUTSIDE = {"model.embed_tokens.weight": "embedding.word_embeddings.weight",
           "lm_head.weight": "output_layer.weight",
           "model.norm.weight": "decoder.final_layernorm.weight"}
FC1, FC2 = upcycling.EXPERT_FC["fc1"], upcycling.EXPERT_FC["fc2"]
ROUTER, EXPERT_BIAS = upcycling.ROUTER
ROUTER_ROWS = (ROUTER, EXPERT_BIAS, "mlp.router.bias")
TRANSPOSED = {  # GPT-OSS: HF tail → (Megatron tail, layout)
    "experts.gate_up_proj": (FC1, "gate_up"), "experts.gate_up_proj_bias": (FC1[:-len("weight")] + "bias", "gate_up_bias"),
    "experts.down_proj": (FC2, "down"), "experts.down_proj_bias": (FC2[:-len("weight")] + "bias", "")}


def to_megatron(layout: str, t: torch.Tensor) -> torch.Tensor:
    """An HF tensor (any leading expert axes) in Megatron's layout: fc1 [gate; up] rows."""
    if layout in ("gate_up", "gate_up_bias"):
        t = torch.cat([t[..., 0::2], t[..., 1::2]], dim=-1)
    return t.transpose(-1, -2) if layout in ("gate_up", "down") else t


def to_hf(layout: str, t: torch.Tensor) -> torch.Tensor:
    """The inverse of `to_megatron`."""
    if layout in ("gate_up", "down"):
        t = t.transpose(-1, -2)
    if layout in ("gate_up", "gate_up_bias"):
        half = t.shape[-1] // 2
        out = torch.empty_like(t)
        out[..., 0::2], out[..., 1::2] = t[..., :half], t[..., half:]
        return out
    return t


@dataclass(frozen=True)
class Place:
    """Where one HF tensor lies in its Megatron-equivalent tensor."""

    key: str  # the Megatron-equivalent key, layer in the key
    prepend: int  # its prepended axes: 1 (the expert) for routed experts, else 0
    offset: tuple[int, ...]  # the HF tensor's global offset in it
    shape: tuple[int, ...]  # the HF tensor's extent in it (a leading 1 for one expert of a stack)
    layout: str = ""  # how the HF tensor differs from Megatron's layout (GPT-OSS experts), else ''


def _layer_key(layer: int, tail: str) -> str:
    return f"decoder.layers.{layer}.{tail}"


def place(family: Family, name: str, shape: tuple[int, ...]) -> Place:
    """The place of HF tensor `name`; GrowthError for an MLP tensor the family does not have."""
    if name in OUTSIDE:
        return Place(OUTSIDE[name], 0, (0,) * len(shape), shape)
    m = LAYER.match(name)
    if m is None:
        return Place(name, 0, (0,) * len(shape), shape)
    layer, tail = int(m.group(1)), m.group(2)
    gate, up, down = family.expert_names
    moe = re.escape(family.moe)
    expert = re.match(rf"^{moe}\.experts\.(\d+)\.(\w+)\.weight$", tail)
    if expert and expert.group(2) in family.expert_names and len(shape) == 2:
        j, which = int(expert.group(1)), expert.group(2)
        key = _layer_key(layer, FC2 if which == down else FC1)
        return Place(key, 1, (j, shape[0] if which == up else 0, 0), (1,) + shape)
    transposed = TRANSPOSED.get(tail[len(family.moe) + 1:]) if family.transposed_experts else None
    if transposed and tail.startswith(family.moe + "."):
        megatron_shape = tuple(to_megatron(transposed[1], torch.empty(shape, device="meta")).shape)
        return Place(_layer_key(layer, transposed[0]), 1, (0,) * len(shape), megatron_shape, transposed[1])
    fused = re.match(rf"^{moe}\.experts\.(gate_up_proj|down_proj)$", tail)
    if fused and len(shape) == 3 and not family.transposed_experts:
        return Place(_layer_key(layer, FC1 if fused.group(1) == "gate_up_proj" else FC2), 1, (0, 0, 0), shape)
    router = f"{family.moe}.{family.router}"
    simple = {f"{router}.weight": ROUTER, f"{router}.e_score_correction_bias": EXPERT_BIAS,
              f"{router}.bias": ROUTER_ROWS[2],
              "self_attn.o_proj.weight": "self_attention.linear_proj.weight",
              "self_attn.o_proj.bias": "self_attention.linear_proj.bias",
              "post_attention_layernorm.weight": upcycling.NORM["weight"]}
    if tail in simple:
        return Place(_layer_key(layer, simple[tail]), 0, (0,) * len(shape), shape)
    mlp = re.match(r"^mlp\.(shared_experts\.)?(gate_proj|up_proj|down_proj)\.weight$", tail)
    if mlp and (family.shared_experts or not mlp.group(1)):
        fc = upcycling.SHARED_FC if mlp.group(1) else upcycling.DENSE_FC
        which = mlp.group(2)
        return Place(_layer_key(layer, fc["fc2" if which == "down_proj" else "fc1"]), 0,
                     (shape[0] if which == "up_proj" else 0, 0), shape)
    if tail.startswith((f"{family.moe}.", "mlp.")):
        raise GrowthError(f"tensor {name!r}: {family.name} has no MLP tensor of that name that growth "
                          "can place (an expert, router or MLP stored another way); it is not grown")
    return Place(_layer_key(layer, tail), 0, (0,) * len(shape), shape)


def retarget(key: str, layer: int) -> str:
    """A Megatron-equivalent key of one decoder layer, for another layer."""
    return re.sub(r"^decoder\.layers\.\d+\.", f"decoder.layers.{layer}.", key)


class SourceView:
    """The source checkpoint as Megatron-equivalent tensors: their shapes (what the plan and
    the mapping see) and box reads assembled from the HF tensors they are made of."""

    def __init__(self, ckpt: HFCheckpoint, family: Family):
        self.ckpt, self.family = ckpt, family
        self.places = {name: place(family, name, shape) for name, shape in ckpt.shapes.items()}
        self.parts: dict[str, list[tuple[str, Place]]] = {}
        for name, p in self.places.items():
            self.parts.setdefault(p.key, []).append((name, p))
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        for key, parts in self.parts.items():
            shape = tuple(max(p.offset[d] + p.shape[d] for _, p in parts) for d in range(len(parts[0][1].shape)))
            dtypes = {ckpt.dtypes[n] for n, _ in parts}
            if sum(math.prod(p.shape) for _, p in parts) != math.prod(shape) or len(dtypes) > 1:
                names = ", ".join(sorted(n for n, _ in parts)[:4])
                raise CheckpointError(f"--load {ckpt.path}: tensors {names} ... do not make one whole "
                                      f"{key} of {shape} in one dtype (an expert's tensor is missing?)")
            self.shapes[key], self.dtypes[key] = shape, dtypes.pop()

    def read(self, box: Box) -> torch.Tensor:
        """The data of `box` (Megatron-equivalent coordinates), from the HF tensors under it."""
        start = tuple(box.index) + tuple(box.offset)
        extent = (1,) * len(box.index) + tuple(box.shape)
        out = None
        for name, p in self.parts[box.key]:
            lo = [max(a, b) for a, b in zip(start, p.offset)]
            hi = [min(a + n, b + m) for a, n, b, m in zip(start, extent, p.offset, p.shape)]
            if any(h <= l for l, h in zip(lo, hi)):
                continue
            lead = len(p.shape) - len(self.ckpt.shapes[name])  # the leading 1 of a single expert
            inner = [l - o for l, o in zip(lo, p.offset)][lead:]
            size = [h - l for l, h in zip(lo, hi)]
            if p.layout:  # whole experts read, turned into Megatron's layout, then cut
                stored = self.ckpt.shapes[name]
                whole = self.ckpt.read_box(name, (inner[0],) + (0,) * (len(stored) - 1), (size[0],) + stored[1:])
                data = to_megatron(p.layout, whole)[(slice(None),) + tuple(
                    slice(i, i + n) for i, n in zip(inner[1:], size[1:]))]
            else:
                data = self.ckpt.read_box(name, tuple(inner), tuple(size[lead:]))
            if list(lo) == list(start) and list(size) == list(extent):  # one part holds it all
                return data.reshape(box.shape)
            if out is None:
                out = torch.empty(extent, dtype=self.dtypes[box.key])
            out[tuple(slice(l - s, h - s) for l, h, s in zip(lo, hi, start))] = data.reshape(size)
        return out.reshape(box.shape)


@dataclass(frozen=True)
class Unit:
    """One target shard as `mapping.map_shard` takes it: a box of a Megatron-equivalent target
    tensor, and where it lies in the HF tensor (`expert`: the index of a fused stack)."""

    key: str
    global_shape: tuple[int, ...]
    global_offset: tuple[int, ...]
    local_shape: tuple[int, ...]
    prepend: int
    expert: Optional[int] = None
    layout: str = ""  # the HF tensor's layout (`to_hf`)

    def box(self) -> Box:
        return Box(self.key, self.global_shape, self.global_offset[:self.prepend],
                   self.global_offset[self.prepend:], self.local_shape)


@dataclass(frozen=True)
class TargetTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    units: tuple[Unit, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def target_tensors(view: SourceView, plan: GrowthPlan, family: Family) -> list[TargetTensor]:
    """Every tensor of the grown HF checkpoint, in layer order, with the shards that make it."""
    out: list[TargetTensor] = []
    layers: dict[int, list[str]] = {}
    for name in view.ckpt.shapes:
        m = LAYER.match(name)
        if m is None:
            shape = view.ckpt.shapes[name]
            out.append(TargetTensor(name, shape, view.ckpt.dtypes[name],
                                    (Unit(view.places[name].key, shape, (0,) * len(shape), shape, 0),)))
        else:
            layers.setdefault(int(m.group(1)), []).append(name)
    experts = plan.target_num_experts
    for t in range(plan.target_num_layers):
        s = plan.layer_map[t]
        for name in layers.get(s, []):
            tail = LAYER.match(name).group(2)
            p, shape, dtype = view.places[name], view.ckpt.shapes[name], view.ckpt.dtypes[name]
            key = retarget(p.key, t)
            whole = view.shapes[p.key]
            if plan.upcycled(s) and key.endswith(tuple(upcycling.DENSE_FC.values())):
                out += _upcycled(view, plan, family, t, tail, p, dtype)
                continue
            if len(p.shape) > len(shape):  # one expert's matrix: one tensor per target expert
                j = p.offset[0]
                for e in plan.expert_targets(j):
                    unit = Unit(key, (experts,) + whole[1:], (e,) + p.offset[1:], shape, 1)
                    out.append(TargetTensor(_name(t, re.sub(r"\.experts\.\d+\.", f".experts.{e}.", tail)),
                                            shape, dtype, (unit,)))
                continue
            if p.prepend == 1:  # a fused stack of every expert
                grown = (experts,) + shape[1:]
                units = tuple(Unit(key, (experts,) + whole[1:], (e,) + (0,) * (len(whole) - 1), whole[1:], 1, e,
                                   p.layout) for e in range(experts))
                out.append(TargetTensor(_name(t, tail), grown, dtype, units))
                continue
            if key.endswith(ROUTER_ROWS) and plan.source.is_moe:
                shape = (experts,) + shape[1:]
                whole = shape
            out.append(TargetTensor(_name(t, tail), shape, dtype, (Unit(key, whole, p.offset, shape, 0),)))
        if plan.upcycled(s):
            dense = view.places[_name(s, "mlp.gate_proj.weight")]
            out.append(TargetTensor(_name(t, f"{family.moe}.{family.router}.weight"), (experts, dense.shape[1]),
                                    view.ckpt.dtypes[_name(s, "mlp.gate_proj.weight")],
                                    (Unit(_layer_key(t, ROUTER), (experts, dense.shape[1]), (0, 0),
                                          (experts, dense.shape[1]), 0),)))
    return out


def _upcycled(view: SourceView, plan: GrowthPlan, family: Family, t: int, tail: str, p: Place,
              dtype) -> list[TargetTensor]:
    """A dense MLP tensor of an upcycled layer → that part of every expert (a 1/G slice)."""
    up = plan.upcycle
    gate, up_name, down = family.expert_names
    which = re.match(r"^mlp\.(\w+)\.weight$", tail).group(1)
    rows, cols = view.ckpt.shapes[_name(plan.layer_map[t], tail)]
    out = []
    for e in range(up.experts):
        if which == "down_proj":
            shape = (rows, cols // up.granularity)
            unit = Unit(_layer_key(t, FC2), (up.experts,) + shape, (e, 0, 0), shape, 1)
            hf = down
        else:
            shape = (rows // up.granularity, cols)
            unit = Unit(_layer_key(t, FC1), (up.experts, 2 * shape[0], cols),
                        (e, shape[0] if which == "up_proj" else 0, 0), shape, 1)
            hf = gate if which == "gate_proj" else up_name
        out.append(TargetTensor(_name(t, f"{family.moe}.experts.{e}.{hf}.weight"), shape, dtype, (unit,)))
    return out


def _name(layer: int, tail: str) -> str:
    return f"model.layers.{layer}.{tail}"


def view_shapes(tensors: list[TargetTensor]) -> tuple[dict, dict]:
    """The Megatron-equivalent shapes and dtypes a list of target tensors makes (for costs)."""
    shapes, dtypes = {}, {}
    for t in tensors:
        for u in t.units:
            shapes[u.key], dtypes[u.key] = u.global_shape, t.dtype
    return shapes, dtypes
