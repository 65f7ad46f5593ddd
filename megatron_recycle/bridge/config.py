"""`GrowthConfig`: the `--grow-*` flags as a Megatron-Bridge style config dataclass.

One field per flag (`depth` is `--grow-depth`, `optimizer` is `--grow-optimizer`, ...), with the
flags' defaults; it is turned into the engine's `Growth` through the very parser the flags use
(`options.add_growth_args` / `growth_from_args`), so names, defaults and checks cannot drift.
Recipe-style overrides `growth.depth=2 growth.experts=2` are split off a Bridge override list
with `split_overrides` (Bridge's `ConfigContainer` has no `growth` section to put them in).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Optional

from ..errors import GrowthError
from ..options import Growth, add_growth_args, growth_from_args

PREFIX = "growth."
FROM_SECOND = PREFIX + "from_second"  # what messages about the second checkpoint name
RAW_STRING = "megatron_recycle.raw_string"  # field metadata: an override's text taken as written


def raw_string(default: Optional[str] = None):
    """A field whose `growth.<field>=<text>` override is the text as written, not parsed as YAML
    (a path: YAML would read `0005` as 5, `true` as a bool)."""
    return dataclasses.field(default=default, metadata={RAW_STRING: True})


@dataclass
class GrowthConfig:
    """Load-time growth of the checkpoint a Bridge run starts from (each field: its `--grow-*` flag)."""

    depth: int = 1  # --grow-depth: decoder layers x K
    depth_method: str = "interposition"  # --grow-depth-method: interposition / stack
    layer_map: Optional[list[int]] = None  # --grow-layer-map: source layer of every target layer
    skip_first: int = 0  # --grow-skip-first
    skip_last: int = 0  # --grow-skip-last
    zero_init_copies: bool = False  # --grow-zero-init-copies: exactly function-preserving
    experts: int = 1  # --grow-experts: experts x M
    expert_placement: str = "append"  # --grow-expert-placement: append / interleave
    topk: str = "scale"  # --grow-topk: scale (k x M, exact at alpha 0) / keep
    noise_alpha: float = 0.01  # --grow-noise-alpha
    seed: int = 1234  # --grow-seed
    weight_multiplier: float = 1.0  # --grow-weight-multiplier: copies x it
    random_router: bool = False  # --grow-random-router: the random-router baseline
    reinit_expert_copies: bool = False  # --grow-reinit-expert-copies: the re-initialised baseline
    zero_expert_bias: bool = False  # --grow-zero-expert-bias
    init_std: float = 0.02  # --grow-init-std: the baselines' N(0, std^2)
    optimizer: str = "copy"  # --grow-optimizer: copy / zero / reset
    rewarmup_iters: int = 0  # --grow-rewarmup-iters
    from_second: Optional[str] = raw_string()  # --grow-from-second: the checkpoint the expert copies come from

    def growth(self) -> Growth:
        """The engine's options; GrowthError names the field if one is not valid."""
        parser = add_growth_args(argparse.ArgumentParser(add_help=False))
        args = parser.parse_args([])
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            dest = "grow_zero_init_copies" if field.name == "zero_init_copies" else f"grow_{field.name}"
            setattr(args, dest, tuple(value) if field.name == "layer_map" and value is not None else value)
        for action in parser._actions:  # the choices the flags accept, under the field's name
            if action.choices and getattr(args, action.dest) not in action.choices:
                field = action.dest.removeprefix("grow_")
                raise GrowthError(f"{PREFIX}{field}={getattr(args, action.dest)!r}: must be one of "
                                  f"{sorted(action.choices)}")
        return growth_from_args(args)

    def given(self) -> list[str]:
        """The fields set to something other than their default, as `growth.<field>`."""
        return [PREFIX + f.name for f in dataclasses.fields(self) if getattr(self, f.name) != f.default]


def split_overrides(overrides: list[str]) -> tuple[GrowthConfig, list[str]]:
    """(`growth.*=` overrides as a GrowthConfig, the other overrides for Bridge)."""
    growth, rest = GrowthConfig(), []
    fields = {f.name: f for f in dataclasses.fields(GrowthConfig)}
    for override in overrides:
        key, sep, text = override.partition("=")
        if not key.startswith(PREFIX):
            rest.append(override)
            continue
        name = key[len(PREFIX):]
        if name.startswith("upcycle"):
            raise GrowthError(f"{override!r}: dense -> MoE upcycling is not supported inside "
                              "Megatron-Bridge; upcycle offline (`megatron-recycle grow --load "
                              "<dense> --save <moe> --upcycle-experts E`) and set checkpoint.load "
                              "to the result")
        if not sep or name not in fields:
            raise GrowthError(f"{override!r}: give growth.<field>=<value> with a field of "
                              f"{sorted(fields)}")
        setattr(growth, name, _parse(fields[name], text))
    return growth, rest


def _parse(field: dataclasses.Field, text: str):
    """The value of `growth.<field>=<text>`, of the field's type (YAML-like: 2, 0.01, true,
    [0,0,1]), or `text` itself for a `raw_string` field."""
    import yaml

    if field.metadata.get(RAW_STRING):
        return text
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    name, default = field.name, field.default
    want = type(default) if default is not None else list
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, want) or (want is int and isinstance(value, bool)):
        raise GrowthError(f"{PREFIX}{name}={text}: expected {want.__name__}")
    return value
