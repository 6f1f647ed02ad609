"""One writer per database: the lock a daemon holds for as long as it may write.

A second daemon on the same database would mark the live run crashed, append ``recover``
events for sessions the first one owns, and then collide with its appends
(VersionConflict). So the daemon takes this lock before it reads or writes anything, and
a daemon that cannot have it refuses to start, naming the holder (pid, host, start time).

- **SQLite**: ``flock(2)`` on ``<database>.lock`` beside the file. The kernel drops the lock
  when the holder's descriptor closes, however the process ends (SIGKILL included), so a
  lock file left behind means nothing; it is never deleted (deleting would race with a
  process that has just opened it). The holder writes its pid, host and start time into
  it as one JSON line. flock, not ``lockf``/``fcntl`` record locks: those belong to the
  process (a second open in the same process shares them, and closing any descriptor of
  the file drops them); flock belongs to the open file, so two daemons in one process
  exclude each other too.
- **PostgreSQL**: a session advisory lock (``pg_try_advisory_lock``) held on a dedicated
  connection for the daemon's life; the server drops it when that connection ends (the
  daemon exits, or dies and the kernel closes its socket). Advisory locks are per
  database and one database may hold event stores in several schemas, so the key is
  fixed per schema: ``"wire"`` in the high 32 bits, the OID of the schema the connection
  writes to (``current_schema()``) in the low 32. The holder is found through
  ``pg_locks`` and ``pg_stat_activity``: its ``application_name`` is ``wirekeep <pid>
  <start> <host>``, the server's ``backend_start`` the fallback. Not from ``daemon_runs``:
  the lock is taken before that table is read (or exists), and a crashed run's unfinished
  row names a dead process.

A dropped connection loses the PostgreSQL lock with it (a server restart): the writer then
fails too, and the per-session ``UNIQUE(session, version)`` still refuses a second writer's
duplicate versions. Daemons sharing a database come later, through per-session leases;
this module is the one place that changes then.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from daemon.dberrors import DatabaseUnavailable, shown, sqlite_hint

#: "wire": the high half of the advisory lock key.
_KEY_HIGH = 0x77697265
#: application_name is cut at NAMEDATALEN - 1 bytes.
_APPLICATION_NAME_MAX = 63


@dataclass(frozen=True)
class Holder:
    """Who holds the lock, as far as it can be told."""

    pid: int | None
    host: str
    started: str

    def describe(self) -> str:
        pid = f"pid {self.pid}" if self.pid is not None else "pid unknown"
        host = f" on host {self.host}" if self.host else ""
        started = f", started {self.started}" if self.started else ""
        return pid + host + started


class DatabaseBusy(Exception):
    """Another daemon holds the database's writer lock."""

    def __init__(self, url: str, holder: Holder, lock: str) -> None:
        super().__init__(
            f"another wirekeep daemon is writing to {shown(url)}: {holder.describe()} "
            f"({lock}); stop it first, or give this daemon another database"
        )
        self.holder = holder


class WriterLock(Protocol):
    def release(self) -> None: ...


def acquire(url: str, *, started_at: datetime) -> WriterLock:
    """The writer lock of the database at ``url``, or DatabaseBusy naming its holder.

    Raises DatabaseUnavailable when the lock cannot even be tried (no such directory,
    no permission, no server).
    """
    me = Holder(os.getpid(), socket.gethostname(), _iso(started_at))
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        path = parsed.database
        if not path or path == ":memory:" or path.startswith("file::memory:"):
            return _Nothing()  # a private in-memory database: nobody else can write it
        return _FileLock.acquire(url, f"{path}.lock", me)
    return _AdvisoryLock.acquire(url, me)


def _iso(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class _Nothing:
    def release(self) -> None:
        pass


class _FileLock:
    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, url: str, path: str, me: Holder) -> _FileLock:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            hint = sqlite_hint(url)
            raise DatabaseUnavailable(
                f"cannot use the database {shown(url)}: cannot open its lock file {path}: "
                f"{exc.strerror or exc}" + (f" ({hint})" if hint else "")
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise DatabaseBusy(url, holder, f"lock file {path}") from None
        except BaseException:
            os.close(fd)
            raise
        record = json.dumps({"pid": me.pid, "host": me.host, "started": me.started})
        os.ftruncate(fd, 0)
        os.pwrite(fd, record.encode() + b"\n", 0)
        return cls(fd)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # drops the flock
            self._fd = None


def _read_holder(fd: int) -> Holder:
    """The holder's line; unknown when it has not written it yet (it has just started)."""
    try:
        record = json.loads(os.pread(fd, 4096, 0) or b"{}")
        pid = record.get("pid")
        return Holder(
            pid if isinstance(pid, int) else None,
            str(record.get("host") or ""),
            str(record.get("started") or ""),
        )
    except (OSError, ValueError, AttributeError):
        return Holder(None, "", "")


class _AdvisoryLock:
    def __init__(self, engine: Any, conn: Any) -> None:
        self._engine = engine
        self._conn = conn

    @classmethod
    def acquire(cls, url: str, me: Holder) -> _AdvisoryLock:
        name = f"wirekeep {me.pid} {me.started} {me.host}"[:_APPLICATION_NAME_MAX]
        engine = sa.create_engine(url, poolclass=NullPool, connect_args={"application_name": name})
        try:
            # Autocommit: the lock belongs to the session, and an idle transaction held for
            # the daemon's life would pin old row versions (and meet idle timeouts).
            conn = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        except BaseException:
            engine.dispose()
            raise
        try:
            schema = conn.execute(
                sa.text(
                    "SELECT coalesce((SELECT oid::bigint FROM pg_namespace "
                    "WHERE nspname = current_schema()), 0)"
                )
            ).scalar_one()
            key = (_KEY_HIGH << 32) | int(schema)
            if conn.execute(sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar_one():
                return cls(engine, conn)
            holder = _pg_holder(conn, schema)
        except BaseException:
            conn.close()
            engine.dispose()
            raise
        conn.close()
        engine.dispose()
        raise DatabaseBusy(url, holder, f"PostgreSQL advisory lock {key}")

    def release(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):  # the server drops it with the session anyway
                self._conn.close()
            self._engine.dispose()
            self._conn = None


def _pg_holder(conn: Any, schema: int) -> Holder:
    row = conn.execute(
        sa.text(
            "SELECT a.application_name, a.backend_start, a.client_hostname, "
            "host(a.client_addr) AS client_addr "
            "FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 "
            "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
            "AND l.classid = CAST(:high AS oid) AND l.objid = CAST(:low AS oid)"
        ),
        {"high": _KEY_HIGH, "low": schema},
    ).first()
    if row is None:  # released between the try and this look
        return Holder(None, "", "")
    parts = (row.application_name or "").split(" ", 3)
    if len(parts) == 4 and parts[0] == "wirekeep" and parts[1].isdigit():
        return Holder(int(parts[1]), parts[3], parts[2])
    started = _iso(row.backend_start) if row.backend_start is not None else ""
    return Holder(None, row.client_hostname or row.client_addr or "", started)
