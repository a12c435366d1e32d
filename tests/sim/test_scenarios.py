"""CI's fleet scenario (issue 16, "CI runs a 1,000-vehicle scenario"): tools/scenarios/'s
50 % churn at 1,000 vehicles over a day, through the runner's own `play`, against the same
fleet without churn. Churn loses work, never a shard: every shard of the job is accepted,
once, none failed or lost, and no acceptance is withdrawn."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))  # tools/ is not a package: import scenarios from it

from scenarios import catalog as C  # noqa: E402
from scenarios.run import play  # noqa: E402

from p2pfleet.sim.traces import load_traces  # noqa: E402


def test_every_scenario_is_well_formed():
    names = [s.name for s in C.all_scenarios()]
    assert len(names) == len(set(names))
    assert len(C.sweep()) == len(C.KINDS) * len(C.SHARES) * len(C.QUORUMS)
    for s in C.all_scenarios():
        assert C.check(s, {"wrong_accepted_ever": 0, "work_lost_to_unplugging_hours": 1,
                           "shards_accepted": 10_000},
                       {"reopened": 0, "double_decisions": 0, "accepted": 1, "shards": 1,
                        "failed": 0, "undecided": 0, "lost": 0}).keys() == set(s.checks)


def test_half_the_fleet_churning_loses_work_but_no_shard():
    traces = load_traces()
    churn = next(s for s in C.NAMED if s.name == "churn-50")
    assert churn.config.vehicles == 1000
    calm = dataclasses.replace(churn, config=dataclasses.replace(churn.config, churn=0.0))
    runs = {s.config.churn: play(s, traces) for s in (churn, calm)}
    for run in runs.values():
        jobs = run["jobs"]
        assert run["invariant_broken"] is None   # no shard decided twice
        assert jobs["shards"] > 5000
        assert jobs["accepted"] == jobs["shards"], jobs
        assert jobs["failed"] == jobs["undecided"] == jobs["lost"] == jobs["reopened"] == 0
        assert run["summary"]["wrong_accepted_ever"] == 0
        assert run["ok"] and all(run["checks"].values()), run["checks"]
    churned, steady = runs[0.5], runs[0.0]
    assert churned["jobs"]["unplugs"] > 500 and steady["jobs"]["unplugs"] == 0
    lost = [r["summary"]["work_lost_to_unplugging_hours"] for r in (churned, steady)]
    assert lost[0] > 2 * lost[1], lost
    # the work handed back is leased again: more leases for the same shards
    assert churned["summary"]["leases"] > steady["summary"]["leases"]
