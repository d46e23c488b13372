"""Durability: real broker subprocesses on SQLite, killed and restarted (SPEC §4)."""
