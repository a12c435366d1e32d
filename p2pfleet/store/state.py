"""The node's small persistent state: seen messages (dedup), record sequence numbers, bans,
and the high-water marks of records seen.

All survive restarts: a replayed message is refused after a restart too, record sequence
numbers and expiries only move forward, a banned peer stays banned when it reconnects, and a
record older than one seen for its key is refused after a restart too. `MemoryMarks` keeps
marks for a process without a state file (the explorer, tests).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

from ..core.records import next_expiry, next_sequence
from .db import open_db

MIGRATIONS = [
    """
    CREATE TABLE seen (
        msg_id BLOB PRIMARY KEY,
        keep_until_ms INTEGER          -- NULL: keep forever
    ) WITHOUT ROWID;
    CREATE INDEX seen_expiry ON seen (keep_until_ms);
    CREATE TABLE sequences (
        name TEXT PRIMARY KEY,
        last INTEGER NOT NULL
    ) WITHOUT ROWID;
    """,
    """
    CREATE TABLE bans (
        peer TEXT PRIMARY KEY,
        until_s REAL NOT NULL,
        reason TEXT NOT NULL
    ) WITHOUT ROWID;
    """,
    """
    ALTER TABLE sequences ADD COLUMN max_exp INTEGER;
    CREATE TABLE record_marks (
        key TEXT PRIMARY KEY,          -- DHT key of the record stream
        seq INTEGER NOT NULL,          -- highest sequence seen (signature verified)
        body_digest BLOB NOT NULL,     -- SHA-256 of that record's body (equivocation)
        envelope BLOB NOT NULL,        -- that record
        keep_until_ms INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX record_marks_expiry ON record_marks (keep_until_ms);
    """,
]


@dataclass(frozen=True)
class RecordMark:
    """The highest-sequence record seen for one key."""

    seq: int
    body_digest: bytes
    envelope: bytes
    keep_until_ms: int


class MemoryMarks:
    """Record marks held in memory only (same methods as NodeState's)."""

    def __init__(self) -> None:
        self._marks: dict[str, RecordMark] = {}

    def record_mark(self, key: str) -> RecordMark | None:
        return self._marks.get(key)

    def raise_mark(self, key: str, mark: RecordMark) -> None:
        held = self._marks.get(key)
        if held is None or mark.seq > held.seq:
            self._marks[key] = mark
        elif mark.seq == held.seq and mark.keep_until_ms > held.keep_until_ms:
            self._marks[key] = RecordMark(held.seq, held.body_digest, held.envelope,
                                          mark.keep_until_ms)

    def forget_marks(self, now_ms: int) -> int:
        ended = [k for k, m in self._marks.items() if m.keep_until_ms < now_ms]
        for key in ended:
            del self._marks[key]
        return len(ended)


class NodeState:
    """Dedup store, sequence counters, bans and record marks in one SQLite file."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.conn: sqlite3.Connection = open_db(self.path, MIGRATIONS, name="node state")

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "NodeState":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # dedup -----------------------------------------------------------------
    def remember(self, msg_id: bytes, keep_until_ms: int | None, now_ms: int) -> bool:
        """Record a message id; False if it is already remembered (a replay)."""
        cur = self.conn.execute(
            "INSERT INTO seen (msg_id, keep_until_ms) VALUES (?, ?) ON CONFLICT DO NOTHING",
            (msg_id, keep_until_ms),
        )
        return cur.rowcount == 1

    def forget_expired(self, now_ms: int) -> int:
        """Drop ids of messages that can no longer be accepted anyway (they expired)."""
        cur = self.conn.execute(
            "DELETE FROM seen WHERE keep_until_ms IS NOT NULL AND keep_until_ms < ?", (now_ms,)
        )
        return cur.rowcount

    # bans ------------------------------------------------------------------
    def save_ban(self, peer: str, until_s: float, reason: str) -> None:
        self.conn.execute(
            "INSERT INTO bans (peer, until_s, reason) VALUES (?, ?, ?) ON CONFLICT (peer) "
            "DO UPDATE SET until_s = max(until_s, excluded.until_s), reason = excluded.reason",
            (peer, until_s, reason),
        )

    def active_bans(self, now_s: float) -> list[tuple[str, float, str]]:
        return list(self.conn.execute(
            "SELECT peer, until_s, reason FROM bans WHERE until_s > ? ORDER BY peer", (now_s,)))

    def forget_ended_bans(self, now_s: float) -> int:
        return self.conn.execute("DELETE FROM bans WHERE until_s <= ?", (now_s,)).rowcount

    # record marks ----------------------------------------------------------
    def record_mark(self, key: str) -> RecordMark | None:
        row = self.conn.execute(
            "SELECT seq, body_digest, envelope, keep_until_ms FROM record_marks WHERE key = ?",
            (key,)).fetchone()
        return RecordMark(row[0], bytes(row[1]), bytes(row[2]), row[3]) if row else None

    def raise_mark(self, key: str, mark: RecordMark) -> None:
        """Hold `mark` for `key` unless a higher sequence is held (the same one: keep the
        held record, and the later keep-until time)."""
        self.conn.execute(
            "INSERT INTO record_marks (key, seq, body_digest, envelope, keep_until_ms) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET "
            "seq = excluded.seq, body_digest = excluded.body_digest, "
            "envelope = excluded.envelope, keep_until_ms = excluded.keep_until_ms "
            "WHERE excluded.seq > record_marks.seq",
            (key, mark.seq, mark.body_digest, mark.envelope, mark.keep_until_ms))
        self.conn.execute(
            "UPDATE record_marks SET keep_until_ms = ? WHERE key = ? AND seq = ? "
            "AND keep_until_ms < ?", (mark.keep_until_ms, key, mark.seq, mark.keep_until_ms))

    def forget_marks(self, now_ms: int) -> int:
        """Drop marks that protect nothing any more (every older record has expired)."""
        return self.conn.execute("DELETE FROM record_marks WHERE keep_until_ms < ?",
                                 (now_ms,)).rowcount

    # sequences -------------------------------------------------------------
    def next_record(self, name: str, now_ms: int, lifetime_ms: int,
                    max_lifetime_ms: int) -> tuple[int, int]:
        """Allocate and persist the next (seq, exp) of the record stream `name`: exp is at
        least the latest exp the stream had (core.records.next_expiry)."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            row = self.conn.execute("SELECT last, max_exp FROM sequences WHERE name = ?",
                                    (name,)).fetchone()
            seq = next_sequence(row[0] if row else None, now_ms)
            latest_exp = row[1] if row else None
            exp = next_expiry(latest_exp, now_ms, lifetime_ms, max_lifetime_ms)
            self.conn.execute(
                "INSERT INTO sequences (name, last, max_exp) VALUES (?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET last = excluded.last, "
                "max_exp = max(coalesce(max_exp, 0), excluded.max_exp)",
                (name, seq, exp),
            )
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        return seq, exp

    def next_sequence(self, name: str, now_ms: int) -> int:
        """Allocate and persist the next sequence number for the record stream `name`."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            row = self.conn.execute("SELECT last FROM sequences WHERE name = ?", (name,)).fetchone()
            seq = next_sequence(row[0] if row else None, now_ms)
            self.conn.execute(
                "INSERT INTO sequences (name, last) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET last = excluded.last",
                (name, seq),
            )
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        return seq
