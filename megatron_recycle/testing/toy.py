"""Small Megatron-Core GPT-MoE models in any TP/EP/PP(/VPP) layout, for tests, the demo and
benchmarks. Built from Megatron-Core's own local (non-TE) specs, so they run on CPU."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

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

    def architecture(self) -> Architecture:
        return Architecture(
            num_layers=self.num_layers,
            num_experts=self.experts,
            topk=self.topk if self.experts else None,
            moe_layers=None if self.moe_layer_freq is None else tuple(bool(x) for x in self.moe_layer_freq),
            mtp_layers=self.mtp_layers,
            router_num_groups=self.router_groups,
            router_group_topk=self.router_group_topk,
            score_function=self.score_function,
            pre_softmax=self.pre_softmax,
        )

    def grown(self, plan: GrowthPlan) -> "ToySpec":
        target = plan.target
        freq = target.moe_layer_freq()
        return dataclasses.replace(
            self,
            num_layers=target.num_layers,
            experts=target.num_experts,
            topk=target.topk or self.topk,
            moe_layer_freq=None if freq is None else tuple(freq),
        )


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

    return argparse.Namespace(
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
