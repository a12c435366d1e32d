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
    assert doc["format"] == "p2pfleet-receipts-2" and len(doc["publishers"]) == 2
    me = load_key(node / "key").peer_id
    assert doc["worker"] == me and {r["exported_by"] for r in rows} == {me}

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


OTHER = Identity.from_seed(b"cli another worker")


def export_row(columns: list[str], like: dict, envelope: bytes) -> dict:
    """An export row for a receipt envelope, other columns (exported_by) copied from `like`."""
    r = open_envelope(envelope, NET).body
    fields = {"publisher": PUB_A.peer_id, "publisher_key": PUB_A.public_key.hex(),
              "network": NET, "lease_id": r.lease_id.hex(), "job_id": r.job_id.hex(),
              "shard": r.shard, "worker": OTHER.peer_id if r.worker == OTHER.public_key else "",
              "output_digest": r.output_digest.hex(), "credit": r.credit, "at_ms": r.at,
              "received_ms": r.at + 1000, "envelope": envelope.hex()}
    return {k: fields.get(k, like.get(k)) for k in columns}


def test_verify_refuses_an_export_padded_with_another_workers_receipt(node, tmp_path):
    """Issue 12, 8b: a genuine receipt of publisher A that pays another worker, added to
    this node's export, would count that worker's credit as this node's contribution."""
    me = load_key(node / "key").peer_id
    theirs = seal(Receipt(lease_id=lid(9), job_id=JOB, shard=9, worker=OTHER.public_key,
                          output_digest=b"\x09" * 32, credit=500, at=NOW + 2000), PUB_A, NET)
    csv_file, json_file = tmp_path / "r.csv", tmp_path / "r.json"
    run("ledger", "--export", "csv", "--out", csv_file, data_dir=node)
    run("ledger", "--export", "json", "--out", json_file, data_dir=node)
    rows = list(csv.DictReader(csv_file.open()))
    rows.append(export_row(list(rows[0]), rows[0], theirs))
    with csv_file.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    doc = json.loads(json_file.read_text())
    group = next(g for g in doc["publishers"] if g["publisher"] == PUB_A.peer_id)
    row = export_row(list(group["receipts"][0]), group["receipts"][0], theirs)
    group["receipts"].append(row)
    json_file.write_text(json.dumps(doc))

    for f in (csv_file, json_file):
        proc = run("ledger", "verify", f, ok=False)
        assert proc.returncode == 2 and "1 of 4 receipts" in proc.stderr, proc
        assert "3 of 4 receipts" in proc.stdout
        assert (f"receipt for lease {lid(9).hex()} names worker {OTHER.peer_id}, not the "
                f"exporting worker {me}") in proc.stdout
        got = json.loads(run("ledger", "verify", f, "--json", ok=False).stdout)
        [failed] = got["failed"]
        assert failed["lease_id"] == lid(9).hex() and failed["worker"] == OTHER.peer_id
        per = {p["publisher"]: p for p in got["publishers"]}
        assert per[PUB_A.peer_id]["credit"] == 180  # the other worker's 500 are not counted

    # claiming the export is the other worker's makes this node's receipts fail instead
    doc["worker"] = OTHER.peer_id
    json_file.write_text(json.dumps(doc))
    proc = run("ledger", "verify", json_file, ok=False)
    assert proc.returncode == 2 and "3 of 4 receipts" in proc.stderr
    assert f"names worker {me}, not the exporting worker {OTHER.peer_id}" in proc.stdout
    # and whose contribution it must be can be demanded
    assert f"not by {me}" in fails("ledger", "verify", json_file, "--worker", me)


def test_receipts_of_a_rotated_key_still_verify_as_the_workers(node, tmp_path):
    old = load_key(node / "key").peer_id
    rotated = run_json("key", "rotate", data_dir=node)
    new = rotated["new_peer_id"]
    assert "3 of 3 stored receipts verify" in run("ledger", data_dir=node).stdout
    csv_file, json_file = tmp_path / "r.csv", tmp_path / "r.json"
    run("ledger", "--export", "csv", "--out", csv_file, data_dir=node)
    run("ledger", "--export", "json", "--out", json_file, data_dir=node)
    got = run_json("ledger", "verify", json_file)  # the export carries the rotation
    assert got["worker"] == new and got["valid"] == 3
    proc = run("ledger", "verify", csv_file, ok=False)  # a CSV file cannot carry it
    assert proc.returncode == 2 and f"names worker {old}, not the exporting worker {new}" in proc.stdout
    got = run_json("ledger", "verify", csv_file, "--rotation", rotated["statement"])
    assert got["worker"] == new and got["valid"] == 3


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
