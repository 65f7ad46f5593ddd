"""Run Megatron-Bridge (0.6.x) on CPU over gloo, and tiny random HF MoE models to feed it.

Bridge assumes CUDA and Transformer Engine in places that are not about the math; `install()`
covers exactly those, once per process:
- `typing.override` (Python 3.12) for megatron.training's import chain on Python 3.11;
- the one unconditional `import transformer_engine.pytorch` on the conversion path (Bridge's
  LoRA layers): a stand-in module while that one file is imported, removed right after, so
  nothing else sees Transformer Engine;
- `torch.cuda.get_rng_state` (Bridge's checkpoint save calls it with `save_rng=False` too)
  and megatron-core's CPU shims (`testing.cpu`).
`cpu_provider()` sets what a provider needs on CPU: the local layer spec, fusions off, the
allgather dispatcher. Tests, the README's walk-through and laptops use this; growth never does.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

import torch

_INSTALLED = False


def install() -> None:
    global _INSTALLED
    if _INSTALLED:
        return
    import typing

    if not hasattr(typing, "override"):  # Python 3.11; megatron.training imports it
        typing.override = lambda f: f
    from . import cpu

    cpu.install()
    if not torch.cuda.is_available():
        torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
        torch.cuda.manual_seed = torch.cuda.manual_seed_all = lambda *a, **k: None
    if importlib.util.find_spec("transformer_engine") is None:
        sys.meta_path.insert(0, _WithoutTransformerEngine("megatron.bridge.peft.lora_layers"))
    _INSTALLED = True


class _WithoutTransformerEngine(importlib.abc.MetaPathFinder):
    """Finds `module` as usual but executes it with a stand-in `transformer_engine.pytorch` in
    `sys.modules`, removed as soon as that one module has run: its top-level import is only used
    by code paths that need Transformer Engine (never taken here), and no other module may see
    a Transformer Engine that is not there."""

    def __init__(self, module: str):
        self.module = module

    def find_spec(self, name, path=None, target=None):
        if name != self.module:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        real = spec.loader

        class Loader(importlib.abc.Loader):
            def create_module(self, spec):
                return real.create_module(spec)

            def exec_module(self, module):
                stand_in = _transformer_engine_stand_in()
                sys.modules.update(stand_in)
                try:
                    real.exec_module(module)
                finally:
                    for key in stand_in:
                        sys.modules.pop(key, None)

        spec.loader = Loader()
        return spec


def _transformer_engine_stand_in() -> dict[str, types.ModuleType]:
    class Missing:  # isinstance(x, te.Linear) is False; building one is an error
        def __init__(self, *a, **k):
            raise RuntimeError("Transformer Engine is not installed")

    te = types.ModuleType("transformer_engine")
    te.pytorch = types.ModuleType("transformer_engine.pytorch")
    te.pytorch.ops = types.ModuleType("transformer_engine.pytorch.ops")
    for module in (te.pytorch, te.pytorch.ops):
        module.__getattr__ = lambda name: Missing if not name.startswith("__") else None
    return {"transformer_engine": te, "transformer_engine.pytorch": te.pytorch}


def cpu_provider(provider, **overrides):
    """A Bridge model provider made runnable on CPU: the local spec (no TE), no fused kernels,
    the allgather dispatcher (alltoall makes CUDA streams), no shared-expert overlap. None of
    these changes the math. `overrides`: parallel sizes and the like."""
    install()
    from megatron.bridge.models.gpt_provider import local_layer_spec

    provider.transformer_layer_spec = local_layer_spec
    settings = dict(
        moe_permute_fusion=False, moe_grouped_gemm=False, moe_token_dispatcher_type="allgather",
        moe_shared_expert_overlap=False, masked_softmax_fusion=False, bias_activation_fusion=False,
        bias_dropout_fusion=False, gradient_accumulation_fusion=False, apply_rope_fusion=False,
        persist_layer_norm=False, cross_entropy_loss_fusion=False, moe_router_fusion=False,
        attention_backend=_attention_backend_local(), use_cpu_initialization=True,
        params_dtype=torch.float32, bf16=False, fp16=False, deallocate_pipeline_outputs=False,
    )
    settings.update(overrides)
    for name, value in settings.items():
        if hasattr(provider, name):
            setattr(provider, name, value)
    return provider


def _attention_backend_local():
    from megatron.core.transformer.enums import AttnBackend

    return AttnBackend.local


@contextlib.contextmanager
def distributed():
    """A one-process gloo group with megatron-core's parallel state (Bridge's own helper)."""
    install()
    from megatron.bridge.training.model_load_save import temporary_distributed_context

    with temporary_distributed_context(backend="gloo"):
        yield


# --- tiny random HF MoE models --------------------------------------------------------------
VOCAB = 128


def hf_config(family: str, **overrides):
    """A tiny config of a public MoE family: 'qwen3_moe', 'qwen3_moe_norm' (norm_topk_prob),
    'olmoe', 'glm4_moe' (sigmoid router, expert bias, shared expert, first layer dense,
    group-limited routing); or of the dense 'qwen3' (to upcycle)."""
    import transformers

    common = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=8, num_hidden_layers=2, max_position_embeddings=64,
                  tie_word_embeddings=False, torch_dtype="float32", rms_norm_eps=1e-6)
    if family in ("qwen3_moe", "qwen3_moe_norm"):
        cfg = dict(common, intermediate_size=48, moe_intermediate_size=16, num_experts=4,
                   num_experts_per_tok=2, norm_topk_prob=family.endswith("_norm"),
                   decoder_sparse_step=1, mlp_only_layers=[])
        cls = transformers.Qwen3MoeConfig
    elif family == "qwen3":
        cfg = dict(common, intermediate_size=48)
        cls = transformers.Qwen3Config
    elif family == "olmoe":
        cfg = dict(common, intermediate_size=16, num_experts=4, num_experts_per_tok=2,
                   norm_topk_prob=False, clip_qkv=None)
        cls = transformers.OlmoeConfig
    elif family == "glm4_moe":
        cfg = dict(common, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=4,
                   num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
                   n_group=2, topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=True,
                   partial_rotary_factor=0.5, use_qk_norm=False, attention_bias=True)
        cls = transformers.Glm4MoeConfig
    else:
        raise ValueError(f"unknown family {family!r}")
    cfg.update(overrides)
    cfg.setdefault("architectures", [cls.__name__.replace("Config", "ForCausalLM")])  # AutoBridge's key
    return cls(**cfg)


def hf_model(config, seed: int = 0):
    """A random HF causal LM from `config`, in fp32 eval mode; router biases made non-zero so
    that a grown model that mishandled them would show."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.2 if p.dim() > 1 else 0.05)
            if "norm" in name:
                p.add_(1.0)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0, 0.05)
    return model


def save_hf(model, path: Path) -> Path:
    """`save_pretrained` plus a tiny word-level tokenizer, so Bridge's import copies a
    tokenizer/ into the checkpoint as it would for a hub model."""
    model.save_pretrained(path)
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB - 1)} | {"<unk>": VOCAB - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="t0").save_pretrained(path)
    return path


def import_ckpt(hf_path: Path, megatron_path: Path, **parallel) -> None:
    """What `AutoBridge.import_ckpt` does, with the provider made runnable on CPU: HF model →
    Bridge provider → Megatron model with the HF weights → `save_megatron_model` (which writes
    run_config.yaml, train_state.pt, the tokenizer). Run inside `distributed()`."""
    from megatron.bridge import AutoBridge

    bridge = AutoBridge.from_hf_pretrained(str(hf_path), torch_dtype=torch.float32)
    provider = cpu_provider(bridge.to_megatron_provider(load_weights=True), **parallel)
    provider.finalize()
    model = provider.provide_distributed_model(wrap_with_ddp=False, use_cpu_initialization=True)
    bridge.save_megatron_model(model, str(megatron_path), hf_tokenizer_path=str(hf_path))


def export_ckpt(hf_config_, megatron_path: Path, hf_out: Path) -> None:
    """Bridge's own `export_ckpt` (it opens its own gloo group): the model is built from the
    checkpoint's run_config.yaml, the weights written with `hf_config_` (the grown model's)."""
    install()
    from megatron.bridge import AutoBridge

    AutoBridge.from_hf_config(hf_config_).export_ckpt(str(megatron_path), str(hf_out),
                                                       show_progress=False)


def grown_hf_config(config, run_config_model: dict[str, Any]):
    """`config` with the sizes growth changes taken from a Bridge checkpoint's run_config
    model section, through Bridge's own HF ↔ Megatron name table."""
    install()
    from megatron.bridge.models.conversion.model_bridge import MegatronModelBridge

    grown = config.__class__.from_dict(config.to_dict())
    changed = {"num_layers", "num_moe_experts", "moe_router_topk"}
    for hf_name, megatron_name in MegatronModelBridge.CONFIG_MAPPING:
        if megatron_name in changed and hasattr(grown, hf_name) and megatron_name in run_config_model:
            setattr(grown, hf_name, run_config_model[megatron_name])
    if hasattr(grown, "first_k_dense_replace"):  # GLM / DeepSeek: the leading dense layers
        freq = run_config_model.get("moe_layer_freq")
        if isinstance(freq, list):
            grown.first_k_dense_replace = next((i for i, m in enumerate(freq) if m), len(freq))
    return grown


def logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits.float()


def load_hf(path: Path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=torch.float32).eval()


def run_config_model(iteration_dir: Path) -> dict[str, Any]:
    import yaml

    return yaml.safe_load((Path(iteration_dir) / "run_config.yaml").read_text())["model"]


def tokens(batch: int = 2, length: int = 12, seed: int = 1, vocab: int = VOCAB) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab - 1, (batch, length), generator=g)

