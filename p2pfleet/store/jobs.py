"""The publisher's job store: jobs, shards, leases, results, receipts, evidence, in SQLite.

One WAL database per publisher (store/db.py migrations). What must survive a SIGKILL
(specs/work-and-leases.md, section 10): a lease is written before its batch is sent, a
result before it is acknowledged, a receipt before it is sent (and stays pending until a
delivery is acknowledged). The scheduler's records (core/scheduler.py: JobRec, ShardRec,
LeaseRec, trust.WorkerTrust) are saved in the same transaction as the input that changed
them, and `load_records()` gives them back to rebuild the machine, so a resumed job loses
no accepted result and recomputes none.

Blobs the publisher serves or needs again (the model, shard inputs, outputs) are kept here
too, by SHA-256: the store alone is enough to resume a job. So is the replay store (table
`seen`): the message ids of work requests and reports taken, until they expire, so a
replayed envelope is refused after a restart too.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..core.scheduler import JobParams, JobRec, LeaseRec, ShardRec
from ..core.trust import WorkerTrust
from .db import StoreError, open_db

MIGRATIONS = [
    """
    CREATE TABLE meta (name TEXT PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID;
    CREATE TABLE blobs (digest BLOB PRIMARY KEY, data BLOB NOT NULL) WITHOUT ROWID;
    CREATE TABLE jobs (
        job_id BLOB PRIMARY KEY,
        params TEXT NOT NULL,          -- core.scheduler.JobParams, JSON (secret included)
        meta TEXT NOT NULL,            -- engine settings: model, lease settings, outputs
        status TEXT NOT NULL,
        paid INTEGER NOT NULL,
        created_ms INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE shards (
        job_id BLOB NOT NULL REFERENCES jobs(job_id),
        idx INTEGER NOT NULL,
        input_digest BLOB NOT NULL,
        ka TEXT NOT NULL,              -- known answers: [[row position, pool index], ...]
        status TEXT NOT NULL, target INTEGER NOT NULL, single INTEGER NOT NULL,
        recheck INTEGER NOT NULL, cross_class INTEGER NOT NULL, errors INTEGER NOT NULL,
        issued INTEGER NOT NULL, accepted_lease BLOB, reason TEXT NOT NULL,
        last_issue_ms INTEGER NOT NULL,
        PRIMARY KEY (job_id, idx)
    ) WITHOUT ROWID;
    CREATE TABLE leases (
        lease_id BLOB PRIMARY KEY,
        job_id BLOB NOT NULL, shard INTEGER NOT NULL, worker BLOB NOT NULL,
        prefix TEXT NOT NULL, hw_class BLOB NOT NULL, issued_ms INTEGER NOT NULL,
        expires_ms INTEGER NOT NULL, deadline_ms INTEGER NOT NULL, credit INTEGER NOT NULL,
        fresh INTEGER NOT NULL, state TEXT NOT NULL, digest BLOB, ok INTEGER NOT NULL,
        agrees BLOB NOT NULL, ord INTEGER NOT NULL, verdict TEXT NOT NULL, paid INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX leases_job ON leases (job_id, shard);
    CREATE TABLE results (
        lease_id BLOB PRIMARY KEY,
        envelope BLOB NOT NULL,        -- the worker's signed result, as received
        output BLOB,                   -- the outputs blob (inline or fetched)
        received_ms INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE receipts (
        lease_id BLOB PRIMARY KEY,
        worker BLOB NOT NULL,
        envelope BLOB NOT NULL,
        delivered INTEGER NOT NULL
    );
    CREATE INDEX receipts_pending ON receipts (worker, delivered);
    CREATE TABLE evidence (
        id INTEGER PRIMARY KEY,
        worker BLOB NOT NULL, job_id BLOB NOT NULL, claim TEXT NOT NULL,
        envelope BLOB NOT NULL, created_ms INTEGER NOT NULL
    );
    CREATE TABLE workers (worker BLOB PRIMARY KEY, record TEXT NOT NULL) WITHOUT ROWID;
    """,
    # The replay store (identity-and-wire.md, section 10): ids of work requests and reports.
    """
    CREATE TABLE seen (msg_id BLOB PRIMARY KEY, keep_until_ms INTEGER NOT NULL) WITHOUT ROWID;
    CREATE INDEX seen_expiry ON seen (keep_until_ms);
    """,
    # Audited shards (verification.md, section 5): one replica reserved for trusted machines.
    "ALTER TABLE shards ADD COLUMN audit INTEGER NOT NULL DEFAULT 0;",
    # Stalled shards (work-and-leases.md, section 4): how the stall was resolved, and since
    # when the shard is stalled.
    """
    ALTER TABLE shards ADD COLUMN fallback TEXT NOT NULL DEFAULT '';
    ALTER TABLE shards ADD COLUMN stalled_ms INTEGER NOT NULL DEFAULT 0;
    """,
]


def _params_json(p: JobParams) -> str:
    return json.dumps({
        "job_id": p.job_id.hex(), "secret": p.secret.hex(), "samples": list(p.samples),
        "credit": list(p.credit), "known_answer": list(p.known_answer),
        "input_size": list(p.input_size), "quorum": p.quorum, "max_error": p.max_error,
        "max_total": p.max_total, "recheck_rate": p.recheck_rate, "budget": p.budget,
        "audit_rate": p.audit_rate})


def _params_from(text: str) -> JobParams:
    d = json.loads(text)
    return JobParams(bytes.fromhex(d["job_id"]), bytes.fromhex(d["secret"]), tuple(d["samples"]),
                     tuple(d["credit"]), tuple(d["known_answer"]), tuple(d["input_size"]),
                     d["quorum"], d["max_error"], d["max_total"], d["recheck_rate"], d["budget"],
                     d.get("audit_rate", 0.0))  # jobs stored before audits had none


def _trust_json(t: WorkerTrust) -> str:
    return json.dumps({k: v for k, v in t.__dict__.items() if k != "worker"})


class JobStore:
    """The publisher's SQLite store. Not thread-safe: one engine owns it."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.conn: sqlite3.Connection = open_db(self.path, MIGRATIONS, name="publisher job store")
        self._depth = 0

    def close(self) -> None:
        self.conn.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """All writes inside commit together or not at all (nesting joins the outer one)."""
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        self.conn.execute("BEGIN IMMEDIATE")
        self._depth = 1
        try:
            yield
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        else:
            self.conn.execute("COMMIT")
        finally:
            self._depth = 0

    # --- meta and blobs ---------------------------------------------------------------
    def secret(self, name: str, size: int = 32) -> bytes:
        """A named random secret of this publisher, created on first use and kept."""
        row = self.conn.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        if row:
            return bytes(row[0])
        value = os.urandom(size)
        with self.transaction():
            self.conn.execute("INSERT INTO meta (name, value) VALUES (?, ?)", (name, value))
        return value

    def put_blob(self, digest: bytes, data: bytes) -> None:
        self.conn.execute("INSERT OR IGNORE INTO blobs (digest, data) VALUES (?, ?)", (digest, data))

    def get_blob(self, digest: bytes) -> bytes | None:
        row = self.conn.execute("SELECT data FROM blobs WHERE digest = ?", (digest,)).fetchone()
        return bytes(row[0]) if row else None

    # --- jobs -------------------------------------------------------------------------
    def add_job(self, params: JobParams, meta: dict, now_ms: int,
                shards: list[tuple[bytes, list[tuple[int, int]]]]) -> None:
        """A new job: `shards` is [(input digest, known-answer rows [(position, pool index)])]."""
        if len(shards) != len(params.samples):
            raise StoreError("add_job: one (input digest, known answers) per shard needed")
        self.conn.execute(
            "INSERT INTO jobs (job_id, params, meta, status, paid, created_ms) VALUES (?,?,?,?,?,?)",
            (params.job_id, _params_json(params), json.dumps(meta), "live", 0, now_ms))
        self.conn.executemany(
            "INSERT INTO shards VALUES (?,?,?,?,'open',0,0,0,0,0,0,NULL,'',0,0,'',0)",
            [(params.job_id, i, d, json.dumps(ka)) for i, (d, ka) in enumerate(shards)])

    def job_ids(self) -> list[bytes]:
        return [bytes(r[0]) for r in self.conn.execute("SELECT job_id FROM jobs ORDER BY created_ms")]

    def job_meta(self, job_id: bytes) -> dict:
        row = self.conn.execute("SELECT meta FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        if row is None:
            raise KeyError(job_id)
        return json.loads(row[0])

    def shard_inputs(self, job_id: bytes) -> list[tuple[bytes, list[tuple[int, int]]]]:
        rows = self.conn.execute("SELECT input_digest, ka FROM shards WHERE job_id = ? ORDER BY idx",
                                 (job_id,))
        return [(bytes(d), [tuple(x) for x in json.loads(ka)]) for d, ka in rows]

    # --- scheduler records --------------------------------------------------------------
    def save_records(self, jobs: list[JobRec], shards: list[ShardRec], leases: list[LeaseRec],
                     workers: list[WorkerTrust]) -> None:
        c = self.conn
        for j in jobs:
            c.execute("UPDATE jobs SET status = ?, paid = ? WHERE job_id = ?",
                      (j.status, j.paid, j.job.job_id))
        for s in shards:
            c.execute("UPDATE shards SET status=?, target=?, single=?, recheck=?, cross_class=?, "
                      "errors=?, issued=?, accepted_lease=?, reason=?, last_issue_ms=?, audit=?, "
                      "fallback=?, stalled_ms=? WHERE job_id=? AND idx=?",
                      (s.status, s.target, int(s.single), int(s.recheck), int(s.cross), s.errors,
                       s.issued, s.accepted_lease, s.reason, s.last_issue_ms, int(s.audit),
                       s.fallback, s.stalled_ms, s.job_id, s.index))
        for l in leases:
            c.execute("INSERT OR REPLACE INTO leases VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                      (l.lease_id, l.job_id, l.shard, l.worker, l.prefix, l.hw_class, l.issued_ms,
                       l.expires_ms, l.deadline_ms, l.credit, int(l.fresh), l.state, l.digest,
                       int(l.ok), b"".join(l.agrees), l.order, l.verdict, int(l.paid)))
        for w in workers:
            c.execute("INSERT OR REPLACE INTO workers VALUES (?, ?)", (w.worker, _trust_json(w)))

    def load_records(self, *, ended: bool = True, job_id: bytes | None = None
                     ) -> tuple[list[JobRec], list[ShardRec], list[LeaseRec], list[WorkerTrust]]:
        """The scheduler's records: every job's (`ended=False`: live jobs' only, with every
        trust record), or one job's (`job_id`: its job, shard and lease records, no trust
        records), in the order `Scheduler.restore` takes them."""
        c = self.conn
        if job_id is not None:
            where, args = "WHERE job_id = ?", (job_id,)
        elif not ended:
            where, args = "WHERE job_id IN (SELECT job_id FROM jobs WHERE status = 'live')", ()
        else:
            where, args = "", ()
        jobs = [JobRec(_params_from(p), status, paid) for p, status, paid in
                c.execute(f"SELECT params, status, paid FROM jobs {where} ORDER BY created_ms",
                          args)]
        shards = [ShardRec(bytes(r[0]), r[1], r[2], r[3], bool(r[4]), bool(r[5]), bool(r[6]),
                           bool(r[12]), r[7], r[8], bytes(r[9]) if r[9] is not None else None,
                           r[10], r[11], r[13], r[14])
                  for r in c.execute("SELECT job_id, idx, status, target, single, recheck, "
                                     "cross_class, errors, issued, accepted_lease, reason, "
                                     f"last_issue_ms, audit, fallback, stalled_ms FROM shards "
                                     f"{where}", args)]
        leases = []
        for r in c.execute(f"SELECT * FROM leases {where}", args):
            agrees = bytes(r[14])
            leases.append(LeaseRec(
                bytes(r[0]), bytes(r[1]), r[2], bytes(r[3]), r[4], bytes(r[5]), r[6], r[7], r[8],
                r[9], bool(r[10]), r[11], bytes(r[12]) if r[12] is not None else None, bool(r[13]),
                tuple(agrees[i:i + 16] for i in range(0, len(agrees), 16)), r[15], r[16], bool(r[17])))
        workers = [] if job_id is not None else [
            WorkerTrust(bytes(w), **json.loads(rec))
            for w, rec in c.execute("SELECT worker, record FROM workers")]
        return jobs, shards, leases, workers

    def ended_job_ids(self) -> list[bytes]:
        """Jobs that are done or cancelled, oldest first."""
        return [bytes(r[0]) for r in self.conn.execute(
            "SELECT job_id FROM jobs WHERE status != 'live' ORDER BY created_ms")]

    def lease_job(self, lease_id: bytes, worker: bytes) -> bytes | None:
        """The job of a stored lease issued to `worker` (None: no such lease of that worker)."""
        row = self.conn.execute("SELECT job_id FROM leases WHERE lease_id = ? AND worker = ?",
                                (lease_id, worker)).fetchone()
        return bytes(row[0]) if row else None

    # --- replay store (specs/identity-and-wire.md, section 10) --------------------------
    def remember(self, msg_id: bytes, keep_until_ms: int | None, now_ms: int) -> bool:
        """Record a message id; False if it is already remembered (a replay)."""
        keep = keep_until_ms if keep_until_ms is not None else 2**63 - 1
        cur = self.conn.execute("INSERT INTO seen (msg_id, keep_until_ms) VALUES (?, ?) "
                                "ON CONFLICT DO NOTHING", (msg_id, keep))
        return cur.rowcount == 1

    def seen(self, msg_id: bytes) -> bool:
        return self.conn.execute("SELECT 1 FROM seen WHERE msg_id = ?",
                                 (msg_id,)).fetchone() is not None

    def forget_seen(self, now_ms: int) -> int:
        """Drop ids of messages that would be refused as expired anyway."""
        return self.conn.execute("DELETE FROM seen WHERE keep_until_ms < ?", (now_ms,)).rowcount

    # --- results, receipts, evidence ----------------------------------------------------
    def save_result(self, lease_id: bytes, envelope: bytes, output: bytes | None, now_ms: int) -> None:
        self.conn.execute("INSERT OR IGNORE INTO results VALUES (?, ?, ?, ?)",
                          (lease_id, envelope, output, now_ms))

    def result(self, lease_id: bytes) -> tuple[bytes, bytes | None] | None:
        row = self.conn.execute("SELECT envelope, output FROM results WHERE lease_id = ?",
                                (lease_id,)).fetchone()
        if row is None:
            return None
        return bytes(row[0]), (bytes(row[1]) if row[1] is not None else None)

    def add_receipt(self, lease_id: bytes, worker: bytes, envelope: bytes) -> None:
        self.conn.execute("INSERT OR IGNORE INTO receipts VALUES (?, ?, ?, 0)",
                          (lease_id, worker, envelope))

    def pending_receipts(self, worker: bytes, limit: int = 64) -> list[tuple[bytes, bytes]]:
        rows = self.conn.execute("SELECT lease_id, envelope FROM receipts WHERE worker = ? AND "
                                 "delivered = 0 ORDER BY rowid LIMIT ?", (worker, limit))
        return [(bytes(a), bytes(b)) for a, b in rows]

    def receipts_for(self, worker: bytes, lease_ids: list[bytes]) -> list[tuple[bytes, bytes]]:
        """The receipts paying `worker` for these leases, delivered or not (a worker asking
        by lease id did not get them); leases of other workers give nothing."""
        rows = []
        for lease_id in dict.fromkeys(lease_ids):
            rows += self.conn.execute("SELECT lease_id, envelope FROM receipts WHERE worker = ? "
                                      "AND lease_id = ?", (worker, lease_id)).fetchall()
        return [(bytes(a), bytes(b)) for a, b in rows]

    def workers_with_pending_receipts(self) -> list[bytes]:
        return [bytes(r[0]) for r in self.conn.execute(
            "SELECT DISTINCT worker FROM receipts WHERE delivered = 0")]

    def mark_delivered(self, lease_ids: list[bytes]) -> None:
        self.conn.executemany("UPDATE receipts SET delivered = 1 WHERE lease_id = ?",
                              [(i,) for i in lease_ids])

    def receipt_count(self, job_id: bytes) -> int:
        return self.conn.execute("SELECT count(*) FROM receipts r JOIN leases l USING (lease_id) "
                                 "WHERE l.job_id = ?", (job_id,)).fetchone()[0]

    def add_evidence(self, worker: bytes, job_id: bytes, claim: str, envelope: bytes,
                     now_ms: int) -> None:
        self.conn.execute("INSERT INTO evidence (worker, job_id, claim, envelope, created_ms) "
                          "VALUES (?, ?, ?, ?, ?)", (worker, job_id, claim, envelope, now_ms))

    def evidence(self, job_id: bytes | None = None) -> list[tuple[bytes, str, bytes]]:
        q = "SELECT worker, claim, envelope FROM evidence"
        rows = (self.conn.execute(q + " WHERE job_id = ? ORDER BY id", (job_id,)) if job_id
                else self.conn.execute(q + " ORDER BY id"))
        return [(bytes(w), c, bytes(e)) for w, c, e in rows]


__all__ = ["JobStore", "StoreError", "MIGRATIONS"]
