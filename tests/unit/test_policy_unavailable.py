"""`StateUnavailable`: a live provider that fails, lies or times out stops the car at once
(p2pfleet/core/policy.py), instead of the last good state being trusted until it is stale."""

from __future__ import annotations

import pytest

from p2pfleet.core import eventlog
from p2pfleet.core.policy import (
    EVENTS,
    JoinMesh,
    LeaveMesh,
    Policy,
    PolicyConfig,
    PolicyUsageError,
    StartComputing,
    StateObserved,
    StateUnavailable,
    StopComputing,
    Tick,
    VehicleState,
    WakeAt,
)

NOON = 1_717_372_800 + 12 * 3600
START = [JoinMesh(), StartComputing(threads=2, cpu_share=0.5)]


def cfg() -> PolicyConfig:
    return PolicyConfig(state_max_age_s=None)


def vs() -> VehicleState:
    return VehicleState(parked=True, plugged_in=True, soc_pct=80, charge_limit_pct=90,
                        network="wifi", metered=False)


def acts(effects: list) -> list:
    return [e for e in effects if not isinstance(e, WakeAt)]


def computing_policy() -> Policy:
    p = Policy(cfg())
    p.handle(StateObserved(NOON, vs()))
    assert acts(p.handle(Tick(NOON + 300))) == START
    return p


def test_unavailable_stops_at_once_and_says_why():
    p = computing_policy()
    effects = acts(p.handle(StateUnavailable(NOON + 400, "vehicle API: HTTP 503")))
    assert [type(e) for e in effects] == [StopComputing, LeaveMesh]
    assert effects[0].code == "no_state" and "HTTP 503" in effects[0].reason
    assert effects[1].flush_byte_cap == 0  # no state: the link is not known to be usable
    assert p.reasons()[0].text == "no vehicle state: vehicle API: HTTP 503"
    assert not p.computing


def test_state_after_unavailable_needs_the_hold_time_again():
    p = computing_policy()
    p.handle(StateUnavailable(NOON + 400, "timed out"))
    assert acts(p.handle(StateObserved(NOON + 410, vs()))) == []
    assert p.reasons() and p.reasons()[0].code == "holding"
    assert acts(p.handle(Tick(NOON + 410 + 300))) == START


def test_never_observed_then_unavailable_is_no_state():
    p = Policy(cfg())
    assert acts(p.handle(StateUnavailable(NOON, "car asleep and never read"))) == []
    assert [r.code for r in p.reasons()] == ["no_state"]


@pytest.mark.parametrize("why", ["", "x" * 301, None, 3])
def test_bad_why_is_refused_and_changes_nothing(why):
    p = computing_policy()
    before = p.state
    with pytest.raises(PolicyUsageError, match="why must be"):
        p.handle(StateUnavailable(NOON + 400, why))
    assert p.state == before


def test_event_log_round_trip():
    ev = StateUnavailable(NOON, "power_supply: capacity is 140", 3600)
    assert eventlog.from_json(eventlog.to_json(ev), EVENTS) == ev
