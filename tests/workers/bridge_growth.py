"""Load-time growth inside Megatron-Bridge's own training entry (`pretrain()`), on CPU over gloo.

Usage: torchrun --nproc-per-node N bridge_growth.py PHASE OUT
- source (1 rank): a tiny random HF Qwen3-MoE (2 layers x 4 experts, top-2) imported with Bridge
  into OUT/import, then a Bridge pretrain() of 2 iterations from it (pretrained_checkpoint) into
  OUT/base: a checkpoint with a train state and Adam moments. OUT/reference.pt: the tokens and the
  HF model's logits (the base run's start must match them); OUT/base_logits.pt: the trained base
  model's (the grown model's right after the load must match them).
  Then, in the same process: OUT/base grown offline (`offline.grow`) into OUT/offline with the
  load-time growth below and into OUT/offline-noisy with NOISY, and Bridge's own pretrain()
  resumes OUT/offline (the grown sizes set on the recipe, checkpoint.load_optim=False) for
  iterations 3-4 into OUT/offline-run (phase "offline").
- grow (2 ranks): first NOISY grown at load from OUT/base at EP2 (phase "ep2", no iteration
  run, nothing saved): each rank writes the model's shards right after the load to
  OUT/ep2-rank<R>.pt. Then, PP2: pretrain() with checkpoint.load=OUT/base, save=OUT/grown and
  growth depth 2 (zero-init copies), experts 2 at alpha 0, to 6 iterations, stopping at 4
  (exit_interval); its shards right after the load in OUT/grow-rank<R>.pt.
- requeue (2 ranks, PP2): the same job relaunched unchanged.
- unconfigured (1 rank): megatron-recycle's manager named without install(): refused.
Each pretrain phase writes OUT/<phase>.json: the step and logits right after the load (a
callback on_train_start), and the iterations that ran with their losses.
"""

import json
import os
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

from megatron_recycle.testing import bridge_cpu, bridge_training  # noqa: E402

bridge_training.install()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megatron_recycle.bridge import GrowthConfig, pretrain  # noqa: E402

LR = 1e-3  # megatron-core matches optimizer param groups by their LR settings on load
GROWTH = GrowthConfig(depth=2, zero_init_copies=True, experts=2, noise_alpha=0.0, optimizer="copy")
NOISY = GrowthConfig(depth=2, experts=2, noise_alpha=0.05, seed=7, optimizer="reset")  # copies differ
GROWN_SIZES = dict(num_layers=4, num_moe_experts=8, moe_router_topk=4)  # what both growths make


def provider(out: Path, **parallel):
    """The base model's provider, as a recipe would give it (Bridge's own HF → provider map)."""
    from megatron.bridge import AutoBridge

    bridge = AutoBridge.from_hf_pretrained(str(out / "hf"), torch_dtype=torch.float32)
    return bridge_cpu.cpu_provider(bridge.to_megatron_provider(load_weights=False), **parallel)


def source(out: Path) -> None:
    hf = bridge_cpu.hf_model(bridge_cpu.hf_config("qwen3_moe"))
    bridge_cpu.save_hf(hf, out / "hf")
    tokens = bridge_cpu.tokens()
    torch.save({"tokens": tokens, "logits": bridge_cpu.logits(hf, tokens)}, out / "reference.pt")
    from megatron.core.rerun_state_machine import destroy_rerun_state_machine

    with bridge_cpu.distributed():
        bridge_cpu.import_ckpt(out / "hf", out / "import")
    destroy_rerun_state_machine()  # the import set one up implicitly; pretrain() makes its own
    cfg = bridge_training.tiny_config(provider(out), out / "base", train_iters=2, lr=LR,
                                      pretrained_checkpoint=str(out / "import"))
    _pretrain(cfg, out, "base", growth=None)
    from megatron_recycle import offline

    offline.grow(out / "base", out / "offline", GROWTH.growth())
    offline.grow(out / "base", out / "offline-noisy", NOISY.growth())
    resumed(out)


def resumed(out: Path) -> None:
    """The offline-grown checkpoint continued by Bridge's own pretrain(), as the README says:
    the grown sizes in the recipe, checkpoint.load=<grown>, checkpoint.load_optim=False."""
    cfg = bridge_training.tiny_config(provider(out, **GROWN_SIZES), out / "offline-run",
                                      train_iters=4, lr=LR)
    cfg.checkpoint.load = str(out / "offline")
    cfg.checkpoint.load_optim = False
    _pretrain(cfg, out, "offline", growth=None)


def grown(out: Path, phase: str) -> None:
    """The grown job; it stops (saving) at iteration 4 as a job at its time limit would, and is
    relaunched unchanged: a requeue (the scheduler's total iterations must not change)."""
    cfg = bridge_training.tiny_config(provider(out, pipeline_model_parallel_size=2), out / "grown",
                                      train_iters=6, lr=LR, save_interval=2)
    cfg.train.exit_interval = 4
    cfg.checkpoint.load = str(out / "base")  # continue the base run: its train state carries over
    _pretrain(cfg, out, phase, growth=GROWTH)


def expert_parallel(out: Path) -> None:
    """NOISY grown at load from the base run (EP1) into EP2, and stopped right after the load
    (the base run's step is the run's last): the shards are the grown tensors as loaded."""
    cfg = bridge_training.tiny_config(provider(out, expert_model_parallel_size=2), out / "unused",
                                      train_iters=2, lr=LR)
    cfg.checkpoint.load, cfg.checkpoint.save = str(out / "base"), None
    _pretrain(cfg, out, "ep2", growth=NOISY)


def unconfigured(out: Path) -> None:
    from megatron.bridge.training.checkpointing import create_checkpoint_manager
    from megatron.bridge.utils.instantiate_utils import register_allowed_target_prefix

    from megatron_recycle.bridge.hooks import MANAGER
    from megatron_recycle.errors import GrowthError

    cfg = bridge_training.tiny_config(provider(out), out / "unconfigured", train_iters=1, lr=0.0)
    cfg.checkpoint.custom_manager_class = MANAGER
    register_allowed_target_prefix("megatron_recycle")
    try:
        create_checkpoint_manager(cfg.checkpoint)
        result = "built"
    except GrowthError as e:
        result = str(e)
    (out / "unconfigured.json").write_text(json.dumps({"error": result}))


def _pretrain(cfg, out: Path, phase: str, growth) -> None:
    from megatron.bridge.training.callbacks import CallbackManager
    from megatron.bridge.training.gpt_step import forward_step
    from megatron.core.transformer.moe.moe_logging import destroy_moe_metrics_tracker

    destroy_moe_metrics_tracker()  # a process-wide one, sized by an earlier run's layer count
    record = {"iterations": []}
    callbacks = CallbackManager()
    reference = torch.load(out / "reference.pt", weights_only=True)

    def on_train_start(context):
        from megatron.core import parallel_state

        record["start_step"] = context.state.train_state.step
        record["consumed_samples"] = context.state.train_state.consumed_train_samples
        record["expert_parallel"] = parallel_state.get_expert_model_parallel_world_size()
        if phase in ("ep2", "grow"):  # the tensors as grown at load, to compare with offline growth's
            from megatron.core.utils import unwrap_model

            from ckpt_tools import local_shards

            (chunk,) = unwrap_model(context.model)
            torch.save(local_shards(chunk.sharded_state_dict()), out / f"{phase}-rank{dist.get_rank()}.pt")
        logits = pipeline_logits(context.model, reference["tokens"])
        if logits is not None:  # the imported HF model (base), the trained base (grown ones)
            want = reference["logits"] if phase == "base" else torch.load(out / "base_logits.pt")
            record["max_logit_diff"] = (logits - want).abs().max().item()
        record["lr"] = context.optimizer.param_groups[0]["lr"]

    def on_train_end(context):  # the base run's trained function, which growth must keep
        logits = pipeline_logits(context.model, reference["tokens"])
        if logits is not None and phase == "base":
            torch.save(logits, out / "base_logits.pt")

    def on_train_step_end(context):
        record["iterations"].append(context.state.train_state.step + 1)  # fired before the count
        record.setdefault("losses", []).append({k: float(v) for k, v in (context.loss_dict or {}).items()})
        write()

    def write():
        if int(os.environ.get("RANK", "0")) == int(os.environ.get("WORLD_SIZE", "1")) - 1:
            (out / f"{phase}.json").write_text(json.dumps(record))

    callbacks.register("on_train_start", on_train_start)
    callbacks.register("on_train_step_end", on_train_step_end)
    callbacks.register("on_train_end", on_train_end)
    with bridge_cpu_cuda():
        if growth is None:
            from megatron.bridge.training.pretrain import pretrain as bridge_pretrain

            bridge_pretrain(cfg, forward_step, callbacks=callbacks)
        else:
            pretrain(cfg, forward_step, growth, callbacks=callbacks)
    write()


def bridge_cpu_cuda():
    from megatron_recycle.testing import cpu

    return cpu.cuda_to_cpu()


@torch.no_grad()
def pipeline_logits(model, tokens):
    """The logits of `model` (one chunk per rank, pipeline stages in rank order) on `tokens`,
    on the last stage (None elsewhere): a forward through the stages by hand."""
    from megatron.core import parallel_state
    from megatron.core.utils import unwrap_model

    (chunk,) = unwrap_model(model)
    was_training = chunk.training
    chunk.eval()
    b, s = tokens.shape
    position_ids = torch.arange(s).unsqueeze(0).expand(b, s)
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1).view(1, 1, s, s)
    hidden_size = chunk.config.hidden_size
    if not parallel_state.is_pipeline_first_stage():
        received = torch.empty(s, b, hidden_size)
        dist.recv(received, src=parallel_state.get_pipeline_model_parallel_prev_rank())
        chunk.set_input_tensor(received)
    output = chunk(tokens, position_ids, mask)
    chunk.train(was_training)
    if not parallel_state.is_pipeline_last_stage():
        dist.send(output.contiguous(), dst=parallel_state.get_pipeline_model_parallel_next_rank())
        return None
    return output.float()


def main(phase: str, out: str) -> None:
    out = Path(out)
    if phase == "source":
        source(out)
    elif phase == "grow":
        # Two pretrain() runs in one process: the process group made here outlives both (Bridge
        # destroys only one it made, and a second gloo group on the same port fails to connect).
        dist.init_process_group("gloo")
        expert_parallel(out)
        grown(out, "grow")
    elif phase == "requeue":
        grown(out, "requeue")
    elif phase == "unconfigured":
        unconfigured(out)
    else:
        raise SystemExit(f"unknown phase {phase!r}")


if __name__ == "__main__":
    main(*sys.argv[1:])
