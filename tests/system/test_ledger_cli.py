"""`p2pfleet ledger` and `node init`'s publisher choice, as real processes on a real data dir
whose ledger holds real signed leases and receipts."""

from __future__ import annotations

import csv
import dataclasses
import json
import sqlite3
import time
from pathlib import Path

import pytest

from p2pfleet.identity import Identity, load_key
from p2pfleet.store.ledger import Ledger
from p2pfleet.wire.envelope import open_envelope, seal
from p2pfleet.wire.kinds import LeaseBatch, Receipt
from p2pfleet.wire.samples import sample_body
from test_cli import PUBLISHER, fails, run, run_json

pytestmark = pytest.mark.system

NET = "testnet"
HOUR = 3_600_000
NOW = int(time.time() * 1000) - HOUR  # recent: `ledger` counts unpaid work of the last 7 days
PUB_A = Identity.from_seed(b"cli publisher A")
PUB_B = Identity.from_seed(b"cli publisher B")
JOB = b"J" * 16


def lid(i: int) -> bytes:
    return bytes([i]) * 16


def fill_ledger(dd: Path) -> None:
    """Leases from two publishers, delivered results, receipts and energy, all signed."""
    me = load_key(dd / "key")
    base = sample_body("lease_batch").leases[0]
    with Ledger(dd / "ledger.sqlite") as led:
        for pub, ids, credit in ((PUB_A, [1, 2, 3], 100), (PUB_B, [4], 7)):
            leases = tuple(dataclasses.replace(base, lease_id=lid(i), job_id=JOB, shard=i,
                                               credit=credit) for i in ids)
            body = LeaseBatch(req_id=b"r" * 16, exp=NOW + 60_000, worker=me.public_key,
                              leases=leases)
            led.add_leases(pub.public_key, open_envelope(seal(body, pub, NET), NET), NOW)
            for i in ids:
                res = dataclasses.replace(sample_body("result"), lease_id=lid(i), job_id=JOB,
                                          shard=i, output_digest=bytes([i]) * 32,
                                          elapsed_ms=60_000, exp=NOW + 24 * HOUR)
                item = led.enqueue(pub.public_key, lid(i), "result", seal(res, me, NET),
                                   res.exp, NOW, output_digest=res.output_digest,
                                   elapsed_ms=res.elapsed_ms)
                led.delivered(item, NOW + 1000)
        for pub, i, credit in ((PUB_A, 1, 100), (PUB_A, 2, 80), (PUB_B, 4, 7)):
            r = Receipt(lease_id=lid(i), job_id=JOB, shard=i, worker=me.public_key,
                        output_digest=bytes([i]) * 32, credit=credit, at=NOW + 2000)
            assert led.add_receipt(open_envelope(seal(r, pub, NET), NET), NOW + 3000) == "new"
        led.add_energy(PUB_A.public_key, NOW, 2500, metered=False)
        led.add_energy(PUB_B.public_key, NOW, 400, metered=True)


@pytest.fixture
def node(tmp_path) -> Path:
    dd = tmp_path / "node"
    run("--network", NET, "node", "init", "--anyone", data_dir=dd)
    fill_ledger(dd)
    return dd


def test_table_and_json_per_publisher_never_summed(node):
    out = run("ledger", data_dir=node).stdout
    assert PUB_A.peer_id in out and PUB_B.peer_id in out
    assert "promised 300, paid 180, unpaid 120" in out  # lease 3 unpaid, lease 2 short 20
    assert "promised 7, paid 7, unpaid 0" in out
    assert "187" not in out  # never paid A + paid B
    assert "4 of 4" not in out and "3 of 3 stored receipts verify" in out
    assert "all days" in out and "kWh estimated" in out

    data = run_json("ledger", data_dir=node)
    by = {p["publisher"]: p for p in data["publishers"]}
    a, b = by[PUB_A.peer_id], by[PUB_B.peer_id]
    assert a["credit"] == {"promised": 300, "paid": 180, "unpaid": 120}
    assert a["results_delivered"] == 3 and a["receipts"] == 2 and a["compute_ms"] == 180_000
    assert a["energy_kwh"] == {"metered": 0.0, "estimated": 0.0025}
    assert b["energy_kwh"] == {"metered": 0.0004, "estimated": 0.0}
    assert sum(d["credit_paid"] for d in a["days"]) == 180
    assert sum(d["energy_kwh"]["estimated"] for d in a["days"]) == 0.0025
    assert data["receipts_checked"] == 3 and data["receipts_failed"] == []
    only_b = run_json("ledger", "--publisher", PUB_B.peer_id, data_dir=node)
    assert [p["publisher"] for p in only_b["publishers"]] == [PUB_B.peer_id]


def test_export_csv_and_json_then_verify_offline(node, tmp_path):
    csv_file, json_file = tmp_path / "r.csv", tmp_path / "r.json"
    run("ledger", "--export", "csv", "--out", csv_file, data_dir=node)
    run("ledger", "--export", "json", "--out", json_file, data_dir=node)
    rows = list(csv.DictReader(csv_file.open()))
    assert len(rows) == 3 and {r["publisher"] for r in rows} == {PUB_A.peer_id, PUB_B.peer_id}
    assert {"lease_id", "job_id", "shard", "worker", "output_digest", "credit", "at",
            "envelope", "publisher_key", "network"} <= set(rows[0])
    # anyone with the publisher key can check an exported receipt by hand
    opened = open_envelope(bytes.fromhex(rows[0]["envelope"]), rows[0]["network"])
    assert opened.signer.hex() == rows[0]["publisher_key"]
    doc = json.loads(json_file.read_text())
    assert doc["format"] == "p2pfleet-receipts-1" and len(doc["publishers"]) == 2

    for f in (csv_file, json_file):  # verify needs no data dir
        got = run_json("ledger", "verify", f, data_dir=tmp_path / "nowhere")
        assert got["receipts"] == 3 and got["valid"] == 3 and got["failed"] == []
        per = {p["publisher"]: p for p in got["publishers"]}
        assert per[PUB_A.peer_id]["credit"] == 180 and per[PUB_B.peer_id]["credit"] == 7
        assert "3 of 3 receipts" in run("ledger", "verify", f).stdout

    # an edited credit, and a forged signature, are caught and named
    rows[0]["credit"] = "999999"
    sig_flipped = bytearray(bytes.fromhex(rows[1]["envelope"]))
    sig_flipped[-1] ^= 1
    rows[1]["envelope"] = sig_flipped.hex()
    with csv_file.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    proc = run("ledger", "verify", csv_file, ok=False)
    assert proc.returncode == 2 and "2 of 3 receipts" in proc.stderr
    assert "credit is '999999'" in proc.stdout and "signature" in proc.stdout

    junk = tmp_path / "junk.json"
    junk.write_text('{"format": "other"}')
    assert "not a receipts export" in fails("ledger", "verify", junk)
    junk.write_text("publisher,envelope\n" + "x" * 300_000 + ",00\n")
    assert "not a receipts export" in fails("ledger", "verify", junk)
    junk.write_bytes(b"\x00\xff garbage")
    assert "not a receipts export" in fails("ledger", "verify", junk)


def test_a_tampered_ledger_receipt_is_reported(node):
    conn = sqlite3.connect(node / "ledger.sqlite")
    conn.execute("UPDATE receipts SET credit = 5000 WHERE shard = 2")
    conn.commit()
    conn.close()
    proc = run("ledger", data_dir=node, ok=False)
    assert proc.returncode == 2 and "1 of 3 stored receipts failed verification" in proc.stderr
    assert "FAILED" in proc.stdout and "credit is 5000" in proc.stdout


def test_empty_ledger_and_missing_data_dir(tmp_path):
    dd = tmp_path / "fresh"
    run("node", "init", "--allow", PUBLISHER, data_dir=dd)
    assert "no work recorded yet" in run("ledger", data_dir=dd).stdout
    assert run_json("ledger", data_dir=dd)["publishers"] == []
    assert not (dd / "ledger.sqlite").exists()  # looking creates nothing
    assert "node init" in fails("ledger", data_dir=tmp_path / "none")
    assert "--export and --out" in run("ledger", "--export", "csv", data_dir=dd,
                                       ok=False).stderr


def test_node_init_states_which_publishers_it_serves(tmp_path):
    none = run("node", "init", data_dir=tmp_path / "a").stdout
    assert "works for NO publisher yet" in none
    allow = run_json("node", "init", "--allow", PUBLISHER, data_dir=tmp_path / "b")
    assert allow["publishers"]["mode"] == "allowlist"
    assert allow["publishers"]["allow"] == [PUBLISHER]
    out = run("node", "init", "--allow", PUBLISHER, data_dir=tmp_path / "c").stdout
    assert f"works only for the 1 allowed: {PUBLISHER}" in out
    anyone = run_json("node", "init", "--anyone", data_dir=tmp_path / "d")
    assert anyone["publishers"]["mode"] == "anyone"
    assert run_json("node", "init", "--serve-anyone",
                    data_dir=tmp_path / "e")["publishers"]["mode"] == "anyone"
    assert run_json("node", "init", data_dir=tmp_path / "f",
                    env={"P2PFLEET_PUBLISHERS_SERVE_ANYONE": "true"})["publishers"]["mode"] == "anyone"
