"""How a checkpoint was grown: one versioned record in its common state, read by every reader.

Every checkpoint that growth writes — offline (`megatron-recycle grow`) or a Megatron-LM job
that grew at load time and then saved — carries a `Provenance` under the common-state key
`megatron_recycle`: the source (iteration directory, its iteration, and for Megatron-LM the
`--load` root, which requeue detection compares), the plan with its seed, the optimizer
policy, the tool and version, and the source's own record when the source was grown too.
The record holds plain Python values only, so it loads with `weights_only=True`.

Schema 1 (no `schema` field) had two shapes, both still read: offline wrote `source` as the
iteration path with `iteration` beside it; Megatron-LM wrote `source` as a dict.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

from .plan import GrowthError, GrowthPlan

KEY = "megatron_recycle"  # in the common state
SCHEMA = 2
GROWN_BY = ("offline", "megatron-lm")


@dataclass(frozen=True)
class SourceRef:
    """The checkpoint a growth read."""

    path: str  # the iteration directory (real path)
    iteration: Optional[int]
    load: Optional[str] = None  # the `--load` root a Megatron-LM job named (real path)
    metadata_sha256: Optional[str] = None  # the second checkpoint's: its `.metadata`, which names every file

    def to_dict(self) -> dict[str, Any]:
        out = {"path": self.path, "iteration": self.iteration, "load": self.load}
        if self.metadata_sha256 is not None:
            out["metadata_sha256"] = self.metadata_sha256
        return out


@dataclass(frozen=True)
class Provenance:
    source: SourceRef
    plan: dict  # GrowthPlan.describe()
    optimizer_policy: str  # --grow-optimizer: copy / zero / reset
    optimizer: str  # the optimizer state: "grown" from the source's, or "dropped"
    grown_by: str  # one of GROWN_BY
    version: str  # megatron-recycle's
    rewarmup_iters: int = 0
    layout: Optional[dict] = None  # the parallel layout of the job that grew (Megatron-LM)
    previous: Optional["Provenance"] = None  # the source's own record, if it was grown too
    schema: int = SCHEMA
    second: Optional[SourceRef] = None  # where the expert copies came from (--grow-from-second)

    @property
    def seed(self) -> int:
        return self.plan["width"]["seed"]

    def growth_plan(self) -> GrowthPlan:
        return GrowthPlan.from_description(self.plan)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "source": self.source.to_dict(),
            "plan": self.plan,
            "optimizer_policy": self.optimizer_policy,
            "optimizer": self.optimizer,
            "grown_by": self.grown_by,
            "version": self.version,
            "rewarmup_iters": self.rewarmup_iters,
            "layout": self.layout,
            "previous": None if self.previous is None else self.previous.to_dict(),
            "second": None if self.second is None else self.second.to_dict(),
        }

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> "Provenance":
        """A record of any schema; GrowthError if it is not one."""
        try:
            source = record["source"]
            if isinstance(source, dict):  # schema 2, or schema 1 written by Megatron-LM
                ref = SourceRef(source["path"], source.get("iteration"), source.get("load"))
                grown_by = record.get("grown_by", "megatron-lm")
            else:  # schema 1 written offline: the path, and the iteration beside it
                ref = SourceRef(str(source), record.get("iteration"))
                grown_by = "offline"
            policy = record.get("optimizer_policy", "copy")
            previous, second = record.get("previous"), record.get("second")
            return cls(
                source=ref,
                plan=record["plan"],
                optimizer_policy=policy,
                optimizer=record.get("optimizer", "dropped" if policy == "reset" else "grown"),
                grown_by=grown_by,
                version=str(record.get("version", "unknown")),
                rewarmup_iters=int(record.get("rewarmup_iters", 0)),
                layout=record.get("layout"),
                previous=None if previous is None else cls.from_dict(previous),
                schema=int(record.get("schema", 1)),
                second=None if second is None else SourceRef(**second),
            )
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise GrowthError(f"the growth record ({KEY!r} in the common state) is not one "
                              f"megatron-recycle wrote: {type(e).__name__}: {e}") from None

    @classmethod
    def of(cls, common: dict[str, Any]) -> Optional["Provenance"]:
        """The record in a checkpoint's common state, or None if it was never grown."""
        record = common.get(KEY)
        return None if record is None else cls.from_dict(record)

    def disagreements(self) -> list[str]:
        """Where the recorded plan's derived parts (layer map, expert map, target model) are
        not what its own options make: a record edited after growth. Empty when they agree."""
        try:
            remade = _plain(self.growth_plan().describe())
        except GrowthError as e:
            return [f"its options make no plan ({e})"]
        recorded = _plain(self.plan)
        out = []
        for name in ("layer_map", "expert_map", "target"):
            have, want = recorded.get(name), remade[name]
            if name in recorded and have != want:  # (an older record may lack one)
                out.append(f"its {name} {_first_difference(have, want)}")
        return out

    def summary(self) -> dict[str, Any]:
        """What `inspect` shows: this record, whether it agrees with itself, and the records of
        earlier growths (`previous`, the source's own record when it was grown too)."""
        return {"source": self.source.path, "iteration": self.source.iteration,
                "grown_by": self.grown_by, "version": self.version, "seed": self.seed,
                "optimizer": self.optimizer, "layer_map": self.plan.get("layer_map"),
                "depth": self.plan.get("depth"), "width": self.plan.get("width"),
                "init": self.plan.get("init"),
                "second": None if self.second is None else self.second.to_dict(),
                "disagreements": self.disagreements(),
                "previous": None if self.previous is None else self.previous.summary()}


def _plain(value):
    """JSON's view of a value (tuples as lists), so a record compares equal however it was stored."""
    return json.loads(json.dumps(value, default=str))


def _first_difference(have, want) -> str:
    if isinstance(have, list) and isinstance(want, list):
        if len(have) != len(want):
            return f"has {len(have)} entries where its options make {len(want)}"
        at = next(i for i, (h, w) in enumerate(zip(have, want)) if h != w)
        return f"says {have[at]} at {at} where its options make {want[at]}"
    if isinstance(have, dict) and isinstance(want, dict):
        at = sorted(k for k in have.keys() | want.keys() if have.get(k) != want.get(k))[0]
        return f"says {at}={have.get(at)} where its options make {want.get(at)}"
    return f"is {have!r} where its options make {want!r}"
