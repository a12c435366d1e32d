"""The node's small persistent state: seen messages (dedup), record sequence numbers, bans.

All survive restarts: a replayed message is refused after a restart too, record sequence
numbers only move forward, and a banned peer stays banned when it reconnects.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from ..core.records import next_sequence
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
]


class NodeState:
    """Dedup store, sequence counters and bans in one SQLite file."""

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

    # sequences -------------------------------------------------------------
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
