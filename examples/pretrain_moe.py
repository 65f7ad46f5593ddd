"""Reference pretraining loop on megatron-core: a GPT-MoE on the standard-library byte corpus,
with checkpoints through `dist_checkpointing`, resumable, and growable at load time.

    torchrun --nproc-per-node 2 examples/pretrain_moe.py --expert-model-parallel-size 2 \
        --train-iters 40 --save ckpt/base
    torchrun --nproc-per-node 2 examples/pretrain_moe.py --tensor-model-parallel-size 2 \
        --grow-from ckpt/base --grow-depth 2 --grow-experts 2 --train-iters 80 --save ckpt/grown

Megatron-Core pieces, as Megatron-LM uses them: GPTModel with MoE (local specs, so it runs
without Transformer Engine), DistributedDataParallel, the distributed optimizer,
`get_forward_backward_func` (pipeline schedules), OptimizerParamScheduler. gloo on CPU,
NCCL on GPU. Checkpoints have Megatron-LM's layout and common state (`args` with
`consumed_train_samples`, `iteration`, `opt_param_scheduler`, `content_metadata`).

`--grow-from` loads a checkpoint of a smaller model through `GrowthLoadStrategy`: the model
and (policy `copy` / `zero`) the optimizer state are grown into this run's layout; the
iteration, consumed samples and LR schedule continue unless `--grow-rewarmup-iters` is set.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # megatron-core imports faster without it

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus import VOCAB_SIZE, ByteCorpus  # noqa: E402

from megatron_recycle import compat, fixes  # noqa: E402
from megatron_recycle.testing import cpu, toy  # noqa: E402
from megatron_recycle.io.checkpoint import CheckpointInfo  # noqa: E402
from megatron_recycle.options import add_growth_args, growth_from_args  # noqa: E402
from megatron_recycle.plan import GrowthPlan  # noqa: E402
from megatron_recycle.policy import Progress, apply_schedule_after_growth, load_moment_policy  # noqa: E402

# How the optimizer's sharded state is requested and saved: model-space tensors (growable,
# reshardable to any layout), and no `chained_N.` prefixes when experts have their own
# optimizer, as Megatron-LM does with --dist-ckpt-optim-fully-reshardable.
def optimizer_metadata(fmt: str) -> dict:
    return {"distrib_optim_sharding_type": fmt, "chained_optim_avoid_prefix": True}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m = p.add_argument_group("model (ignored with --load / --grow-from: read from the checkpoint)")
    m.add_argument("--num-layers", type=int, default=2)
    m.add_argument("--hidden-size", type=int, default=64)
    m.add_argument("--num-attention-heads", type=int, default=4)
    m.add_argument("--ffn-hidden-size", type=int, default=128)
    m.add_argument("--num-experts", type=int, default=4)
    m.add_argument("--moe-ffn-hidden-size", type=int, default=64)
    m.add_argument("--moe-router-topk", type=int, default=2)
    m.add_argument("--seq-length", type=int, default=128)

    par = p.add_argument_group("parallelism")
    par.add_argument("--tensor-model-parallel-size", type=int, default=1)
    par.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    par.add_argument("--expert-model-parallel-size", type=int, default=1)
    par.add_argument("--expert-tensor-parallel-size", type=int, default=None)
    par.add_argument("--no-distributed-optimizer", dest="distributed_optimizer",
                     action="store_false", help="use the non-distributed optimizer")
    par.add_argument("--dist-optim-format", default="fully_reshardable",
                     choices=["fully_reshardable", "dp_reshardable"],
                     help="how the distributed optimizer saves its state; only "
                          "fully_reshardable can be grown")

    t = p.add_argument_group("training")
    t.add_argument("--train-iters", type=int, default=40, help="the iteration to stop at")
    t.add_argument("--micro-batch-size", type=int, default=4)
    t.add_argument("--global-batch-size", type=int, default=16)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--min-lr", type=float, default=3e-4)
    t.add_argument("--lr-warmup-iters", type=int, default=5)
    t.add_argument("--lr-decay-iters", type=int, default=None, help="default: --train-iters")
    t.add_argument("--lr-decay-style", default="cosine", choices=["constant", "linear", "cosine"])
    t.add_argument("--weight-decay", type=float, default=0.1)
    t.add_argument("--clip-grad", type=float, default=1.0)
    t.add_argument("--seed", type=int, default=1234)
    t.add_argument("--corpus-bytes", type=int, default=4_000_000,
                   help="how much of the standard library's sources to read")

    e = p.add_argument_group("evaluation and logging")
    e.add_argument("--eval-interval", type=int, default=10)
    e.add_argument("--eval-samples", type=int, default=64, help="held-out windows per evaluation")
    e.add_argument("--log-interval", type=int, default=1)
    e.add_argument("--metrics", type=Path, default=None, help="append JSON lines here (rank 0)")

    c = p.add_argument_group("checkpoints")
    c.add_argument("--save", type=Path, default=None)
    c.add_argument("--save-interval", type=int, default=None, help="default: at the end only")
    c.add_argument("--load", type=Path, default=None, help="resume a checkpoint of this model")

    p.add_argument("--grow-from", type=Path, default=None,
                   help="grow this checkpoint of a smaller model at load time (--grow-* options)")
    add_growth_args(p)
    args = p.parse_args(argv)
    if args.load and args.grow_from:
        p.error("--load resumes the same model, --grow-from grows a smaller one: give one")
    return args


# --- the run -------------------------------------------------------------------------------
@dataclass
class Run:
    args: argparse.Namespace
    spec: toy.ToySpec
    layout: toy.Layout
    model: list  # DDP-wrapped chunks
    optimizer: object
    scheduler: object
    corpus: ByteCorpus
    progress: Progress = Progress()
    grown_at: Optional[int] = None  # iteration of the source checkpoint, when grown
    plan: Optional[GrowthPlan] = None  # the growth, when grown
    # More metrics at each evaluation: callables of the run returning a dict (a caller's).
    eval_metrics: list = dataclasses.field(default_factory=list)

    @property
    def chunks(self) -> list[torch.nn.Module]:
        return [m.module for m in self.model]

    @property
    def samples_per_step(self) -> int:
        return self.args.global_batch_size


def layout_from(args) -> toy.Layout:
    return toy.Layout(tp=args.tensor_model_parallel_size, pp=args.pipeline_model_parallel_size,
                      ep=args.expert_model_parallel_size, etp=args.expert_tensor_parallel_size)


def spec_from(args) -> toy.ToySpec:
    """The model from command-line flags or from a checkpoint's `args` (same field names; a
    checkpoint's may also give the vocabulary, a shared expert and mixed dense/MoE layers)."""
    freq = getattr(args, "moe_layer_freq", 1)
    return toy.ToySpec(
        num_layers=args.num_layers, hidden=args.hidden_size, heads=args.num_attention_heads,
        ffn=args.ffn_hidden_size, experts=args.num_experts, moe_ffn=args.moe_ffn_hidden_size,
        topk=args.moe_router_topk, vocab=getattr(args, "padded_vocab_size", None) or VOCAB_SIZE,
        seq=args.seq_length, expert_bias=False,
        shared_expert=getattr(args, "moe_shared_expert_intermediate_size", None) or 0,
        moe_layer_freq=tuple(freq) if isinstance(freq, (list, tuple)) else None,
    )


def build_run(args, spec: toy.ToySpec, layout: toy.Layout) -> Run:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    toy.init_parallel(layout)
    if torch.cuda.is_available():  # the CUDA RNG tracker that attention dropout and TP init fork
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(args.seed)
    chunks = toy.build(spec, layout, seed=args.seed)
    if torch.cuda.is_available():
        chunks = [c.cuda(torch.cuda.current_device()) for c in chunks]
    config = chunks[0].config
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=args.distributed_optimizer)
    model = [DistributedDataParallel(config, ddp_config, c, disable_bucketing=i > 0)
             for i, c in enumerate(chunks)]
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
        adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, clip_grad=args.clip_grad,
        use_distributed_optimizer=args.distributed_optimizer, params_dtype=spec.dtype,
    ), model)
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    gbs = args.global_batch_size
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=args.lr, min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters * gbs,
        lr_decay_steps=(args.lr_decay_iters or args.train_iters) * gbs,
        lr_decay_style=args.lr_decay_style, start_wd=args.weight_decay,
        end_wd=args.weight_decay, wd_incr_steps=args.train_iters * gbs, wd_incr_style="constant",
    )
    corpus = ByteCorpus(max_bytes=args.corpus_bytes, seed=args.seed)
    return Run(args, spec, layout, model, optimizer, scheduler, corpus)


# --- data and steps ------------------------------------------------------------------------
def _device_batch(windows):
    tokens, labels = ByteCorpus.batch(windows)
    if torch.cuda.is_available():
        tokens, labels = tokens.cuda(non_blocking=True), labels.cuda(non_blocking=True)
    return tokens, labels


def microbatches(run: Run, sample: Callable[[int, int], object], first: int, count: int):
    """This data-parallel rank's micro-batches of samples first … first + count - 1."""
    from megatron.core import parallel_state as ps

    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    per_rank = count // dp
    mbs = run.args.micro_batch_size
    start = first + rank * per_rank
    return [_device_batch([sample(start + i + j, run.spec.seq) for j in range(mbs)])
            for i in range(0, per_rank, mbs)]


def forward_step(data_iterator, model):
    tokens, labels = next(data_iterator)
    position_ids = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    per_token = model(tokens, position_ids, None, labels=labels)

    def loss_func(output):
        loss = output.float().mean()
        # A copy: the schedule divides the returned loss in place by the micro-batch count.
        return loss, {"lm loss": loss.detach().clone()}

    return per_token, loss_func


def collective_device() -> str:
    """Where a tensor for a collective lives: NCCL takes CUDA tensors only, gloo CPU ones."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def _forward_backward(run: Run, batches, forward_only: bool) -> Optional[float]:
    """Mean loss over `batches` on every rank (computed on the last pipeline stage)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    iters = [iter(batches) for _ in run.model]
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iters if len(iters) > 1 else iters[0],
        model=run.model, num_microbatches=len(batches), seq_length=run.spec.seq,
        micro_batch_size=run.args.micro_batch_size, forward_only=forward_only)
    # One contribution per data-parallel replica: last stage, first tensor-parallel rank.
    counts = ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0
    total = torch.tensor([sum(float(x["lm loss"]) for x in losses) if counts else 0.0,
                          len(losses) if counts else 0.0], dtype=torch.float64, device=collective_device())
    dist.all_reduce(total)
    return float(total[0] / total[1])


def train_step(run: Run) -> dict:
    for m in run.model:
        m.zero_grad_buffer()
    run.optimizer.zero_grad()
    gbs = run.samples_per_step
    batches = microbatches(run, run.corpus.train_sample, run.progress.consumed_samples, gbs)
    loss = _forward_backward(run, batches, forward_only=False)
    ok, grad_norm, _ = run.optimizer.step()
    if not ok:
        raise FloatingPointError(f"optimizer step failed at iteration {run.progress.iteration + 1}")
    lr = run.optimizer.param_groups[0]["lr"]
    run.scheduler.step(increment=gbs)
    run.progress = dataclasses.replace(run.progress, iteration=run.progress.iteration + 1,
                                       consumed_samples=run.progress.consumed_samples + gbs)
    return {"train_loss": loss, "lr": lr, "grad_norm": float(grad_norm)}


def evaluate(run: Run) -> float:
    """Validation loss on a fixed set of held-out windows (the same for every run)."""
    for m in run.model:
        m.eval()
    with torch.no_grad():
        batches = microbatches(run, run.corpus.valid_sample, 0, run.args.eval_samples)
        loss = _forward_backward(run, batches, forward_only=True)
    for m in run.model:
        m.train()
    return loss


# --- checkpoints ---------------------------------------------------------------------------
def checkpoint_state(run: Run, with_optimizer: bool = True, is_loading: bool = False) -> dict:
    """The sharded state dict Megatron-LM saves: model, optimizer and common state."""
    model_state = toy.sharded_state_dict(run.chunks)
    fmt = run.args.dist_optim_format if run.args.distributed_optimizer else None
    state = {"model": model_state} if len(run.chunks) == 1 else dict(model_state)
    if with_optimizer:
        state["optimizer"] = run.optimizer.sharded_state_dict(
            state, is_loading=is_loading, metadata=optimizer_metadata(fmt) if fmt else None)
    a = run.args
    state.update({
        "iteration": run.progress.iteration,
        "opt_param_scheduler": run.scheduler.state_dict(),
        "content_metadata": optimizer_metadata(fmt) if fmt else {},
        "args": toy.megatron_args(
            run.spec, run.layout, consumed_train_samples=run.progress.consumed_samples,
            micro_batch_size=a.micro_batch_size, global_batch_size=a.global_batch_size,
            use_distributed_optimizer=a.distributed_optimizer,
            dist_ckpt_optim_fully_reshardable=fmt == "fully_reshardable",
            expert_tensor_parallel_size=run.layout.etp, train_iters=a.train_iters),
    })
    return state


def save(run: Run) -> None:
    toy.save_checkpoint(run.args.save, run.progress.iteration, checkpoint_state(run))
    log(f"saved iteration {run.progress.iteration} to {run.args.save}")


def _apply_loaded(run: Run, request: dict, loaded: dict, source_common: dict) -> None:
    toy.load_state(run.chunks, loaded["model"] if len(run.chunks) == 1 else loaded)
    if "optimizer" in request:
        state = _own_structure_with_loaded_tensors(request["optimizer"], loaded["optimizer"])
        _set_adam_step(state, _adam_step(source_common.get("optimizer")))
        run.optimizer.load_state_dict(state)


def _own_structure_with_loaded_tensors(requested, loaded):
    """This run's optimizer state dict with the loaded tensors in it.

    `dist_checkpointing.load` merges the checkpoint's common state (param groups, one entry
    per optimizer) into the result. Those are the *source's*: with expert parallelism on one
    side only, one optimizer faces two (dense + expert), and Megatron refuses. Param groups
    are hyper-parameters this run sets anyway (the scheduler rewrites lr and wd each step);
    only Adam's step count is state, and `_adam_step` carries it."""
    from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedBase

    def has_loaded(x):
        if isinstance(x, (ShardedBase, LocalNonpersistentObject)):
            return True
        values = x.values() if isinstance(x, dict) else x if isinstance(x, list) else ()
        return any(has_loaded(v) for v in values)

    def merge(requested, loaded):
        if not has_loaded(requested):
            return requested
        if isinstance(requested, dict):
            return {k: merge(v, loaded[k]) if has_loaded(v) else v for k, v in requested.items()}
        if isinstance(requested, list):
            return [merge(v, w) for v, w in zip(requested, loaded)]
        return loaded

    return merge(requested, loaded)


def _param_groups(optimizer_state) -> list[dict]:
    if isinstance(optimizer_state, dict):
        groups = optimizer_state.get("param_groups", [])
        return list(groups) + [g for v in optimizer_state.values() for g in _param_groups(v)]
    return []


def _adam_step(common_optimizer_state) -> Optional[float]:
    """The source's Adam step count (Megatron keeps it in every param group)."""
    steps = {g["step"] for g in _param_groups(common_optimizer_state) if "step" in g}
    if len(steps) > 1:
        raise ValueError(f"optimizer param groups disagree on Adam's step: {sorted(steps)}")
    return steps.pop() if steps else None


def _set_adam_step(optimizer_state, step: Optional[float]) -> None:
    for group in _param_groups(optimizer_state):
        if step is None:
            group.pop("step", None)
        else:
            group["step"] = step


def resume(run: Run, info: CheckpointInfo) -> None:
    """Continue a checkpoint of this same model, in any layout."""
    from megatron.core import dist_checkpointing

    request = checkpoint_state(run, is_loading=True)
    loaded = dist_checkpointing.load(request, str(info.path))
    _apply_loaded(run, request, loaded, info.common)
    run.progress = Progress.from_common(info.common)
    run.scheduler.load_state_dict(run.progress.scheduler)
    log(f"resumed {info.path} at iteration {run.progress.iteration}")


def grow(run: Run, info: CheckpointInfo, plan: GrowthPlan) -> None:
    """Load the smaller model's checkpoint into this (grown) run through the growth hook."""
    from megatron.core import dist_checkpointing

    from megatron_recycle.load_hook import GrowthLoadStrategy

    a = run.args
    moments = load_moment_policy(a.grow_optimizer, info.optimizer_format)
    strategy = GrowthLoadStrategy(plan, optimizer_policy=a.grow_optimizer)
    request = checkpoint_state(run, with_optimizer=moments is not None, is_loading=True)
    loaded = dist_checkpointing.load(request, str(info.path), strategy)
    _apply_loaded(run, request, loaded, info.common)
    source = Progress.from_common(info.common)
    apply_schedule_after_growth(run.scheduler, source.scheduler, a.grow_rewarmup_iters,
                                run.samples_per_step)
    run.progress = dataclasses.replace(source, scheduler=run.scheduler.state_dict())
    run.grown_at, run.plan = source.iteration, plan
    log(f"grew {info.path} (iteration {source.iteration}) into {run.spec.num_layers} layers x "
             f"{run.spec.experts} experts at {run.layout}; optimizer: {a.grow_optimizer}")


# --- main ----------------------------------------------------------------------------------
def log(message: str) -> None:
    if dist.get_rank() == 0:
        print(f"[pretrain_moe] {message}", flush=True)


def write_metrics(run: Run, record: dict) -> None:
    if run.args.metrics is not None and dist.get_rank() == 0:
        with open(run.args.metrics, "a") as f:
            f.write(json.dumps(record) + "\n")


def init_distributed() -> None:
    if dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl")
    else:
        cpu.install()
        dist.init_process_group("gloo")
    fixes.apply()  # megatron-core without apex/TE: its torch-AdamW load bugs, SP for its torch norm


def setup(args) -> Run:
    """Build the run: fresh, resumed (--load) or grown (--grow-from)."""
    layout = layout_from(args)
    if args.grow_from:
        info = CheckpointInfo.read(args.grow_from, flag="--grow-from")
        compat.check_loadable(info, "--grow-from")
        plan = growth_from_args(args).plan(info.architecture())
        spec = spec_from(info.args).grown(plan)
        plan.check_target(expert_parallel=layout.ep, pipeline_parallel=layout.pp)
        run = build_run(args, spec, layout)
        grow(run, info, plan)
    elif args.load:
        info = CheckpointInfo.read(args.load)
        run = build_run(args, spec_from(info.args), layout)
        resume(run, info)
    else:
        run = build_run(args, spec_from(args), layout)
    return run


def train(run: Run) -> Run:
    a = run.args
    start, t0 = run.progress.iteration, time.time()
    val = evaluate(run)  # where this run starts from: fresh, resumed or right after growth
    log(f"iteration {start:5d} | validation loss {val:.4f}")
    write_metrics(run, {"iteration": start, "val_loss": val, "grown_at": run.grown_at,
                        **extra_metrics(run)})
    while run.progress.iteration < a.train_iters:
        record = train_step(run)
        it = run.progress.iteration
        record["iteration"] = it
        if it % a.eval_interval == 0 or it == a.train_iters:
            record["val_loss"] = evaluate(run)
            record.update(extra_metrics(run))
        if not math.isfinite(record["train_loss"]):
            raise FloatingPointError(f"loss is {record['train_loss']} at iteration {it}")
        write_metrics(run, record)
        if it % a.log_interval == 0 or "val_loss" in record:
            rate = (time.time() - t0) / (it - start)
            val = f" | validation loss {record['val_loss']:.4f}" if "val_loss" in record else ""
            log(f"iteration {it:5d}/{a.train_iters} | loss {record['train_loss']:.4f} | "
                     f"lr {record['lr']:.2e} | grad norm {record['grad_norm']:.3f} | "
                     f"{rate:.2f} s/it{val}")
        if a.save and a.save_interval and it % a.save_interval == 0 and it != a.train_iters:
            save(run)
    if a.save:
        save(run)
    return run


def extra_metrics(run: Run) -> dict:
    out = {}
    for metric in run.eval_metrics:
        out.update(metric(run))
    return out


def main(argv=None, customize: Optional[Callable[[Run], None]] = None) -> Run:
    """`customize(run)`: a caller's change to the run after it is built (fresh, resumed or
    grown) and before it trains, e.g. more `eval_metrics`."""
    args = parse_args(argv)
    init_distributed()
    with cpu.cuda_to_cpu():
        run = setup(args)
        if customize is not None:
            customize(run)
        return train(run)


if __name__ == "__main__":
    main()
    toy.finish()
