"""The named scenarios of the fleet simulator (issue 16, item 5), each a small declarative
definition: a `FleetConfig` (p2pfleet/sim/fleet.py) and the properties its run must show.

Scenarios run through the fleet (`p2pfleet.sim.fleet`), not through sim/verification.py:
the fleet puts every cheater kind into a drawn population (home, work and fast-charge
days, veterans already established, one publisher per 100 cars with the default trust
settings) and a 10^4-shard run costs seconds now that the scheduler ranks only its window.
verification.py stays the tool for the adversaries the fleet has no cars for (lease games,
throwaway keys, the re-check and audit sweeps: tools/sim_verification.py).

Checks (`check`): "once" no shard ever holds two decisions (a second acceptance or a
failure after one raises `InvariantBroken` in the run); "kept" no acceptance withdrawn
(`ShardReopened`, which the scheduler sends when an excluded cheater's result had helped
accept a shard: expected with colluders, never without cheaters); "complete"
every shard of the job accepted, none failed, none left undecided or lost; "no_wrong" no
wrong result accepted; "10k" at least 10^4 shards accepted; "lost_work" some work handed back unfinished; "bound" wrong results accepted within the f^k bound of
independent cheaters (reported, not asserted: colluders and Sybils are not independent).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from p2pfleet.sim.fleet import CHEATS, FleetConfig, Workload
from p2pfleet.sim.population import Assumptions

# A job the fleet finishes within the day, so "every shard completes" can be checked.
FINITE = Workload(shards_per_vehicle_hour=0.3)
HOME_ONLY = Assumptions(habits=(("home", 1.0),))


@dataclass(frozen=True)
class Scenario:
    name: str
    what: str
    config: FleetConfig
    checks: tuple[str, ...] = ("once",)
    table: dict = field(default_factory=dict)   # the sweep's row keys (kind, share, quorum)


def _cfg(vehicles: int = 1000, **kw) -> FleetConfig:
    return FleetConfig(vehicles, **kw)


NAMED: tuple[Scenario, ...] = (
    Scenario("nightly-peak", "every car charges at home overnight: the night's plug-in peak "
             "on the publishers", _cfg(assumptions=HOME_ONLY), ("once", "no_wrong")),
    Scenario("departure-wave", "every car leaves home at 07:25 +- 10 min: the 07:30 wave "
             "hands its leases back at once",
             _cfg(hours=10, assumptions=replace(HOME_ONLY, jitter_s=600)),
             ("once", "no_wrong", "lost_work")),
    Scenario("churn-30", "30 % of cars unplug mid-lease (half their leases), 5-60 min away",
             _cfg(churn=0.3, workload=FINITE), ("once", "kept", "complete", "no_wrong")),
    Scenario("churn-50", "50 % of cars unplug mid-lease (half their leases), 5-60 min away",
             _cfg(churn=0.5, workload=FINITE), ("once", "kept", "complete", "no_wrong")),
    Scenario("colluders-10", "10 % colluders: established, one row changed, only together",
             _cfg(cheaters=0.1, cheat_kinds=("colluder",)), ("once",)),
    Scenario("colluders-30", "30 % colluders: established, one row changed, only together",
             _cfg(cheaters=0.3, cheat_kinds=("colluder",)), ("once",)),
    Scenario("strategic", "20 % strategic cheaters: honest until established, then fp16",
             _cfg(cheaters=0.2, cheat_kinds=("strategic",)), ("once", "no_wrong")),
    Scenario("sybil-swarm", "20 % of cars are a Sybil swarm behind one /24 per publisher, "
             "fp16", _cfg(cheaters=0.2, cheat_kinds=("sybil",)), ("once", "no_wrong")),
    Scenario("partition-60s", "at 02:00 half the fleet cannot reach its publisher for 60 s",
             _cfg(partition=(2.0, 60, 0.5), workload=FINITE),
             ("once", "kept", "complete", "no_wrong")),
    Scenario("uplink-bottleneck", "each publisher's uplink is 1 Mbit/s (the default 100)",
             _cfg(uplink_bytes_per_s=125_000), ("once", "no_wrong")),
)

KINDS = tuple(k for k, _ in CHEATS)
SHARES = (0.1, 0.2, 0.3)
QUORUMS = (2, 3)
# vehicles per quorum: at least 10^4 shards accepted in 24 h (quorum 3 needs more results)
SWEEP_VEHICLES = {2: 700, 3: 1200}


def sweep() -> tuple[Scenario, ...]:
    """Every cheater kind x share x quorum: wrong results accepted out of >= 10^4 shards."""
    out = []
    for kind in KINDS:
        for share in SHARES:
            for q in QUORUMS:
                out.append(Scenario(
                    f"sweep-{kind}-{share:g}-q{q}",
                    f"{share:.0%} {kind} cheaters, quorum {q}",
                    _cfg(SWEEP_VEHICLES[q], cheaters=share, cheat_kinds=(kind,),
                         workload=Workload(quorum=q)),
                    ("once", "10k"), {"kind": kind, "share": share, "quorum": q}))
    return tuple(out)


def all_scenarios() -> tuple[Scenario, ...]:
    return NAMED + sweep()


def check(scn: Scenario, summary: dict, jobs: dict) -> dict[str, bool]:
    """Each of the scenario's checks -> held? `jobs` sums the publishers' job reports."""
    out = {}
    for name in scn.checks:
        if name == "once":
            out[name] = jobs["double_decisions"] == 0
        elif name == "kept":
            out[name] = jobs["reopened"] == 0
        elif name == "complete":
            out[name] = (jobs["accepted"] == jobs["shards"] and jobs["failed"] == 0
                         and jobs["undecided"] == 0 and jobs["lost"] == 0)
        elif name == "lost_work":  # the wave hands back leases under way
            out[name] = summary["work_lost_to_unplugging_hours"] > 0
        elif name == "10k":  # the table's counts are out of at least 10^4 shards
            out[name] = summary["shards_accepted"] >= 10_000
        elif name == "no_wrong":
            out[name] = summary["wrong_accepted_ever"] == 0
        else:
            raise ValueError(f"scenario {scn.name}: unknown check {name!r}")
    return out


def bound(share: float, quorum: int, accepted: int) -> float:
    """Wrong results expected accepted if cheaters were independent and every replica went
    to a cheater with probability `share`: accepted x share^quorum (an upper bound: it
    ignores known answers, exclusion and the rule that a quorum holds an established
    vote)."""
    return accepted * share ** quorum
