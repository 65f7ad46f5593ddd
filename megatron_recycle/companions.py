"""Files a training framework keeps beside a checkpoint's weights, grown with them.

A framework adapter offers a class with `of(info)` (its files in a source checkpoint, read and
checked, or None when that framework did not save it), `grown_config(plan, dense_hidden)`
(raises before anything is written if growth cannot carry them), `write(root, iteration_dir,
plan, dense_hidden)` (into the staging checkpoint; returns the files written),
`mismatches(grown, plan, dense_hidden)` (for `verify`) and `notes(plan, dense_hidden)`. Offline growth and
`verify` ask `of` for the source's, and never name a framework themselves.
"""

from __future__ import annotations


def of(info):
    """The companion files of the source checkpoint `info` (a CheckpointInfo), or None."""
    from .bridge.checkpoint import BridgeFiles

    for kind in (BridgeFiles,):
        files = kind.of(info)
        if files is not None:
            return files
    return None
