"""Properties of the vehicle policy over random event sequences, checked against a small
reference model written from the rules in specs/vehicle-trace-format.md section 3."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pfleet.core.policy import (
    MB,
    BytesTransferred,
    EnergyUsed,
    JoinMesh,
    LeaveMesh,
    PauseRequested,
    Policy,
    PolicyConfig,
    PolicyUsageError,
    ResumeRequested,
    StartComputing,
    StateObserved,
    StopAfterCurrent,
    StopComputing,
    Tick,
    VehicleState,
    WakeAt,
)

T0 = 1_717_372_800
DAY = 86_400

states = st.builds(
    VehicleState,
    parked=st.booleans(),
    plugged_in=st.booleans(),
    soc_pct=st.sampled_from([20, 59.5, 60, 74, 75, 80, 100]),
    charge_limit_pct=st.sampled_from([50, 80, 100]),
    network=st.sampled_from(["wifi", "ethernet", "cellular", "none"]),
    metered=st.sampled_from([False, True, None]),
    battery_temp_c=st.sampled_from([None, 20, 40, 41]),
    cabin_temp_c=st.sampled_from([None, 30, 46]),
    departure_at=st.none(),
)
good_state = VehicleState(parked=True, plugged_in=True, soc_pct=80, charge_limit_pct=90,
                          network="wifi", metered=False)
weighted_states = st.one_of(states, st.just(good_state), st.just(good_state))
configs = st.builds(
    PolicyConfig,
    battery_floor_pct=st.sampled_from([60, 80]),
    quiet_hours=st.sampled_from([(), ("22:00-06:00",), ("12:00-12:30", "23:30-00:30")]),
    excluded_tariff_windows=st.sampled_from([(), ("17:00-19:00",)]),
    resume_after_s=st.sampled_from([0, 300]),
    require_unmetered=st.booleans(),
    state_max_age_s=st.sampled_from([None, 900]),
    daily_energy_budget_wh=st.sampled_from([None, 500]),
    daily_transfer_cap_mb=st.sampled_from([None, 100]),
)


@st.composite
def scenarios(draw):
    cfg = draw(configs)
    off = draw(st.sampled_from([0, 7200, -18000]))
    at = T0 + draw(st.integers(0, DAY))
    # The machine learns the owner's UTC offset first, as the node does (its first event is
    # a StateObserved carrying it); before any offset the policy counts days in UTC, which
    # the reference (one offset throughout) does not model.
    events = [Tick(at, off)]
    for _ in range(draw(st.integers(1, 40))):
        at += draw(st.sampled_from([0, 1, 60, 299, 300, 600, 3600, 5 * 3600]))
        kind = draw(st.sampled_from(["state"] * 4 + ["tick"] * 3 + ["energy", "bytes", "pause",
                                                                    "resume", "after"]))
        if kind == "state":
            s = draw(weighted_states)
            if draw(st.booleans()):
                s = VehicleState(**{**s.__dict__, "departure_at": at + draw(
                    st.sampled_from([-600, 0, 1800, 3600, 4000, 20000]))})
            events.append(StateObserved(at, s, off))
        elif kind == "tick":
            events.append(Tick(at, off))
        elif kind == "energy":
            events.append(EnergyUsed(at, draw(st.sampled_from([0.0, 100.0, 600.0]))))
        elif kind == "bytes":
            events.append(BytesTransferred(at, draw(st.sampled_from([0, MB, 200 * MB]))))
        else:
            events.append({"pause": PauseRequested, "resume": ResumeRequested,
                           "after": StopAfterCurrent}[kind](at))
    return cfg, off, events


# ------------------------------------------------------------------ reference model

def in_windows(texts, at, off) -> bool:
    minute = ((at + off) % DAY) / 60
    for w in texts:
        a, b = w.split("-")
        start = int(a[:2]) * 60 + int(a[3:])
        end = int(b[:2]) * 60 + int(b[3:])
        if (start <= minute < end) if start < end else (minute >= start or minute < end):
            return True
    return False


class Reference:
    """The rules, restated naively: conditions evaluated at event times only."""

    def __init__(self, cfg: PolicyConfig, off: int):
        self.cfg, self.off = cfg, off
        self.state = None
        self.observed_at = None
        self.ok_since = None
        self.paused = False
        self.day = None
        self.wh = 0.0
        self.bytes = 0

    def vehicle_ok(self, at) -> bool:
        c, s = self.cfg, self.state
        if s is None:
            return False
        if c.state_max_age_s is not None and at - self.observed_at >= c.state_max_age_s:
            return False
        floor = max(0, min(c.battery_floor_pct, s.charge_limit_pct - c.charge_limit_margin_pct))
        return (s.parked and s.plugged_in and s.soc_pct >= floor
                and (s.battery_temp_c is None or s.battery_temp_c <= c.max_battery_temp_c)
                and (s.cabin_temp_c is None or s.cabin_temp_c <= c.max_cabin_temp_c)
                and s.network != "none"
                and (not c.require_unmetered or s.metered is False)
                and (s.departure_at is None or at < s.departure_at - c.departure_margin_s))

    def other_ok(self, at) -> bool:
        c = self.cfg
        return (not in_windows(c.quiet_hours, at, self.off)
                and not in_windows(c.excluded_tariff_windows, at, self.off)
                and not self.paused
                and (c.daily_energy_budget_wh is None or self.wh < c.daily_energy_budget_wh)
                and (c.daily_transfer_cap_mb is None or self.bytes < c.daily_transfer_cap_mb * MB))

    def step(self, ev):
        at = ev.at
        day = math.floor((at + self.off) / DAY)
        if self.day != day:
            self.day, self.wh, self.bytes = day, 0.0, 0
        if not self.vehicle_ok(at):  # lapsed since the last event, by time alone
            self.ok_since = None
        if isinstance(ev, StateObserved):
            self.state, self.observed_at = ev.vehicle_state, at
        elif isinstance(ev, EnergyUsed):
            self.wh += ev.wh
        elif isinstance(ev, BytesTransferred):
            self.bytes += ev.n
        elif isinstance(ev, (PauseRequested, StopAfterCurrent)):
            self.paused = True
        elif isinstance(ev, ResumeRequested):
            self.paused = False
        if not self.vehicle_ok(at):
            self.ok_since = None
        elif self.ok_since is None:
            self.ok_since = at

    def may_compute(self, at) -> bool:
        return (self.ok_since is not None and at - self.ok_since >= self.cfg.resume_after_s
                and self.other_ok(at))


def run(cfg, events):
    p = Policy(cfg)
    return p, [p.handle(ev) for ev in events]


FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------ properties

@FAST
@given(scenarios())
def test_computes_exactly_when_the_reference_rules_allow(scenario):
    """Never StartComputing while any hard condition fails or before the hold; never keeps
    computing past an event at which a condition fails; and never idles when all hold."""
    cfg, off, events = scenario
    p, ref = Policy(cfg), Reference(cfg, off)
    for ev in events:
        effects = p.handle(ev)
        ref.step(ev)
        allowed = ref.may_compute(ev.at)
        if any(isinstance(e, StartComputing) for e in effects):
            assert allowed, (ev, effects)
        assert p.computing == allowed, (ev, effects, p.reasons())
        assert (p.reasons() == []) == allowed


class FullDecision(Policy):
    """The policy deciding at every event, without the shortcut for a count reported at
    the instant of the last event (Policy.handle)."""

    def handle(self, ev: object) -> list:
        return self._full_decision(self._s, ev)


@FAST
@given(scenarios(), st.data())
def test_a_count_at_the_same_instant_decides_what_a_full_decision_would(scenario, data):
    cfg, _off, events = scenario
    # reports of energy and bytes right after other events, at the same instant, as a node
    # and the simulator send them; some cross a limit
    mixed = []
    for ev in events:
        mixed.append(ev)
        for _ in range(data.draw(st.integers(0, 2))):
            mixed.append(data.draw(st.sampled_from([
                EnergyUsed(ev.at, 100.0), EnergyUsed(ev.at, 0.0), BytesTransferred(ev.at, MB),
                BytesTransferred(ev.at, 90 * MB)])))
    fast, full = Policy(cfg), FullDecision(cfg)
    for ev in mixed:
        assert fast.handle(ev) == full.handle(ev), ev
        assert fast.state == full.state, ev


@FAST
@given(scenarios())
def test_start_and_stop_alternate_with_join_and_leave_and_wakes_lie_ahead(scenario):
    cfg, off, events = scenario
    _, outputs = run(cfg, events)
    for ev, effects in zip(events, outputs):
        for e in effects:
            if isinstance(e, WakeAt):
                assert ev.at < e.at
                assert cfg.recheck_s is None or e.at <= ev.at + cfg.recheck_s
    flat = [e for effects in outputs for e in effects if not isinstance(e, WakeAt)]
    computing = finishing = in_mesh = False
    for i, e in enumerate(flat):
        if isinstance(e, JoinMesh):
            assert not in_mesh and isinstance(flat[i + 1], StartComputing)
            in_mesh = True
        elif isinstance(e, StartComputing):
            assert not computing and in_mesh and isinstance(flat[i - 1], JoinMesh)
            computing, finishing = True, False
        elif isinstance(e, StopComputing):
            if computing:
                assert isinstance(flat[i + 1], LeaveMesh)
                computing, finishing = False, not e.hand_back
            else:  # the one escalation after a stop that let the shard finish
                assert finishing and e.hand_back
                finishing = False
        elif isinstance(e, LeaveMesh):
            assert in_mesh and not computing and isinstance(flat[i - 1], StopComputing)
            assert 0 <= e.flush_byte_cap <= cfg.leaving_flush_cap_kb * 1024
            in_mesh = False
    assert in_mesh == computing


@FAST
@given(scenarios(), st.data())
def test_replay_is_deterministic_refusals_change_nothing_status_is_a_pure_read(scenario, data):
    cfg, off, events = scenario
    p1, out1 = run(cfg, events)
    p2, out2 = run(cfg, events)
    assert out1 == out2 and p1.state == p2.state
    p = Policy(cfg)
    cut = data.draw(st.integers(0, len(events)))
    for ev in events[:cut]:
        p.handle(ev)
    before = p.state
    p.status()
    p.reasons(before.at + 7 * 3600 if before.at is not None else None)
    assert p.state == before
    if before.at is not None:
        with pytest.raises(PolicyUsageError):
            p.handle(Tick(before.at - 1, off))
        with pytest.raises(PolicyUsageError):
            p.handle(EnergyUsed(before.at, -1.0))
        assert p.state == before
    # and the machine goes on exactly as one that never saw the refused events
    assert [p.handle(ev) for ev in events[cut:]] == out1[cut:]
