"""HybridModel layer patterns (`--hybrid-layer-pattern`), for depth growth. Pure Python.

In megatron-core's HybridModel every symbol of the pattern is one decoder layer: `*` attention,
`M` Mamba-2, `G` gated delta net, `D` DSA and `+` MLA attention (the *mixers*), `E` MoE and
`-` dense MLP (the *MLPs*); `|` separates pipeline segments and `/` starts the pattern of the
MTP layers. A GPT layer with MoE is `*E`.

Depth growth copies *blocks* of the pattern, so a copy is a whole GPT-like layer: by default a
block is a mixer followed by its MLPs (`*E`, `M-`, or `M` alone when a mixer follows it);
an explicit block map may group otherwise, but never splits a mixer from the MLP after it.
The MTP pattern is not depth-grown; the target's `|` segments are derived for its layout.
"""

from __future__ import annotations

from typing import Optional, Sequence

from .errors import GrowthError

MIXERS = "*MGD+"
MLPS = "E-"
SYMBOLS = MIXERS + MLPS
PIPE, MTP = "|", "/"
BLOCKS_FLAG = "--grow-hybrid-blocks"


def split(pattern: str) -> tuple[str, str]:
    """(main symbols without `|`, the MTP part with its leading `/`, or '')."""
    main, sep, mtp = pattern.partition(MTP)
    main = main.replace(PIPE, "")
    bad = sorted(set(main + mtp.replace(MTP, "")) - set(SYMBOLS))
    if bad or not main:
        raise GrowthError(f"hybrid layer pattern {pattern!r}: {'unknown symbols ' + str(bad) if bad else 'no layers'}; "
                          f"it uses {SYMBOLS!r}, '|' between pipeline segments and '/' before MTP")
    return main, sep + mtp


def default_blocks(main: str) -> list[str]:
    """A mixer with the MLPs after it; MLPs before any mixer form a block of their own."""
    blocks: list[str] = []
    for symbol in main:
        if symbol in MIXERS or not blocks:
            blocks.append(symbol)
        else:
            blocks[-1] += symbol
    return blocks


def check_blocks(main: str, blocks: Sequence[str]) -> list[str]:
    """An explicit block map: it must spell the pattern and keep each mixer with its MLPs."""
    if "".join(blocks) != main:
        raise GrowthError(f"{BLOCKS_FLAG} {','.join(blocks)!r} does not spell the source pattern "
                          f"{main!r}; give its blocks in order, e.g. {','.join(default_blocks(main))}")
    at = 0
    for block in blocks[:-1]:
        at += len(block)
        if main[at - 1] in MIXERS and main[at] in MLPS:
            raise GrowthError(f"{BLOCKS_FLAG} {','.join(blocks)!r} splits the mixer {main[at - 1]!r} "
                              f"(layer {at - 1}) from its MLP {main[at]!r} (layer {at}); a copy must "
                              "take a mixer and its MLPs together")
    return list(blocks)


def segmented(main: str, blocks: Sequence[str], segments: int, flag: str) -> str:
    """`main` with `|` between `segments` pipeline segments, cut at block boundaries into
    layer counts as even as the blocks allow."""
    if segments <= 1:
        return main
    bounds = [0]
    for block in blocks:
        bounds.append(bounds[-1] + len(block))
    total = bounds[-1]
    cuts, last = [], 0
    for k in range(1, segments):
        ideal = total * k / segments
        cut = min((b for b in bounds if b > last), key=lambda b: abs(b - ideal), default=None)
        if cut is None or cut >= total:
            raise GrowthError(f"{flag}: {len(blocks)} blocks of the grown pattern cannot fill "
                              f"{segments} pipeline segments; pick a smaller pipeline size")
        cuts.append(cut)
        last = cut
    pieces = [main[a:b] for a, b in zip([0] + cuts, cuts + [total])]
    return PIPE.join(pieces)


def block_sizes(main: str, blocks: Optional[Sequence[str]]) -> list[int]:
    return [len(b) for b in (check_blocks(main, blocks) if blocks else default_blocks(main))]
