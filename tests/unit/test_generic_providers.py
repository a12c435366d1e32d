"""The generic live providers (p2pfleet/vehicle/generic.py, power_supply.py) and how the
node builds them from its config (p2pfleet/live/providers.py): real processes, a real HTTP
server on loopback, and sysfs trees built by the test."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import trio

from httpkit import RecordedServer
from p2pfleet.live.config import ConfigError, load_config
from p2pfleet.live.node import make_provider
from p2pfleet.vehicle.generic import JsonCommandProvider, JsonEndpointProvider
from p2pfleet.vehicle.live import observation
from p2pfleet.vehicle.power_supply import PowerSupplyProvider
from p2pfleet.core.policy import StateObserved, StateUnavailable

CAR = {"parked": True, "plugged_in": True, "soc_pct": 80, "charge_limit_pct": 90}
LINK = {"network": "wifi", "metered": False}


def py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


async def read(provider):
    await provider.poll_once()
    return observation(provider, time.time())


# ------------------------------------------------------------------ command

async def test_command_state_with_the_node_link_as_default():
    ev = await read(JsonCommandProvider(py(f"print({json.dumps(json.dumps(CAR))})"),
                                        defaults=LINK))
    assert isinstance(ev, StateObserved)
    assert (ev.vehicle_state.soc_pct, ev.vehicle_state.network) == (80, "wifi")


async def test_command_departure_as_iso_time_and_own_network():
    obj = {**CAR, "network": "cellular", "metered": True, "departure_at": "2030-01-01T07:30:00+01:00"}
    ev = await read(JsonCommandProvider(py(f"print({json.dumps(json.dumps(obj))})"), defaults=LINK))
    assert ev.vehicle_state.network == "cellular" and ev.vehicle_state.departure_at == 1893479400


@pytest.mark.parametrize("code, why", [
    ("print('{\"parked\": true}')", "command output: plugged_in: missing"),
    (f"print({json.dumps(json.dumps({**CAR, 'soc_pct': 140}))})", "soc_pct"),
    (f"print({json.dumps(json.dumps({**CAR, 'speed': 3}))})", "speed: unknown field"),
    ("print('[1, 2]')", "must print one JSON object, got list"),
    ("print('{\"parked\": NaN}')", "not JSON"),
    ("import sys; sys.exit(2)", "command: exit status 2"),
    ("print('x' * 100000)", "printed more than 65536 bytes"),
    ("import time; time.sleep(30)", "no complete answer within 1 s"),
])
async def test_command_failures_name_what_is_wrong(code, why):
    p = JsonCommandProvider(py(code), timeout_s=1.0, defaults=LINK)
    with trio.fail_after(10):
        ev = await read(p)
    assert isinstance(ev, StateUnavailable) and why in ev.why, ev.why
    assert ev.why.startswith("command: ")


async def test_missing_program():
    ev = await read(JsonCommandProvider(["/nonexistent/p2pfleet-test-program"]))
    assert "cannot run '/nonexistent/p2pfleet-test-program'" in ev.why


# ------------------------------------------------------------------ endpoint

async def test_endpoint_good_bad_and_hanging(nursery):
    server = RecordedServer()
    server.answer("/state", json.dumps(CAR).encode())
    await server.start(nursery)
    p = JsonEndpointProvider(server.url + "/state", timeout_s=0.5, defaults=LINK)
    assert isinstance(await read(p), StateObserved)
    assert p.health(time.time()).startswith("endpoint: ok, read")
    server.answer("/state", b"{}", status=503)
    ev = await read(p)
    assert isinstance(ev, StateUnavailable) and "HTTP 503" in ev.why
    server.answer("/state", b"x" * 70000)
    assert "over the 65536-byte limit" in (await read(p)).why
    server.misbehave("/state", "trickle")
    assert "no complete answer within 0.5 s" in (await read(p)).why
    assert p.failures == 3


async def test_endpoint_nobody_listening():
    p = JsonEndpointProvider("http://127.0.0.1:9/state", timeout_s=2)  # discard port: closed
    assert "ConnectError" in (await read(p)).why


# ------------------------------------------------------------------ power_supply

def supply(root: Path, name: str, **files: object) -> None:
    d = root / name
    d.mkdir(parents=True)
    for key, value in files.items():
        (d / key).write_text(f"{value}\n")


async def test_laptop_on_mains_and_on_battery(tmp_path):
    supply(tmp_path, "AC", type="Mains", online=1)
    supply(tmp_path, "BAT0", type="Battery", capacity=73, status="Charging", temp=312,
           charge_control_end_threshold=80)
    supply(tmp_path, "hidpp_battery_0", type="Battery", scope="Device", capacity=5, status="Discharging")
    p = PowerSupplyProvider(tmp_path, defaults=LINK)
    s = (await read(p)).vehicle_state
    assert (s.parked, s.plugged_in, s.soc_pct, s.charge_limit_pct, s.battery_temp_c) == (
        True, True, 73, 80, 31.2)
    assert "on mains, battery 73% charging" in p.health(time.time())
    (tmp_path / "AC" / "online").write_text("0\n")
    assert (await read(p)).vehicle_state.plugged_in is False


async def test_home_box_without_battery_runs_from_the_wall(tmp_path):
    tmp_path.joinpath("x").mkdir()  # some other supply dir without a type
    s = (await read(PowerSupplyProvider(tmp_path, defaults=LINK))).vehicle_state
    assert (s.plugged_in, s.soc_pct, s.charge_limit_pct) == (True, 100, 100)


@pytest.mark.parametrize("name, files, why", [
    ("BAT0", {"type": "Battery", "capacity": 140, "status": "Full"}, "capacity: 140 is outside 0..100"),
    ("BAT0", {"type": "Battery", "capacity": "lots"}, "capacity: not an integer"),
    ("BAT0", {"type": "Battery", "status": "Full"}, "capacity: missing"),
    ("BAT0", {"type": "Battery", "capacity": 50, "status": "Exploding"}, "unknown status"),
    ("AC", {"type": "Mains", "online": 2}, "online: 2 is outside 0..1"),
])
async def test_power_supply_impossible_values_name_the_file(tmp_path, name, files, why):
    supply(tmp_path, name, **files)
    ev = await read(PowerSupplyProvider(tmp_path, defaults=LINK))
    assert isinstance(ev, StateUnavailable) and why in ev.why and str(tmp_path / name) in ev.why


# ------------------------------------------------------------------ config

def config(tmp_path: Path, text: str):
    path = tmp_path / "config.toml"
    path.write_text(text)
    return load_config(path)


@pytest.mark.parametrize("text, key", [
    ('[vehicle]\nprovider = "vehicle_api"\n', "vehicle_api.base_url"),
    ('[vehicle]\nprovider = "vehicle_api"\n[vehicle_api]\nbase_url = "https://x"\n',
     "vehicle_api.vehicle"),
    ('[vehicle]\nprovider = "vehicle_api"\n[vehicle_api]\nbase_url = "https://x"\nvehicle = "V"\n',
     "vehicle_api.token_file"),
    ('[vehicle]\nprovider = "json_command"\n', "json_source.command"),
    ('[vehicle]\nprovider = "json_endpoint"\n', "json_source.url"),
    ('[vehicle]\nprovider = "json_endpoint"\n[json_source]\nurl = "ftp://x/y"\n', "json_source"),
    ('[vehicle]\nprovider = "power_supply"\n[power_supply]\nroot = "/nonexistent/ps"\n',
     "power_supply.root"),
])
def test_config_errors_name_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError) as err:
        make_provider(config(tmp_path, text))
    assert err.value.key == key and key.split(".")[0] in str(err.value)


def test_config_builds_each_provider(tmp_path):
    c = config(tmp_path, '[vehicle]\nprovider = "json_command"\nmetered = "no"\n'
                         '[json_source]\ncommand = ["cat", "state.json"]\ninterval_s = 5.0\n')
    p = make_provider(c)
    assert isinstance(p, JsonCommandProvider) and p.argv == ("cat", "state.json")
    assert p.interval_s == 5.0 and p.defaults == {"network": "ethernet", "metered": False}
