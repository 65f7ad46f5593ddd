"""The growth record: one schema, written by every grower, read by every reader, old records
too (rank-free)."""

import pytest

from megatron_recycle.errors import GrowthError
from megatron_recycle.plan import Architecture, DepthGrowth, GrowthPlan, WidthGrowth
from megatron_recycle.provenance import KEY, Provenance, SourceRef

PLAN = GrowthPlan(Architecture(num_layers=2, num_experts=4, topk=2), DepthGrowth(2), WidthGrowth(2, seed=9))


def test_a_record_round_trips_with_its_chain():
    first = Provenance(SourceRef("/ckpt/base/iter_0000010", 10), PLAN.describe(), "copy", "grown",
                       "offline", "0.2.0")
    second = Provenance(SourceRef("/ckpt/grown/iter_0000010", 10, load="/ckpt/grown"), PLAN.describe(),
                        "reset", "dropped", "megatron-lm", "0.2.0", rewarmup_iters=5,
                        layout={"expert_model_parallel_size": 8}, previous=first)
    again = Provenance.of({KEY: second.to_dict()})
    assert again == second and again.previous == first
    assert again.growth_plan() == PLAN and again.seed == 9


def test_a_record_names_the_second_checkpoint_of_a_merge():
    ref = SourceRef("/ckpt/other/iter_0000020", 20, metadata_sha256="ab" * 32)
    record = Provenance(SourceRef("/ckpt/base/iter_0000010", 10), PLAN.describe(), "copy", "grown",
                        "offline", "0.2.0", second=ref)
    again = Provenance.of({KEY: record.to_dict()})
    assert again.second == ref and again == record and again.summary()["second"]["iteration"] == 20
    assert Provenance.of({KEY: dict(record.to_dict(), second=None)}).second is None


def test_schema_1_records_of_both_writers_are_read():
    offline = {"source": "/ckpt/base/iter_0000010", "iteration": 10, "plan": PLAN.describe(),
               "seed": 9, "optimizer_policy": "copy", "optimizer": "grown", "version": "0.1.0",
               "previous": None}
    megatron_lm = {"version": "0.1.0", "source": {"load": "/ckpt/base", "path": "/ckpt/base/iter_0000010",
                                                  "iteration": 10},
                   "plan": PLAN.describe(), "optimizer_policy": "reset", "rewarmup_iters": 0,
                   "layout": {"tensor_model_parallel_size": 1}}
    a, b = Provenance.from_dict(offline), Provenance.from_dict(megatron_lm)
    assert (a.source, a.grown_by, a.schema) == (SourceRef("/ckpt/base/iter_0000010", 10), "offline", 1)
    assert (b.source.load, b.grown_by, b.optimizer) == ("/ckpt/base", "megatron-lm", "dropped")
    assert a.growth_plan() == b.growth_plan() == PLAN


def test_a_checkpoint_never_grown_has_no_record_and_a_foreign_one_is_refused():
    assert Provenance.of({"args": None}) is None
    with pytest.raises(GrowthError, match="not one megatron-recycle wrote"):
        Provenance.of({KEY: {"source": "/x"}})


def test_records_hold_plain_values_only():
    """So a checkpoint's common state loads with weights_only=True."""
    def plain(x):
        if isinstance(x, dict):
            return all(isinstance(k, str) and plain(v) for k, v in x.items())
        if isinstance(x, (list, tuple)):
            return all(plain(v) for v in x)
        return x is None or isinstance(x, (str, int, float, bool))

    record = Provenance(SourceRef("/p", 1, "/l"), PLAN.describe(), "copy", "grown", "offline", "0.2.0")
    assert plain(record.to_dict())
