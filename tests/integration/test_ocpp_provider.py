"""The OCPP provider over real websockets: a simulated charge point (the `ocpp` package's
own ChargePoint) talks to the provider's central system on loopback. Honest sessions,
and hostile or broken chargers: each leaves the provider without a state (the node then
stays ineligible) and says why, and the server stays up for the next charger."""

from __future__ import annotations


import pytest
import trio
from websockets.exceptions import InvalidStatus

from ocppkit import SimCharger
from p2pfleet.vehicle.ocpp import OcppProvider, OcppSettings
from p2pfleet.vehicle.providers import StaticProvider


class Clock:
    """Wall time the test can move forward (the provider's only clock)."""

    def __init__(self) -> None:
        self.t = 1_800_000_000.0

    def __call__(self) -> float:
        return self.t


def base() -> StaticProvider:
    return StaticProvider.from_config({"charge_limit_pct": 80.0, "network": "wifi",
                                       "metered": False})


async def start(nursery: trio.Nursery, clock: Clock, **kw) -> tuple[OcppProvider, str]:
    settings = OcppSettings(charge_point_ids=kw.pop("ids", ("CP1",)), port=0, **kw)
    provider = OcppProvider(settings, base(), clock=clock)
    host, port = await nursery.start(provider.run)
    return provider, f"ws://{host}:{port}/ocpp"


async def sim(url: str, cp_id: str = "CP1", password: str = "") -> SimCharger:
    charger = SimCharger(url, cp_id, password)
    await trio.to_thread.run_sync(charger.connect)
    return charger


async def do(fn, *args, **kw):
    return await trio.to_thread.run_sync(lambda: fn(*args, **kw))


async def wait_until(pred, timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.02)


async def test_a_session_walks_through_plugged_charging_full_unplugged():
    clock = Clock()
    async with trio.open_nursery() as nursery:
        p, url = await start(nursery, clock)
        assert p.state_at(clock()) is None
        assert "has not connected yet" in p.unavailable_why(clock())
        c = await sim(url)
        await do(c.boot)
        await do(c.status, "Available")
        s = p.state_at(clock())
        assert (s.parked, s.plugged_in) == (False, False)
        await do(c.status, "Preparing")
        s = p.state_at(clock())
        assert (s.parked, s.plugged_in, s.soc_pct) == (True, True, 0.0)  # SoC unknown
        tx = await do(c.start_transaction, 1000)
        await do(c.status, "Charging")
        await do(c.meter, tx, wh=1500, w=7400, soc=55)
        s = p.state_at(clock())
        assert (s.plugged_in, s.soc_pct, s.charger_energy_wh) == (True, 55.0, None)
        assert "Charging (SoC 55 %, 7400 W)" in p.health(clock())
        await do(c.status, "SuspendedEV")
        await do(c.meter, tx, wh=9000, soc=80)      # first reading while full: the baseline
        await do(c.meter, tx, wh=9012.5, soc=80)    # the car's own draw while full
        s = p.state_at(clock())
        assert (s.soc_pct, s.charger_energy_wh) == (80.0, 12.5)
        await do(c.status, "Charging")                # tops up: not counted
        await do(c.meter, tx, wh=9500)
        assert p.state_at(clock()).charger_energy_wh is None
        await do(c.status, "SuspendedEV")
        await do(c.meter, tx, wh=9510)
        await do(c.meter, tx, wh=9517.5)
        assert p.state_at(clock()).charger_energy_wh == 20.0
        await do(c.stop_transaction, tx, 9520)
        await do(c.status, "Finishing")
        assert p.state_at(clock()).plugged_in
        await do(c.status, "Available")
        s = p.state_at(clock())
        assert (s.parked, s.plugged_in, s.network, s.metered) == (False, False, "wifi", False)
        await do(c.close)
        await wait_until(lambda: p.state_at(clock()) is None)
        assert "disconnected" in p.unavailable_why(clock())
        nursery.cancel_scope.cancel()


async def test_full_car_without_soc_counts_at_its_charge_limit():
    clock = Clock()
    async with trio.open_nursery() as nursery:
        p, url = await start(nursery, clock)
        c = await sim(url)
        await do(c.status, "Charging")
        assert p.state_at(clock()).soc_pct == 0.0
        await do(c.status, "SuspendedEV")
        assert p.state_at(clock()).soc_pct == 80.0
        await do(c.close)
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("send, why", [
    (lambda c, tx: c.meter(tx, soc=140), "impossible value: SoC 140 %"),
    (lambda c, tx: c.meter(tx, w=-5), "impossible value: power -5 W"),
    (lambda c, tx: c.meter(tx, wh=-1), "impossible value: energy register Wh -1"),
    (lambda c, tx: c.meter(tx, wh=500), "energy register went back from 1000 to 500 Wh"),
    (lambda c, tx: c.stop_transaction(tx, 10), "meterStop 10 Wh is below"),
    (lambda c, tx: c.send_raw("this is not OCPP"), "garbage frame"),
    (lambda c, tx: c.send_raw('[2, "1", "MeterValues", {"connectorId": 1, "meterValue": '
                              '[{"timestamp": "2026-01-01T00:00:00Z", "sampledValue": '
                              '[{"value": "lots", "measurand": "SoC"}]}]}]'),
     "SoC % 'lots' is not a number"),
    (lambda c, tx: c.send_raw(b"\x00\x01binary"), "garbage frame"),
    (lambda c, tx: c.send_raw('[2, "m1", "StatusNotification", {"connectorId": 1}]'),
     "malformed StatusNotification"),
])
async def test_an_impossible_value_leaves_no_state_for_the_hold_time(send, why):
    clock = Clock()
    async with trio.open_nursery() as nursery:
        p, url = await start(nursery, clock, violation_hold_s=600.0)
        c = await sim(url)
        await do(c.status, "Charging")
        tx = await do(c.start_transaction, 1000)
        await do(c.meter, tx, wh=1000, soc=70)
        assert p.state_at(clock()).soc_pct == 70.0
        await do(send, c, tx)
        await wait_until(lambda: p.state_at(clock()) is None)
        assert why in p.unavailable_why(clock()), p.unavailable_why(clock())
        assert why in p.health(clock())
        await do(c.heartbeat)                         # still connected, still answered
        clock.t += 599
        await do(c.heartbeat)
        assert p.state_at(clock()) is None
        assert p.next_change_after(clock()) == pytest.approx(clock.t + 1)
        clock.t += 1
        assert p.state_at(clock()).soc_pct == 70.0    # honest since: trusted again
        await do(c.close)
        nursery.cancel_scope.cancel()


async def test_a_silent_charger_leaves_no_state():
    clock = Clock()
    async with trio.open_nursery() as nursery:
        p, url = await start(nursery, clock, heartbeat_s=30, silent_after_s=90.0)
        c = await sim(url)
        await do(c.status, "SuspendedEV")
        assert p.state_at(clock()).plugged_in
        assert p.next_change_after(clock()) == pytest.approx(clock.t + 90, abs=0.01)
        clock.t += 91
        assert p.state_at(clock()) is None
        assert p.unavailable_why(clock()) == "ocpp: charger CP1 silent for 91 s"
        await do(c.heartbeat)
        assert p.state_at(clock()).plugged_in
        await do(c.close)
        nursery.cancel_scope.cancel()


async def test_unknown_id_and_wrong_password_are_refused_at_the_handshake():
    clock = Clock()
    async with trio.open_nursery() as nursery:
        p, url = await start(nursery, clock, password="s3cret-key-0123")
        with pytest.raises(InvalidStatus) as e:
            await sim(url, "CP-EVIL", "s3cret-key-0123")
        assert e.value.response.status_code == 404
        for pw in ("", "wrong"):
            with pytest.raises(InvalidStatus) as e:
                await sim(url, "CP1", pw)
            assert e.value.response.status_code == 401
        assert "has not connected yet" in p.unavailable_why(clock())
        c = await sim(url, "CP1", "s3cret-key-0123")  # 3 refused so far: still let in
        await do(c.status, "Preparing")
        assert p.state_at(clock()).plugged_in
        await do(c.close)
        nursery.cancel_scope.cancel()


async def test_a_flooding_charger_is_cut_off_and_the_server_stays_up():
    clock = Clock()
    async with trio.open_nursery() as nursery:
        p, url = await start(nursery, clock)
        c = await sim(url)
        await do(c.status, "SuspendedEV")

        def flood():
            for i in range(400):
                if c.closed:
                    return
                try:
                    c.send_raw(f'[2, "f{i}", "Heartbeat", {{}}]')
                except Exception:
                    return

        await do(flood)
        await wait_until(lambda: "flooding" in p.unavailable_why(clock()))
        await wait_until(lambda: c.closed)
        assert p.state_at(clock()) is None
        c2 = await sim(url)                             # the server still serves
        await do(c2.heartbeat)
        await do(c.close)
        await do(c2.close)
        nursery.cancel_scope.cancel()


async def test_an_oversized_frame_ends_the_connection():
    clock = Clock()
    async with trio.open_nursery() as nursery:
        p, url = await start(nursery, clock)
        c = await sim(url)
        await do(c.status, "Preparing")
        try:
            await do(c.send_raw, "[" + " " * 100_000 + "]")
        except Exception:
            pass
        await wait_until(lambda: p.state_at(clock()) is None)
        assert "disconnected" in p.unavailable_why(clock())
        await do(c.close)
        nursery.cancel_scope.cancel()


async def test_two_chargers_the_one_with_the_car_counts():
    clock = Clock()
    async with trio.open_nursery() as nursery:
        p, url = await start(nursery, clock, ids=("HOME", "WORK"))
        home = await sim(url, "HOME")
        await do(home.status, "Available")
        assert "WORK has not connected yet" in p.unavailable_why(clock())
        await do(home.status, "SuspendedEV")
        assert p.state_at(clock()).plugged_in   # the car is at home: WORK does not matter
        await do(home.close)
        nursery.cancel_scope.cancel()


async def test_a_taken_port_is_a_clear_error():
    clock = Clock()
    async with trio.open_nursery() as nursery:
        p, url = await start(nursery, clock)
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        other = OcppProvider(OcppSettings(charge_point_ids=("CP1",), port=port), base(),
                             clock=clock)
        from p2pfleet.vehicle.ocpp import OcppServerError
        with pytest.raises(OcppServerError, match=f"cannot listen on 127.0.0.1:{port}"):
            await other.run()
        nursery.cancel_scope.cancel()


async def test_answers_to_calls_never_made_are_dropped_not_queued():
    clock = Clock()
    async with trio.open_nursery() as nursery:
        p, url = await start(nursery, clock)
        c = await sim(url)
        for i in range(20):
            await do(c.send_raw, f'[3, "nobody-asked-{i}", {{}}]')
        await do(c.send_raw, '[2, "u1", "NoSuchAction", {}]')  # answered NotImplemented
        await do(c.status, "Preparing")  # still served, in order
        assert p.state_at(clock()).plugged_in
        assert p.unavailable_why(clock()) == "ocpp: no state"  # and no violation held
        assert p.system.points["CP1"]._response_queue.qsize() == 0
        await do(c.close)
        nursery.cancel_scope.cancel()


async def test_an_ocpp_201_session_walks_through_the_same_states():
    from ocppkit import SimCharger201

    clock = Clock()
    async with trio.open_nursery() as nursery:
        p, url = await start(nursery, clock, password="pw-0123456789")
        c = SimCharger201(url, "CP1", "pw-0123456789")
        await do(c.connect)
        assert c.ws.subprotocol == "ocpp2.0.1"
        await do(c.boot)
        await do(c.connector, "Available")
        s = p.state_at(clock())
        assert (s.parked, s.plugged_in) == (False, False)
        await do(c.connector, "Occupied")
        s = p.state_at(clock())
        assert (s.plugged_in, s.soc_pct) == (True, 0.0)
        await do(c.event, "Started", "tx-1", "Charging", wh=2000, w=11000, soc=40)
        s = p.state_at(clock())
        assert (s.soc_pct, s.charger_energy_wh) == (40.0, None)
        assert "Charging (SoC 40 %, 11000 W)" in p.health(clock())
        await do(c.event, "Updated", "tx-1", "SuspendedEV", wh=30_000, soc=80)
        await do(c.event, "Updated", "tx-1", None, wh=30_004.5)
        s = p.state_at(clock())
        assert (s.soc_pct, s.charger_energy_wh) == (80.0, 4.5)
        assert await do(c.event, "Updated", "tx-1", None, wh=10) is None  # went back: refused
        assert "energy register went back from 30004.5 to 10 Wh" in p.unavailable_why(clock())
        clock.t += 901
        await do(c.event, "Ended", "tx-1", None, wh=30_010)
        assert p.state_at(clock()).plugged_in  # Finishing: still plugged in
        await do(c.connector, "Available")
        assert not p.state_at(clock()).plugged_in
        await do(c.connector, "Faulted")
        assert "reports Faulted" in p.unavailable_why(clock())
        await do(c.close)
        nursery.cancel_scope.cancel()


async def test_guessing_the_password_is_throttled():
    clock = Clock()
    async with trio.open_nursery() as nursery:
        p, url = await start(nursery, clock, password="s3cret-key-0123")
        codes = []
        for i in range(7):
            with pytest.raises(InvalidStatus) as e:
                await sim(url, "CP1", f"guess-{i}")
            codes.append(e.value.response.status_code)
        assert codes == [401] * 5 + [429] * 2
        with pytest.raises(InvalidStatus) as e:  # even the right one waits out the window
            await sim(url, "CP1", "s3cret-key-0123")
        assert e.value.response.status_code == 429
        nursery.cancel_scope.cancel()
