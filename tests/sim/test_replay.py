"""`p2pfleet sim replay`: a log of real core machines replays to the same decisions.

The logs here are written the way the live drivers write them (a header, then each event
with the machine's effects: publisher/engine.py, live/node.py), by real core machines driven
in memory; a tampered log must diverge at the tampered event, and a corrupt one must be
refused by line, never with a traceback.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from p2pfleet.cli.main import cli
from p2pfleet.core import eventlog
from p2pfleet.core import policy as P
from p2pfleet.core import scheduler as S
from p2pfleet.core import trust as T
from p2pfleet.sim.replay import LogError, replay

JOB = b"j" * 16
CLASS = b"c" * 32
KEY = b"k" * 32


def key(name: str) -> bytes:
    return name.encode().ljust(32, b".")


class Logged:
    """A scheduler whose events and decisions go to a log, as the engine writes it."""

    def __init__(self, path: Path, settings: S.SchedulerSettings, *, restored=None):
        self.m = S.Scheduler(settings, rng=S.KeyedRandom(KEY))
        header = None
        if restored is not None:
            self.m.restore(*restored)
            header = {"jobs": [eventlog.plain(r) for r in restored[0]],
                      "shards": [eventlog.plain(r) for r in restored[1]],
                      "leases": [eventlog.plain(r) for r in restored[2]],
                      "workers": [eventlog.plain(r) for r in restored[3]]}
        self.f = path.open("a", encoding="utf-8")
        self.f.write(eventlog.header("scheduler", settings, rng={"key": KEY.hex(), "counter": 0},
                                     restored=header) + "\n")

    def handle(self, ev) -> list:
        effects = self.m.handle(ev)
        self.f.write(eventlog.record(ev, effects) + "\n")
        self.f.flush()
        return effects


def settings(**kw) -> S.SchedulerSettings:
    return S.SchedulerSettings(cross_class_rate=0.0, request_interval_ms=0, trust=T.TrustSettings(
        established_accepted=0, established_age_ms=0, trusted=frozenset({key("own")})),
        own_key=key("own"), **kw)


def run_job(log: Path, *, recheck: float = 0.3, audit: float = 0.3) -> Logged:
    """Three honest workers and a cheater (fails a known answer once it has a lease) over
    eight shards, with the re-check and audit draws on."""
    m = Logged(log, settings())
    m.handle(S.JobAdded(0, S.JobParams(JOB, b"s" * 32, (10,) * 8, (5,) * 8, (True,) * 8,
                                       (100,) * 8, recheck_rate=recheck, audit_rate=audit)))
    at = 1
    for _round in range(12):
        for i, who in enumerate(("a", "b", "c", "cheat", "own")):
            at += 100
            grants = [g for e in m.handle(S.WorkRequested(
                at, key(who), f"10.0.{i}.0/24", CLASS, 100.0, 2, (JOB,), audit_only=who == "own"))
                if isinstance(e, S.Grant) for g in e.leases]
            for g in grants:
                at += 100
                bad = who == "cheat"
                m.handle(S.ResultArrived(at, g.lease_id, key(who),
                                         (b"bad" if bad else b"good").ljust(32, b"."),
                                         known_answer_ok=not bad, agrees=()))
        m.handle(S.Tick(at))
    return m


def test_a_scheduler_log_replays_to_the_same_decisions(tmp_path):
    log = tmp_path / "pub.jsonl"
    m = run_job(log)
    counts = m.m.job_counts(JOB)
    report = replay([log])
    assert report.divergence is None
    t = report.totals
    assert t["exclusions"] == 1 and t["leases"] > 8 and t["accepts"] >= 8
    assert t["credit"] == counts["paid"] and report.jobs[JOB.hex()] == counts
    assert report.decisions > report.events / 2


def test_a_restart_segment_replays_from_the_restored_records(tmp_path):
    log = tmp_path / "pub.jsonl"
    first = run_job(log)
    records = first.m.take_changes()
    again = Logged(log, settings(), restored=records)  # a second start appends a header
    again.handle(S.Tick(10**7))
    again.handle(S.WorkRequested(10**7 + 1, key("d"), "10.0.9.0/24", CLASS, 1.0, 1, (JOB,)))
    report = replay([log])
    assert report.divergence is None and report.segments == 2


def tampered(log: Path, n: int, change) -> Path:
    lines = log.read_text().splitlines()
    data = json.loads(lines[n])
    change(data)
    lines[n] = json.dumps(data)
    out = log.with_name("tampered.jsonl")
    out.write_text("\n".join(lines) + "\n")
    return out


def test_a_tampered_decision_or_event_diverges_at_that_line(tmp_path):
    log = tmp_path / "pub.jsonl"
    run_job(log)
    lines = log.read_text().splitlines()
    n = next(i for i, line in enumerate(lines) if '"type": "Pay"' in line)

    def pay_more(data):
        for e in data["effects"]:
            if e["type"] == "Pay":
                e["credit"] += 1
    report = replay([tampered(log, n, pay_more)])
    d = report.divergence
    assert d is not None and d.line == n + 1 and d.index == n - 1
    assert d.logged[d.first_difference]["credit"] == d.replayed[d.first_difference]["credit"] + 1
    # an event changed (a worker said to fail a known answer passes it): other decisions
    k = next(i for i, line in enumerate(lines) if '"known_answer_ok": false' in line)
    report = replay([tampered(log, k, lambda d: d.update(known_answer_ok=True))])
    assert report.divergence is not None and report.divergence.line == k + 1


@pytest.mark.parametrize("bad, message", [
    ('{"type": "Tick", "at_ms": 5', "not JSON"),
    ('{"type": "Bogus", "at_ms": 5, "effects": []}', "unknown event type 'Bogus'"),
    ('{"type": "Tick", "effects": []}', "event Tick"),
    ('{"type": "Tick", "at_ms": 5}', "without its decisions"),
    ('[1, 2]', "not a JSON object"),
])
def test_a_corrupt_line_is_refused_by_line(tmp_path, bad, message):
    log = tmp_path / "pub.jsonl"
    run_job(log)
    lines = log.read_text().splitlines()
    lines[3] = bad
    log.write_text("\n".join(lines) + "\n")
    with pytest.raises(LogError, match=f"pub.jsonl:4: .*{message}"):
        replay([log])


def test_a_truncated_last_line_an_old_log_and_a_newer_version_are_refused(tmp_path):
    log = tmp_path / "pub.jsonl"
    run_job(log)
    text = log.read_text()
    cut = tmp_path / "cut.jsonl"
    cut.write_text(text[:-20])
    with pytest.raises(LogError, match=r"cut.jsonl:\d+: the last line is truncated"):
        replay([cut])
    old = tmp_path / "v1.jsonl"
    old.write_text(S.event_json(S.Tick(1)) + "\n")
    with pytest.raises(LogError, match="v1.jsonl:1: .*version 1 .*holds no decisions"):
        replay([old])
    newer = tmp_path / "v3.jsonl"
    newer.write_text(text.replace('"version": 2', '"version": 3', 1))
    with pytest.raises(LogError, match="version 3 is newer"):
        replay([newer])
    keyless = tmp_path / "keyless.jsonl"
    keyless.write_text(text.replace('"rng": {', '"rng_": {', 1))
    with pytest.raises(LogError, match="no rng key"):
        replay([keyless])


def policy_log(path: Path) -> list:
    """A node's policy log, written as live/node.py writes it (a refusal included)."""
    config = P.PolicyConfig(resume_after_s=60.0)
    policy = P.Policy(config)
    car = dict(parked=True, plugged_in=True, soc_pct=80.0, charge_limit_pct=90.0,
               network="wifi", metered=False, battery_temp_c=20.0, cabin_temp_c=20.0)
    events = [P.StateObserved(0.0, P.VehicleState(**car), 3600), P.Tick(100.0, 3600),
              P.EnergyUsed(200.0, 5.0), P.Tick(150.0, 3600),  # back in time: refused
              P.StateObserved(300.0, P.VehicleState(**{**car, "plugged_in": False}), 3600)]
    out = []
    with path.open("w") as f:
        f.write(eventlog.header("policy", config) + "\n")
        for ev in events:
            try:
                effects = policy.handle(ev)
            except P.PolicyUsageError as exc:
                f.write(eventlog.record(ev, refused=str(exc)) + "\n")
                continue
            out.append(effects)
            f.write(eventlog.record(ev, effects) + "\n")
    return out


def test_a_node_policy_log_replays_with_its_refusals(tmp_path):
    log = tmp_path / "node.jsonl"
    policy_log(log)
    report = replay([log])
    assert report.divergence is None and report.events == 5
    assert report.totals["compute_starts"] == 1 and report.totals["compute_stops"] == 1
    lines = log.read_text().splitlines()
    k = next(i for i, line in enumerate(lines) if "StartComputing" in line)
    report = replay([tampered(log, k, lambda d: d.update(effects=[]))])
    assert report.divergence is not None and report.divergence.line == k + 1


def test_the_cli_prints_a_summary_or_the_divergence_and_exits_non_zero(tmp_path):
    pub, node = tmp_path / "pub.jsonl", tmp_path / "node.jsonl"
    run_job(pub)
    policy_log(node)
    runner = CliRunner()
    r = runner.invoke(cli, ["sim", "replay", "--json", str(pub), str(node)])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["identical"] and out["totals"]["exclusions"] == 1 and out["segments"] == 2
    r = runner.invoke(cli, ["sim", "replay", str(pub)])
    assert r.exit_code == 0 and "identical" in r.output
    lines = pub.read_text().splitlines()
    lines[5] = lines[5].replace('"at_ms": ', '"at_ms": 1', 1)
    pub.write_text("\n".join(lines) + "\n")
    r = runner.invoke(cli, ["sim", "replay", str(pub)])
    assert r.exit_code == 1 and "line 6" in r.output and "logged" in r.output
    pub.write_text("\n".join(lines[:4]) + "\n{\"type\n")
    r = runner.invoke(cli, ["sim", "replay", str(pub)])
    assert r.exit_code == 2 and "pub.jsonl:5" in r.output and "Traceback" not in r.output


def credit_log(path: Path, tmp_path: Path) -> None:
    """A node's credit log written by its real ledger (store/ledger.py `on_receipt`), as
    live/node.py writes it: a receipt stored, the same again, a conflicting one, refused ones."""
    import dataclasses

    from p2pfleet.identity import Identity
    from p2pfleet.store.ledger import Ledger, ReceiptRejected
    from p2pfleet.wire.envelope import open_envelope, seal
    from p2pfleet.wire.kinds import LeaseBatch, Receipt
    from p2pfleet.wire.samples import sample_body

    net, now = "testnet", 1_700_000_000_000
    pub, me = Identity.from_seed(b"replay publisher"), Identity.from_seed(b"replay worker")
    base = sample_body("lease_batch").leases[0]
    leases = tuple(dataclasses.replace(base, lease_id=bytes([i]) * 16, job_id=JOB, shard=i,
                                       credit=10) for i in (1, 2))
    held = open_envelope(seal(LeaseBatch(req_id=b"r" * 16, exp=now + 60_000,
                                         worker=me.public_key, leases=leases), pub, net), net)

    def receipt(i: int, credit: int = 10, **over):
        fields = dict(lease_id=bytes([i]) * 16, job_id=JOB, shard=i, worker=me.public_key,
                      output_digest=bytes([i]) * 32, credit=credit, at=now)
        return open_envelope(seal(Receipt(**{**fields, **over}), pub, net), net)

    with path.open("w") as f, Ledger(tmp_path / "ledger.sqlite") as led:
        f.write(eventlog.header("credit", None) + "\n")
        led.on_receipt = lambda seen, effects, refused: f.write(
            eventlog.record(seen, effects, refused) + "\n")
        led.add_leases(pub.public_key, held, now)
        item = led.enqueue(pub.public_key, bytes([1]) * 16, "result", b"env", now + 10**9, now,
                           output_digest=bytes([1]) * 32, output=None, elapsed_ms=1000)
        led.delivered(item, now)
        low = receipt(1, credit=8)
        assert led.add_receipt(low, now + 1) == "new"
        assert led.add_receipt(low, now + 2) == "duplicate"
        assert led.add_receipt(receipt(1, credit=12, at=now + 5), now + 3) == "conflict"
        for bad in (receipt(2), receipt(1, output_digest=b"x" * 32), receipt(7)):
            with pytest.raises(ReceiptRejected):
                led.add_receipt(bad, now + 4)


def test_a_node_credit_log_replays_the_receipt_checks(tmp_path):
    log = tmp_path / "credit-events.jsonl"
    credit_log(log, tmp_path)
    report = replay([log])
    assert report.divergence is None and report.events == 6
    assert report.totals["receipts"] == 2 and report.totals["credit_received"] == 8
    lines = log.read_text().splitlines()
    # a refused receipt logged as stored, or a stored one with more credit: both diverge
    k = next(i for i, line in enumerate(lines) if '"refused"' in line)
    report = replay([tampered(log, k, lambda d: (d.pop("refused"), d.update(effects=[])))])
    assert report.divergence is not None and report.divergence.line == k + 1
    k = next(i for i, line in enumerate(lines) if '"Credited"' in line)
    report = replay([tampered(log, k, lambda d: d["effects"][0].update(credit=80))])
    assert report.divergence is not None and report.divergence.line == k + 1
