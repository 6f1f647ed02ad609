"""The event store: engines for SQLite and PostgreSQL, batched appends, reads.

Everything here is synchronous and runs in a worker thread (the writer) or in a
command-line process. The Trio side talks to it only through ``daemon.writer``.
"""

from __future__ import annotations

import functools
import json
import sqlite3
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg.errors
from sqlalchemy import Engine, create_engine, event, func, insert, select, text, tuple_, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError

from daemon import dblock
from daemon.readonly import open_sqlite_readonly
from daemon.schema import daemon_runs, session_events, session_snapshots
from statemachines.session import TransitionRecord

SQLITE_BUSY_TIMEOUT_MS = 10_000
#: The execution option that marks a write transaction (BEGIN IMMEDIATE on SQLite).
WRITE_OPTION = "wirekeep_write"


class VersionConflict(Exception):
    """An append collided with a stored (session, version): another writer owns the session."""


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def _sqlite_pragmas(dbapi_conn: sqlite3.Connection, _record: object) -> None:
    # SQLAlchemy's documented recipe: let SQLAlchemy emit BEGIN itself (see _sqlite_begin).
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cur.close()


def _sqlite_begin(conn: Any) -> None:
    # A write transaction takes the write lock at BEGIN, so a batch never fails half-way
    # on SQLITE_BUSY; a read stays a deferred BEGIN and never blocks the writer.
    write = conn.get_execution_options().get(WRITE_OPTION, False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


def make_engine(url: str, *, readonly: bool = False) -> Engine:
    """An engine for the daemon and its writer, or a read-only one for audit commands.

    Read-only SQLite is opened ``mode=ro`` (see :mod:`daemon.readonly`), so replay works
    for a reviewer who may read the database but not write its directory.
    """
    if readonly:
        if is_sqlite(url):
            path = make_url(url).database or ""
            return create_engine("sqlite://", creator=functools.partial(open_sqlite_readonly, path))
        return create_engine(url, pool_pre_ping=True).execution_options(postgresql_readonly=True)
    if is_sqlite(url):
        engine = create_engine(url, pool_size=2, max_overflow=4)
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=2, max_overflow=2)


def utc(value: datetime) -> datetime:
    """Stored times are UTC; SQLite hands them back naive."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


@dataclass(frozen=True, slots=True)
class StoredEvent:
    id: int
    session: str
    version: int
    at: datetime
    trigger: str
    source: str
    dest: str
    reason: str
    detail: Mapping[str, Any]

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "session": self.session,
            "version": self.version,
            "at": self.at.isoformat(),
            "trigger": self.trigger,
            "source": self.source,
            "dest": self.dest,
            "reason": self.reason,
            "detail": dict(self.detail),
        }


@dataclass(frozen=True, slots=True)
class Snapshot:
    session: str
    version: int
    at: datetime
    state: str
    detail: Mapping[str, Any]


def _row_to_event(row: Any) -> StoredEvent:
    detail = row.detail
    if isinstance(detail, str):  # a driver that hands JSON back as text
        detail = json.loads(detail)
    return StoredEvent(
        id=row.id,
        session=row.session,
        version=row.version,
        at=utc(row.at),
        trigger=row.trigger,
        source=row.source,
        dest=row.dest,
        reason=row.reason,
        detail=detail,
    )


#: The columns an append writes, in the order of the row tuples below.
COLUMNS = ("session", "version", "at", "trigger", "source", "dest", "reason", "detail")
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


#: Rows per multi-row INSERT: a batch is cut into these sizes, largest first, so only a
#: handful of distinct statements exist and SQLite's statement cache keeps them compiled.
#: 1024 rows x 8 columns stays far below SQLite's bound-parameter limit.
_CHUNK_SIZES = (1024, 256, 64, 16, 4, 1)


def _chunks(total: int) -> list[int]:
    sizes = []
    for size in _CHUNK_SIZES:
        count, total = divmod(total, size)
        sizes.extend([size] * count)
    return sizes


def sqlite_time(at: datetime) -> str:
    """UTC as SQLAlchemy's SQLite DateTime stores it: 'YYYY-MM-DD HH:MM:SS.ffffff'."""
    if at.tzinfo is not None and at.utcoffset():
        at = at.astimezone(UTC)
    return at.isoformat(" ", "microseconds")[:26]


def _sqlite_row(r: TransitionRecord) -> tuple[Any, ...]:
    return (
        r.session,
        r.version,
        sqlite_time(r.at),
        r.trigger,
        r.source,
        r.dest,
        r.reason,
        _dumps(r.detail),
    )


def _postgres_row(r: TransitionRecord) -> tuple[Any, ...]:
    return (r.session, r.version, r.at, r.trigger, r.source, r.dest, r.reason, _dumps(r.detail))


class EventStore:
    """Synchronous access to one event database."""

    def __init__(self, url: str, *, engine: Engine | None = None, readonly: bool = False) -> None:
        self.url = url
        self.engine = engine if engine is not None else make_engine(url, readonly=readonly)
        self.sqlite = self.engine.dialect.name == "sqlite"
        self.writes = self.engine.execution_options(**{WRITE_OPTION: True})
        self._insert_sql = str(
            insert(session_events).compile(dialect=self.engine.dialect, column_keys=list(COLUMNS))
        )
        self._copy_sql = f"COPY session_events ({', '.join(COLUMNS)}) FROM STDIN"
        self._multi: dict[int, str] = {}
        self._writer_lock: dblock.WriterLock | None = None

    def lock_writer(self, *, started_at: datetime) -> None:
        """Take the database's writer lock (:mod:`daemon.dblock`) until :meth:`close`.

        Raises DatabaseBusy, naming the daemon that holds it. A daemon calls this before it
        reads or writes anything else.
        """
        if self._writer_lock is None:
            self._writer_lock = dblock.acquire(self.url, started_at=started_at)

    def _multi_insert(self, rows: int) -> str:
        sql = self._multi.get(rows)
        if sql is None:
            one = "(" + ", ".join("?" * len(COLUMNS)) + ")"
            head = self._insert_sql.partition(" VALUES ")[0]
            sql = self._multi[rows] = f"{head} VALUES {', '.join([one] * rows)}"
        return sql

    def close(self) -> None:
        self.engine.dispose()
        if self._writer_lock is not None:
            self._writer_lock.release()
            self._writer_lock = None

    # -- writes ---------------------------------------------------------------------

    def prepare(self, record: TransitionRecord) -> tuple[Any, ...]:
        """The row ``append_rows`` writes for ``record`` (the values of COLUMNS, in order)."""
        return _sqlite_row(record) if self.sqlite else _postgres_row(record)

    def append(self, records: Sequence[TransitionRecord]) -> None:
        """Append records in one transaction: all of them are durable, or none."""
        self.append_rows([self.prepare(r) for r in records])

    def append_rows(self, rows: Sequence[tuple[Any, ...]]) -> None:
        """Append prepared rows in one transaction: all of them are durable, or none.

        The hot path. SQLite gets multi-row INSERT ... VALUES statements: one
        sqlite3_step per statement runs with the GIL released throughout, where
        executemany gives the GIL up and takes it back on every row (and then waits
        behind the Trio thread for it). PostgreSQL gets one COPY. SQLAlchemy's
        per-row type processing would triple the cost per event.
        Raises VersionConflict when a (session, version) is already stored.
        """
        if not rows:
            return
        try:
            with self.writes.begin() as conn:
                if self.sqlite:
                    start = 0
                    for size in _chunks(len(rows)):
                        params = tuple(v for row in rows[start : start + size] for v in row)
                        conn.exec_driver_sql(self._multi_insert(size), params)
                        start += size
                else:
                    cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
                    with cursor.copy(self._copy_sql) as copy:
                        for row in rows:
                            copy.write_row(row)
        except (IntegrityError, psycopg.errors.IntegrityError) as exc:
            raise VersionConflict(str(getattr(exc, "orig", None) or exc)) from None

    def write_snapshots(self, snapshots: Sequence[Snapshot]) -> None:
        if not snapshots:
            return
        rows = [
            {
                "session": s.session,
                "version": s.version,
                "at": s.at,
                "state": s.state,
                "detail": dict(s.detail),
            }
            for s in snapshots
        ]
        table = session_snapshots
        with self.writes.begin() as conn:
            names = [s.session for s in snapshots]
            conn.execute(table.delete().where(table.c.session.in_(names)))
            conn.execute(insert(table), rows)

    def start_run(
        self, *, started_at: datetime, version: str, host: str, pid: int, config_hash: str
    ) -> int:
        with self.writes.begin() as conn:
            result = conn.execute(
                insert(daemon_runs).values(
                    started_at=started_at,
                    version=version,
                    host=host,
                    pid=pid,
                    config_hash=config_hash,
                )
            )
            key = result.inserted_primary_key
            assert key is not None
            return int(key[0])

    def finish_run(self, run_id: int, *, stopped_at: datetime, clean: bool) -> None:
        with self.writes.begin() as conn:
            last = conn.execute(select(func.max(session_events.c.id))).scalar()
            conn.execute(
                update(daemon_runs)
                .where(daemon_runs.c.id == run_id)
                .values(stopped_at=stopped_at, clean=clean, last_event_id=last)
            )

    def mark_crashed_runs(self, *, host: str) -> int:
        """Runs on this host with no stop time ended without a clean shutdown."""
        with self.writes.begin() as conn:
            result = conn.execute(
                update(daemon_runs)
                .where(
                    daemon_runs.c.stopped_at.is_(None),
                    daemon_runs.c.clean.is_(None),  # not judged yet
                    daemon_runs.c.host == host,
                )
                .values(clean=False)
            )
            return int(result.rowcount)

    # -- reads ----------------------------------------------------------------------

    def iter_events(
        self,
        *,
        session: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        after_version: int = 0,
        batch: int = 10_000,
    ) -> Generator[StoredEvent, None, None]:
        """Events in global order (by id), streamed in batches."""
        t = session_events
        query = select(t).order_by(t.c.id)
        if session is not None:
            query = query.where(t.c.session == session)
            if after_version:
                query = query.where(t.c.version > after_version)
        if since is not None:
            query = query.where(t.c.at >= since)
        if until is not None:
            query = query.where(t.c.at <= until)
        with (
            self.engine.connect() as conn,
            conn.execution_options(yield_per=batch).execute(query) as result,
        ):
            for row in result:
                yield _row_to_event(row)

    def iter_fold_rows(
        self, *, until: datetime | None = None
    ) -> Generator[tuple[Any, ...], None, None]:
        """(session, version, trigger, source, dest) tuples in id order: the replay hot path.

        Read through the driver's cursor in large batches (a server-side cursor on
        PostgreSQL): SQLAlchemy's Row objects would halve the rate.
        """
        t = session_events
        query = select(t.c.session, t.c.version, t.c.trigger, t.c.source, t.c.dest).order_by(t.c.id)
        if until is not None:
            query = query.where(t.c.at <= until)
        compiled = query.compile(dialect=self.engine.dialect)
        params: Any = compiled.params
        if self.sqlite:  # qmark style: positional parameters
            params = () if until is None else (sqlite_time(until),)
        with self.engine.connect() as conn:
            raw = conn.connection.driver_connection
            assert raw is not None
            cursor = raw.cursor() if self.sqlite else raw.cursor(name="wirekeep_fold")
            try:
                cursor.execute(str(compiled), params)
                while rows := cursor.fetchmany(50_000):
                    yield from rows
            finally:
                cursor.close()

    def events_at(self, versions: Mapping[str, int]) -> dict[str, StoredEvent]:
        """The events with these (session, version) pairs."""
        t = session_events
        out: dict[str, StoredEvent] = {}
        pairs = list(versions.items())
        with self.engine.connect() as conn:
            for start in range(0, len(pairs), 500):
                chunk = pairs[start : start + 500]
                query = select(t).where(tuple_(t.c.session, t.c.version).in_(chunk))
                for row in conn.execute(query):
                    out[row.session] = _row_to_event(row)
        return out

    def last_events(self) -> dict[str, StoredEvent]:
        """The newest event of every session."""
        t = session_events
        newest = (
            select(t.c.session, func.max(t.c.version).label("version"))
            .group_by(t.c.session)
            .subquery()
        )
        query = select(t).join(
            newest, (t.c.session == newest.c.session) & (t.c.version == newest.c.version)
        )
        with self.engine.connect() as conn:
            return {row.session: _row_to_event(row) for row in conn.execute(query)}

    def snapshots(self) -> dict[str, Snapshot]:
        t = session_snapshots
        with self.engine.connect() as conn:
            out = {}
            for row in conn.execute(select(t)):
                detail = json.loads(row.detail) if isinstance(row.detail, str) else row.detail
                out[row.session] = Snapshot(
                    row.session, row.version, utc(row.at), row.state, detail
                )
            return out

    def count_events(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(session_events)).scalar_one())

    def append_only_triggers_present(self) -> bool:
        """True when the database still rejects UPDATE and DELETE on the event table."""
        with self.engine.connect() as conn:
            if self.sqlite:
                names = set(
                    conn.execute(
                        text(
                            "SELECT name FROM sqlite_master WHERE type = 'trigger' "
                            "AND tbl_name = 'session_events'"
                        )
                    ).scalars()
                )
                return {"session_events_no_update", "session_events_no_delete"} <= names
            names = set(
                conn.execute(
                    text(
                        "SELECT tgname FROM pg_trigger WHERE tgrelid = 'session_events'::regclass "
                        "AND NOT tgisinternal"
                    )
                ).scalars()
            )
            return {"session_events_append_only", "session_events_no_truncate"} <= names
