"""The node's ledger: leases, the outbox of reports, receipts and energy, per publisher.

One SQLite file (WAL, migrations, one transaction per change) that is the owner's record of
contribution (specs/credit.md, section 4). It holds:

- every lease received, with the complete signed `lease_batch` envelope it came in;
- the outbox: every result, failure and hand-back, persisted before it is sent, retried with
  back-off until delivered or expired, and when its delivery was acknowledged; a result's
  outputs blob is kept until a receipt for its lease arrives (or `prune` drops it after the
  result expired), so the publisher can fetch it;
- every receipt, as the complete signed envelope, after checks 2-5 (`core.credit`);
- energy per publisher and local day, metered or estimated.

Nothing is written before a message passed every check: a refused receipt raises
`ReceiptRejected` and changes nothing. The rules (checks, unpaid work, the cap, back-off)
live in `p2pfleet.core.credit`; this module only stores and queries.
"""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import msgpack

from ..core import credit as C
from ..core import worker as W
from ..wire.envelope import Opened
from ..wire.kinds import Lease, Receipt
from ..wire.schema import decode_struct, encode_struct
from .db import open_db

LEASE_STATUSES = ("queued", "running", "done", "failed", "handed_back", "cancelled", "expired")
OPEN_STATUSES = ("queued", "running")
OUTBOX_KINDS = ("result", "failed", "hand_back")

MIGRATIONS = [
    """
    CREATE TABLE lease_batches (
        id INTEGER PRIMARY KEY,
        msg_id BLOB NOT NULL UNIQUE,       -- signer + signed content: one row per batch
        publisher BLOB NOT NULL,
        envelope BLOB NOT NULL,            -- the complete signed lease_batch
        received_ms INTEGER NOT NULL
    );
    CREATE TABLE leases (
        lease_id BLOB PRIMARY KEY,
        publisher BLOB NOT NULL,
        worker BLOB NOT NULL,              -- the key the batch was addressed to
        batch_id INTEGER NOT NULL REFERENCES lease_batches (id),
        job_id BLOB NOT NULL,
        shard INTEGER NOT NULL,
        credit INTEGER NOT NULL,
        lease BLOB NOT NULL,               -- msgpack of the wire Lease
        received_ms INTEGER NOT NULL,
        status TEXT NOT NULL,
        updated_ms INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX leases_publisher ON leases (publisher);
    CREATE INDEX leases_status ON leases (status);
    CREATE TABLE outbox (
        id INTEGER PRIMARY KEY,
        publisher BLOB NOT NULL,
        lease_id BLOB,
        kind TEXT NOT NULL,
        envelope BLOB NOT NULL UNIQUE,     -- re-sent identically on every attempt
        exp_ms INTEGER NOT NULL,
        created_ms INTEGER NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_try_ms INTEGER NOT NULL,
        delivered_ms INTEGER,              -- acknowledged (for a result: the unpaid clock)
        output_digest BLOB,
        output BLOB,                       -- outputs blob, kept until a receipt or expiry
        elapsed_ms INTEGER NOT NULL DEFAULT 0,
        energy_mwh INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX outbox_pending ON outbox (next_try_ms) WHERE delivered_ms IS NULL;
    CREATE INDEX outbox_lease ON outbox (lease_id);
    CREATE INDEX outbox_digest ON outbox (output_digest);
    CREATE INDEX outbox_publisher ON outbox (publisher, kind);
    CREATE TABLE receipts (
        id INTEGER PRIMARY KEY,
        msg_id BLOB NOT NULL UNIQUE,       -- an identical receipt is stored once
        publisher BLOB NOT NULL,
        lease_id BLOB NOT NULL,
        job_id BLOB NOT NULL,
        shard INTEGER NOT NULL,
        worker BLOB NOT NULL,
        output_digest BLOB NOT NULL,
        credit INTEGER NOT NULL,
        at_ms INTEGER NOT NULL,
        received_ms INTEGER NOT NULL,
        network TEXT NOT NULL,
        envelope BLOB NOT NULL             -- the complete signed receipt
    );
    CREATE INDEX receipts_lease ON receipts (lease_id);
    CREATE INDEX receipts_publisher ON receipts (publisher);
    CREATE TABLE energy (
        publisher BLOB NOT NULL,
        day TEXT NOT NULL,                 -- local calendar day, YYYY-MM-DD
        metered INTEGER NOT NULL,          -- 1 metered, 0 estimated
        mwh INTEGER NOT NULL,
        PRIMARY KEY (publisher, day, metered)
    ) WITHOUT ROWID;
    """,
]


class ReceiptRejected(Exception):
    """A receipt failed a check; `reason` names it (a `core.credit.CHECK_*` name)."""

    def __init__(self, reason: str, detail: str):
        self.reason = reason
        self.detail = detail
        super().__init__(f"receipt rejected ({reason}): {detail}")


class LedgerError(ValueError):
    """The caller asked for something the ledger cannot do (unknown lease, bad status...)."""


@dataclass(frozen=True)
class LeaseRow:
    lease_id: bytes
    publisher: bytes
    worker: bytes
    lease: Lease
    received_ms: int
    status: str
    updated_ms: int


@dataclass(frozen=True)
class OutboxItem:
    id: int
    publisher: bytes
    lease_id: bytes | None
    kind: str
    envelope: bytes
    attempts: int
    exp_ms: int
    next_try_ms: int


@dataclass(frozen=True)
class ReceiptRow:
    id: int
    publisher: bytes
    lease_id: bytes
    job_id: bytes
    shard: int
    worker: bytes
    output_digest: bytes
    credit: int
    at_ms: int
    received_ms: int
    network: str
    envelope: bytes


@dataclass(frozen=True)
class DaySummary:
    """One local day at one publisher. Results and receipts are dated by when they were
    acknowledged and received, energy by when it was spent."""

    day: str
    results: int = 0
    credit_paid: int = 0
    compute_ms: int = 0
    metered_mwh: int = 0
    estimated_mwh: int = 0


@dataclass(frozen=True)
class PublisherSummary:
    """Everything the ledger knows of one publisher, in that publisher's credit units."""

    publisher: bytes
    leases: int
    results_delivered: int
    results_pending: int
    failures: int
    hand_backs: int
    receipts: int
    conflicting_receipts: int       # leases with more than one (different) receipt
    credit_promised: int            # lease credit of delivered results
    credit_paid: int                # per lease the highest receipt
    unpaid: C.Unpaid                # 7-day window, shortfalls included (credit.md 3)
    compute_ms: int                 # elapsed_ms of results sent
    metered_mwh: int
    estimated_mwh: int
    days: list[DaySummary] = field(default_factory=list)


def _encode_lease(lease: Lease) -> bytes:
    return msgpack.packb(encode_struct(lease), use_bin_type=True)


def _decode_lease(data: bytes) -> Lease:
    return decode_struct(Lease, msgpack.unpackb(data, raw=False), "lease")


class Ledger:
    """The ledger file. Not thread-safe; one writer (the node), readers may share the file."""

    def __init__(self, path: Path | str, *, worker_keys: tuple[bytes, ...] = ()):
        """`worker_keys`: further keys of this node (rotated from/to) a receipt may pay."""
        self.path = Path(path)
        self.worker_keys = tuple(worker_keys)
        self.conn: sqlite3.Connection = open_db(self.path, MIGRATIONS, name="ledger")
        # Told of every receipt decision: (C.ReceiptSeen, effects, refused) for the node's
        # credit log (specs/event-log.md); None: not logged.
        self.on_receipt: Callable[[C.ReceiptSeen, list, str | None], None] | None = None

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    # leases ------------------------------------------------------------------------------------
    def add_leases(self, publisher: bytes, batch: Opened, now_ms: int) -> list[bytes]:
        """Store a verified `lease_batch` and its leases; return the ids of leases new here.

        Idempotent: a lease id already held (from this batch again, or any other) is not
        stored twice nor replaced, so only the returned leases should be run.
        """
        if batch.kind != "lease_batch":
            raise LedgerError(f"expected a lease_batch envelope, got {batch.kind!r}")
        if batch.signer != publisher:
            raise LedgerError(f"lease_batch signed by {batch.signer.hex()[:16]}, not by the "
                              f"publisher {publisher.hex()[:16]} it came from")
        new: list[bytes] = []
        with self._tx() as db:
            row = db.execute("SELECT id FROM lease_batches WHERE msg_id = ?",
                             (batch.msg_id,)).fetchone()
            if row is None:
                batch_id = db.execute(
                    "INSERT INTO lease_batches (msg_id, publisher, envelope, received_ms) "
                    "VALUES (?, ?, ?, ?)", (batch.msg_id, publisher, batch.raw, now_ms)).lastrowid
            else:
                batch_id = row[0]
            for lease in batch.body.leases:
                cur = db.execute(
                    "INSERT INTO leases (lease_id, publisher, worker, batch_id, job_id, shard, "
                    "credit, lease, received_ms, status, updated_ms) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'queued', ?) ON CONFLICT DO NOTHING",
                    (lease.lease_id, publisher, batch.body.worker, batch_id, lease.job_id,
                     lease.shard, lease.credit, _encode_lease(lease), now_ms, now_ms))
                if cur.rowcount == 1:
                    new.append(lease.lease_id)
        return new

    def _lease_row(self, row: tuple) -> LeaseRow:
        lease_id, publisher, worker, blob, received, status, updated = row
        return LeaseRow(lease_id, publisher, worker, _decode_lease(blob), received, status,
                        updated)

    _LEASE_COLS = "lease_id, publisher, worker, lease, received_ms, status, updated_ms"

    def lease(self, lease_id: bytes) -> LeaseRow | None:
        row = self.conn.execute(f"SELECT {self._LEASE_COLS} FROM leases WHERE lease_id = ?",
                                (lease_id,)).fetchone()
        return None if row is None else self._lease_row(row)

    def open_leases(self) -> list[LeaseRow]:
        """Leases queued or running: what to resume after a restart, oldest first."""
        rows = self.conn.execute(
            f"SELECT {self._LEASE_COLS} FROM leases WHERE status IN ('queued', 'running') "
            "ORDER BY received_ms, lease_id").fetchall()
        return [self._lease_row(r) for r in rows]

    def job_leases(self, publisher: bytes, job_id: bytes) -> list[W.LeaseStatus]:
        """The leases of `job_id` this node holds from `publisher`, with their status."""
        rows = self.conn.execute("SELECT lease_id, status FROM leases WHERE publisher = ? AND "
                                 "job_id = ? ORDER BY lease_id", (publisher, job_id)).fetchall()
        return [W.LeaseStatus(bytes(lease_id), status) for lease_id, status in rows]

    def set_status(self, lease_id: bytes, status: str, now_ms: int) -> None:
        if status not in LEASE_STATUSES:
            raise LedgerError(f"unknown lease status {status!r}; one of {', '.join(LEASE_STATUSES)}")
        with self._tx() as db:
            cur = db.execute("UPDATE leases SET status = ?, updated_ms = ? WHERE lease_id = ?",
                             (status, now_ms, lease_id))
            if cur.rowcount != 1:
                raise LedgerError(f"no lease {lease_id.hex()} in the ledger")

    # outbox ------------------------------------------------------------------------------------
    def enqueue(self, publisher: bytes, lease_id: bytes | None, kind: str, envelope: bytes,
                exp_ms: int, now_ms: int, *, output_digest: bytes | None = None,
                output: bytes | None = None, elapsed_ms: int = 0, energy_mwh: int = 0) -> int:
        """Persist a report before sending it; returns its outbox id (due at once).

        The same envelope enqueued again returns the first id (a crash between enqueue and
        bookkeeping repeats nothing).
        """
        if kind not in OUTBOX_KINDS:
            raise LedgerError(f"cannot enqueue {kind!r}: one of {', '.join(OUTBOX_KINDS)}")
        if kind == "result" and (lease_id is None or output_digest is None):
            raise LedgerError("a result needs its lease_id and output_digest")
        if elapsed_ms < 0 or energy_mwh < 0:
            raise LedgerError("elapsed_ms and energy_mwh must be >= 0")
        with self._tx() as db:
            if lease_id is not None:
                row = db.execute("SELECT publisher FROM leases WHERE lease_id = ?",
                                 (lease_id,)).fetchone()
                if row is None:
                    raise LedgerError(f"no lease {lease_id.hex()} in the ledger")
                if row[0] != publisher:
                    raise LedgerError(f"lease {lease_id.hex()} is not from publisher "
                                      f"{publisher.hex()[:16]}")
            found = db.execute("SELECT id FROM outbox WHERE envelope = ?", (envelope,)).fetchone()
            if found is not None:
                return found[0]
            return db.execute(
                "INSERT INTO outbox (publisher, lease_id, kind, envelope, exp_ms, created_ms, "
                "next_try_ms, output_digest, output, elapsed_ms, energy_mwh) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (publisher, lease_id, kind, envelope, exp_ms, now_ms, now_ms, output_digest,
                 output, elapsed_ms, energy_mwh)).lastrowid

    def due(self, now_ms: int) -> list[OutboxItem]:
        """Undelivered, unexpired items whose next try has come, oldest first."""
        rows = self.conn.execute(
            "SELECT id, publisher, lease_id, kind, envelope, attempts, exp_ms, next_try_ms "
            "FROM outbox WHERE delivered_ms IS NULL AND exp_ms >= ? AND next_try_ms <= ? "
            "ORDER BY next_try_ms, id", (now_ms, now_ms)).fetchall()
        return [OutboxItem(*r) for r in rows]

    def pending(self) -> int:
        """Undelivered items, expired or not (for status displays)."""
        return self.conn.execute(
            "SELECT count(*) FROM outbox WHERE delivered_ms IS NULL").fetchone()[0]

    def delivered(self, item_id: int, now_ms: int) -> None:
        """The publisher acknowledged the item. For a result this starts the unpaid clock.
        A second call keeps the first time."""
        with self._tx() as db:
            cur = db.execute("UPDATE outbox SET delivered_ms = coalesce(delivered_ms, ?) "
                             "WHERE id = ?", (now_ms, item_id))
            if cur.rowcount != 1:
                raise LedgerError(f"no outbox item {item_id}")

    def retry_later(self, item_id: int, now_ms: int, rng: random.Random, *,
                    base_s: float = C.RETRY_BASE_S, max_s: float = C.RETRY_MAX_S) -> int:
        """A delivery attempt failed: count it and schedule the next; returns its time (ms)."""
        with self._tx() as db:
            row = db.execute("SELECT attempts FROM outbox WHERE id = ?", (item_id,)).fetchone()
            if row is None:
                raise LedgerError(f"no outbox item {item_id}")
            attempts = row[0] + 1
            next_ms = now_ms + round(1000 * C.retry_delay_s(attempts, rng, base_s=base_s,
                                                            max_s=max_s))
            db.execute("UPDATE outbox SET attempts = ?, next_try_ms = ? WHERE id = ?",
                       (attempts, next_ms, item_id))
        return next_ms

    def output_for(self, digest: bytes) -> bytes | None:
        """An outputs blob this node still keeps for its publisher, by digest."""
        row = self.conn.execute("SELECT output FROM outbox WHERE output_digest = ? AND "
                                "output IS NOT NULL LIMIT 1", (digest,)).fetchone()
        return None if row is None else row[0]

    def prune(self, now_ms: int) -> int:
        """Drop outputs blobs of results that expired without a receipt; returns how many.
        (Records are kept: only the bulky blobs go.)"""
        with self._tx() as db:
            return db.execute("UPDATE outbox SET output = NULL WHERE output IS NOT NULL "
                              "AND exp_ms < ?", (now_ms,)).rowcount

    # receipts ----------------------------------------------------------------------------------
    def add_receipt(self, receipt: Opened, now_ms: int) -> str:
        """Check and store a verified receipt envelope: "new", "duplicate" or "conflict".

        Raises `ReceiptRejected` (nothing stored) if it fails checks 2-5 of credit.md
        section 2. "duplicate": this very receipt is already stored (acknowledge it, change
        nothing). "conflict": a different receipt for the lease is already held; this one is
        stored beside it as proof, and the higher credit counts.
        """
        if receipt.kind != "receipt" or not isinstance(receipt.body, Receipt):
            raise ReceiptRejected(C.CHECK_KIND, f"a {receipt.kind!r} envelope is not a receipt")
        body: Receipt = receipt.body
        seen = C.ReceiptSeen(now_ms, body.lease_id, body.job_id, body.shard, body.worker,
                             body.output_digest, body.credit, body.at, receipt.signer)
        with self._tx() as db:
            if db.execute("SELECT 1 FROM receipts WHERE msg_id = ?",
                          (receipt.msg_id,)).fetchone():
                self._noted(replace(seen, duplicate=True), [], None)
                return "duplicate"
            row = db.execute("SELECT lease_id, publisher, worker, job_id, shard, credit "
                             "FROM leases WHERE lease_id = ?", (body.lease_id,)).fetchone()
            held = C.HeldLease(*row) if row else None
            sent = db.execute("SELECT output_digest FROM outbox WHERE lease_id = ? AND "
                              "kind = 'result' ORDER BY id LIMIT 1", (body.lease_id,)).fetchone()
            try:
                C.check_receipt(body, receipt.signer, held, sent[0] if sent else None,
                                worker_keys=self.worker_keys, now_ms=now_ms)
            except C.ReceiptRefused as exc:
                if self.on_receipt is not None:
                    self._noted(replace(seen, lease=held, sent_digest=sent[0] if sent else None,
                                        worker_keys=self.worker_keys), [], str(exc))
                raise ReceiptRejected(exc.check, exc.detail) from None
            before = db.execute("SELECT count(*) FROM receipts WHERE lease_id = ? AND "
                                "publisher = ?", (body.lease_id, receipt.signer)).fetchone()[0]
            if self.on_receipt is not None:
                self._noted(replace(seen, lease=held, sent_digest=sent[0] if sent else None,
                                    worker_keys=self.worker_keys, earlier=before),
                            [C.Credited(body.lease_id, receipt.signer, body.credit,
                                        "conflict" if before else "new")], None)
            db.execute(
                "INSERT INTO receipts (msg_id, publisher, lease_id, job_id, shard, worker, "
                "output_digest, credit, at_ms, received_ms, network, envelope) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (receipt.msg_id, receipt.signer, body.lease_id, body.job_id, body.shard,
                 body.worker, body.output_digest, body.credit, body.at, now_ms,
                 receipt.network, receipt.raw))
            # A receipt proves the result arrived: stop retrying it, release its blob.
            db.execute("UPDATE outbox SET delivered_ms = coalesce(delivered_ms, ?), "
                       "output = NULL WHERE lease_id = ? AND kind = 'result'",
                       (now_ms, body.lease_id))
        return "conflict" if before else "new"

    def _noted(self, seen: C.ReceiptSeen, effects: list, refused: str | None) -> None:
        if self.on_receipt is not None:
            self.on_receipt(seen, effects, refused)

    _RECEIPT_COLS = ("id, publisher, lease_id, job_id, shard, worker, output_digest, credit, "
                     "at_ms, received_ms, network, envelope")

    def receipt_rows(self, publisher: bytes | None = None) -> list[ReceiptRow]:
        if publisher is None:
            rows = self.conn.execute(f"SELECT {self._RECEIPT_COLS} FROM receipts ORDER BY id")
        else:
            rows = self.conn.execute(f"SELECT {self._RECEIPT_COLS} FROM receipts WHERE "
                                     "publisher = ? ORDER BY id", (publisher,))
        return [ReceiptRow(*r) for r in rows.fetchall()]

    def hand_back_rows(self, limit: int = 20) -> list[tuple[bytes, bytes, bytes, int, int, bytes]]:
        """The latest hand-backs, newest first: (publisher, lease id, job id, shard, created
        ms, the signed hand_back envelope, which says why)."""
        return self.conn.execute(
            "SELECT o.publisher, o.lease_id, l.job_id, l.shard, o.created_ms, o.envelope "
            "FROM outbox o JOIN leases l ON l.lease_id = o.lease_id WHERE o.kind = 'hand_back' "
            "ORDER BY o.created_ms DESC, o.id DESC LIMIT ?", (limit,)).fetchall()

    def receipts(self, publisher: bytes | None = None) -> list[bytes]:
        """The complete signed receipt envelopes, in the order received."""
        return [r.envelope for r in self.receipt_rows(publisher)]

    def unreceipted(self, now_ms: int, waited_ms: int, limit: int = 64) -> dict[bytes, list[bytes]]:
        """Per publisher, the leases (at most `limit` each, oldest first) whose result was
        acknowledged at least `waited_ms` ago, within the unpaid window, without a receipt."""
        rows = self.conn.execute(
            "SELECT o.publisher, o.lease_id FROM outbox o WHERE o.kind = 'result' AND "
            "o.delivered_ms IS NOT NULL AND o.delivered_ms <= ? AND o.delivered_ms > ? AND "
            "NOT EXISTS (SELECT 1 FROM receipts r WHERE r.lease_id = o.lease_id) "
            "ORDER BY o.delivered_ms, o.id", (now_ms - waited_ms, now_ms - C.WINDOW_MS))
        out: dict[bytes, list[bytes]] = {}
        for publisher, lease_id in rows:
            held = out.setdefault(bytes(publisher), [])
            if len(held) < limit:
                held.append(bytes(lease_id))
        return out

    # the cap -----------------------------------------------------------------------------------
    def _deliveries(self, publisher: bytes, since_ms: int | None) -> list[C.Delivery]:
        sql = ("SELECT o.lease_id, l.credit, o.delivered_ms, o.elapsed_ms FROM outbox o "
               "JOIN leases l ON l.lease_id = o.lease_id WHERE o.publisher = ? AND "
               "o.kind = 'result' AND o.delivered_ms IS NOT NULL")
        args: tuple = (publisher,)
        if since_ms is not None:
            sql += " AND o.delivered_ms > ?"
            args += (since_ms,)
        return [C.Delivery(*r) for r in self.conn.execute(sql + " ORDER BY o.id", args)]

    def _payments(self, publisher: bytes) -> list[C.Payment]:
        return [C.Payment(*r) for r in self.conn.execute(
            "SELECT lease_id, credit FROM receipts WHERE publisher = ?", (publisher,))]

    def unpaid(self, publisher: bytes, now_ms: int) -> C.Unpaid:
        """Unpaid work at `publisher` (credit.md section 3, `core.credit.unpaid`)."""
        return C.unpaid(self._deliveries(publisher, now_ms - C.WINDOW_MS),
                        self._payments(publisher), now_ms)

    def may_request(self, publisher: bytes, now_ms: int, *, cap_credit: int,
                    cap_elapsed_ms: int = C.DEFAULT_CAP_ELAPSED_MS) -> bool:
        """May the node send `publisher` a work request under the unpaid caps?"""
        return self.cap_reason(publisher, now_ms, cap_credit=cap_credit,
                               cap_elapsed_ms=cap_elapsed_ms) is None

    def cap_reason(self, publisher: bytes, now_ms: int, *, cap_credit: int,
                   cap_elapsed_ms: int = C.DEFAULT_CAP_ELAPSED_MS) -> str | None:
        """Why the node must not ask `publisher` for work now (None: it may), for status."""
        return C.cap_reason(self.unpaid(publisher, now_ms), cap_credit=cap_credit,
                            cap_elapsed_ms=cap_elapsed_ms)

    # energy ------------------------------------------------------------------------------------
    def add_energy(self, publisher: bytes, now_ms: int, mwh: int, *, metered: bool,
                   tz_offset_s: int = 0) -> None:
        """Add energy spent for `publisher`'s work to its row for the local day of `now_ms`."""
        if not isinstance(mwh, int) or isinstance(mwh, bool) or mwh < 0:
            raise LedgerError(f"energy must be a whole number of mWh >= 0, got {mwh!r}")
        day = C.local_day(now_ms, tz_offset_s)
        with self._tx() as db:
            db.execute("INSERT INTO energy (publisher, day, metered, mwh) VALUES (?, ?, ?, ?) "
                       "ON CONFLICT (publisher, day, metered) DO UPDATE SET mwh = mwh + "
                       "excluded.mwh", (publisher, day, int(bool(metered)), mwh))

    # the owner's view --------------------------------------------------------------------------
    def publishers(self) -> list[bytes]:
        rows = self.conn.execute(
            "SELECT publisher FROM leases UNION SELECT publisher FROM receipts "
            "UNION SELECT publisher FROM energy UNION SELECT publisher FROM outbox "
            "ORDER BY publisher")
        return [r[0] for r in rows]

    def summary(self, now_ms: int, *, tz_offset_s: int = 0) -> list[PublisherSummary]:
        """One summary per publisher, in its own credit units; never a sum across them."""
        return [self._summary(p, now_ms, tz_offset_s) for p in self.publishers()]

    def _summary(self, pub: bytes, now_ms: int, tz_offset_s: int) -> PublisherSummary:
        q = self.conn.execute
        leases = q("SELECT count(*) FROM leases WHERE publisher = ?", (pub,)).fetchone()[0]
        counts = dict(q("SELECT kind || (delivered_ms IS NOT NULL), count(*) FROM outbox "
                        "WHERE publisher = ? GROUP BY 1", (pub,)).fetchall())
        compute = q("SELECT coalesce(sum(elapsed_ms), 0) FROM outbox WHERE publisher = ? "
                    "AND kind = 'result'", (pub,)).fetchone()[0]
        payments = self._payments(pub)
        paid = C.paid_per_lease(payments)
        promised = q("SELECT coalesce(sum(l.credit), 0) FROM leases l WHERE l.publisher = ? AND "
                     "EXISTS (SELECT 1 FROM outbox o WHERE o.lease_id = l.lease_id AND "
                     "o.kind = 'result' AND o.delivered_ms IS NOT NULL)", (pub,)).fetchone()[0]
        energy = dict(q("SELECT metered, sum(mwh) FROM energy WHERE publisher = ? GROUP BY 1",
                        (pub,)).fetchall())
        days: dict[str, dict[str, int]] = {}

        def day(at_ms: int) -> dict[str, int]:
            return days.setdefault(C.local_day(at_ms, tz_offset_s), {})

        for delivered_ms, elapsed in q("SELECT delivered_ms, elapsed_ms FROM outbox WHERE "
                                       "publisher = ? AND kind = 'result' AND delivered_ms "
                                       "IS NOT NULL", (pub,)):
            d = day(delivered_ms)
            d["results"] = d.get("results", 0) + 1
            d["compute_ms"] = d.get("compute_ms", 0) + elapsed
        # Per day, the credit a lease's counting receipt (the highest) paid, on its day.
        best: dict[bytes, tuple[int, int]] = {}
        for lease_id, credit, received in q("SELECT lease_id, credit, received_ms FROM receipts "
                                            "WHERE publisher = ? ORDER BY id", (pub,)):
            if lease_id not in best or credit > best[lease_id][0]:
                best[lease_id] = (credit, received)
        for credit, received in best.values():
            d = day(received)
            d["credit_paid"] = d.get("credit_paid", 0) + credit
        for dname, metered, mwh in q("SELECT day, metered, mwh FROM energy WHERE publisher = ?",
                                     (pub,)):
            d = days.setdefault(dname, {})
            key = "metered_mwh" if metered else "estimated_mwh"
            d[key] = d.get(key, 0) + mwh
        conflicts = q("SELECT count(*) FROM (SELECT lease_id FROM receipts WHERE publisher = ? "
                      "GROUP BY lease_id HAVING count(*) > 1)", (pub,)).fetchone()[0]
        return PublisherSummary(
            publisher=pub, leases=leases,
            results_delivered=counts.get("result1", 0), results_pending=counts.get("result0", 0),
            failures=counts.get("failed0", 0) + counts.get("failed1", 0),
            hand_backs=counts.get("hand_back0", 0) + counts.get("hand_back1", 0),
            receipts=len(payments), conflicting_receipts=conflicts,
            credit_promised=promised, credit_paid=sum(paid.values()),
            unpaid=self.unpaid(pub, now_ms), compute_ms=compute,
            metered_mwh=energy.get(1, 0), estimated_mwh=energy.get(0, 0),
            days=[DaySummary(name, **vals) for name, vals in sorted(days.items())],
        )


__all__ = ["DaySummary", "LEASE_STATUSES", "Ledger", "LedgerError", "LeaseRow", "OutboxItem",
           "PublisherSummary", "ReceiptRejected", "ReceiptRow"]
