"""The formats offline growth writes, and the one place a writer is chosen for one.

A writer has `write_batch(out_dir, number, pieces, objects, values)` (one batch file, any
process) and `finish(out_dir, pieces, objects, results, common, metadata_json, common_number)`
(the rest, once); pieces are in torch_dist terms whatever the format. Each format carries
the optimizer state of the source formats named here.
"""

from __future__ import annotations

from typing import Optional, Sequence

from ..errors import GrowthError
from ..policy import MODEL_SPACE_OPTIMIZER_FORMATS

TORCH_DIST, FSDP_DTENSOR = "torch_dist", "fsdp_dtensor"
WRITTEN = (TORCH_DIST, FSDP_DTENSOR)
# the source optimizer formats whose state each output format carries (grown by the plan)
CARRIED_OPTIMIZERS = {TORCH_DIST: MODEL_SPACE_OPTIMIZER_FORMATS, FSDP_DTENSOR: (FSDP_DTENSOR,)}


def output_format(source_format: str, requested: Optional[str]) -> str:
    """`--ckpt-format`, by default the source's own where it is written (fsdp_dtensor stays
    fsdp_dtensor, so a Megatron-FSDP run resumes as it saved), else torch_dist."""
    chosen = requested or (source_format if source_format in WRITTEN else TORCH_DIST)
    if chosen not in WRITTEN:
        raise GrowthError(f"--ckpt-format must be one of {WRITTEN}, got {chosen!r}")
    if chosen == FSDP_DTENSOR and source_format != FSDP_DTENSOR:
        raise GrowthError(f"--ckpt-format {FSDP_DTENSOR}: the source is a {source_format} checkpoint; "
                          f"grown {FSDP_DTENSOR} checkpoints are written from {FSDP_DTENSOR} sources only "
                          "(their parameter names and GLU split come from it); use --ckpt-format torch_dist")
    return chosen


class TorchDistWriter:
    """`io.writer`'s functions (as an object a worker process can be handed)."""

    def write_batch(self, *args):
        from .writer import write_batch

        return write_batch(*args)

    def finish(self, *args, **kwargs):
        from .writer import finish

        return finish(*args, **kwargs)


def writer(output: str, info, plan, keep_optimizer: bool, pieces: Sequence):
    """The writer of `output` for growing `info` by `plan` into `pieces`."""
    if output == FSDP_DTENSOR:
        from .fsdp_dtensor import open_checkpoint
        from .fsdp_dtensor_writer import FsdpDtensorWriter

        return FsdpDtensorWriter(open_checkpoint(info.path), plan, keep_optimizer, pieces)
    return TorchDistWriter()
