"""Megatron-LM's legacy `torch` checkpoints (`--ckpt-format torch`) as a growth source.

An iteration directory holds one `mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt` per tensor /
pipeline / expert rank (the pipeline part only at PP > 1, the expert part only at EP > 1): a
pickled dict of `args`, `checkpoint_version`, `iteration`, the rank's module state dict
(`model`, or `model0`, `model1`… per virtual stage) with local layer and expert numbers, and its
optimizer, scheduler and RNG state. Each file is unpickled with `weights_only=True` and
megatron-core's safe globals (`safe_pickle.torch_load`), its tensors memory-mapped.

`LegacyTorchCheckpoint` presents it as the torch_dist checkpoint of the same model: keys and
global shapes as megatron-core's `sharded_state_dict` defines them (layers stacked on a first
axis, or in the key for non-homogeneous stacks; experts on the next axis as
`mlp.experts.experts.…`), and boxes of those global tensors assembled from the rank shards on
request, one layer/expert unit at a time:
- tensor parallel: column-parallel layers (`linear_qkv`, `linear_fc1`, MLA up-projections) on
  dim 0, a gated `linear_fc1` as all ranks' gate parts then all ranks' up parts; row-parallel
  (`linear_proj`, `linear_fc2`) on dim 1; vocab-parallel embedding / output layer on dim 0;
  anything else must be identical on every rank (norms, router, row-parallel biases);
- pipeline: a stage's local layer numbers shifted by the layers of the stages before it (in
  Megatron's order of virtual stages), which covers uneven first/last stages;
- expert parallel: local experts (`local_experts.i`, or TE's grouped `linear_fc1.weight{i}`)
  shifted by the experts of the expert ranks before; expert tensor parallelism must equal TP.
Not read: the optimizer state (tied to the saving layout; a grown copy starts a fresh one) and
the RNG state. Modules' `_extra_state` entries become the ShardedObjects megatron-core makes of
them (TP rank 0's, per layer/expert). GroupedMLP's fused `weight1`/`weight2`, MTP layers and
an expert TP size other than TP are refused (convert those with Megatron-LM first).
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..errors import CheckpointError, GrowthError
from .checkpoint import CheckpointInfo
from .safe_pickle import torch_load

RANK_FILE = "model_optim_rng.pt"
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")
_MODEL_CHUNK = re.compile(r"^model(\d*)$")
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")
_LOCAL_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(.*)$")  # SequentialMLP
_GROUPED_EXPERT = re.compile(r"^mlp\.experts\.(linear_fc[12])\.(weight|bias)(\d+)$")  # TEGroupedMLP
_COLUMN = re.compile(r"(^|\.)(linear_qkv|linear_fc1|linear_q_proj|linear_q_up_proj|linear_kv_up_proj)"
                     r"\.(weight|bias)$")
_ROW = re.compile(r"(^|\.)(linear_proj|linear_fc2)\.weight$")
_VOCAB = ("embedding.word_embeddings.weight", "output_layer.weight")
# megatron-core's local (non-TE) GPT layer spec saves its norms under the TE spec's names
# (`sharded_state_dict_keys_map`); a layer with an `input_layernorm` is of that spec.
_LOCAL_SPEC_KEYS = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                    "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}
_NOT_MODEL = ("optimizer", "rng_state")  # per-rank state a grown checkpoint does not carry


def is_legacy_iteration(path: Path) -> bool:
    """An iteration directory Megatron-LM saved with `--ckpt-format torch`."""
    return path.is_dir() and any(path.glob(f"mp_rank_*/{RANK_FILE}"))


@dataclass(frozen=True)
class Rank:
    tp: int
    pp: int
    ep: int
    file: str  # relative to the iteration directory


@dataclass(frozen=True)
class Unit:
    """One layer/expert slab of a global tensor: where its shards are and how they join."""

    parts: tuple[tuple[str, str, str], ...]  # (rank file, model chunk, local key), by TP rank
    split: Optional[int]  # the dim TP splits; None: replicated (the first part is it)
    gated: bool  # a GLU linear_fc1: each part is [gate; up]


@dataclass
class LegacyTorchCheckpoint(CheckpointInfo):
    units: dict = dataclasses.field(default_factory=dict, repr=False)  # key → index → Unit
    has_optimizer: bool = False
    object_parts: dict = dataclasses.field(default_factory=dict, repr=False)  # (key, offset) → part
    format = "torch"

    @classmethod
    def read_iteration(cls, ckpt: Path) -> "LegacyTorchCheckpoint":
        ranks = _ranks(ckpt)
        files = _Files(ckpt)
        first = files[ranks[0].file]
        common = {k: v for k, v in first.items() if not _MODEL_CHUNK.match(k) and k not in _NOT_MODEL}
        units, extra_states = _index(ranks, files, common.get("args"))
        shapes, dtypes = {}, {}
        for key, by_index in units.items():
            unit_shapes = {i: _unit_shape(files, u) for i, u in by_index.items()}
            shape = next(iter(unit_shapes.values()))
            counts = _counts(by_index)
            missing = set(itertools.product(*map(range, counts))) - by_index.keys()
            if missing or any(s != shape for s in unit_shapes.values()):
                raise CheckpointError(f"{ckpt}: {key}: the rank files hold " + (
                    f"no shard of (layer, expert) {sorted(missing)[0]}" if missing else
                    "shards of different shapes per layer/expert") + "; the checkpoint is incomplete")
            shapes[key] = counts + shape
            parts = next(iter(by_index.values())).parts
            dtypes[key] = files.value(parts[0]).dtype
        object_parts, objects = {}, []
        for key, by_index in extra_states.items():  # as megatron-core's make_sharded_object_for_checkpoint
            shape = _counts(by_index) or (1,)
            for index, part in by_index.items():
                offset = index or (0,)
                object_parts[key, offset] = part
                objects.append(f"{key}/shard_{'.'.join(map(str, offset))}_{'.'.join(map(str, shape))}")
        return cls(path=ckpt, shapes=shapes, dtypes=dtypes, objects=objects, common=common, units=units,
                   has_optimizer="optimizer" in first, object_parts=object_parts)

    @property
    def optimizer_format(self) -> Optional[str]:
        return "legacy torch, per rank" if self.has_optimizer else None

    def reading_notes(self) -> list[str]:
        return ["a legacy torch source: the grown checkpoint is torch_dist, without the source's "
                "RNG state: load it with --ckpt-format torch_dist --no-load-rng"]

    def read_boxes(self, requests: dict) -> dict:
        """As `io.reader.read_boxes`; a box may span several layer/expert units."""
        from .reader import is_object_request

        files, out, assembled = _Files(self.path), {}, {}
        for name, sh in requests.items():
            if is_object_request(sh):
                part = self.object_parts.get((sh.key, tuple(sh.global_offset)))
                if part is None:
                    raise GrowthError(f"object {sh.unique_key!r} is not in the checkpoint")
                out[name] = files.value(part)
                continue
            if sh.key not in self.units:
                raise GrowthError(f"tensor {sh.key!r} is not in the checkpoint")
            if tuple(sh.global_shape) != self.shapes[sh.key]:
                raise GrowthError(f"tensor {sh.key!r}: the checkpoint holds global shape "
                                  f"{self.shapes[sh.key]}, {tuple(sh.global_shape)} was asked for")
            sizes = (1,) * sh.prepend_axis_num + tuple(sh.local_shape)
            offset = tuple(sh.global_offset)
            axes = len(next(iter(self.units[sh.key])))
            target = sh.data.view(sizes)
            for index in itertools.product(*(range(o, o + n) for o, n in zip(offset[:axes], sizes[:axes]))):
                if (sh.key, index) not in assembled:
                    assembled[sh.key, index] = _assemble(files, self.units[sh.key][index])
                view = assembled[sh.key, index]
                for dim, (o, n) in enumerate(zip(offset[axes:], sizes[axes:])):
                    view = view.narrow(dim, o, n)
                target[tuple(i - o for i, o in zip(index, offset))].copy_(view)
            out[name] = sh.data
        return out


class _Files:
    """The rank files of one iteration directory, unpickled once per process (and again
    where a file changed)."""

    _cache: dict = {}

    def __init__(self, ckpt: Path):
        self.ckpt = ckpt

    def __getitem__(self, name: str) -> dict:
        path = self.ckpt / name
        try:
            stat = path.stat()
        except OSError as e:
            raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
        key = (str(path), stat.st_ino, stat.st_mtime_ns, stat.st_size)
        if key not in _Files._cache:
            state = torch_load(path, mmap=True)
            if not isinstance(state, dict):
                raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a dict; the "
                                      "checkpoint is corrupt")
            _Files._cache[key] = state
        return _Files._cache[key]

    def chunk(self, file: str, chunk: str) -> dict:
        state = self[file].get(chunk)
        if not isinstance(state, dict):
            raise CheckpointError(f"{self.ckpt / file}: no module state {chunk!r}, which the other "
                                  "rank files hold; the checkpoint is incomplete or mixed")
        return state

    def value(self, part: tuple[str, str, str]):
        file, chunk, key = part
        try:
            return self[file][chunk][key]
        except (KeyError, TypeError):
            raise CheckpointError(f"{self.ckpt / file}: no {chunk}[{key!r}], which the other rank "
                                  "files hold; the checkpoint is incomplete or mixed") from None


def _ranks(ckpt: Path) -> list[Rank]:
    """Every rank file, by (pp, ep, tp); `_PPP` and `_EEE` told apart by their count, or by
    the args where only one is there."""
    found = []
    for d in sorted(ckpt.glob("mp_rank_*")):
        m = _RANK_DIR.match(d.name)
        if m is None or not (d / RANK_FILE).is_file():
            raise CheckpointError(f"{d}: not a Megatron rank directory (mp_rank_TT[_PPP][_EEE]/"
                                  f"{RANK_FILE}); the checkpoint is incomplete or not Megatron's")
        found.append((int(m[1]), m[2], m[3], f"{d.name}/{RANK_FILE}"))
    suffixes = {(b is not None) + (c is not None) for _, b, c, _ in found}
    if len(suffixes) > 1:
        raise CheckpointError(f"{ckpt}: rank directories of different forms "
                              f"({', '.join(sorted(f[3] for f in found)[:4])}); the checkpoint is mixed")
    pipelined = True  # mp_rank_TT_PPP_EEE
    if suffixes == {1}:  # mp_rank_TT_PPP or mp_rank_TT_EEE
        args = _Files(ckpt)[found[0][3]].get("args")
        if args is None:
            raise CheckpointError(f"{ckpt}: mp_rank_TT_XXX directories, and no args to tell a "
                                  "pipeline rank from an expert rank")
        pipelined = (getattr(args, "pipeline_model_parallel_size", None) or 1) > 1
    ranks = []
    for tp, first, second, file in found:
        pp, ep = (int(first), int(second or 0)) if pipelined else (0, int(first))
        ranks.append(Rank(tp, pp, ep, file))
    ranks.sort(key=lambda r: (r.pp, r.ep, r.tp))
    want = set(itertools.product(*(range(max(getattr(r, a) for r in ranks) + 1) for a in ("tp", "pp", "ep"))))
    have = {(r.tp, r.pp, r.ep) for r in ranks}
    if want != have:
        raise CheckpointError(f"{ckpt}: rank files missing for (tp, pp, ep) {sorted(want - have)[:3]}; "
                              "the checkpoint is incomplete")
    return ranks


def _chunks(state: dict) -> list[tuple[int, str]]:
    """(virtual stage, key) of each module state dict in a rank file."""
    return sorted((int(m[1] or 0), k) for k in state if (m := _MODEL_CHUNK.match(k)))


def _index(ranks: list[Rank], files: _Files, args) -> tuple[dict, dict]:
    """key → index → Unit, in the torch_dist checkpoint's names; and key → index → part of
    the modules' extra states."""
    tp_size = max(r.tp for r in ranks) + 1
    etp = getattr(args, "expert_tensor_parallel_size", None)
    if etp not in (None, tp_size):
        raise GrowthError(f"{files.ckpt}: expert tensor parallel size {etp} differs from the tensor "
                          f"parallel size {tp_size}; convert it with Megatron-LM's "
                          "--ckpt-convert-format torch_dist first")
    by_place = {(r.tp, r.pp, r.ep): r.file for r in ranks}
    pp_size = max(r.pp for r in ranks) + 1
    chunks = _chunks(files[by_place[0, 0, 0]])
    layer_offset = _layer_offsets(files, by_place, pp_size, chunks)
    stacked = not _non_homogeneous(args)
    renames = _LOCAL_SPEC_KEYS if _local_spec(files[by_place[0, 0, 0]], chunks) else {}
    units: dict = {}
    extra_states: dict = {}
    for (tp, pp, ep), file in sorted(by_place.items()):
        if tp:
            continue  # the TP shards of a unit join under the tp=0 entry
        local_experts = _local_expert_count(files, file, chunks)
        for v, chunk in chunks:
            for local_key, value in files.chunk(file, chunk).items():
                extra_state = local_key.endswith("._extra_state")
                if not (extra_state or isinstance(value, torch.Tensor)):
                    continue
                key, index, expert = _global_name(local_key, layer_offset[pp, v], ep * local_experts, stacked,
                                                 renames)
                if expert is None and ep:
                    continue  # replicated over expert ranks: read from ep = 0
                if key.startswith("mtp."):
                    raise GrowthError(f"{files.ckpt}: multi-token prediction layers are not read from "
                                      "legacy torch checkpoints; convert it with Megatron-LM's "
                                      "--ckpt-convert-format torch_dist first")
                if key == "output_layer.weight" and _tied(args):
                    continue  # the last stage's copy of the embedding
                if key == "output_layer._extra_state":
                    continue  # GPTModel.sharded_state_dict drops it (it never holds data)
                if extra_state:  # TP rank 0's, as megatron-core saves it
                    extra_states.setdefault(key, {}).setdefault(index, (file, chunk, local_key))
                    continue
                parts = tuple((by_place[t, pp, ep], chunk, local_key) for t in range(tp_size))
                held = units.setdefault(key, {}).get(index)
                if held is None:
                    units[key][index] = _unit(files, key, parts)
                elif not torch.equal(files.value(held.parts[0]), files.value(parts[0])):
                    raise CheckpointError(f"{files.ckpt}: {local_key} differs between {held.parts[0][0]} "
                                          f"and {file}; the checkpoint is inconsistent")
    return units, extra_states


def _counts(by_index: dict) -> tuple[int, ...]:
    """The extent of each prepended (layer, expert) axis."""
    return tuple(max(i[a] for i in by_index) + 1 for a in range(len(next(iter(by_index)))))


def _layer_offsets(files: _Files, by_place: dict, pp_size: int, chunks) -> dict:
    """(pp, virtual stage) → global number of its first layer: Megatron's layer order is
    virtual stage major, then pipeline rank."""
    counts = {}
    for v, chunk in chunks:
        for pp in range(pp_size):
            local = [int(m[1]) for k in files.chunk(by_place[0, pp, 0], chunk) if (m := _LAYER.match(k))]
            counts[pp, v] = max(local) + 1 if local else 0
    offsets, total = {}, 0
    for v, _ in chunks:
        for pp in range(pp_size):
            offsets[pp, v] = total
            total += counts[pp, v]
    return offsets


def _non_homogeneous(args) -> bool:
    """Whether megatron-core keys this model's layers by number (`decoder.layers.N.…`) rather
    than stacking them, as `TransformerBlock.sharded_state_dict` decides."""
    for name in ("moe_layer_freq", "linear_attention_freq"):
        freq = getattr(args, name, None)
        if isinstance(freq, list) or (isinstance(freq, int) and freq > 1):
            return True
    return bool(getattr(args, "heterogeneous_layers_config_path", None))


def _tied(args) -> bool:
    return getattr(args, "untie_embeddings_and_output_weights", True) is False


def _local_expert_count(files: _Files, file: str, chunks) -> int:
    """Experts per expert rank: one more than the highest local expert number in a rank file."""
    numbers = [0]
    for _, chunk in chunks:
        for key in files.chunk(file, chunk):
            layer = _LAYER.match(key)
            rest = layer[2] if layer else ""
            if (m := _LOCAL_EXPERT.match(rest)) is not None:
                numbers.append(int(m[1]) + 1)
            elif (m := _GROUPED_EXPERT.match(rest)) is not None:
                numbers.append(int(m[3]) + 1)
    return max(numbers)


def _local_spec(state: dict, chunks) -> bool:
    """Whether the layers are megatron-core's local spec with standard attention (its norms
    are apart from the linear layers and renamed in torch_dist; not so for MLA)."""
    keys = [m[2] for _, chunk in chunks for k in state[chunk] if (m := _LAYER.match(k))]
    return (any(k.startswith("input_layernorm.") for k in keys)
            and any(k.startswith("self_attention.linear_qkv.") for k in keys))


def _global_name(local_key: str, layer_offset: int, expert_offset: int, stacked: bool, renames: dict):
    """(torch_dist key, prepended index, global expert or None) of a rank's local key."""
    m = _LAYER.match(local_key)
    if m is None:
        return local_key, (), None
    layer, rest = layer_offset + int(m[1]), m[2]
    for old, new in renames.items():
        if rest.startswith(old):
            rest = new + rest[len(old):]
    expert = None
    if (e := _LOCAL_EXPERT.match(rest)) is not None:
        expert, rest = expert_offset + int(e[1]), f"mlp.experts.experts.{e[2]}"
    elif (e := _GROUPED_EXPERT.match(rest)) is not None:
        expert, rest = expert_offset + int(e[3]), f"mlp.experts.experts.{e[1]}.{e[2]}"
    elif rest.startswith("mlp.experts.weight"):
        raise GrowthError(f"{local_key}: GroupedMLP's fused expert weights (--moe-grouped-gemm "
                          "without Transformer Engine) are not read from legacy torch checkpoints; "
                          "convert it with Megatron-LM's --ckpt-convert-format torch_dist first")
    experts = () if expert is None else (expert,)
    if stacked:
        return f"decoder.layers.{rest}", (layer,) + experts, expert
    return f"decoder.layers.{layer}.{rest}", experts, expert


def _unit(files: _Files, key: str, parts) -> Unit:
    shards = [files.value(p) for p in parts]
    if len(shards) == 1:
        return Unit(parts, None, False)
    if _COLUMN.search(key) or key in _VOCAB:
        gated = False
        if ".linear_fc1." in key:
            file, chunk, local = parts[0]
            fc2 = files.chunk(file, chunk).get(re.sub(r"linear_fc1\.(weight|bias)", "linear_fc2.weight", local))
            if fc2 is None:
                raise CheckpointError(f"{files.ckpt / file}: {local} has no linear_fc2 beside it to "
                                      "tell a gated (GLU) layer from a plain one")
            gated = shards[0].shape[0] == 2 * fc2.shape[1]
        return Unit(parts, 0, gated)
    if _ROW.search(key):
        return Unit(parts, 1, False)
    if any(s.shape != shards[0].shape or not torch.equal(s, shards[0]) for s in shards[1:]):
        raise CheckpointError(f"{files.ckpt / parts[0][0]}: {parts[0][2]} differs between tensor "
                              "parallel ranks, and is not a layer megatron-recycle knows to be "
                              "split; convert it with Megatron-LM's --ckpt-convert-format "
                              "torch_dist first")
    return Unit(parts, None, False)


def _unit_shape(files: _Files, unit: Unit) -> tuple[int, ...]:
    shapes = [tuple(files.value(p).shape) for p in unit.parts]
    if unit.split is None:
        return shapes[0]
    shape = list(shapes[0])
    shape[unit.split] = sum(s[unit.split] for s in shapes)
    return tuple(shape)


def _assemble(files: _Files, unit: Unit) -> torch.Tensor:
    shards = [files.value(p) for p in unit.parts]
    if unit.split is None:
        return shards[0]
    if unit.gated:  # megatron-core's global GLU weight: every rank's gate part, then every up part
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(shards, dim=unit.split)
