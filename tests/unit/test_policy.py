"""The vehicle policy, rule by rule (p2pfleet/core/policy.py), and energy accounting."""

from __future__ import annotations

import pytest

from p2pfleet.core.energy import EnergySample, account, estimate_wh
from p2pfleet.core.policy import (
    BytesTransferred,
    EnergyUsed,
    JoinMesh,
    LeaveMesh,
    PauseRequested,
    Policy,
    PolicyConfig,
    PolicyConfigError,
    PolicyUsageError,
    ResumeRequested,
    StartComputing,
    StateObserved,
    StopAfterCurrent,
    StopComputing,
    Tick,
    VehicleState,
    WakeAt,
    hand_back_reason,
)

DAY = 86_400
T0 = 1_717_372_800  # 2024-06-03 00:00 UTC, a Monday
NOON = T0 + 12 * 3600
START = [JoinMesh(), StartComputing(threads=2, cpu_share=0.5)]


def cfg(**kw) -> PolicyConfig:
    """Default config without the stale-state rule (tested on its own), so tests need not
    re-observe the state every 15 minutes."""
    return PolicyConfig(**{"state_max_age_s": None, **kw})


def vs(**kw) -> VehicleState:
    values = dict(parked=True, plugged_in=True, soc_pct=80, charge_limit_pct=90,
                  network="wifi", metered=False, battery_temp_c=20, cabin_temp_c=20)
    values.update(kw)
    return VehicleState(**values)


def acts(effects: list) -> list:
    """Effects without timers."""
    return [e for e in effects if not isinstance(e, WakeAt)]


def wakes(effects: list) -> list[float]:
    return [e.at for e in effects if isinstance(e, WakeAt)]


def computing_policy(at: float = NOON, config: PolicyConfig | None = None, off: int = 0,
                     **state) -> Policy:
    p = Policy(config or cfg())
    p.handle(StateObserved(at, vs(**state), off))
    assert acts(p.handle(Tick(at + p.config.resume_after_s, off))) == START
    return p


def stop_of(effects: list) -> StopComputing:
    stops = [e for e in effects if isinstance(e, StopComputing)]
    assert len(stops) == 1, effects
    return stops[0]


# ------------------------------------------------------------------ hysteresis

def test_starts_only_after_conditions_held_resume_after_s():
    p = Policy(cfg())
    first = p.handle(StateObserved(NOON, vs()))
    assert acts(first) == [] and wakes(first) == [NOON + 300]
    assert acts(p.handle(Tick(NOON + 299))) == []
    assert not p.computing
    assert acts(p.handle(Tick(NOON + 300))) == START
    assert p.computing and p.in_mesh


def test_a_condition_failing_during_the_hold_restarts_it():
    p = Policy(cfg())
    p.handle(StateObserved(NOON, vs()))
    p.handle(StateObserved(NOON + 200, vs(plugged_in=False)))
    p.handle(StateObserved(NOON + 250, vs()))
    assert acts(p.handle(Tick(NOON + 300))) == []
    assert acts(p.handle(Tick(NOON + 549))) == []
    assert acts(p.handle(Tick(NOON + 550))) == START


def test_flapping_plug_does_not_start_and_stop_rapidly():
    p = computing_policy()
    t = NOON + 300
    starts = stops = 0
    for i in range(1, 37):  # the plug flaps every 100 s for an hour
        effects = acts(p.handle(StateObserved(t + 100 * i, vs(plugged_in=i % 2 == 0))))
        starts += sum(isinstance(e, StartComputing) for e in effects)
        stops += sum(isinstance(e, StopComputing) for e in effects)
    assert (starts, stops) == (0, 1)  # one stop at the first unplug, no restart
    assert any("for conditions to hold" in line for line in p.status())
    end = t + 3600
    assert acts(p.handle(Tick(end + 299))) == []
    assert acts(p.handle(Tick(end + 300))) == START


def test_battery_floor_sits_below_the_charge_limit_and_never_flaps_at_the_limit():
    config = cfg(battery_floor_pct=80)
    p = Policy(config)
    effects = []
    t = NOON
    for i in range(200):  # the car tops up 79% -> 80% at its 80% limit, all night
        effects += acts(p.handle(StateObserved(t + 120 * i, vs(soc_pct=80 - i % 2,
                                                              charge_limit_pct=80))))
    assert effects == START
    assert config.effective_floor(80) == 75
    low = Policy(config)
    low.handle(StateObserved(NOON, vs(soc_pct=74, charge_limit_pct=80)))
    assert "battery 74% < floor 75% (charge limit 80% - 5%)" in low.status()


def test_battery_at_the_floor_and_temperatures_at_their_limits_are_eligible():
    p = computing_policy(soc_pct=60, battery_temp_c=40, cabin_temp_c=45)
    assert p.computing
    assert computing_policy(battery_temp_c=None, cabin_temp_c=None).computing


# ------------------------------------------------------------------ each condition alone

VEHICLE_CASES = [
    ("not_parked", dict(parked=False), "not parked (driving)"),
    ("unplugged", dict(plugged_in=False), "not plugged in"),
    ("battery_low", dict(soc_pct=42), "battery 42% < floor 60%"),
    ("battery_hot", dict(battery_temp_c=40.5), "battery 40.5 C > 40 C"),
    ("cabin_hot", dict(cabin_temp_c=46), "cabin 46 C > 45 C"),
    ("no_network", dict(network="none", metered=None), "no network"),
    ("metered", dict(network="cellular", metered=True), "cellular network is metered"),
    ("metered", dict(metered=None), "wifi network may be metered"),
    ("departure", dict(departure_at=NOON + 400 + 2400), "departure at 12:46 in 40 min"),
]


@pytest.mark.parametrize("code,change,text", VEHICLE_CASES, ids=[c[2] for c in VEHICLE_CASES])
def test_each_vehicle_condition_alone_stops_computing(code, change, text):
    p = computing_policy()
    at = NOON + 400
    effects = acts(p.handle(StateObserved(at, vs(**change))))
    stop = stop_of(effects)
    assert stop.code == code and text in stop.reason and stop.hand_back
    assert isinstance(effects[-1], LeaveMesh)
    assert not p.computing and not p.in_mesh
    assert any(text in line for line in p.status())
    # ... and alone keeps a fresh node from starting
    q = Policy(cfg())
    q.handle(StateObserved(at, vs(**change)))
    assert acts(q.handle(Tick(at + 800))) == []
    assert [r.code for r in q.reasons()] == [code]


def test_metered_links_are_allowed_when_the_owner_allows_them():
    p = computing_policy(config=cfg(require_unmetered=False), network="cellular",
                         metered=True)
    assert p.computing
    assert acts(p.handle(StateObserved(NOON + 400, vs(network="none")))) == [
        StopComputing("no network", True, "no_network"), LeaveMesh(0)]


def test_quiet_hours_alone_stop_computing_and_clear_without_hysteresis():
    config = cfg(quiet_hours=("22:00-06:00",), recheck_s=None)
    p = computing_policy(at=T0 + 20 * 3600, config=config)
    assert p.state.wake_at == T0 + 22 * 3600  # wakes at the start of quiet hours
    effects = p.handle(Tick(T0 + 22 * 3600))
    assert acts(effects) == [StopComputing("quiet hours until 06:00", True, "quiet_hours"),
                             LeaveMesh(65536)]
    assert T0 + DAY + 6 * 3600 in wakes(effects)
    p.handle(StateObserved(T0 + DAY + 5 * 3600, vs()))   # state kept fresh overnight
    assert acts(p.handle(Tick(T0 + DAY + 6 * 3600 - 1))) == []
    assert acts(p.handle(Tick(T0 + DAY + 6 * 3600))) == START


def test_quiet_hours_wrap_midnight_in_local_time():
    config = cfg(quiet_hours=("23:00-01:00",))
    off = 2 * 3600  # local = UTC+2
    p = Policy(config)
    p.handle(StateObserved(T0 - 30 * 60 - off, vs(), off))  # 23:30 local
    assert [r.text for r in p.reasons()][0] == "quiet hours until 01:00"
    p = Policy(config)
    p.handle(StateObserved(T0 + 30 * 60 - off, vs(), off))  # 00:30 local
    assert p.reasons()[0].until == T0 + 3600 - off
    p = Policy(config)
    p.handle(StateObserved(T0 + 90 * 60 - off, vs(), off))  # 01:30 local
    assert [r.code for r in p.reasons()] == ["holding"]


def test_overlapping_windows_merge():
    config = cfg(quiet_hours=("22:00-02:00", "01:00-05:00"),
                       excluded_tariff_windows=("17:00-20:00",))
    p = Policy(config)
    p.handle(StateObserved(T0 + 23 * 3600, vs()))
    assert p.status()[1] == "quiet hours until 05:00"
    p = Policy(config)
    p.handle(StateObserved(T0 + 18 * 3600, vs()))
    assert p.status()[1] == "excluded tariff window until 20:00"
    assert computing_policy(at=T0 + 20 * 3600, config=config).computing
    whole = Policy(cfg(quiet_hours=("00:00-24:00",)))
    whole.handle(StateObserved(NOON, vs()))
    assert whole.reasons()[0].code == "quiet_hours"


def test_departure_margin():
    dep = NOON + 4 * 3600
    p = Policy(cfg())
    effects = p.handle(StateObserved(NOON, vs(departure_at=dep)))
    assert NOON + 300 in wakes(effects)
    effects = p.handle(Tick(NOON + 300))
    assert acts(effects) == START
    assert p.state.wake_at == NOON + 300 + 900  # recheck_s comes before the margin
    p.handle(StateObserved(dep - 3601, vs(departure_at=dep)))
    assert p.computing
    effects = acts(p.handle(Tick(dep - 3600)))
    assert stop_of(effects).code == "departure"
    assert hand_back_reason("departure") == "departure"
    # the departure time passes while the car is still here: still not computing
    p.handle(StateObserved(dep + 600, vs(departure_at=dep)))
    assert "has passed" in p.reasons()[0].text
    # a new departure tomorrow: conditions hold again after the hold
    p.handle(StateObserved(dep + 700, vs(departure_at=dep + DAY)))
    assert acts(p.handle(Tick(dep + 999))) == []
    assert acts(p.handle(Tick(dep + 1000))) == START


def test_a_margin_entered_between_events_breaks_the_hold():
    dep = NOON + 4 * 3600
    p = computing_policy(departure_at=dep)
    # no Tick at dep - 3600; the provider moves the departure an hour later
    effects = acts(p.handle(StateObserved(dep - 3000, vs(departure_at=dep + 7200))))
    assert stop_of(effects).code == "departure"
    assert acts(p.handle(Tick(dep - 3000 + 300))) == START


def test_owner_pause_and_resume():
    p = computing_policy()
    effects = acts(p.handle(PauseRequested(NOON + 400)))
    assert effects == [StopComputing("paused by the owner", True, "paused"), LeaveMesh(65536)]
    assert "paused by the owner" in p.status()
    assert acts(p.handle(Tick(NOON + 2000))) == []
    assert acts(p.handle(ResumeRequested(NOON + 2001))) == START  # vehicle conditions held


def test_pause_while_out_only_records_it():
    p = Policy(cfg())
    p.handle(StateObserved(NOON, vs(plugged_in=False)))
    assert acts(p.handle(PauseRequested(NOON + 1))) == []
    p.handle(StateObserved(NOON + 2, vs()))
    assert acts(p.handle(Tick(NOON + 1000))) == []
    assert acts(p.handle(ResumeRequested(NOON + 1001))) == START


def test_stop_after_current_lets_the_shard_finish_unless_a_condition_fails():
    p = computing_policy()
    effects = acts(p.handle(StopAfterCurrent(NOON + 400)))
    assert effects == [StopComputing("stopped by the owner after the current shard", False,
                                     "stop_after_current"), LeaveMesh(65536)]
    assert p.state.finishing and not p.computing
    assert acts(p.handle(Tick(NOON + 500))) == []
    effects = acts(p.handle(StateObserved(NOON + 600, vs(plugged_in=False))))
    assert effects == [StopComputing("not plugged in", True, "unplugged")]  # escalation only
    assert not p.state.finishing
    assert acts(p.handle(StateObserved(NOON + 700, vs()))) == []
    assert acts(p.handle(ResumeRequested(NOON + 800))) == []  # plug held only 100 s
    assert acts(p.handle(Tick(NOON + 1000))) == START


def test_pause_after_stop_after_current_hands_back_now():
    p = computing_policy()
    p.handle(StopAfterCurrent(NOON + 400))
    assert acts(p.handle(PauseRequested(NOON + 401))) == [
        StopComputing("paused by the owner", True, "paused")]


# ------------------------------------------------------------------ budgets

def test_energy_budget_stops_computing_and_resets_at_local_midnight():
    off = 2 * 3600
    p = computing_policy(off=off)
    assert acts(p.handle(EnergyUsed(NOON + 400, 1999.0))) == []
    effects = p.handle(EnergyUsed(NOON + 500, 1.0))
    assert acts(effects) == [StopComputing("energy budget used 2000/2000 Wh today, resets at "
                                           "00:00", True, "energy_budget"), LeaveMesh(65536)]
    midnight = T0 + DAY - off
    assert p.reasons()[0].until == midnight
    p.handle(StateObserved(midnight - 60, vs(), off))
    assert acts(p.handle(Tick(midnight - 1, off))) == []
    assert acts(p.handle(Tick(midnight, off))) == START
    assert p.state.energy_wh == 0


def test_transfer_cap_stops_computing_flushes_nothing_more_and_resets():
    p = computing_policy()
    assert acts(p.handle(BytesTransferred(NOON + 400, 499_990_000))) == []
    effects = acts(p.handle(BytesTransferred(NOON + 500, 10_000)))
    assert effects == [StopComputing("transfer cap used 500.0/500 MB today, resets at 00:00",
                                     True, "transfer_cap"), LeaveMesh(0)]
    p.handle(StateObserved(T0 + DAY - 100, vs()))
    assert acts(p.handle(Tick(T0 + DAY))) == START


def test_flush_cap_never_exceeds_the_transfer_left_today():
    p = computing_policy()
    p.handle(BytesTransferred(NOON + 400, 499_980_000))
    assert acts(p.handle(PauseRequested(NOON + 500)))[-1] == LeaveMesh(20_000)


def test_no_budget_and_no_cap():
    config = cfg(daily_energy_budget_wh=None, daily_transfer_cap_mb=None)
    p = computing_policy(config=config)
    p.handle(EnergyUsed(NOON + 400, 1e6))
    p.handle(BytesTransferred(NOON + 400, 10**12))
    assert p.computing
    assert p.status()[-1] == "today: energy no budget, transfer no cap"


# ------------------------------------------------------------------ mesh, wake, staleness

def test_leaves_the_mesh_when_ineligible_and_joins_again():
    p = computing_policy()
    effects = acts(p.handle(StateObserved(NOON + 400, vs(network="cellular", metered=True))))
    assert effects == [StopComputing("cellular network is metered", True, "metered"),
                       LeaveMesh(0)]  # no flush over a metered link
    p.handle(StateObserved(NOON + 500, vs()))
    assert acts(p.handle(Tick(NOON + 800))) == START
    effects = acts(p.handle(StateObserved(NOON + 900, vs(parked=False, plugged_in=False))))
    assert effects == [StopComputing("not parked (driving); not plugged in", True, "not_parked"),
                       LeaveMesh(65536)]
    assert hand_back_reason("not_parked") == "unplugged"


def test_stale_vehicle_state_stops_computing():
    p = computing_policy(config=PolicyConfig())
    assert p.state.wake_at == NOON + 900  # observed_at + state_max_age_s
    effects = acts(p.handle(Tick(NOON + 900)))
    assert stop_of(effects).code == "stale_state"
    assert effects[-1] == LeaveMesh(0)  # network unknown now


def test_wake_at_is_emitted_only_when_earlier_than_the_pending_one_or_it_passed():
    p = Policy(cfg(recheck_s=None, quiet_hours=("13:00-14:00",)))
    assert wakes(p.handle(StateObserved(NOON, vs()))) == [NOON + 300]
    assert wakes(p.handle(StateObserved(NOON + 10, vs(departure_at=NOON + 3700)))) == [NOON + 100]
    assert wakes(p.handle(Tick(NOON + 50))) == []  # the pending one (NOON + 100) stands
    # in the departure margin: the hold is broken, next is the start of quiet hours
    assert wakes(p.handle(Tick(NOON + 100))) == [NOON + 3600]


def test_recheck_bounds_sleep_and_a_new_utc_offset_is_used():
    config = cfg(quiet_hours=("03:00-05:00",))
    p = computing_policy(at=T0 - 3600, config=config)  # 23:00 local (offset 0)
    assert p.state.wake_at <= T0 - 3600 + 300 + 900
    # a daylight-saving change to +1 h: 02:00 UTC is now 03:00 local, quiet
    p.handle(StateObserved(T0 + 7200 - 60, vs(), 0))
    effects = acts(p.handle(Tick(T0 + 7200, 3600)))
    assert stop_of(effects).code == "quiet_hours"


def test_status_reports_everything_and_changes_nothing():
    p = Policy(cfg(quiet_hours=("20:00-07:00",)))
    assert p.status() == ["not computing", "no vehicle state observed yet"]
    p.handle(StateObserved(T0 + 21 * 3600, vs(plugged_in=False, soc_pct=42)))
    p.handle(EnergyUsed(T0 + 21 * 3600, 1200))
    before = p.state
    assert p.status() == ["not computing", "not plugged in", "battery 42% < floor 60%",
                          "quiet hours until 07:00",
                          "today: energy 1200/2000 Wh, transfer 0.0/500 MB"]
    assert p.state == before
    p.handle(StateObserved(T0 + 31 * 3600, vs()))
    assert p.status(T0 + 31 * 3600 + 120) == ["not computing",
                                             "waiting 3 min more for conditions to hold",
                                             "today: energy 0/2000 Wh, transfer 0.0/500 MB"]
    with pytest.raises(PolicyUsageError):
        p.status(T0)


# ------------------------------------------------------------------ refusals

@pytest.mark.parametrize("event,why", [
    (Tick(NOON - 1), "time went backwards"),
    (EnergyUsed(NOON + 1, -1.0), "wh must be"),
    (EnergyUsed(NOON + 1, float("nan")), "wh must be"),
    (BytesTransferred(NOON + 1, -5), "n must be"),
    (BytesTransferred(NOON + 1, 1.5), "n must be"),
    (Tick(NOON + 1, 99 * 3600), "utc_offset_s"),
    (Tick(float("inf")), "at must be"),
    (StateObserved(NOON + 1, {"parked": True}), "vehicle_state must be"),
    ("tick", "not a policy event"),
])
def test_a_refused_event_changes_nothing(event, why):
    p = computing_policy(at=NOON - 300)
    before = p.state
    with pytest.raises(PolicyUsageError, match=why) as e:
        p.handle(event)
    assert "when state=COMPUTING" in str(e.value)
    assert p.state == before


@pytest.mark.parametrize("kwargs,field", [
    (dict(battery_floor_pct=101), "battery_floor_pct"),
    (dict(cpu_share=0), "cpu_share"),
    (dict(max_threads=0), "max_threads"),
    (dict(max_threads=True), "max_threads"),
    (dict(resume_after_s=-1), "resume_after_s"),
    (dict(power_w=0), "power_w"),
    (dict(daily_energy_budget_wh=-1), "daily_energy_budget_wh"),
    (dict(quiet_hours="22:00-06:00"), "quiet_hours"),
    (dict(quiet_hours=("25:00-06:00",)), r"quiet_hours\[0\]"),
    (dict(quiet_hours=("7:00-8:00",)), r"quiet_hours\[0\]"),
    (dict(excluded_tariff_windows=("07:00-07:00",)), r"excluded_tariff_windows\[0\].*empty"),
    (dict(state_max_age_s=0), "state_max_age_s"),
])
def test_bad_config_is_refused_naming_the_setting(kwargs, field):
    with pytest.raises(PolicyConfigError, match=field):
        PolicyConfig(**kwargs)


def test_config_accepts_lists_and_freezes_them():
    config = PolicyConfig(quiet_hours=["22:00-06:00"])
    assert config.quiet_hours == ("22:00-06:00",)
    assert config.quiet_windows[0].length_s == 8 * 3600
    assert config == PolicyConfig(quiet_hours=("22:00-06:00",))


@pytest.mark.parametrize("change,field", [
    (dict(soc_pct=101), "soc_pct"), (dict(soc_pct=True), "soc_pct"),
    (dict(charge_limit_pct=0), "charge_limit_pct"), (dict(network="5g"), "network"),
    (dict(metered="no"), "metered"), (dict(parked=1), "parked"),
    (dict(departure_at=float("nan")), "departure_at"),
    (dict(charger_energy_wh=-1), "charger_energy_wh"),
])
def test_vehicle_state_is_validated(change, field):
    with pytest.raises(ValueError, match=f"VehicleState.{field}"):
        vs(**change)


# ------------------------------------------------------------------ energy

def test_energy_estimate_and_metering():
    assert estimate_wh(60, 0.5, 3600) == 30.0
    assert account(3600, power_w=60, cpu_share=0.5, meter_before=100.0,
                   meter_after=112.5) == EnergySample(12.5, True, 112.5)
    # no baseline yet, or a meter reset: estimate, and the reading becomes the baseline
    assert account(720, power_w=60, cpu_share=1.0, meter_before=None,
                   meter_after=5.0) == EnergySample(12.0, False, 5.0)
    assert account(720, power_w=60, cpu_share=1.0, meter_before=900.0,
                   meter_after=2.0) == EnergySample(12.0, False, 2.0)
    with pytest.raises(ValueError, match="busy_s"):
        estimate_wh(60, 0.5, -1)
