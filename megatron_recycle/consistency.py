"""Whether a checkpoint's common-state `args` describe its tensors.

The args are what Megatron-LM (and growth) build the model from; the `.metadata` global shapes
are what is stored. A checkpoint where they disagree is inconsistent, and every reader
(`inspect`, `plan`, `grow`, `verify`, the load hook, the Megatron-LM adapter) must say so
rather than grow, cost or show the args' fiction. Each rule compares one argument with one
axis of the tensors that fix it; where an argument is unset, or no tensor fixes it, there is
nothing to check. Only global shapes are read, so the layout (TP/EP/PP, stacked or indexed
layers and experts, local or Transformer Engine keys) does not matter; GLU doubles `linear_fc1`,
so sizes are read from `linear_fc2`. Pure Python, no torch.
"""

from __future__ import annotations

import re
from typing import Any, Optional

from . import indexing

_EXPERT_FC2 = re.compile(r"\.mlp\.experts\.(experts|\d+)\.linear_fc2\.weight$")
# Layers whose sizes Megatron-LM's heterogeneous (per-layer) configs set, not the args.
_HETEROGENEOUS = ("heterogeneous_layers_config_path", "heterogeneous_layers_config_encoded_json")


def _arg(args, name: str) -> Optional[int]:
    value = getattr(args, name, None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _model_keys(shapes):
    return ((k, s) for k, s in shapes.items() if not k.startswith("optimizer."))


def problems(shapes: dict[str, tuple[int, ...]], args: Any) -> list[str]:
    """Each disagreement of `args` with the tensors `shapes`, as 'args.NAME=V but TENSOR …'.
    Empty when they agree or there are no args."""
    if args is None:
        return []
    found: dict[str, list[str]] = {}  # argument → what disagrees with it, first found first
    model = dict(_model_keys(shapes))

    def disagree(name: str, text: str) -> None:
        found.setdefault(name, []).append(text)

    def counted(name: str, held: Optional[int], what: str) -> None:
        value = _arg(args, name) or None  # 0: unset (num_experts 0 is a dense model)
        if value is not None and value != held:
            disagree(name, f"args.{name}={value} but the tensors hold {held} {what}")

    layers = indexing.decoder_layer_count(model)
    experts = indexing.expert_count(model)
    counted("num_layers", layers, "decoder layers")
    counted("num_experts", experts, "experts (router rows)")

    def axis(key: str, shape, dim: int, name: str, want: Optional[int], said: str = "") -> None:
        if want is not None and len(shape) >= -dim and shape[dim] != want:
            disagree(name, f"{said or f'args.{name}={want}'} but {key} has {shape[dim]} "
                           f"(shape {tuple(shape)})")

    hidden, vocab = _arg(args, "hidden_size"), _arg(args, "padded_vocab_size")
    same_layers = not any(getattr(args, name, None) for name in _HETEROGENEOUS)
    ffn, moe_ffn = _arg(args, "ffn_hidden_size"), _arg(args, "moe_ffn_hidden_size")
    shared = _arg(args, "moe_shared_expert_intermediate_size")
    heads, kv = _arg(args, "num_attention_heads"), _arg(args, "kv_channels")
    groups = _arg(args, "num_query_groups") if getattr(args, "group_query_attention", False) else heads
    gate = bool(getattr(args, "attention_output_gate", False))
    # the embedding and output layer first: the plainest witnesses of hidden and vocab sizes
    for key in sorted(model, key=lambda k: (not k.startswith(("embedding.", "output_layer.")), k)):
        shape = model[key]
        if key in ("embedding.word_embeddings.weight", "output_layer.weight"):
            axis(key, shape, -1, "hidden_size", hidden)
            axis(key, shape, -2, "padded_vocab_size", vocab)
        elif key.endswith(".router.weight"):
            axis(key, shape, -1, "hidden_size", hidden)
        elif _EXPERT_FC2.search(key):
            axis(key, shape, -2, "hidden_size", hidden)
            axis(key, shape, -1, "moe_ffn_hidden_size", moe_ffn if same_layers else None)
        elif key.endswith(".mlp.shared_experts.linear_fc2.weight"):
            axis(key, shape, -2, "hidden_size", hidden)
            axis(key, shape, -1, "moe_shared_expert_intermediate_size", shared if same_layers else None)
        elif key.endswith(".mlp.linear_fc2.weight"):
            axis(key, shape, -2, "hidden_size", hidden)
            axis(key, shape, -1, "ffn_hidden_size", ffn if same_layers else None)
        elif key.endswith(".self_attention.linear_proj.weight"):
            axis(key, shape, -2, "hidden_size", hidden)
            # its input is heads x kv_channels for standard attention only (MLA: v_head_dim)
            if heads and kv and same_layers and key[:-len("linear_proj.weight")] + "linear_qkv.weight" in model:
                axis(key, shape, -1, "num_attention_heads", heads * kv,
                     f"args.num_attention_heads={heads} x kv_channels={kv} = {heads * kv}")
        elif key.endswith(".self_attention.linear_qkv.weight"):
            axis(key, shape, -1, "hidden_size", hidden)
            if heads and groups and kv and same_layers:
                rows = (heads * (2 if gate else 1) + 2 * groups) * kv
                if shape[-2] != rows:
                    disagree("num_query_groups", f"args.num_attention_heads={heads}, num_query_groups={groups}, "
                               f"kv_channels={kv}{' (output gate)' if gate else ''} make {rows} "
                               f"query/key/value rows but {key} has shape {tuple(shape)}")
    if experts:
        topk = _arg(args, "moe_router_topk")
        if topk is not None and not 0 < topk <= experts:
            disagree("moe_router_topk", f"args.moe_router_topk={topk} but the tensors hold {experts} experts "
                       "(top-k must be between 1 and the experts)")
        num_groups, group_topk = _arg(args, "moe_router_num_groups"), _arg(args, "moe_router_group_topk")
        if num_groups and (num_groups < 0 or experts % num_groups):
            disagree("moe_router_num_groups", f"args.moe_router_num_groups={num_groups} does not divide the {experts} "
                       "experts the tensors hold")
        elif num_groups and group_topk is not None and not 0 < group_topk <= num_groups:
            disagree("moe_router_group_topk", f"args.moe_router_group_topk={group_topk} but args.moe_router_num_groups="
                       f"{num_groups} (it must be between 1 and the groups)")
    return [texts[0] + (f" (and {len(texts) - 1} more tensor(s))" if len(texts) > 1 else "")
            for texts in found.values()]


def check(path, shapes: dict[str, tuple[int, ...]], args: Any,
          source: str = "the common state's args") -> None:
    """Refuse (CheckpointError, exit 3) a checkpoint whose args (`source`: where they were read)
    disagree with its tensors."""
    from .errors import CheckpointError

    found = problems(shapes, args)
    if found:
        raise CheckpointError(f"{path}: {source} disagree with the tensors: "
                              f"{'; '.join(found)}; the checkpoint is inconsistent")
