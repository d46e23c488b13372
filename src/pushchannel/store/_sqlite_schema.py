"""The SQLite store's file: opening it, checking it, its schema and migrations, and its errors.

Everything here runs on the store's writer thread. Foreign errors (``sqlite3.Error``, ``OSError``)
become :mod:`pushchannel.errors` here, once, with a message that says what to do.
"""

from __future__ import annotations

import errno
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Literal, TextIO

try:
    import fcntl
except ImportError:  # not POSIX: no advisory lock
    fcntl = None  # type: ignore[assignment]

from pushchannel.errors import InternalError, PushChannelError, ResourceExhausted, Unavailable

#: Written to the file header (``PRAGMA application_id``) so a foreign SQLite file is recognised.
APPLICATION_ID = 0x50434831  # "PCH1"

Fsync = Literal["normal", "full"]

# SQLite primary result codes (the low byte of an extended code).
_PERM, _BUSY, _LOCKED, _READONLY, _IOERR, _CORRUPT, _FULL, _CANTOPEN, _NOTADB = 3, 5, 6, 8, 10, 11, 13, 14, 26


def _v1(conn: sqlite3.Connection) -> None:
    """The initial schema."""
    _script(
        conn,
        """
        CREATE TABLE channels (
            id       INTEGER PRIMARY KEY,
            name     TEXT NOT NULL UNIQUE,
            last_seq INTEGER NOT NULL DEFAULT 0,  -- the highest seq ever given
            bytes    INTEGER NOT NULL DEFAULT 0,  -- sum of messages.size
            dropped  INTEGER NOT NULL DEFAULT 0   -- dropped by limits (max_age/messages/bytes)
        );
        CREATE TABLE messages (
            channel_id   INTEGER NOT NULL,
            seq          INTEGER NOT NULL,
            id           TEXT NOT NULL,
            payload      BLOB NOT NULL,
            attributes   BLOB,                    -- a compact JSON object, NULL: none
            publish_time REAL NOT NULL,
            expires_at   REAL NOT NULL,           -- 0: never
            size         INTEGER NOT NULL,
            PRIMARY KEY (channel_id, seq)
        );  -- a rowid table: payloads of 1 KiB and more would bloat a WITHOUT ROWID b-tree
        CREATE TABLE groups (
            id         INTEGER PRIMARY KEY,
            channel_id INTEGER NOT NULL,
            name       TEXT NOT NULL,
            cursor     INTEGER NOT NULL,          -- the last seq handed out
            UNIQUE (channel_id, name)
        );
        CREATE TABLE pending (
            grp      INTEGER NOT NULL,            -- groups.id
            seq      INTEGER NOT NULL,
            consumer TEXT NOT NULL,
            deadline REAL NOT NULL,
            attempt  INTEGER NOT NULL,
            reason   TEXT NOT NULL,
            PRIMARY KEY (grp, seq)
        ) WITHOUT ROWID;
        CREATE INDEX pending_by_deadline ON pending (grp, deadline);
        CREATE TABLE dedupe (
            channel_id INTEGER NOT NULL,
            id         TEXT NOT NULL,
            seq        INTEGER NOT NULL,
            time       REAL NOT NULL,
            PRIMARY KEY (channel_id, id)
        ) WITHOUT ROWID;
        CREATE INDEX dedupe_by_time ON dedupe (channel_id, time);
        """,
    )


def _script(conn: sqlite3.Connection, script: str) -> None:
    # Not executescript(): that commits first, and migrations run inside one transaction.
    statement = ""
    for line in script.splitlines(keepends=True):
        statement += line
        if sqlite3.complete_statement(statement):
            conn.execute(statement)
            statement = ""
    if statement.strip():
        raise ValueError(f"incomplete SQL in a migration: {statement!r}")


def _v2(conn: sqlite3.Connection) -> None:
    """Pending entries handed out together by read_new, as one row (see _sqlite_groups)."""
    _script(
        conn,
        """
        CREATE TABLE pending_ranges (
            grp       INTEGER NOT NULL,           -- groups.id
            first_seq INTEGER NOT NULL,
            last_seq  INTEGER NOT NULL,           -- first_seq..last_seq: all pending, attempt 1
            consumer  TEXT NOT NULL,
            deadline  REAL NOT NULL,
            PRIMARY KEY (grp, first_seq)
        ) WITHOUT ROWID;
        CREATE INDEX pending_ranges_by_deadline ON pending_ranges (grp, deadline);
        """,
    )


#: MIGRATIONS[i] brings a file from schema version i to i + 1. Append only; never edit one.
MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_v1, _v2]
SCHEMA_VERSION = len(MIGRATIONS)


def parse_url(url: str) -> Path:
    """``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db`` -> the file's path."""
    from pushchannel.errors import InvalidArgument

    prefix = "sqlite:///"
    if not url.startswith(prefix) or len(url) == len(prefix):
        raise InvalidArgument(
            f"bad sqlite store URL {url!r}: use sqlite:///relative/path.db or sqlite:////absolute/path.db"
        )
    return Path(url[len(prefix) :])


def _code(exc: BaseException) -> int:
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        return code & 0xFF
    text = str(exc).lower()
    if "disk is full" in text:
        return _FULL
    if "not a database" in text:
        return _NOTADB
    if "malformed" in text:
        return _CORRUPT
    if "readonly" in text or "read-only" in text:
        return _READONLY
    if "unable to open" in text:
        return _CANTOPEN
    if "locked" in text:
        return _LOCKED
    if "disk i/o" in text:
        return _IOERR
    return -1


def corrupt(path: Path, detail: str) -> Unavailable:
    return Unavailable(
        f"{path} is not a valid pushchannel database (corrupt?): {detail}: "
        "move it away or restore a backup, then start again"
    )


def translate(exc: BaseException, path: Path) -> PushChannelError:
    """The pushchannel error for a ``sqlite3.Error`` or ``OSError`` met while using ``path``."""
    if isinstance(exc, OSError) and not isinstance(exc, sqlite3.Error):
        reason = exc.strerror or str(exc)
        if exc.errno == errno.ENOSPC:
            return ResourceExhausted(f"store is full: no space left for {path}: free disk space")
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            return Unavailable(
                f"store {path} is read-only ({reason}): "
                "make the file and its directory writable for the broker"
            )
        return Unavailable(f"cannot use the store at {path} ({reason}): check the path")
    code = _code(exc)
    if code == _FULL:
        return ResourceExhausted(
            f"store is full: {path} cannot grow ({exc}): free disk space, purge or delete channels, "
            "or lower the retention limits"
        )
    if code in (_READONLY, _PERM):
        return Unavailable(
            f"store {path} is read-only ({exc}): make the file and its directory writable for the broker"
        )
    if code == _CANTOPEN:
        return Unavailable(
            f"cannot open the store at {path} ({exc}): check that the path is a file in a writable directory"
        )
    if code in (_BUSY, _LOCKED):
        return Unavailable(
            f"store {path} is locked ({exc}): is another pushchannel broker using it? "
            "Stop it, or use another path"
        )
    if code == _IOERR:
        return Unavailable(f"I/O error on the store at {path} ({exc}): check the disk and the file system")
    if code in (_CORRUPT, _NOTADB):
        return corrupt(path, str(exc))
    return InternalError(f"sqlite error on {path}: {exc}")


class BrokerLock:
    """An advisory lock on ``PATH.lock``, held while a broker uses the store at ``PATH``: two
    brokers on one file would hand out the same seqs. SQLite's own locks stay in normal mode,
    so backups and the sqlite3 shell can read the file while the broker runs."""

    def __init__(self, db_path: Path) -> None:
        self.db_path = db_path
        self.path = db_path.with_name(db_path.name + ".lock")
        self._file: TextIO | None = None

    def acquire(self) -> None:
        f = self.path.open("a+")
        try:
            if fcntl is not None:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise Unavailable(
                f"store {self.db_path} is in use by another pushchannel broker (pid {holder}): "
                "stop it, or give this one another path"
            ) from None
        except BaseException:
            f.close()
            raise
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the file releases the lock
            self._file = None


def open_database(
    path: Path, fsync: Fsync, max_page_count: int | None
) -> tuple[sqlite3.Connection, BrokerLock]:
    """Lock, open (creating it and its directory if needed), check and migrate the database at
    ``path``. Release the lock after closing the connection.

    Raises Unavailable (with what to do) for a file that cannot be opened or written, one in use
    by another broker, a corrupt or foreign file, or one written by a newer pushchannel.
    """
    lock = BrokerLock(path)
    try:
        if path.parent != Path():
            path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() and not path.is_file():
            raise Unavailable(f"cannot open the store at {path}: it is not a file: check the path")
        lock.acquire()
    except OSError as exc:
        raise translate(exc, path) from exc
    try:
        conn = sqlite3.connect(path, isolation_level=None, cached_statements=256)
    except BaseException as exc:
        lock.release()
        if isinstance(exc, sqlite3.Error):
            raise translate(exc, path) from exc
        raise
    try:
        _prepare(conn, path, fsync, max_page_count)
    except BaseException as exc:
        conn.close()
        lock.release()
        if isinstance(exc, (OSError, sqlite3.Error)):
            raise translate(exc, path) from exc
        raise
    return conn, lock


def _prepare(conn: sqlite3.Connection, path: Path, fsync: Fsync, max_page_count: int | None) -> None:
    # Reading the header first tells a random file ("file is not a database") from a real one.
    tables = conn.execute("SELECT count(*) FROM sqlite_schema").fetchone()[0]
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    app_id = conn.execute("PRAGMA application_id").fetchone()[0]
    if tables and app_id != APPLICATION_ID:
        raise Unavailable(
            f"{path} is an SQLite database of another application, not a pushchannel one: "
            "choose another path for the store"
        )
    if version > SCHEMA_VERSION:
        raise Unavailable(
            f"{path} has schema version {version}, newer than this pushchannel knows ({SCHEMA_VERSION}): "
            "run a newer pushchannel, or restore a backup made for this version"
        )
    if tables:
        rows = conn.execute("PRAGMA quick_check").fetchall()
        if rows != [("ok",)]:
            raise corrupt(path, "; ".join(str(r[0]) for r in rows[:3]))
    else:
        # Only takes effect before the first table: freed pages can then be given back.
        conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
    mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise Unavailable(f"cannot switch {path} to WAL mode (got {mode!r}): put the store on a local disk")
    conn.execute("PRAGMA synchronous=" + ("FULL" if fsync == "full" else "NORMAL"))
    conn.execute("PRAGMA journal_size_limit=67108864")
    conn.execute("PRAGMA cache_size=-32768")  # 32 MiB
    conn.execute("PRAGMA temp_store=MEMORY")
    if max_page_count is not None:
        conn.execute(f"PRAGMA max_page_count={int(max_page_count)}")
    # Always one write transaction, also when there is nothing to migrate: it proves the file
    # writable at start rather than at the first publish.
    conn.execute("BEGIN IMMEDIATE")
    try:
        for migrate in MIGRATIONS[version:]:
            migrate(conn)
        conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
