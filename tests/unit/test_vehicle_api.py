"""The vehicle-API provider (p2pfleet/vehicle/tesla.py) against recorded Fleet API answers
served by a real HTTP server on loopback (httpkit.py); no test contacts a real API.

A provider that fails, lies or times out must leave the node ineligible, with a status line
that says why: each such case ends in the policy saying `no_state` with the provider's reason.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import trio

from httpkit import RecordedServer
from p2pfleet.core.policy import Policy, PolicyConfig, StateObserved, StateUnavailable, Tick
from p2pfleet.vehicle.live import observation
from p2pfleet.vehicle.tesla import FleetApiProvider, save_token

VIN = "TEST00000000VIN01"
CAR = f"/api/1/vehicles/{VIN}"
DATA = f"{CAR}/vehicle_data"
DEFAULTS = {"network": "ethernet", "metered": False}


@pytest.fixture
def token(tmp_path: Path) -> Path:
    path = tmp_path / "vehicle-api.token"
    save_token(path, "test-access-token")
    return path


def provider(server: RecordedServer, token: Path, **kw) -> FleetApiProvider:
    kw = {"poll_s": 1.0, "timeout_s": 0.5, "idle_poll_s": 1800.0, **kw}
    return FleetApiProvider(server.url, VIN, token, defaults=DEFAULTS, **kw)


async def read(nursery, token: Path, car: str, data: str | None = None, **kw):
    server = RecordedServer()
    server.answer(CAR, f"fleet_api/vehicle_{car}.json")
    if data is not None:
        server.answer(DATA, f"fleet_api/data_{data}.json")
    await server.start(nursery)
    p = provider(server, token, **kw)
    await p.poll_once()
    return server, p


def ineligible_because(p: FleetApiProvider, *, after_good: bool = False) -> str:
    """Feed the policy what the node would, and return its one reason (asserting no_state)."""
    now = time.time()
    policy = Policy(PolicyConfig(resume_after_s=0))
    if after_good:  # the car was computing on a good reading a minute ago
        policy.handle(StateObserved(now - 60, _good_state()))
        policy.handle(Tick(now - 60))
        assert policy.computing
    ev = observation(p, now)
    assert isinstance(ev, StateUnavailable)
    policy.handle(ev)
    assert not policy.computing
    reasons = policy.reasons()
    assert [r.code for r in reasons] == ["no_state"]
    return reasons[0].text


def _good_state():
    from p2pfleet.vehicle.state import VehicleState
    return VehicleState(parked=True, plugged_in=True, soc_pct=80, charge_limit_pct=90,
                        network="ethernet", metered=False)


async def test_charging_car(token, nursery):
    server, p = await read(nursery, token, "online", "charging")
    s = p.state_at(time.time())
    assert (s.parked, s.plugged_in, s.soc_pct, s.charge_limit_pct) == (True, True, 62, 80)
    assert s.cabin_temp_c == 19.5 and s.departure_at == 1780389000
    assert (s.network, s.metered, s.charger_energy_wh) == ("ethernet", False, None)
    health = p.health(time.time())
    assert health.startswith("vehicle-api: ok") and "charging 11 kW" in health
    assert "+12.41 kWh" in health and "outside 11.5 C" in health
    path, headers = server.requests[-1]
    assert path.startswith(DATA) and headers["authorization"] == "Bearer test-access-token"
    await p.poll_once()  # charging: the car is awake anyway, so it is read every poll
    assert server.hits(DATA) == 2


async def test_full_car_is_read_rarely_so_it_can_sleep(token, nursery):
    server, p = await read(nursery, token, "online", "full")
    s = p.state_at(time.time())
    assert (s.parked, s.plugged_in, s.soc_pct) == (True, True, 80)
    assert "charge complete" in p.health(time.time())
    for _ in range(3):
        await p.poll_once()
    assert server.hits(CAR) == 4 and server.hits(DATA) == 1  # idle: once per idle_poll_s
    assert p.state_at(time.time()) == s


async def test_driving_car(token, nursery):
    _, p = await read(nursery, token, "online", "driving")
    s = p.state_at(time.time())
    assert (s.parked, s.plugged_in, s.soc_pct) == (False, False, 55)
    assert "driving, shift D" in p.health(time.time())
    now = time.time()
    policy = Policy(PolicyConfig(resume_after_s=0))
    policy.handle(observation(p, now))
    assert {"not_parked", "unplugged"} <= {r.code for r in policy.reasons()}


async def test_asleep_car_is_not_woken_and_has_no_state(token, nursery):
    server, p = await read(nursery, token, "asleep")
    assert p.state_at(time.time()) is None
    assert server.hits(DATA) == 0 and not any("wake_up" in r for r, _ in server.requests)
    assert "car asleep and not read recently; not waking it" in ineligible_because(p)
    assert p.failures == 0  # not a failure: no back-off
    assert p.next_delay() == p.interval_s


async def test_car_that_falls_asleep_keeps_its_last_reading(token, nursery):
    server, p = await read(nursery, token, "online", "full")
    before = p.state_at(time.time())
    server.answer(CAR, "fleet_api/vehicle_asleep.json")
    await p.poll_once()
    assert p.state_at(time.time()) == before and server.hits(DATA) == 1
    assert "asleep, not woken; last read 0 min ago: charge complete" in p.health(time.time())


async def test_offline_car(token, nursery):
    _, p = await read(nursery, token, "offline")
    assert "car offline" in ineligible_because(p)


async def test_server_error_forgets_the_last_reading_at_once(token, nursery):
    server, p = await read(nursery, token, "online", "charging")
    assert p.state_at(time.time()) is not None
    server.answer(CAR, b'{"error": "upstream"}', status=503)
    await p.poll_once()
    await p.poll_once()
    why = ineligible_because(p, after_good=True)
    assert "vehicle-api: failed 2 times in a row: vehicle-api: HTTP 503" in why
    assert p.next_delay() == 2 * p.interval_s  # backs off


@pytest.mark.parametrize("fixture, field", [
    ("lie_soc", "charge_state.battery_level is 140, outside 0..100"),
    ("lie_power", "charge_state.charger_power is -7, outside 0..1000"),
])
async def test_a_lying_car_is_trusted_for_nothing(token, nursery, fixture, field):
    _, p = await read(nursery, token, "online", fixture)
    assert p.state_at(time.time()) is None
    assert f"impossible value: {field}" in ineligible_because(p, after_good=True)


@pytest.mark.parametrize("behaviour", ["hang", "trickle"])
async def test_a_server_that_hangs_or_trickles_is_cut_off(token, nursery, behaviour):
    server = RecordedServer()
    server.misbehave(CAR, behaviour)
    await server.start(nursery)
    p = provider(server, token, timeout_s=0.5)
    with trio.fail_after(5):  # the provider's own deadline ends it, not this one
        await p.poll_once()
    assert "no complete answer within 0.5 s" in ineligible_because(p)


async def test_refused_token_and_rate_limit(token, nursery):
    server = RecordedServer()
    server.answer(CAR, b'{"error": "invalid bearer token"}', status=401)
    await server.start(nursery)
    p = provider(server, token)
    await p.poll_once()
    assert "HTTP 401" in ineligible_because(p) and "renew it" in p.health(time.time())
    server.answer(CAR, b'{"error": "too many requests"}', status=429)
    await p.poll_once()
    assert p.next_delay() >= 300  # rate limited: wait well beyond the poll interval


async def test_a_token_others_can_read_is_refused_before_any_request(token, nursery):
    server = RecordedServer()
    server.answer(CAR, "fleet_api/vehicle_online.json")
    await server.start(nursery)
    os.chmod(token, 0o640)
    p = provider(server, token)
    await p.poll_once()
    assert server.requests == []
    assert f"token file {token} has mode 0640" in ineligible_because(p)
    assert oct(os.stat(token).st_mode & 0o777) == "0o640"


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="base_url"):
        FleetApiProvider("ftp://x", VIN, "/nonexistent")
    with pytest.raises(ValueError, match="vehicle must be"):
        FleetApiProvider("https://fleet-api.example", "a/b", "/nonexistent")


async def test_car_asleep_between_the_two_requests(token, nursery):
    server = RecordedServer()
    server.answer(CAR, "fleet_api/vehicle_online.json")
    server.answer(DATA, b'{"response": null, "error": "vehicle unavailable"}', status=408)
    await server.start(nursery)
    p = provider(server, token)
    await p.poll_once()
    assert "car unavailable (asleep or offline); not waking it" in ineligible_because(p)
    assert p.failures == 0
