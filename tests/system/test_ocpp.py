"""A real node (`p2pfleet node start`, its own process) with the OCPP provider, and a
simulated charge point built with the `ocpp` package's ChargePoint class connecting to it
over loopback: plug-in, charging, suspended (car full), unplug. The node's policy state
(`node status` over the control socket) and its capacity record follow; a charger with
the wrong id or password is refused at the handshake; a charger that lies leaves the node
out with the reason in its status. With security profile 2 the charger connects over TLS
only."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
from websockets.exceptions import InvalidStatus

from p2pfleet.live.localfleet import LocalFleet, wait_for

sys.path.insert(0, str(Path(__file__).parents[1] / "integration"))  # ocppkit, workerkit
from ocppkit import SimCharger  # noqa: E402

pytestmark = pytest.mark.system
PASSWORD = "correct-horse-battery"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def car(tmp_path):
    port = free_port()
    f = LocalFleet(tmp_path / "f", 1, network="systest", settings={
        "vehicle.provider": "ocpp", "vehicle.charge_limit_pct": "80",
        "ocpp.listen": f"127.0.0.1:{port}", "ocpp.charge_point_ids": "CP1",
        "ocpp.password": PASSWORD})
    f.init()
    node = f.nodes[0]
    node.start(f.network, [])  # out of the mesh until the charger says the car is there
    try:
        wait_for(lambda: f._check_alive(node) and node.try_ask("status"), 60, "the node")
        yield node, f"ws://127.0.0.1:{port}/ocpp"
    finally:
        f.stop()


def status_where(node, pred, what: str, timeout: float = 30):
    return wait_for(lambda: (s := node.ask("status")) and pred(s) and s, timeout, what)


def codes(s: dict) -> list[str]:
    return [r["code"] for r in s["reasons"]]


def test_the_node_follows_a_charging_session(car):
    node, url = car
    s = node.ask("status")
    assert codes(s) == ["no_state"] and "charger CP1 has not connected yet" in s["vehicle"]

    for cp_id, password, code in (("CP2", PASSWORD, 404), ("CP1", "guess", 401)):
        with pytest.raises(InvalidStatus) as e:
            SimCharger(url, cp_id, password).connect()
        assert e.value.response.status_code == code

    c = SimCharger(url, "CP1", PASSWORD)
    try:
        c.connect()
        c.boot()
        c.status("Available")
        s = status_where(node, lambda s: "not_parked" in codes(s), "the car to be away")
        assert codes(s) == ["not_parked", "unplugged"] and not s["in_mesh"]
        assert s["vehicle"] == "ocpp: ok, no car at CP1"

        c.status("Preparing")  # plugged in; a charger sends no state of charge yet
        s = status_where(node, lambda s: codes(s) == ["battery_low"], "plugged in, SoC unknown")
        assert s["vehicle"] == "ocpp: ok, Preparing (SoC unknown)"

        tx = c.start_transaction(10_000)
        c.status("Charging")
        c.meter(tx, wh=10_500, w=7400, soc=70)
        s = status_where(node, lambda s: s["computing"] and s["record_state"] == "available",
                         "the car to compute while charging above the floor", 60)
        assert s["in_mesh"] and s["vehicle"] == "ocpp: ok, Charging (SoC 70 %, 7400 W)"
        joins = s["mesh_joins"]

        c.status("SuspendedEV")  # full at its 80 % limit: stays in
        c.meter(tx, wh=16_000)
        c.meter(tx, wh=16_010)
        s = status_where(node, lambda s: "SuspendedEV" in s["vehicle"], "the car full")
        assert s["computing"] and s["in_mesh"] and s["mesh_joins"] == joins

        c.stop_transaction(tx, 16_020)
        c.status("Finishing")
        c.status("Available")  # unplugged and gone
        s = status_where(node, lambda s: not s["computing"] and not s["in_mesh"],
                         "the car to leave the mesh when unplugged")
        assert codes(s) == ["not_parked", "unplugged"]
        assert s["record_state"] == "offline" and s["mesh_leaves"] >= 1

        c.status("Preparing")
        c.meter(None, soc=150)  # a lie: trusted for nothing
        s = status_where(node, lambda s: codes(s) == ["no_state"], "the lie to be refused")
        assert "impossible value: SoC 150 %" in s["reasons"][0]["text"]
        assert "impossible value: SoC 150 %" in s["vehicle"]
    finally:
        c.close()
    s = node.ask("status")  # the lie is held against the charger, connected or not
    assert codes(s) == ["no_state"] and not s["in_mesh"]


def test_a_taken_ocpp_port_stops_the_node_with_a_clear_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        f = LocalFleet(tmp_path / "f", 1, network="systest", settings={
            "vehicle.provider": "ocpp", "ocpp.listen": f"127.0.0.1:{port}",
            "ocpp.charge_point_ids": "CP1"})
        f.init()
        node = f.nodes[0]
        node.start(f.network, [])
        assert node.proc.wait(60) != 0
    out = node.output()
    assert f"OCPP server (ocpp.listen) cannot listen on 127.0.0.1:{port}" in out, out[-2000:]
    assert "Traceback" not in out, out[-3000:]


def test_config_show_hides_the_charger_password(tmp_path):
    import subprocess

    from p2pfleet.live.localfleet import P2PFLEET

    for fmt in ((), ("--json",)):
        out = subprocess.run([*P2PFLEET, "--data-dir", str(tmp_path / "d"), *fmt, "-s",
                              f"ocpp.password={PASSWORD}", "config", "show"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert PASSWORD not in out.stdout and "<hidden>" in out.stdout


def test_the_ledger_energy_is_the_chargers_reading_while_the_car_is_full(tmp_path):
    """A real publisher (`p2pfleet job serve`) and the OCPP node: while the car is full a
    reading the charger sends during the shard is that shard's energy, marked metered."""
    import json
    import signal
    import subprocess

    import numpy as np
    from pubkit import pub_args, try_attach
    from workerkit import mlp_model

    from p2pfleet.live.localfleet import P2PFLEET

    port = free_port()
    f = LocalFleet(tmp_path / "f", 1, network="ocppjob", settings={
        "vehicle.provider": "ocpp", "vehicle.charge_limit_pct": "80",
        "ocpp.listen": f"127.0.0.1:{port}", "ocpp.charge_point_ids": "CP1",
        "publishers.serve_anyone": "true", "publishers.retry_base_s": "1",
        "policy.max_threads": "1"})
    f.init()
    node = f.nodes[0]
    node.start(f.network, [])
    c = SimCharger(f"ws://127.0.0.1:{port}", "CP1")
    serve = None
    try:
        wait_for(lambda: f._check_alive(node) and node.try_ask("status"), 60, "the node")
        c.connect()
        tx = c.start_transaction(40_000)
        c.status("SuspendedEV")
        c.meter(tx, wh=41_000)  # the first reading while full: the baseline
        s = status_where(node, lambda s: s["in_mesh"] and s["listen_addrs"], "the mesh", 60)
        pub_root = tmp_path / "pub"
        serve = subprocess.Popen(
            pub_args(pub_root, f.network, {"publishing.request_interval_s": "0.2",
                                           "publishing.announce_interval_s": "1",
                                           "publishing.cross_class_wait_s": "1"},
                     "job", "serve", "--listen", "/ip4/127.0.95.1/tcp/0",
                     "--bootstrap", s["listen_addrs"][0], "--trust", node.peer_id),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        client = wait_for(lambda: try_attach(pub_root / "publisher"), 60, "the publisher")
        model = mlp_model(seed=8, n_in=512, hidden=4096, n_out=8)  # ~9 GFLOP a shard
        x = np.random.default_rng(8).standard_normal((2048, 512)).astype(np.float32)
        job = client.submit(model, x, shard_size=2048, micro_batch=256, quorum=1,
                            recheck_rate=0.0, audit_rate=0.0, known_answer_rate=0.0)
        status_where(node, lambda s: s["work"] and s["work"]["running"], "the shard to run",
                     120)
        # the full car drew 12.5 Wh while the shard ran (it computes for seconds: the
        # reading lands inside it)
        c.meter(tx, wh=41_012.5)
        done = client.wait(job, timeout=240)
        assert done["state"] == "done", done
        out = subprocess.run([*P2PFLEET, "--data-dir", str(node.data_dir), "--json", "ledger"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        (pub,) = json.loads(out.stdout)["publishers"]
        assert pub["energy_kwh"] == {"metered": 0.0125, "estimated": 0.0}, pub
    finally:
        if serve is not None:
            serve.send_signal(signal.SIGTERM)
            serve.wait(30)
        c.close()
        f.stop()


def test_a_node_with_security_profile_2_takes_its_charger_over_tls_only(tmp_path):
    """Profile 2: the charger connects over wss:// with the node's certificate (made by the
    test, signed by a CA the charger trusts) and the password; a wrong password and plain
    ws:// are refused. A key file others can read stops the node, naming the file."""
    from certkit import make_pki
    from websockets.exceptions import InvalidMessage

    pki = make_pki(tmp_path / "pki")
    port = free_port()
    tls = {"vehicle.provider": "ocpp", "ocpp.listen": f"127.0.0.1:{port}",
           "ocpp.charge_point_ids": "CP1", "ocpp.password": PASSWORD,
           "ocpp.security_profile": "2", "ocpp.tls_cert_file": str(pki.server.cert),
           "ocpp.tls_key_file": str(pki.server.key)}
    f = LocalFleet(tmp_path / "f", 1, network="systest", settings=tls)
    f.init()
    node = f.nodes[0]
    node.start(f.network, [])
    url = f"wss://127.0.0.1:{port}/ocpp"
    c = SimCharger(url, "CP1", PASSWORD, ssl_context=pki.charger_context())
    try:
        wait_for(lambda: f._check_alive(node) and node.try_ask("status"), 60, "the node")
        for charger, refusal in (
                (SimCharger(url, "CP1", "wrong-password-123",
                            ssl_context=pki.charger_context()), InvalidStatus),
                (SimCharger(url.replace("wss:", "ws:"), "CP1", PASSWORD), InvalidMessage)):
            try:
                with pytest.raises(refusal):
                    charger.connect()
            finally:
                charger.close()
        assert "charger CP1 has not connected yet" in node.ask("status")["vehicle"]
        c.connect()
        c.boot()
        c.status("Available")
        status_where(node, lambda s: s["vehicle"] == "ocpp: ok, no car at CP1",
                     "the charger over TLS")
    finally:
        c.close()
        f.stop()

    pki.server.key.chmod(0o644)
    f = LocalFleet(tmp_path / "g", 1, network="systest", settings=tls)
    f.init()
    node = f.nodes[0]
    node.start(f.network, [])
    try:
        assert node.proc.wait(60) != 0
    finally:
        f.stop()
    out = node.output()
    assert f"ocpp.tls_key_file: {pki.server.key} has mode 0644" in out, out[-2000:]
    assert "Traceback" not in out, out[-3000:]
