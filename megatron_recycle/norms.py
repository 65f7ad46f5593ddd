"""Per-layer and per-expert weight norms of a checkpoint, normalised as the paper does.

The paper's Figure 2 (and its authors' `analysis/layer_norm.py`): every projection of an
expert — gate, up, down — gets its Frobenius norm divided by sqrt(number of elements), so
tensors of different shapes compare; an expert's norm is the mean of its projections; a
layer's norm is the mean over its experts. Converged MoE models show a profile that rises
with depth, which stacking breaks and interposition keeps.

Megatron keys: the routed experts' `linear_fc1` (GLU: gate rows, then up rows, each half its
own projection) and `linear_fc2` (down); a dense layer's MLP counts as one expert (`expert`
None). Shared experts, attention and biases are left out, as in the paper.

Memory is bounded: the expert matrices are read in batches of whole units (one layer's one
expert) of at most `batch_bytes`, through the checkpoint's safe reader, and dropped once
their norms are taken; the checkpoint is never held whole. A new checkpoint format plugs in
through `expert_norms(shapes, dtypes, read)`.
"""

from __future__ import annotations

import csv
import io
import itertools
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from . import indexing
from .errors import CheckpointError, GrowthError
from .io.destination import write_file
from .mapping import Box

# What the paper's profile counts as rising: the deeper half's mean at least this much
# (relative) above the shallower half's, and layer norms ordered with depth (Spearman rho).
# Thresholds of ours, not the paper's: a freshly initialised model is flat within ~1%.
RISE = 0.05
ORDER = 0.5
_FC = (".linear_fc1.weight", ".linear_fc2.weight")


@dataclass(frozen=True)
class ExpertNorm:
    layer: int  # decoder layer
    expert: Optional[int]  # routed expert; None: a dense layer's MLP
    projections: tuple[tuple[str, float], ...]  # (gate / up / down, ||W||_F / sqrt(numel))

    @property
    def norm(self) -> float:
        """The mean of the projections' normalised norms (the paper's `average_norm`)."""
        return statistics.fmean(v for _, v in self.projections)


@dataclass(frozen=True)
class LayerNorm:
    layer: int
    kind: str  # "moe" or "dense"
    experts: int
    norm: float  # mean over its experts (the paper's `layer_avg_norm`)
    lowest: float
    highest: float


@dataclass(frozen=True)
class NormProfile:
    experts: tuple[ExpertNorm, ...]  # sorted by (layer, expert)

    def layers(self) -> list[LayerNorm]:
        out = []
        for layer, group in itertools.groupby(self.experts, key=lambda e: e.layer):
            group = list(group)
            norms = [e.norm for e in group]
            kind = "dense" if group[0].expert is None else "moe"
            out.append(LayerNorm(layer, kind, len(norms), statistics.fmean(norms), min(norms), max(norms)))
        return out

    def shape(self) -> dict:
        """Whether the layer norms rise with depth: `rise` (deeper half over shallower half,
        relative to the mean), `spearman` (rank correlation with the layer index) and the
        verdict: rising, flat, falling, irregular, or unknown (fewer than two layers)."""
        norms = [layer.norm for layer in self.layers()]
        if len(norms) < 2:
            return {"shape": "unknown", "rise": None, "spearman": None,
                    "why": "fewer than two layers with an MLP"}
        half = len(norms) // 2
        rise = (statistics.fmean(norms[-half:]) - statistics.fmean(norms[:half])) / statistics.fmean(norms)
        rho = _spearman(norms)
        if abs(rise) < RISE:
            verdict = "flat"
        elif rise > 0 and rho >= ORDER:
            verdict = "rising"
        elif rise < 0 and rho <= -ORDER:
            verdict = "falling"
        else:
            verdict = "irregular"
        return {"shape": verdict, "rise": rise, "spearman": rho,
                "first": norms[0], "last": norms[-1], "peak_layer": self.layers()[norms.index(max(norms))].layer}


def _spearman(values: list[float]) -> float:
    """Rank correlation of `values` with their positions (ties get their mean rank)."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in order[i:j + 1]:
            ranks[k] = (i + j) / 2
        i = j + 1
    positions = list(range(len(values)))
    if len(set(ranks)) == 1:
        return 0.0
    return statistics.correlation(positions, ranks)


# --- which tensors, and reading them ---------------------------------------------------------
@dataclass(frozen=True)
class _Unit:
    box: Box
    layer: int
    expert: Optional[int]
    projection: str  # "fc1" (split into gate / up for GLU) or "down"
    glu: bool


def mlp_units(shapes: dict[str, tuple[int, ...]]) -> list[_Unit]:
    """Every (layer, expert) matrix of the routed experts and dense MLPs, by its key and
    prepended index. Pure: no tensor is read."""
    units = []
    for key, shape in shapes.items():
        if not key.endswith(_FC):
            continue
        layout = indexing.parse_key(key, indexing.stored_prepend_axes(key))
        dense = layout.tail.startswith("mlp.linear_fc")
        if not layout.decoder or layout.prefix or not (dense or layout.has_expert_index):
            continue  # MTP, optimizer state, shared experts, attention
        prepend = (layout.layer_axis is not None) + (layout.expert_axis is not None)
        fc2 = shapes.get(key.replace(".linear_fc1.", ".linear_fc2."))
        glu = key.endswith(_FC[0]) and fc2 is not None and shape[prepend] == 2 * fc2[-1]
        for index in itertools.product(*(range(n) for n in shape[:prepend])):
            layer = index[layout.layer_axis] if layout.layer_axis is not None else layout.layer_in_key
            expert = (index[layout.expert_axis] if layout.expert_axis is not None
                      else layout.expert_in_key)
            units.append(_Unit(Box.whole_unit(key, shape, index), layer, None if dense else expert,
                               "fc1" if key.endswith(_FC[0]) else "down", glu))
    return sorted(units, key=lambda u: (u.layer, -1 if u.expert is None else u.expert, u.projection))


def _normalised(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(t, dtype=torch.float64)) / math.sqrt(t.numel())


def _projections(unit: _Unit, t: torch.Tensor) -> Iterator[tuple[str, float]]:
    if unit.projection == "down":
        yield "down", _normalised(t)
    elif unit.glu:  # megatron-core keeps GLU's fc1 as [gate; up] along its rows, whatever the TP
        gate, up = t.chunk(2, dim=0)
        yield "gate", _normalised(gate)
        yield "up", _normalised(up)
    else:
        yield "up", _normalised(t)


def expert_norms(shapes: dict[str, tuple[int, ...]], dtypes: dict[str, torch.dtype],
                 read: Callable[[dict[str, tuple[Box, torch.dtype]]], dict[str, torch.Tensor]],
                 batch_bytes: int = 256 * 2**20) -> NormProfile:
    """The profile of the tensors `shapes` lists, read through `read` (name → (box, dtype)
    to name → tensor) in batches of at most `batch_bytes` (one unit at least)."""
    units = mlp_units(shapes)
    if not units:
        raise GrowthError("the checkpoint has no decoder MLP or expert weights "
                          "(`decoder.layers…linear_fc1/2.weight`): no norms to take")
    found: dict[tuple, list] = {}
    for batch in _batches(units, dtypes, batch_bytes):
        tensors = read({str(i): (u.box, dtypes[u.box.key]) for i, u in enumerate(batch)})
        for i, u in enumerate(batch):
            found.setdefault((u.layer, u.expert), []).extend(_projections(u, tensors[str(i)]))
        del tensors
    order = {"gate": 0, "up": 1, "down": 2}
    return NormProfile(tuple(ExpertNorm(layer, expert, tuple(sorted(p, key=lambda x: order[x[0]])))
                             for (layer, expert), p in sorted(found.items(), key=_layer_then_expert)))


def _layer_then_expert(item) -> tuple[int, int]:
    (layer, expert), _ = item
    return layer, -1 if expert is None else expert


def _batches(units: list[_Unit], dtypes, batch_bytes: int) -> Iterator[list[_Unit]]:
    batch, size = [], 0
    for u in units:
        n = math.prod(u.box.unit_shape) * dtypes[u.box.key].itemsize
        if batch and size + n > batch_bytes:
            yield batch
            batch, size = [], 0
        batch.append(u)
        size += n
    if batch:
        yield batch


def checkpoint_norms(info, batch_bytes: int = 256 * 2**20) -> NormProfile:
    """The profile of a checkpoint (`io.checkpoint.CheckpointInfo`)."""
    from .io.reader import box_request

    def read(requests):
        return info.read_boxes({name: box_request(box, dtype) for name, (box, dtype) in requests.items()})

    return expert_norms(info.model_shapes(), info.dtypes, read, batch_bytes)


# --- output -----------------------------------------------------------------------------------
EXPERT_CSV, LAYER_CSV, PLOT = "expert_norms.csv", "layer_norms.csv", "layer_norms.png"


def expert_rows(profile: NormProfile) -> list[dict]:
    """One row per (layer, expert), with the paper's columns: the projections, their mean,
    the expert's share of its layer's sum, and the layer's mean."""
    layers = {layer.layer: layer for layer in profile.layers()}
    sums = {layer: sum(e.norm for e in profile.experts if e.layer == layer) for layer in layers}
    rows = []
    for e in profile.experts:
        p = dict(e.projections)
        rows.append({"layer": e.layer, "expert": "" if e.expert is None else e.expert,
                     "gate": p.get("gate", ""), "up": p.get("up", ""), "down": p.get("down", ""),
                     "norm": e.norm, "share_of_layer": e.norm / sums[e.layer],
                     "layer_norm": layers[e.layer].norm})
    return rows


def layer_rows(profile: NormProfile) -> list[dict]:
    return [{"layer": x.layer, "kind": x.kind, "experts": x.experts, "norm": x.norm,
             "lowest_expert": x.lowest, "highest_expert": x.highest} for x in profile.layers()]


def write(profile: NormProfile, out: Path, title: str = "") -> dict:
    """The CSVs always; the PNG when matplotlib is importable. Each file is written under a
    temporary name and renamed into place. Returns what was written and what was not."""
    out = check_out(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        written = [write_file(out / EXPERT_CSV, lambda f: _csv(f, expert_rows(profile))),
                   write_file(out / LAYER_CSV, lambda f: _csv(f, layer_rows(profile)))]
    except OSError as e:
        raise CheckpointError(f"--out {out}: cannot write ({e.strerror or e})") from None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {"written": written, "plot": f"no {PLOT}: matplotlib is not installed "
                                            "(pip install matplotlib for the plot)"}
    written.append(write_file(out / PLOT, lambda f: _plot(plt, profile, title, f)))
    return {"written": written, "plot": None}


def check_out(out) -> Path:
    """`--out`, refused before anything is read if it cannot be the output directory."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise GrowthError(f"--out {out}: exists and is not a directory; name a directory")
    return out


def _csv(f, rows: list[dict]) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    f.write(text.getvalue().encode())


def _plot(plt, profile: NormProfile, title: str, f) -> None:
    layers = profile.layers()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = [layer.layer for layer in layers]
    ax.fill_between(x, [layer.lowest for layer in layers], [layer.highest for layer in layers],
                    alpha=0.2, label="lowest to highest expert")
    ax.plot(x, [layer.norm for layer in layers], "o-", label="mean over experts")
    ax.set_xlabel("layer")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("weight norm / sqrt(numel)")
    ax.set_title(title or "Per-layer expert weight norms")
    ax.grid(True, linestyle="--", linewidth=0.5)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def table(profile: NormProfile) -> str:
    s = profile.shape()
    lines = [f"{'layer':>5}  {'kind':5}  {'experts':>7}  {'norm':>10}  {'lowest':>10}  {'highest':>10}"]
    lines += [f"{x.layer:>5}  {x.kind:5}  {x.experts:>7}  {x.norm:10.6f}  {x.lowest:10.6f}  {x.highest:10.6f}"
              for x in profile.layers()]
    lines.append(f"profile: {describe_shape(s)}")
    return "\n".join(lines)


def describe_shape(s: dict) -> str:
    if s["rise"] is None:
        return f"{s['shape']} ({s['why']})"
    return (f"{s['shape']}: deeper half {s['rise']:+.1%} over the shallower half, "
            f"rank correlation with depth {s['spearman']:+.2f}")
