"""The errors growth reports, and the exit codes the command-line tools give them.

Every error a user can cause or meet says, in one line, which flag, key or file is at fault
and what to do. Two kinds, one base, so callers that only ask "did growth refuse?" catch both:

- `GrowthError`: the request cannot work (a flag, a size, a layout, a destination); exit 2.
- `CheckpointError`: a checkpoint cannot be read as it should (missing or garbled files,
  truncated data, content that would need unsafe unpickling) or an I/O operation failed
  (read-only or full destination); exit 3.

`megatron-recycle verify` exits 1 when a checkpoint does not match its plan.
"""

from __future__ import annotations

EXIT_VERIFY_FAILED = 1
EXIT_USAGE = 2
EXIT_IO = 3
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


class GrowthError(ValueError):
    """A growth option, checkpoint or target that cannot work, with what to change."""

    exit_code = EXIT_USAGE


class CheckpointError(GrowthError):
    """A checkpoint that cannot be read as it should, or an I/O failure, naming the file."""

    exit_code = EXIT_IO
