"""SQLite storage (WAL, migrations): node state, dedup of seen messages, sequences."""
