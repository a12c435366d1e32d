"""vehicle/ocpp/charger.py without sockets: what a charger's messages say about the car,
and that a refused message changes nothing but the violation it records."""

from __future__ import annotations

import copy

import pytest

from p2pfleet.vehicle.ocpp.charger import ChargerTracker, ChargerViolation

T0 = 1_800_000_000.0


def connected() -> ChargerTracker:
    t = ChargerTracker("CP1", silent_after_s=180, violation_hold_s=900)
    t.on_connect(T0)
    return t


def test_a_refused_meter_value_changes_nothing_else():
    t = connected()
    t.status(T0, 1, "SuspendedEV", "NoError")
    t.start_transaction(T0, 1, 1000, 7)
    t.meter_values(T0, 1, 7, [{"value": "1000"}, {"value": "70", "measurand": "SoC"}])
    before = copy.deepcopy(t.connectors)
    with pytest.raises(ChargerViolation, match="SoC 101 %"):
        # a good register in the same message is not applied either
        t.meter_values(T0 + 1, 1, 7, [{"value": "1500"}, {"value": "101", "measurand": "SoC"}])
    assert t.connectors == before
    assert t.problem(T0 + 1) == "charger CP1: impossible value: SoC 101 %"
    t.heard(T0 + 900)  # a heartbeat
    assert t.problem(T0 + 901) is None


def test_the_full_car_counter_grows_only_between_readings_taken_while_full():
    t = connected()
    t.start_transaction(T0, 1, 0, 1)
    t.status(T0, 1, "Charging", "NoError")
    t.meter_values(T0, 1, 1, [{"value": "5", "unit": "kWh"}])
    t.status(T0, 1, "SuspendedEV", "NoError")
    t.meter_values(T0, 1, 1, [{"value": "5010"}])       # baseline: the last one was charging
    assert t.view(T0).full_wh == 0.0
    t.meter_values(T0, 1, 1, [{"value": "5.02", "unit": "kWh"}])
    assert t.view(T0).full_wh == pytest.approx(10.0)
    t.meter_values(T0, 1, 1, [{"value": "5030", "phase": "L1"}])  # per phase: ignored
    assert t.view(T0).full_wh == pytest.approx(10.0)


@pytest.mark.parametrize("connector, status, words", [
    (1, "Faulted", "reports Faulted (GroundFailure)"),
    (0, "Unavailable", "reports Unavailable"),
])
def test_a_broken_charger_gives_no_state(connector, status, words):
    t = connected()
    t.status(T0, connector, status, "GroundFailure")
    assert words in t.view(T0).problem


@pytest.mark.parametrize("call, words", [
    (lambda t: t.status(T0, 1, "Exploding", "NoError"), "status 'Exploding'"),
    (lambda t: t.status(T0, 99, "Charging", "NoError"), "connector id 99"),
    (lambda t: t.meter_values(T0, 1, None, [{"value": "1", "unit": "MWh"}]), "energy in 'MWh'"),
    (lambda t: t.meter_values(T0, 1, None, [{"value": "2", "measurand": "Power.Active.Import",
                                             "unit": "MW"}]), "power in 'MW'"),
    (lambda t: t.meter_values(T0, 1, None, [{"value": "nan"}]), "'nan'"),
    (lambda t: t.meter_values(T0, 1, None, [{"value": "2e6",
                                             "measurand": "Power.Active.Import"}]),
     "power 2e+06 W"),
    (lambda t: t.start_transaction(T0, 1, -5, 1), "meterStart Wh -5"),
])
def test_impossible_values_are_named(call, words):
    t = connected()
    with pytest.raises(ChargerViolation, match="impossible value"):
        call(t)
    assert words in t.problem(T0)


def test_silence_and_disconnection_are_named():
    t = ChargerTracker("CP1", silent_after_s=180)
    assert t.problem(T0) == "charger CP1 has not connected yet"
    t.on_connect(T0)
    assert t.problem(T0 + 180) is None
    assert t.problem(T0 + 181) == "charger CP1 silent for 181 s"
    t.on_disconnect(T0 + 200)
    assert t.problem(T0 + 230) == "charger CP1 disconnected 30 s ago"
