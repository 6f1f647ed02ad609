"""The event store (daemon/store.py) on both backends: appends, reads, runs, snapshots, and
the append-only guarantee enforced by the database itself (also through sqlite3 and psql)."""

from __future__ import annotations

import gc
import os
import shutil
import sqlite3
import subprocess
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from daemon import migrate
from daemon.schema import daemon_runs
from daemon.store import EventStore, Snapshot, VersionConflict
from statemachines.session import TransitionRecord

T0 = datetime(2026, 11, 21, 14, 3, 0, 123456, tzinfo=UTC)
PLUS2 = timezone(timedelta(hours=2))
MINUS5 = timezone(timedelta(hours=-5, minutes=-30))

# (trigger, source, dest) of the happy path, so stored rows are also legal events.
HAPPY = [
    ("start", "DISCONNECTED", "CONNECTING"),
    ("connected", "CONNECTING", "CONNECTING"),
    ("authenticated", "CONNECTING", "AUTHENTICATED"),
    ("data", "AUTHENTICATED", "STREAMING"),
    ("stale", "STREAMING", "STALE"),
    ("data", "STALE", "STREAMING"),
    ("lost", "STREAMING", "BACKOFF"),
    ("retry", "BACKOFF", "CONNECTING"),
]


def rec(
    session: str,
    version: int,
    *,
    at: datetime | None = None,
    reason: str | None = None,
    detail: dict[str, Any] | None = None,
) -> TransitionRecord:
    trigger, source, dest = HAPPY[(version - 1) % len(HAPPY)]
    return TransitionRecord(
        session=session,
        version=version,
        at=at if at is not None else T0 + timedelta(seconds=version),
        trigger=trigger,
        source=source,
        dest=dest,
        reason=reason if reason is not None else f"{session} v{version}",
        detail=detail if detail is not None else {"v": version},
    )


def raw_rows(store: EventStore) -> list[tuple[Any, ...]]:
    """Every stored row, read with plain SQL (no store code)."""
    with store.engine.connect() as conn:
        return [
            tuple(r)
            for r in conn.execute(
                sa.text(
                    "SELECT id, session, version, trigger, source, dest, reason "
                    "FROM session_events ORDER BY id"
                )
            )
        ]


def is_utc_aware(value: datetime) -> bool:
    return value.tzinfo is not None and value.utcoffset() == timedelta(0)


@pytest.fixture
def sqlite_store(sqlite_url: str) -> Iterator[EventStore]:
    st = EventStore(sqlite_url)
    migrate.upgrade(st.engine)
    try:
        yield st
    finally:
        st.close()


@pytest.fixture
def pg_store(postgres_url: str) -> Iterator[EventStore]:
    st = EventStore(postgres_url)
    migrate.upgrade(st.engine)
    try:
        yield st
    finally:
        st.close()


# -- appends and reads ---------------------------------------------------------------------


def test_append_and_read_back_field_by_field(store: EventStore) -> None:
    detail = {
        "attempt": 3,
        "delay_s": 1.25,
        "endpoint": "wss://venue.example/feed?x=1&y=2",
        "ok": True,
        "none": None,
        "nested": {"list": [1, "two", 3.5, False], "empty": {}},
        "unicode": "Zürich → 東京 ✓",
        "quote": 'it\'s "quoted" \\ backslash\nnewline\ttab',
    }
    records = [
        rec("venue-a", 1, at=T0, reason="begin an attempt", detail=detail),
        # An aware time with another offset is the same instant, stored as UTC.
        rec("venue-a", 2, at=(T0 + timedelta(seconds=1)).astimezone(PLUS2), reason="handshake"),
        rec("venue-b", 1, at=T0 + timedelta(microseconds=1), reason="", detail={}),
    ]
    store.append(records)

    events = list(store.iter_events())
    assert len(events) == 3
    for ev, r in zip(events, records, strict=True):
        assert ev.session == r.session
        assert ev.version == r.version
        assert ev.trigger == r.trigger
        assert ev.source == r.source
        assert ev.dest == r.dest
        assert ev.reason == r.reason
        assert dict(ev.detail) == dict(r.detail)
        assert ev.at == r.at  # the same instant, to the microsecond
        assert is_utc_aware(ev.at), ev.at
        assert isinstance(ev.id, int)
    assert events[0].detail == detail
    assert events[1].at == T0 + timedelta(seconds=1)
    assert events[2].at - events[0].at == timedelta(microseconds=1)

    as_json = events[0].as_json()
    assert as_json["detail"] == detail
    assert datetime.fromisoformat(as_json["at"]) == T0
    assert store.count_events() == 3


def test_append_nothing_is_a_no_op(store: EventStore) -> None:
    store.append([])
    assert store.count_events() == 0
    assert list(store.iter_events()) == []
    assert store.last_events() == {}


def test_ids_give_the_global_append_order(store: EventStore) -> None:
    # Interleave sessions across several batches; times deliberately not in id order.
    order: list[tuple[str, int]] = []
    versions = {"a": 0, "b": 0, "c": 0}
    for batch_no, names in enumerate([["a", "b"], ["c"], ["b", "a", "c", "a"], ["c", "b"]]):
        batch = []
        for name in names:
            versions[name] += 1
            at = T0 - timedelta(minutes=batch_no) + timedelta(seconds=versions[name])
            batch.append(rec(name, versions[name], at=at))
            order.append((name, versions[name]))
        store.append(batch)

    events = list(store.iter_events())
    assert [(e.session, e.version) for e in events] == order
    ids = [e.id for e in events]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    # Small read batches stream the same order.
    assert [e.id for e in store.iter_events(batch=2)] == ids
    # iter_fold_rows is the same order, as (session, version, trigger, source, dest).
    assert [(r[0], r[1]) for r in store.iter_fold_rows()] == order


def test_iter_events_filters(store: EventStore) -> None:
    store.append([rec("a", v) for v in range(1, 6)] + [rec("b", v) for v in range(1, 4)])

    assert [e.version for e in store.iter_events(session="a")] == [1, 2, 3, 4, 5]
    assert [e.version for e in store.iter_events(session="a", after_version=3)] == [4, 5]
    assert list(store.iter_events(session="nobody")) == []

    since, until = T0 + timedelta(seconds=2), T0 + timedelta(seconds=3)
    got = [(e.session, e.version) for e in store.iter_events(since=since, until=until)]
    assert got == [("a", 2), ("a", 3), ("b", 2), ("b", 3)]  # both bounds inclusive
    got = [(e.session, e.version) for e in store.iter_events(session="b", since=since)]
    assert got == [("b", 2), ("b", 3)]
    rows = list(store.iter_fold_rows(until=until))
    assert [(r[0], r[1]) for r in rows] == [
        ("a", 1),
        ("a", 2),
        ("a", 3),
        ("b", 1),
        ("b", 2),
        ("b", 3),
    ]


def test_time_filters_mean_the_same_instant_whatever_the_offset(store: EventStore) -> None:
    """since/until are instants: an aware time at +02:00 or -05:30 selects the same rows as
    the same instant in UTC, on both backends."""
    store.append([rec("a", v) for v in range(1, 6)])
    since_utc, until_utc = T0 + timedelta(seconds=2), T0 + timedelta(seconds=4)
    expected = [2, 3, 4]
    assert [e.version for e in store.iter_events(since=since_utc, until=until_utc)] == expected
    for tz in (PLUS2, MINUS5):
        got = [
            e.version
            for e in store.iter_events(
                since=since_utc.astimezone(tz), until=until_utc.astimezone(tz)
            )
        ]
        assert got == expected, f"since/until at offset {tz} selected {got}"
    fold = [r[1] for r in store.iter_fold_rows(until=until_utc.astimezone(PLUS2))]
    assert fold == [1, 2, 3, 4]


def test_last_events(store: EventStore) -> None:
    store.append([rec("a", 1), rec("b", 1), rec("a", 2)])
    store.append([rec("a", 3), rec("c", 1), rec("b", 2)])
    last = store.last_events()
    assert {name: ev.version for name, ev in last.items()} == {"a": 3, "b": 2, "c": 1}
    assert last["a"].reason == "a v3"
    assert last["b"].trigger == HAPPY[1][0]
    assert all(is_utc_aware(ev.at) for ev in last.values())


def test_events_at(store: EventStore) -> None:
    store.append([rec("a", v) for v in range(1, 4)] + [rec("b", 1)])
    got = store.events_at({"a": 2, "b": 1, "missing": 1})
    assert set(got) == {"a", "b"}
    assert (got["a"].version, got["a"].reason) == (2, "a v2")
    assert got["b"].dest == HAPPY[0][2]
    assert store.events_at({"a": 9}) == {}
    assert store.events_at({}) == {}


def test_events_at_reads_more_pairs_than_one_chunk(store: EventStore) -> None:
    names = [f"s{i:04d}" for i in range(1203)]  # more than two chunks of 500
    store.append([rec(name, 1, reason=f"first of {name}") for name in names])
    got = store.events_at(dict.fromkeys(names, 1))
    assert len(got) == len(names)
    assert all(got[n].reason == f"first of {n}" for n in names)


def test_snapshots_write_read_overwrite(store: EventStore) -> None:
    assert store.snapshots() == {}
    first = [
        Snapshot("a", 4, T0, "STREAMING", {"reason": "data resumed", "carry": {"attempt": 2}}),
        Snapshot("b", 1, T0 + timedelta(seconds=1), "CONNECTING", {}),
    ]
    store.write_snapshots(first)
    got = store.snapshots()
    assert set(got) == {"a", "b"}
    for snap in first:
        read = got[snap.session]
        assert (read.session, read.version, read.state) == (snap.session, snap.version, snap.state)
        assert read.at == snap.at
        assert is_utc_aware(read.at)
        assert dict(read.detail) == dict(snap.detail)

    # Overwrite one session; the other is untouched; a new one appears.
    store.write_snapshots(
        [
            Snapshot("a", 9, T0 + timedelta(minutes=5), "BACKOFF", {"reason": "lost"}),
            Snapshot("c", 2, T0 + timedelta(minutes=6), "PAUSED", {"x": [1, 2]}),
        ]
    )
    got = store.snapshots()
    assert set(got) == {"a", "b", "c"}
    assert (got["a"].version, got["a"].state, dict(got["a"].detail)) == (
        9,
        "BACKOFF",
        {"reason": "lost"},
    )
    assert got["a"].at == T0 + timedelta(minutes=5)
    assert got["b"].version == 1
    assert dict(got["c"].detail) == {"x": [1, 2]}
    store.write_snapshots([])
    assert len(store.snapshots()) == 3


def test_snapshot_time_keeps_the_instant_whatever_the_offset(store: EventStore) -> None:
    """A snapshot taken with an aware non-UTC time reads back as the same instant."""
    store.write_snapshots([Snapshot("a", 1, T0.astimezone(PLUS2), "CONNECTING", {})])
    assert store.snapshots()["a"].at == T0


def _runs(store: EventStore) -> dict[int, Any]:
    with store.engine.connect() as conn:
        return {r.id: r for r in conn.execute(sa.select(daemon_runs).order_by(daemon_runs.c.id))}


def test_runs_start_finish_and_crashed(store: EventStore) -> None:
    common = {"version": "0.1.0", "pid": 4242, "config_hash": "c" * 64}
    crashed = store.start_run(started_at=T0, host="h1", **common)
    clean = store.start_run(started_at=T0 + timedelta(hours=1), host="h1", **common)
    other_host = store.start_run(started_at=T0 + timedelta(hours=2), host="h2", **common)
    assert len({crashed, clean, other_host}) == 3

    store.append([rec("a", 1), rec("a", 2)])
    last_id = max(e.id for e in store.iter_events())
    store.finish_run(clean, stopped_at=T0 + timedelta(hours=1, minutes=5), clean=True)

    runs = _runs(store)
    assert runs[clean].clean is True
    assert runs[clean].last_event_id == last_id
    stopped = runs[clean].stopped_at
    stopped = stopped.replace(tzinfo=UTC) if stopped.tzinfo is None else stopped
    assert stopped == T0 + timedelta(hours=1, minutes=5)
    assert (runs[clean].host, runs[clean].pid, runs[clean].version) == ("h1", 4242, "0.1.0")
    assert runs[clean].config_hash == "c" * 64
    assert runs[crashed].stopped_at is None
    assert runs[crashed].clean is None

    # Only runs of this host with no stop time are marked crashed.
    assert store.mark_crashed_runs(host="h1") == 1
    runs = _runs(store)
    assert runs[crashed].clean is False
    assert runs[crashed].stopped_at is None
    assert runs[clean].clean is True
    assert runs[other_host].clean is None
    assert store.mark_crashed_runs(host="nowhere") == 0


# -- version conflicts and atomicity --------------------------------------------------------


def test_batch_with_a_stored_version_is_rejected_whole(store: EventStore) -> None:
    store.append([rec("a", 1), rec("a", 2)])
    before = raw_rows(store)
    batch = [rec("b", 1), rec("c", 1), rec("a", 2, reason="duplicate"), rec("b", 2)]
    with pytest.raises(VersionConflict):
        store.append(batch)
    assert raw_rows(store) == before  # none of the batch is stored
    assert store.count_events() == 2
    assert store.last_events().keys() == {"a"}
    # The store is still usable, and the same records minus the duplicate go in.
    store.append([r for r in batch if r.reason != "duplicate"])
    assert store.count_events() == 5


def test_duplicate_version_rejected(store: EventStore) -> None:
    store.append([rec("a", 1, reason="original")])
    with pytest.raises(VersionConflict, match=r"(?i)unique|duplicate"):
        store.append([rec("a", 1, reason="second writer")])
    # Inside one batch too.
    with pytest.raises(VersionConflict):
        store.append([rec("z", 1), rec("z", 1, reason="again")])
    events = list(store.iter_events())
    assert [(e.session, e.version, e.reason) for e in events] == [("a", 1, "original")]


# -- append-only, enforced by the database ------------------------------------------------

WRITES = [
    "UPDATE session_events SET reason='x'",
    "UPDATE session_events SET version = version + 100 WHERE session = 'a'",
    "DELETE FROM session_events",
    "DELETE FROM session_events WHERE version = 1",
]


def test_update_and_delete_rejected_by_the_database(store: EventStore) -> None:
    store.append([rec("a", 1), rec("a", 2), rec("b", 1)])
    before = raw_rows(store)
    for sql in WRITES:
        with pytest.raises(sa.exc.DBAPIError, match="append-only"), store.engine.begin() as conn:
            conn.execute(sa.text(sql))
        assert raw_rows(store) == before, sql


def test_truncate_rejected_by_postgresql(pg_store: EventStore) -> None:
    pg_store.append([rec("a", 1), rec("a", 2)])
    before = raw_rows(pg_store)
    with pytest.raises(sa.exc.DBAPIError, match="append-only"), pg_store.engine.begin() as conn:
        conn.execute(sa.text("TRUNCATE session_events"))
    assert raw_rows(pg_store) == before


def test_config_reloads_are_append_only_too(store: EventStore) -> None:
    from daemon.schema import config_reloads

    row = {"run_id": None, "at": datetime.now(UTC), "config_hash": "b" * 16,
           "previous_hash": "a" * 16, "reason": "configuration reloaded by SIGHUP",
           "detail": {"added": ["x"]}}  # fmt: skip
    with store.engine.begin() as conn:
        conn.execute(sa.insert(config_reloads).values(**row))
    writes = ["UPDATE config_reloads SET reason = 'nothing happened'", "DELETE FROM config_reloads"]
    if not store.sqlite:
        writes.append("TRUNCATE config_reloads")
    for sql in writes:
        with (
            pytest.raises(sa.exc.DBAPIError, match="config_reloads is append-only"),
            store.engine.begin() as conn,
        ):
            conn.execute(sa.text(sql))
    with store.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT reason FROM config_reloads")).scalars().all() == [
            "configuration reloaded by SIGHUP"
        ]
    # The shared PostgreSQL function names the table it guards (row triggers need a row).
    store.append([rec("a", 1)])
    with (
        pytest.raises(sa.exc.DBAPIError, match="session_events is append-only: DELETE"),
        store.engine.begin() as conn,
    ):
        conn.execute(sa.text("DELETE FROM session_events"))


def test_append_only_triggers_present(store: EventStore) -> None:
    assert store.append_only_triggers_present() is True


def test_append_only_triggers_missing_is_reported(sqlite_store: EventStore) -> None:
    with sqlite_store.engine.begin() as conn:
        conn.execute(sa.text("DROP TRIGGER session_events_no_delete"))
    assert sqlite_store.append_only_triggers_present() is False


def _sqlite_path(store: EventStore) -> str:
    database = make_url(store.url).database
    assert database
    return database


def test_sqlite3_command_line_cannot_change_events(sqlite_store: EventStore) -> None:
    binary = shutil.which("sqlite3")
    if binary is None:
        pytest.skip("the sqlite3 command-line client is not installed")
    sqlite_store.append([rec("a", 1), rec("a", 2)])
    before = raw_rows(sqlite_store)
    for sql in ["DELETE FROM session_events;", "UPDATE session_events SET reason = 'x';"]:
        proc = subprocess.run(
            [binary, "-bail", _sqlite_path(sqlite_store), sql],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert proc.returncode != 0, proc
        assert "append-only" in proc.stderr, proc
        assert raw_rows(sqlite_store) == before, sql
    assert sqlite_store.append_only_triggers_present()


def _schema(url: str) -> str:
    options = make_url(url).query["options"]
    assert isinstance(options, str)
    assert options.startswith("-csearch_path=")
    return options.removeprefix("-csearch_path=")


def test_psql_cannot_change_events(pg_store: EventStore) -> None:
    binary = shutil.which("psql")
    if binary is None:
        pytest.skip("the psql command-line client is not installed")
    pg_store.append([rec("a", 1), rec("a", 2), rec("b", 1)])
    before = raw_rows(pg_store)
    url = make_url(pg_store.url)
    for sql in [
        "DELETE FROM session_events",
        "UPDATE session_events SET reason = 'x'",
        "TRUNCATE session_events",
    ]:
        proc = subprocess.run(
            [
                binary,
                "-h",
                url.host or "127.0.0.1",
                "-p",
                str(url.port or 5432),
                "-U",
                url.username or "postgres",
                "-d",
                url.database or "test",
                "-c",
                f"SET search_path TO {_schema(pg_store.url)}; {sql}",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            env={**os.environ, "PGCONNECT_TIMEOUT": "10"},
        )
        assert proc.returncode != 0, proc
        assert "append-only" in proc.stderr, proc
        assert raw_rows(pg_store) == before, sql


# -- SQLite concurrency ------------------------------------------------------------------------


def test_sqlite_reads_do_not_take_the_write_lock(sqlite_store: EventStore) -> None:
    """A reader (replay, recovery, status) in the middle of a read must not hold SQLite's
    write lock: in WAL mode readers and the writer run side by side, and a long read
    (`wirekeep replay` over a large log) must not stall the daemon's commits."""
    sqlite_store.append([rec("a", v) for v in range(1, 6)])
    reader = sqlite_store.iter_events(batch=1)
    assert next(reader).version == 1  # the read is open
    writer = sqlite3.connect(_sqlite_path(sqlite_store), timeout=0, isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")  # what the event writer does at each commit
        writer.execute("ROLLBACK")
    except sqlite3.OperationalError as exc:
        pytest.fail(f"an open read blocks the writer: {exc}")
    finally:
        writer.close()
        reader.close()


def test_abandoned_read_closes_its_cursor(store: EventStore) -> None:
    """A reader that stops early (first event only, or a fold that hits corruption) closes
    its cursor and gives its connection back, without a ResourceWarning from the driver."""
    store.append([rec("a", v) for v in range(1, 8)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        events = store.iter_events(batch=2)
        assert next(events).version == 1
        events.close()
        rows = store.iter_fold_rows()
        assert next(rows)[1] == 1
        rows.close()
        gc.collect()
    assert [str(w.message) for w in caught] == []
    assert store.count_events() == 7  # the connections went back in a usable state
