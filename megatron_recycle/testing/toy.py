"""Small Megatron-Core GPT-MoE and HybridModel models in any TP/EP/PP(/VPP) layout, for tests,
the demo and benchmarks. Built from Megatron-Core's own local (non-TE) modules, so they run on
CPU (megatron-core ships HybridModel specs with Transformer Engine only: `hybrid_stack_spec`
below is the same stack from local modules, its keys mapped to the TE spec's)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from .. import hybrid
from ..plan import Architecture, GrowthPlan


@dataclass(frozen=True)
class ToySpec:
    num_layers: int = 4
    hidden: int = 32
    heads: int = 4
    ffn: int = 64
    experts: Optional[int] = 4
    moe_ffn: int = 16
    topk: int = 2
    shared_expert: int = 0  # shared expert intermediate size, 0 = none
    glu: bool = True
    moe_layer_freq: Optional[tuple[int, ...]] = None  # 1 = MoE, 0 = dense, per layer
    score_function: str = "softmax"
    pre_softmax: bool = False
    expert_bias: bool = False
    router_groups: Optional[int] = None
    router_group_topk: Optional[int] = None
    mtp_layers: int = 0
    vocab: int = 64
    seq: int = 16
    dtype: torch.dtype = torch.float32
    # HybridModel (megatron-core 0.18+): one symbol per layer, '/' before the MTP pattern; no
    # '|': pipeline segments are cut for the layout. num_layers and mtp_layers follow from it.
    hybrid_pattern: Optional[str] = None

    def __post_init__(self):
        if self.hybrid_pattern is not None:
            main, mtp = hybrid.split(self.hybrid_pattern)
            object.__setattr__(self, "num_layers", len(main))
            object.__setattr__(self, "mtp_layers", mtp.count(hybrid.MTP))

    def architecture(self) -> Architecture:
        moe_layers = None if self.moe_layer_freq is None else tuple(bool(x) for x in self.moe_layer_freq)
        if self.hybrid_pattern is not None:
            moe_layers = tuple(c == "E" for c in hybrid.split(self.hybrid_pattern)[0])
        return Architecture(
            num_layers=self.num_layers,
            num_experts=self.experts,
            topk=self.topk if self.experts else None,
            moe_layers=moe_layers,
            mtp_layers=self.mtp_layers,
            router_num_groups=self.router_groups,
            router_group_topk=self.router_group_topk,
            score_function=self.score_function,
            pre_softmax=self.pre_softmax,
            hybrid_pattern=self.hybrid_pattern,
        )

    def grown(self, plan: GrowthPlan) -> "ToySpec":
        target, up = plan.target, plan.upcycle
        freq = None if target.is_hybrid else target.moe_layer_freq()
        upcycled = {} if not up.active else {
            "moe_ffn": self.ffn // up.granularity, "shared_expert": self.ffn if up.shared_expert else 0}
        return dataclasses.replace(
            self,
            num_layers=target.num_layers,
            experts=target.num_experts,
            topk=target.topk or self.topk,
            moe_layer_freq=None if freq is None else tuple(freq),
            hybrid_pattern=target.hybrid_pattern,
            **upcycled,
        )

    def pattern_for(self, layout: "Layout") -> str:
        """The hybrid pattern with one `|` segment per (virtual) pipeline stage."""
        main, mtp = hybrid.split(self.hybrid_pattern)
        stages = layout.pp * (layout.vpp or 1)
        return hybrid.segmented(main, hybrid.default_blocks(main), stages, "pp") + mtp


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    ep: int = 1
    pp: int = 1
    vpp: Optional[int] = None
    first_stage_layers: Optional[int] = None
    last_stage_layers: Optional[int] = None
    etp: Optional[int] = None  # expert tensor parallel; default: TP

    def __str__(self):
        s = f"TP{self.tp}-EP{self.ep}-PP{self.pp}"
        return s + (f"-VPP{self.vpp}" if self.vpp else "")


def init_parallel(layout: Layout) -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp,
    )


def config(spec: ToySpec, layout: Layout):
    from megatron.core.transformer import TransformerConfig

    kwargs = dict(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden,
        num_attention_heads=spec.heads,
        ffn_hidden_size=spec.ffn,
        gated_linear_unit=spec.glu,
        add_bias_linear=False,
        use_cpu_initialization=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=spec.dtype,
        bf16=spec.dtype == torch.bfloat16,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp,
        # MoE trains at TP > 1 only with it (torch norm: cpu.patch_torch_norm_sequence_parallel)
        sequence_parallel=layout.tp > 1 and bool(spec.experts),
        num_layers_in_first_pipeline_stage=layout.first_stage_layers,
        num_layers_in_last_pipeline_stage=layout.last_stage_layers,
        pipeline_dtype=spec.dtype,
        mtp_num_layers=spec.mtp_layers or None,
    )
    if spec.hybrid_pattern is not None:
        kwargs.update(is_hybrid_model=True, normalization="RMSNorm", mamba_state_dim=8,
                      mamba_head_dim=8, mamba_num_groups=2, use_mamba_mem_eff_path=False)
    if spec.experts:
        kwargs.update(
            num_moe_experts=spec.experts,
            moe_ffn_hidden_size=spec.moe_ffn,
            moe_router_topk=spec.topk,
            moe_token_dispatcher_type="allgather",
            moe_router_score_function=spec.score_function,
            moe_router_pre_softmax=spec.pre_softmax,
            moe_router_enable_expert_bias=spec.expert_bias,
            moe_router_num_groups=spec.router_groups,
            moe_router_group_topk=spec.router_group_topk,
            moe_aux_loss_coeff=0.0,
            moe_router_load_balancing_type="none" if spec.expert_bias else "aux_loss",
            moe_shared_expert_intermediate_size=spec.shared_expert or None,
            moe_layer_freq=list(spec.moe_layer_freq) if spec.moe_layer_freq else 1,
        )
    return TransformerConfig(**kwargs)


def build(spec: ToySpec, layout: Layout, seed: int = 1) -> list[torch.nn.Module]:
    """The model chunks this rank holds (one per virtual stage), initialised from `seed`."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_decoder_block_spec,
        get_gpt_mtp_block_spec,
    )

    cfg = config(spec, layout)
    chunks = []
    for vp in range(layout.vpp or 1):
        vp_stage = vp if layout.vpp else None
        torch.manual_seed(seed)
        if spec.hybrid_pattern is not None:
            from megatron.core.models.hybrid.hybrid_model import HybridModel

            from .cpu import cuda_to_cpu

            with cuda_to_cpu():  # its output layer set-up moves weights with .cuda() under PP
                chunks.append(HybridModel(
                    cfg, hybrid_stack_spec(spec), vocab_size=spec.vocab, max_sequence_length=spec.seq,
                    hybrid_layer_pattern=spec.pattern_for(layout),
                    pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
                    post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
                    position_embedding_type="rope", vp_stage=vp_stage))
            continue
        block = get_gpt_decoder_block_spec(cfg, use_transformer_engine=False, vp_stage=vp_stage)
        mtp = None
        if spec.mtp_layers:
            mtp = get_gpt_mtp_block_spec(cfg, block.layer_specs[-1] if block.layer_specs else block,
                                         use_transformer_engine=False, vp_stage=vp_stage)
        chunks.append(GPTModel(
            cfg,
            block,
            vocab_size=spec.vocab,
            max_sequence_length=spec.seq,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            position_embedding_type="rope",
            mtp_block_spec=mtp,
            vp_stage=vp_stage,
        ))
    return chunks


def hybrid_stack_spec(spec: ToySpec):
    """megatron-core's `hybrid_stack_spec` from local modules (it ships one with Transformer
    Engine only), with `sharded_state_dict_keys_map`s that give the TE spec's checkpoint keys."""
    from functools import partial

    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.models.hybrid.hybrid_block import HybridStack, HybridStackSubmodules
    from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
    from megatron.core.ssm.mlp_layer import MLPLayer
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.multi_token_prediction import (
        MultiTokenPredictionBlock,
        MultiTokenPredictionBlockSubmodules,
        MultiTokenPredictionLayer,
        MultiTokenPredictionLayerSubmodules,
    )
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm as Norm
    from megatron.core.transformer.transformer_layer import (
        MoETransformerLayer,
        TransformerLayer,
        TransformerLayerSubmodules,
    )

    def mamba_mixer():  # imports mamba_ssm: only built for patterns with 'M'
        from megatron.core.ssm.mamba_mixer import MambaMixer, MambaMixerSubmodules

        return ModuleSpec(module=MambaMixer, submodules=MambaMixerSubmodules(
            in_proj=ColumnParallelLinear, out_proj=RowParallelLinear))

    has_mamba = "M" in (spec.hybrid_pattern or "")
    return ModuleSpec(module=HybridStack, submodules=HybridStackSubmodules(
        mamba_layer=ModuleSpec(module=MambaLayer, submodules=MambaLayerSubmodules(
            norm=Norm, mixer=mamba_mixer() if has_mamba else None, mamba_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map={"norm.": "mixer.in_proj.layer_norm_"})),
        attention_layer=ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
            input_layernorm=Norm,
            self_attention=ModuleSpec(
                module=SelfAttention, params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(linear_qkv=ColumnParallelLinear,
                                                   core_attention=DotProductAttention,
                                                   linear_proj=RowParallelLinear)),
            self_attn_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map={"input_layernorm.": "self_attention.linear_qkv.layer_norm_"})),
        mlp_layer=ModuleSpec(module=MLPLayer, submodules=TransformerLayerSubmodules(
            pre_mlp_layernorm=Norm,
            mlp=partial(MLP.as_mlp_submodule, submodules=MLPSubmodules(
                linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)),
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map={"pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"})),
        moe_layer=ModuleSpec(module=MoETransformerLayer, submodules=TransformerLayerSubmodules(
            pre_mlp_layernorm=Norm,
            mlp=get_moe_module_spec(use_te=False, num_experts=spec.experts, moe_grouped_gemm=False),
            mlp_bda=get_bias_dropout_add)),
        mtp_block_spec=ModuleSpec(module=MultiTokenPredictionBlock, submodules=MultiTokenPredictionBlockSubmodules(
            layer_specs=[ModuleSpec(module=MultiTokenPredictionLayer, submodules=MultiTokenPredictionLayerSubmodules(
                enorm=Norm, hnorm=Norm, eh_proj=ColumnParallelLinear, mtp_model_layer=None,
                layer_norm=Norm))])),
    ))


def sharded_state_dict(chunks: list[torch.nn.Module]) -> dict:
    """One sharded state dict over all chunks (Megatron-LM's `model0`, `model1` … keys)."""
    if len(chunks) == 1:
        return chunks[0].sharded_state_dict()
    return {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def load_state(chunks, state) -> None:
    if len(chunks) == 1:
        chunks[0].load_state_dict(state)
    else:
        for i, c in enumerate(chunks):
            c.load_state_dict(state[f"model{i}"])


def megatron_args(spec: ToySpec, layout: Layout, **extra):
    """The `args` Megatron-LM stores in common.pt, for the fields growth reads."""
    import argparse

    hybrid_args = {} if spec.hybrid_pattern is None else {
        "hybrid_layer_pattern": spec.pattern_for(layout), "is_hybrid_model": True}
    return argparse.Namespace(
        **hybrid_args,
        num_layers=spec.num_layers,
        hidden_size=spec.hidden,
        num_attention_heads=spec.heads,
        kv_channels=spec.hidden // spec.heads,
        ffn_hidden_size=spec.ffn,
        num_experts=spec.experts,
        moe_ffn_hidden_size=spec.moe_ffn,
        moe_router_topk=spec.topk if spec.experts else None,
        moe_layer_freq=list(spec.moe_layer_freq) if spec.moe_layer_freq else 1,
        moe_router_score_function=spec.score_function,
        moe_router_pre_softmax=spec.pre_softmax,
        moe_router_num_groups=spec.router_groups,
        moe_router_group_topk=spec.router_group_topk,
        mtp_num_layers=spec.mtp_layers or None,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        expert_model_parallel_size=layout.ep,
        padded_vocab_size=spec.vocab,
        seq_length=spec.seq,
        **extra,
    )


def finish() -> None:
    """Leave a distributed run cleanly: barrier, destroy the process group, then reap the
    writer helpers dist_checkpointing's save started (else the interpreter waits on them)."""
    import multiprocessing.util

    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
    multiprocessing.util._exit_function()


def save_checkpoint(root, iteration: int, state_dict: dict) -> None:
    """Save like Megatron-LM: `iter_XXXXXXX/` via dist_checkpointing, then the tracker file.

    The tracker is written last, by rank 0 after every rank finished, so a crash never
    leaves a `latest_checkpointed_iteration.txt` pointing at a partial directory.
    """
    import os
    from pathlib import Path

    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from ..io.checkpoint import TRACKER_FILE, iteration_dir

    root = Path(root)
    path = iteration_dir(root, iteration)
    if dist.get_rank() == 0:
        path.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(state_dict, str(path))
    dist.barrier()
    if dist.get_rank() == 0:
        tmp = root / (TRACKER_FILE + ".tmp")
        tmp.write_text(str(iteration))
        os.replace(tmp, root / TRACKER_FILE)
    dist.barrier()
