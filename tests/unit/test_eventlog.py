"""Event logs replay: a policy fed the logged events reaches the same decisions."""

from __future__ import annotations

import json

import pytest

from p2pfleet.core import eventlog
from p2pfleet.core import policy as P


def events():
    car = dict(parked=True, plugged_in=True, soc_pct=80.0, charge_limit_pct=90.0,
               network="wifi", metered=False, battery_temp_c=20.0, cabin_temp_c=20.0)
    out = [P.StateObserved(0.0, P.VehicleState(**car), 3600)]
    out += [P.Tick(t, 3600) for t in (100.0, 400.0)]
    out.append(P.EnergyUsed(500.0, 12.5))
    out.append(P.StateObserved(600.0, P.VehicleState(**{**car, "plugged_in": False}), 3600))
    out.append(P.PauseRequested(700.0))
    return out


def test_logged_policy_events_replay_to_the_same_effects():
    config = P.PolicyConfig(resume_after_s=60.0)
    live, replay = P.Policy(config), P.Policy(config)
    lines, decided = [], []
    for ev in events():
        lines.append(eventlog.to_json(ev))
        decided.append(live.handle(ev))
    again = [replay.handle(eventlog.from_json(line, P.EVENTS)) for line in lines]
    assert again == decided
    assert any(decided)  # the run decided something worth comparing
    assert [eventlog.from_json(line, P.EVENTS) for line in lines] == events()


def test_unknown_event_types_are_refused_by_name():
    with pytest.raises(ValueError, match="unknown event type 'Bogus'"):
        eventlog.from_json('{"type": "Bogus"}', P.EVENTS)


def test_settings_and_records_round_trip_for_a_log_header():
    from p2pfleet.core import scheduler as S
    from p2pfleet.core import trust as T

    settings = S.SchedulerSettings(own_key=b"o" * 32, trust=T.TrustSettings(
        trusted=frozenset({b"o" * 32, b"a" * 32})))
    config = P.PolicyConfig(quiet_hours=("22:00-06:00",))
    header = json.loads(eventlog.header("scheduler", settings, rng={"key": "00", "counter": 3}))
    assert (header["format"], header["version"]) == (eventlog.FORMAT, eventlog.VERSION)
    assert eventlog.build(S.SchedulerSettings, header["settings"]) == settings
    back = eventlog.build(P.PolicyConfig, json.loads(eventlog.header("policy", config))["settings"])
    assert back == config and back.quiet_windows == config.quiet_windows  # derived again
    lease = S.LeaseRec(b"l" * 16, b"j" * 16, 3, b"w" * 32, "10.0.0.0/24", b"c" * 32, 1, 2, 3, 4,
                       True, digest=None, agrees=(b"m" * 16,))
    assert eventlog.build(S.LeaseRec, eventlog.plain(lease)) == lease


def test_a_record_holds_the_event_its_effects_or_its_refusal():
    ev = events()[0]
    line = json.loads(eventlog.record(ev, [P.JoinMesh()]))
    assert line["type"] == "StateObserved" and line["effects"] == [{"type": "JoinMesh"}]
    assert eventlog.from_json(json.dumps(line), P.EVENTS) == ev  # extra keys are ignored
    assert json.loads(eventlog.record(ev, refused="no"))["refused"] == "no"
