"""Open a SQLite database in WAL mode and bring its schema up to date.

Each database names its migrations: a list of SQL scripts, applied in order inside one
transaction each, with `PRAGMA user_version` recording how many have run. A database whose
version is newer than the code knows is refused (it was written by newer software).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path


class StoreError(Exception):
    """A database is corrupt, newer than this software, or otherwise unusable."""


def open_db(path: Path | str, migrations: list[str], *, name: str = "database") -> sqlite3.Connection:
    try:
        conn = sqlite3.connect(str(path), timeout=10.0, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"{path}: not a usable SQLite {name} ({exc})") from None
    if version > len(migrations):
        conn.close()
        raise StoreError(
            f"{path}: {name} schema version {version} is newer than this software "
            f"(knows {len(migrations)}); upgrade p2pfleet"
        )
    for number in range(version, len(migrations)):
        try:
            conn.execute("BEGIN IMMEDIATE")
            for statement in _statements(migrations[number]):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version={number + 1}")
            conn.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            conn.execute("ROLLBACK")
            conn.close()
            raise StoreError(f"{path}: migration {number + 1} of {name} failed ({exc})") from None
    return conn


def _statements(script: str) -> list[str]:
    """Split a migration script into statements (our scripts hold no ';' in literals)."""
    return [s.strip() for s in script.split(";") if s.strip()]
