"""The growth advisor: how the paper's findings say to grow this checkpoint, and why.

Two signals, both read from the checkpoint:
- its sunk compute: the tokens it has seen (consumed samples, else iteration x global batch;
  times the sequence length) at 6 N_a FLOPs each, against the Chinchilla-optimal compute
  F_c = 6 N_a (20 N_a), N_a its active parameters per token as `plan` counts them. The paper
  finds interposition better than stacking from about 1x F_c on, stacking competitive before,
  and the grown model's final accuracy rising with the sunk compute;
- its norm profile (`norms.py`): converged MoE models' layer norms rise with depth, a profile
  interposition keeps and stacking breaks at the seam.
What the advice needs and the checkpoint lacks is named, never guessed.
"""

from __future__ import annotations

from typing import Optional

from . import cost, norms

BOUNDARY = 1.0  # x Chinchilla-optimal compute: interposition wins from here on (the paper)
TOKENS_PER_PARAM = 20  # Chinchilla
NOISE_ALPHA = 0.01

PAPER = {
    "boundary": "interposition beats stacking once the base has about 1x the Chinchilla-optimal "
                "compute F_c = 6 N_a (20 N_a), N_a the active parameters; stacking is competitive before",
    "profile": "converged MoE models' layer weight norms (Frobenius / sqrt(numel), mean over "
               "experts) rise with depth; stacking breaks that profile at the seam, interposition "
               "keeps it (Figure 2)",
    "sunk_cost": "final accuracy rises with the base's sunk compute: 38.79 -> 48.99 average accuracy "
                 "as the base goes from 0k to 88k steps, same extra compute",
    "noise": "alpha = 0.01 on the copied experts about 1 point better downstream than alpha = 0; "
             "re-initialised experts far worse",
    "zero_init": "the paper copies layers whole (output projections not zeroed); its numbers rest on that",
    "scale": "17B -> 70B grown: +10.66% relative accuracy over training from scratch with the same "
             "extra compute",
}


def sunk_compute(info) -> dict:
    """The compute the checkpoint has seen, against the Chinchilla-optimal compute of its
    active parameters; `missing` names what the checkpoint lacks for it."""
    args, arch = info.args, info.architecture()
    active = cost.count_params(info.model_shapes(), arch.topk, arch.num_experts).active
    missing, notes = [], []
    if active is None:
        missing.append("moe_router_topk in the common state's args (for the active parameters)")
    if args is None:
        missing.append("args in the common state (global_batch_size, seq_length)")
    seq = getattr(args, "seq_length", None)
    if args is not None and not seq:
        missing.append("seq_length in the common state's args")
    consumed = getattr(args, "consumed_train_samples", None)
    batch = getattr(args, "global_batch_size", None)
    iteration = info.iteration
    samples = samples_from = None
    if consumed:
        samples, samples_from = consumed, "consumed_train_samples"
    elif iteration is not None and batch:
        samples, samples_from = iteration * batch, "iteration x global_batch_size"
        if getattr(args, "rampup_batch_size", None):
            notes.append("batch size ramp-up without consumed_train_samples: iteration x "
                         "global_batch_size overstates the samples seen")
    elif iteration == 0:
        samples, samples_from = 0, "iteration 0"
    elif args is not None:
        missing.append("consumed_train_samples, or the iteration and global_batch_size, in the "
                       "common state")
    if info.provenance is not None:
        notes.append(f"grown by megatron-recycle from iteration {info.provenance.summary()['iteration']}: "
                     "the tokens before that were seen by the smaller source model, counted here "
                     "at this model's size")
    out = {"active_params": active, "samples": samples, "samples_from": samples_from,
           "seq_length": seq, "tokens": None, "flops": None, "chinchilla_flops": None,
           "over_chinchilla": None, "boundary_iteration": None, "missing": missing, "notes": notes}
    if missing:
        return out
    tokens = samples * seq
    out.update(tokens=tokens, flops=6 * active * tokens,
               chinchilla_flops=6 * active * TOKENS_PER_PARAM * active,
               over_chinchilla=tokens / (TOKENS_PER_PARAM * active))
    if batch:  # where this run reaches 1x F_c at its batch and sequence length
        out["boundary_iteration"] = -(-TOKENS_PER_PARAM * active // (batch * seq))
    return out


def advise(info, profile: Optional[norms.NormProfile] = None, profile_missing: str = "",
           growth=None) -> dict:
    """The advice for growing `info` (an `io.checkpoint.CheckpointInfo`); `growth` (an
    `options.Growth`), where given, is checked against it."""
    compute = sunk_compute(info)
    shape = profile.shape() if profile is not None else {"shape": None, "why": profile_missing}
    rising = shape["shape"] == "rising"
    advice = {"depth_method": None, "zero_init_copies": False, "noise_alpha": NOISE_ALPHA}
    why: list[str] = []
    reasons = {"depth_method": why,
               "zero_init_copies": f"{PAPER['zero_init']}; --grow-zero-init-copies makes growth "
                                   "exactly function-preserving, which the paper did not measure",
               "noise_alpha": PAPER["noise"]}
    out = {"sunk_compute": compute, "norm_profile": shape, "recommendation": advice,
           "reasons": reasons, "missing": list(compute["missing"]), "signals_agree": None,
           "plan": [], "paper": PAPER}
    if compute["missing"]:
        why.append("cannot say without " + "; ".join(compute["missing"]))
        if shape["shape"] is not None:
            why.append(f"its norm profile: {norms.describe_shape(shape)}")
        return out
    ratio = compute["over_chinchilla"]
    late = ratio >= BOUNDARY
    advice["depth_method"] = "interposition" if late else "stack"
    seen = (f"the base has seen {ratio:.3g}x the Chinchilla-optimal compute ({compute['flops']:.3g} "
            f"of F_c = {compute['chinchilla_flops']:.3g} FLOPs, N_a = {compute['active_params']:,})")
    if late:
        why.append(f"{seen}: past the paper's boundary of about {BOUNDARY:g}x, where interposition wins")
    else:
        why.append(f"{seen}: below the paper's boundary of about {BOUNDARY:g}x, where stacking is "
                   "competitive with interposition")
        if compute["boundary_iteration"]:
            why.append(f"{PAPER['sunk_cost']}: a checkpoint of this run from iteration "
                       f"{compute['boundary_iteration']:,} on (1x F_c at its batch and sequence "
                       "length) is a better base")
    if shape["shape"] is None:
        why.append(f"norm profile not read ({shape['why']}): the compute boundary alone decides")
    elif rising and late:
        why.append(f"its layer norms rise with depth ({norms.describe_shape(shape)}): the profile "
                   "interposition keeps and stacking breaks")
    elif rising:
        why.append(f"its layer norms already rise with depth ({norms.describe_shape(shape)}); "
                   "interposition would keep that profile, but the paper finds the two methods "
                   "competitive at this compute")
    elif late:
        why.append(f"its layer norms do not rise with depth ({norms.describe_shape(shape)}): the "
                   "profile the paper's argument rests on is not visible, so the compute boundary "
                   "alone decides")
    else:
        why.append(f"its layer norms do not rise with depth ({norms.describe_shape(shape)}): no "
                   "profile yet for interposition to keep")
    if shape["shape"] is not None:
        out["signals_agree"] = rising == late
    why.extend(compute["notes"])
    if growth is not None:
        out["plan"] = _against(growth, advice)
    return out


def _against(growth, advice: dict) -> list[str]:
    """Where the planned growth differs from the advice."""
    notes = []
    depth, width = growth.depth, growth.width
    if depth.layer_map is not None:
        notes.append(f"--grow-layer-map gives the layer order; the advice is {advice['depth_method']}")
    elif depth.factor > 1 and depth.method != advice["depth_method"]:
        notes.append(f"--grow-depth-method {depth.method}: the advice is {advice['depth_method']}")
    if depth.zero_copy_outputs:
        notes.append("--grow-zero-init-copies: not the paper's setting (its numbers are without it)")
    if width.factor > 1 and width.noise_alpha != NOISE_ALPHA:
        notes.append(f"--grow-noise-alpha {width.noise_alpha:g}: the paper's is {NOISE_ALPHA:g}")
    return notes


def advise_checkpoint(path, step=None, flag: str = "--load", growth=None, read_norms: bool = False,
                      batch_bytes: int = 256 * 2**20) -> dict:
    from .io.checkpoint import CheckpointInfo

    info = CheckpointInfo.read(path, step, flag)
    profile = norms.checkpoint_norms(info, batch_bytes) if read_norms else None
    return advise(info, profile, "pass --norms to read the expert weights for it", growth)


def table(advice: dict) -> str:
    r, why = advice["recommendation"], advice["reasons"]
    lines = [f"advice: grow depth by {r['depth_method'] or '? (missing data)'}"]
    lines += [f"  - {reason}" for reason in why["depth_method"]]
    lines.append(f"advice: zero-init copies {'yes' if r['zero_init_copies'] else 'no'}: {why['zero_init_copies']}")
    lines.append(f"advice: noise alpha {r['noise_alpha']:g} on expert copies: {why['noise_alpha']}")
    lines += [f"advice: your plan has {note}" for note in advice["plan"]]
    return "\n".join(lines)
