"""The fleet simulator's scenario knobs (tools/scenarios/): churn, a partition, the
publisher's uplink. Each is refused clearly when out of range, changes nothing when off,
and does what it says when on: churn unplugs cars mid-lease (work is lost, no shard), a
partition holds a share of cars' messages until it heals, a thin uplink is used more."""

from __future__ import annotations

import pytest

from p2pfleet.sim.fleet import Fleet, FleetConfig, Workload
from p2pfleet.sim.traces import load_traces

TRACES = load_traces()
SMALL_JOB = Workload(shards_per_vehicle_hour=0.3)   # a job the fleet finishes in the run


@pytest.mark.parametrize("kw, name", [
    (dict(churn=1.5), "churn"), (dict(churn=-0.1), "churn"),
    (dict(churn_per_lease=0.0), "churn_per_lease"),
    (dict(churn_away_s=(60, 10)), "churn_away_s"),
    (dict(partition=(30.0, 60, 0.5)), "partition"), (dict(partition=(1.0, 0, 0.5)), "partition"),
    (dict(partition=(1.0, 60, 0.0)), "partition"), (dict(partition=(1.0, 60)), "partition"),
    (dict(uplink_bytes_per_s=0), "uplink_bytes_per_s"),
])
def test_bad_knobs_are_refused_by_name(kw, name):
    with pytest.raises(ValueError, match=f"FleetConfig.{name}:"):
        FleetConfig(10, hours=24, **kw)


def _run(**kw) -> tuple[Fleet, dict]:
    fleet = Fleet(FleetConfig(200, hours=24, seed=7, workload=SMALL_JOB, **kw), TRACES).run()
    return fleet, fleet.summary()


def _decided(fleet: Fleet) -> tuple[int, int, int]:
    reps = [p.report() for p in fleet.publishers]
    return (sum(r["shards"] for r in reps), sum(r["accepted"] for r in reps),
            sum(r["undecided"] + r["failed"] for r in reps))


def test_knobs_off_change_no_draw():
    base = Fleet(FleetConfig(60, hours=6, seed=3, cheaters=0.2), TRACES).run().summary()
    off = Fleet(FleetConfig(60, hours=6, seed=3, cheaters=0.2, churn=0.0, partition=None),
                TRACES).run().summary()
    assert base == off


def test_churn_loses_work_but_no_shard():
    calm, s0 = _run()
    churned, s1 = _run(churn=0.5)
    assert churned.unplugs > 50, churned.unplugs
    assert s1["work_lost_to_unplugging_hours"] > 2 * s0["work_lost_to_unplugging_hours"]
    for fleet in (calm, churned):
        shards, accepted, open_or_failed = _decided(fleet)
        assert accepted == shards and open_or_failed == 0
        assert not any(p.lost() for p in fleet.publishers)


def test_a_partition_holds_messages_until_it_heals():
    fleet, s = _run(partition=(2.0, 600, 0.5))
    cut = [c for c in fleet.cars if c.cut_off]
    assert 60 < len(cut) < 140
    start, end = fleet.cut_window
    assert (start, end) == (2 * 3_600_000, 2 * 3_600_000 + 600_000)
    assert fleet.reach(cut[0], start + 1) > end
    assert fleet.reach(cut[0], end) == end
    shards, accepted, open_or_failed = _decided(fleet)
    assert accepted == shards and open_or_failed == 0


def test_a_thin_uplink_is_the_bottleneck():
    _f, wide = _run()
    _f, thin = _run(uplink_bytes_per_s=150_000)
    assert thin["publisher_uplink"]["mean_use"] > 20 * wide["publisher_uplink"]["mean_use"]
    assert thin["time_to_result_s"]["p50"] > wide["time_to_result_s"]["p50"]
