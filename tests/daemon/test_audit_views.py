"""The audit views (migrations/versions/0002_audit_views.py and 0005, daemon/audit.py) on
both backends.

First against a hand-built history whose intervals, durations and daily figures are
worked out by hand below: stays that cross midnight, a clean shutdown and a crash with
its ``recover``, an operator pause, a session removed for good, one removed and added
again the next day, one the same day, sessions still in their current state (today's
figures grow with the clock), and self-loops (``connected``, ``stable``, ``throttled``)
that change none of those figures. Then against a longer random walk, each view checked
row by row against a fold of the same events in Python.

No test depends on the day it runs or waits for one: the views end open stays at the
database's clock, and each query that reads them also selects that clock in the same
statement (one instant per statement on SQLite, per transaction on PostgreSQL), which
the expected figures are computed from.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from daemon import migrate
from daemon.audit import (
    CONNECTED_STATES,
    NOT_CONNECTED_STATES,
    OPERATOR_TRIGGERS,
    PAUSED_STATES,
    QUESTIONS,
    RECONNECT_TRIGGERS,
    STALE_STATES,
    STREAMING_STATES,
    VIEW_COLUMNS,
    audit_role_sql,
    operator_detail,
)
from daemon.readonly import RefusedWrite, run_query
from daemon.store import EventStore
from statemachines.session import SessionMachine, SessionModel, TransitionRecord

CAPTURE = pytest.CaptureFixture[str]


def midnight(at: datetime) -> datetime:
    return at.replace(hour=0, minute=0, second=0, microsecond=0)


#: The UTC day the history is built before; the query may run on a later day.
BUILT = midnight(datetime.now(UTC))
DAY_A = BUILT - timedelta(days=2)  # the history's first day
DAY_B = BUILT - timedelta(days=1)
ALICE = operator_detail(1000, "alice", "maintenance")


def at(day: datetime, clock: str) -> datetime:
    h, m, s = clock.split(":")
    return day + timedelta(hours=int(h), minutes=int(m), seconds=float(s))


# (session, day, clock, trigger, reason, detail)
HISTORY: list[tuple[str, datetime, str, str, str, dict[str, Any]]] = [
    ("alpha", DAY_A, "22:00:00", "start", "connecting to ws://venue-a/feed", {}),
    ("alpha", DAY_A, "22:00:01", "connected", "connected to ws://venue-a/feed", {}),
    ("alpha", DAY_A, "22:00:02", "authenticated", "authenticated", {}),
    ("alpha", DAY_A, "22:00:03", "data", "first message after subscribing", {}),
    ("alpha", DAY_A, "22:30:03", "stable", "streamed for 1800.0 s: failure counts reset", {}),
    ("alpha", DAY_A, "23:00:00", "stale", "no data for 5.0 s", {}),
    ("alpha", DAY_A, "23:00:10", "data", "data resumed after 15.0 s", {}),
    ("alpha", DAY_B, "00:30:10", "stable", "streamed for 5400.0 s: failure counts reset", {}),
    ("alpha", DAY_B, "01:00:00", "shutdown", "daemon shutting down", {}),
    ("alpha", DAY_B, "01:30:00", "start", "connecting to ws://venue-a/feed", {}),
    ("alpha", DAY_B, "01:30:01", "authenticated", "authenticated", {}),
    ("alpha", DAY_B, "01:30:02", "data", "first message after subscribing", {}),
    ("alpha", DAY_B, "03:00:00", "recover", "daemon restarted", {}),
    ("alpha", DAY_B, "03:00:01", "start", "connecting to ws://venue-a/feed", {}),
    ("alpha", DAY_B, "03:00:02", "authenticated", "authenticated", {}),
    ("alpha", DAY_B, "03:00:03", "data", "first message after subscribing", {}),
    ("alpha", DAY_B, "03:30:03", "stable", "streamed for 1800.0 s: failure counts reset", {}),
    ("alpha", DAY_B, "11:59:59", "stable", "streamed for 1800.0 s: failure counts reset", {}),
    ("alpha", DAY_B, "12:00:00", "pause", "paused by uid 1000 (alice): maintenance", ALICE),
    ("alpha", DAY_B, "12:30:00", "resume", "resumed by uid 1000 (alice)",
     operator_detail(1000, "alice", None)),
    ("alpha", DAY_B, "12:30:00.5", "start", "connecting to ws://venue-a/feed", {}),
    ("alpha", DAY_B, "12:30:01", "authenticated", "authenticated", {}),
    ("alpha", DAY_B, "12:30:02", "data", "first message after subscribing", {}),
    ("beta", DAY_A, "10:00:00", "start", "connecting to tcp://venue-b:9000", {}),
    ("beta", DAY_A, "10:00:05", "auth_rejected", "auth rejected: invalid key", {}),
    ("beta", DAY_A, "10:00:06", "retry", "backoff elapsed", {}),
    ("beta", DAY_A, "10:00:07", "authenticated", "authenticated", {}),
    ("beta", DAY_A, "10:00:08", "data", "first message after subscribing", {}),
    ("beta", DAY_A, "18:00:00", "lost", "connection reset by peer", {}),
    ("beta", DAY_A, "18:00:01", "throttled", "no connect token for venue-b: waiting", {}),
    ("beta", DAY_A, "18:00:03", "retry", "backoff elapsed", {}),
    ("beta", DAY_A, "18:00:04", "trip", "connect timed out; circuit open for 60.0 s",
     {"endpoint": "tcp://venue-b:9000"}),
    ("beta", DAY_A, "18:00:34", "throttled", "cool-down over, no connect token yet", {}),
    ("beta", DAY_A, "18:01:04", "probe", "cool-down over: probing", {}),
    ("beta", DAY_A, "18:01:04.5", "connected", "connected to tcp://venue-b:9000", {}),
    ("beta", DAY_A, "18:01:05", "authenticated", "authenticated", {}),
    ("beta", DAY_A, "18:01:06", "data", "first message after subscribing", {}),
    ("beta", DAY_B, "01:00:00", "shutdown", "daemon shutting down", {}),
    ("beta", DAY_B, "01:30:00", "start", "connecting to tcp://venue-b:9000", {}),
    ("beta", DAY_B, "01:30:01", "authenticated", "authenticated", {}),
    ("beta", DAY_B, "01:30:02", "data", "first message after subscribing", {}),
    ("beta", DAY_B, "03:00:00", "recover", "daemon restarted", {}),
    ("beta", DAY_B, "03:00:01", "start", "connecting to tcp://venue-b:9000", {}),
    ("beta", DAY_B, "03:00:02", "authenticated", "authenticated", {}),
    ("beta", DAY_B, "03:00:03", "data", "first message after subscribing", {}),
    ("beta", DAY_B, "19:59:59", "stable", "streamed for 1800.0 s: failure counts reset", {}),
    ("beta", DAY_B, "20:00:00", "remove", "removed from the configuration", {}),
    ("gamma", DAY_A, "10:30:00", "start", "connecting to tcp://venue-c:9000", {}),
    ("gamma", DAY_A, "10:30:01", "authenticated", "authenticated", {}),
    ("gamma", DAY_A, "10:30:02", "data", "first message after subscribing", {}),
    ("gamma", DAY_A, "12:00:00", "remove", "removed from the configuration", {}),
    ("gamma", DAY_B, "08:00:00", "start", "added to the configuration: connecting", {}),
    ("gamma", DAY_B, "08:00:01", "authenticated", "authenticated", {}),
    ("gamma", DAY_B, "08:00:02", "data", "first message after subscribing", {}),
    ("gamma", DAY_B, "09:00:00", "stale", "no data for 5.0 s", {}),
    ("delta", DAY_B, "09:00:00", "start", "connecting to tcp://venue-d:9000", {}),
    ("delta", DAY_B, "09:00:01", "authenticated", "authenticated", {}),
    ("delta", DAY_B, "09:00:02", "data", "first message after subscribing", {}),
    ("delta", DAY_B, "10:00:00", "remove", "removed from the configuration", {}),
    ("delta", DAY_B, "11:00:00", "start", "added to the configuration: connecting", {}),
    ("delta", DAY_B, "11:00:01", "authenticated", "authenticated", {}),
    ("delta", DAY_B, "11:00:02", "data", "first message after subscribing", {}),
    ("delta", DAY_B, "11:30:02", "stable", "streamed for 1800.0 s: failure counts reset", {}),
    ("delta", DAY_B, "23:59:59.5", "stable", "streamed for 1800.0 s: failure counts reset", {}),
]  # fmt: skip


def build_records() -> list[TransitionRecord]:
    machine = SessionMachine()
    models: dict[str, SessionModel] = {}
    records = []
    for session, day, clock, trigger, reason, detail in sorted(
        HISTORY, key=lambda h: at(h[1], h[2])
    ):
        model = models.get(session) or machine.register(SessionModel(session))
        models[session] = model
        records.append(
            machine.fire(model, trigger, at=at(day, clock), reason=reason, detail=detail)
        )
    return records


# Stays, by hand: (state, start, end or None, seconds or None, entered by, left by).
A, B = DAY_A, DAY_B
INTERVALS = {
    "alpha": [
        ("CONNECTING", at(A, "22:00:00"), at(A, "22:00:02"), 2.0, "start", "authenticated"),
        ("AUTHENTICATED", at(A, "22:00:02"), at(A, "22:00:03"), 1.0, "authenticated", "data"),
        ("STREAMING", at(A, "22:00:03"), at(A, "23:00:00"), 3597.0, "data", "stale"),
        ("STALE", at(A, "23:00:00"), at(A, "23:00:10"), 10.0, "stale", "data"),
        ("STREAMING", at(A, "23:00:10"), at(B, "01:00:00"), 7190.0, "data", "shutdown"),
        ("DISCONNECTED", at(B, "01:00:00"), at(B, "01:30:00"), 1800.0, "shutdown", "start"),
        ("CONNECTING", at(B, "01:30:00"), at(B, "01:30:01"), 1.0, "start", "authenticated"),
        ("AUTHENTICATED", at(B, "01:30:01"), at(B, "01:30:02"), 1.0, "authenticated", "data"),
        ("STREAMING", at(B, "01:30:02"), at(B, "03:00:00"), 5398.0, "data", "recover"),
        ("DISCONNECTED", at(B, "03:00:00"), at(B, "03:00:01"), 1.0, "recover", "start"),
        ("CONNECTING", at(B, "03:00:01"), at(B, "03:00:02"), 1.0, "start", "authenticated"),
        ("AUTHENTICATED", at(B, "03:00:02"), at(B, "03:00:03"), 1.0, "authenticated", "data"),
        ("STREAMING", at(B, "03:00:03"), at(B, "12:00:00"), 32397.0, "data", "pause"),
        ("PAUSED", at(B, "12:00:00"), at(B, "12:30:00"), 1800.0, "pause", "resume"),
        ("DISCONNECTED", at(B, "12:30:00"), at(B, "12:30:00.5"), 0.5, "resume", "start"),
        ("CONNECTING", at(B, "12:30:00.5"), at(B, "12:30:01"), 0.5, "start", "authenticated"),
        ("AUTHENTICATED", at(B, "12:30:01"), at(B, "12:30:02"), 1.0, "authenticated", "data"),
        ("STREAMING", at(B, "12:30:02"), None, None, "data", None),
    ],
    "beta": [
        ("CONNECTING", at(A, "10:00:00"), at(A, "10:00:05"), 5.0, "start", "auth_rejected"),
        ("BACKOFF", at(A, "10:00:05"), at(A, "10:00:06"), 1.0, "auth_rejected", "retry"),
        ("CONNECTING", at(A, "10:00:06"), at(A, "10:00:07"), 1.0, "retry", "authenticated"),
        ("AUTHENTICATED", at(A, "10:00:07"), at(A, "10:00:08"), 1.0, "authenticated", "data"),
        ("STREAMING", at(A, "10:00:08"), at(A, "18:00:00"), 28792.0, "data", "lost"),
        # the throttled self-loop at 18:00:01 stays inside this BACKOFF
        ("BACKOFF", at(A, "18:00:00"), at(A, "18:00:03"), 3.0, "lost", "retry"),
        ("CONNECTING", at(A, "18:00:03"), at(A, "18:00:04"), 1.0, "retry", "trip"),
        ("CIRCUIT_OPEN", at(A, "18:00:04"), at(A, "18:01:04"), 60.0, "trip", "probe"),
        ("CONNECTING", at(A, "18:01:04"), at(A, "18:01:05"), 1.0, "probe", "authenticated"),
        ("AUTHENTICATED", at(A, "18:01:05"), at(A, "18:01:06"), 1.0, "authenticated", "data"),
        ("STREAMING", at(A, "18:01:06"), at(B, "01:00:00"), 25134.0, "data", "shutdown"),
        ("DISCONNECTED", at(B, "01:00:00"), at(B, "01:30:00"), 1800.0, "shutdown", "start"),
        ("CONNECTING", at(B, "01:30:00"), at(B, "01:30:01"), 1.0, "start", "authenticated"),
        ("AUTHENTICATED", at(B, "01:30:01"), at(B, "01:30:02"), 1.0, "authenticated", "data"),
        ("STREAMING", at(B, "01:30:02"), at(B, "03:00:00"), 5398.0, "data", "recover"),
        ("DISCONNECTED", at(B, "03:00:00"), at(B, "03:00:01"), 1.0, "recover", "start"),
        ("CONNECTING", at(B, "03:00:01"), at(B, "03:00:02"), 1.0, "start", "authenticated"),
        ("AUTHENTICATED", at(B, "03:00:02"), at(B, "03:00:03"), 1.0, "authenticated", "data"),
        ("STREAMING", at(B, "03:00:03"), at(B, "20:00:00"), 61197.0, "data", "remove"),
        ("DISCONNECTED", at(B, "20:00:00"), None, None, "remove", None),
    ],
    "gamma": [
        ("CONNECTING", at(A, "10:30:00"), at(A, "10:30:01"), 1.0, "start", "authenticated"),
        ("AUTHENTICATED", at(A, "10:30:01"), at(A, "10:30:02"), 1.0, "authenticated", "data"),
        ("STREAMING", at(A, "10:30:02"), at(A, "12:00:00"), 5398.0, "data", "remove"),
        ("DISCONNECTED", at(A, "12:00:00"), at(B, "08:00:00"), 72000.0, "remove", "start"),
        ("CONNECTING", at(B, "08:00:00"), at(B, "08:00:01"), 1.0, "start", "authenticated"),
        ("AUTHENTICATED", at(B, "08:00:01"), at(B, "08:00:02"), 1.0, "authenticated", "data"),
        ("STREAMING", at(B, "08:00:02"), at(B, "09:00:00"), 3598.0, "data", "stale"),
        ("STALE", at(B, "09:00:00"), None, None, "stale", None),
    ],
    "delta": [
        ("CONNECTING", at(B, "09:00:00"), at(B, "09:00:01"), 1.0, "start", "authenticated"),
        ("AUTHENTICATED", at(B, "09:00:01"), at(B, "09:00:02"), 1.0, "authenticated", "data"),
        ("STREAMING", at(B, "09:00:02"), at(B, "10:00:00"), 3598.0, "data", "remove"),
        ("DISCONNECTED", at(B, "10:00:00"), at(B, "11:00:00"), 3600.0, "remove", "start"),
        ("CONNECTING", at(B, "11:00:00"), at(B, "11:00:01"), 1.0, "start", "authenticated"),
        ("AUTHENTICATED", at(B, "11:00:01"), at(B, "11:00:02"), 1.0, "authenticated", "data"),
        ("STREAMING", at(B, "11:00:02"), None, None, "data", None),
    ],
}

# Days, by hand: streaming, stale, not connected, paused, disconnects, reconnect attempts.
DAILY = {
    # A: 22:00-24:00. Streaming 3597 + 3590; stale 10; connecting 2 + authenticated 1.
    ("alpha", A): (7187.0, 10.0, 3.0, 0.0, 0, 0),
    # B: streaming 3600 + 5398 + 32397 + 41398; paused 1800; down 1800 (daemon stopped)
    # + 1 + 1 + 1 + 1 + 1 + 0.5 + 0.5 + 1; shutdown, recover and pause disconnect it.
    ("alpha", B): (82793.0, 0.0, 1807.0, 1800.0, 3, 0),
    # A: 10:00-24:00. Streaming 28792 + 21534; down 5 + 1 + 1 + 1 + 3 + 1 + 60 + 1 + 1;
    # lost disconnects it (the trip comes from CONNECTING); retry, retry, probe.
    ("beta", A): (50326.0, 0.0, 74.0, 0.0, 1, 3),
    # B: 00:00-20:00, then removed for good. Streaming 3600 + 5398 + 61197.
    ("beta", B): (70195.0, 0.0, 1805.0, 0.0, 3, 0),
    # A: 10:30-12:00, then removed; B: back from 08:00, stale from 09:00 on.
    ("gamma", A): (5398.0, 0.0, 2.0, 0.0, 1, 0),
    ("gamma", B): (3598.0, 54000.0, 2.0, 0.0, 0, 0),
    # B: 09:00-10:00, removed, back 11:00-24:00 the same day. Streaming 3598 + 46798.
    ("delta", B): (50396.0, 0.0, 4.0, 0.0, 1, 0),
}
#: From BUILT on, these sessions spend every day (today until now) in one state.
LIVE = {"alpha": "STREAMING", "gamma": "STALE", "delta": "STREAMING"}
Figures = tuple[float, float, float, float, int, int]


def expected_daily(now: datetime) -> dict[tuple[str, date], Figures]:
    """DAILY, and the rows of the days from BUILT to the database's ``now``."""
    rows = {(session, day.date()): figures for (session, day), figures in DAILY.items()}
    day = BUILT
    while day <= now:
        length = min((now - day).total_seconds(), 86400.0)
        for session, state in LIVE.items():
            streaming = length if state == "STREAMING" else 0.0
            rows[(session, day.date())] = (streaming, length - streaming, 0.0, 0.0, 0, 0)
        day += timedelta(days=1)
    return rows


@dataclass
class Audit:
    store: EventStore
    records: list[TransitionRecord]

    def query(self, sql: str, **params: Any) -> list[dict[str, Any]]:
        return query(self.store, sql, **params)

    def query_now(self, sql: str) -> tuple[list[dict[str, Any]], datetime]:
        return query_now(self.store, sql)


#: The database's clock, as the views read it.
DB_NOW = {"sqlite": "strftime('%Y-%m-%d %H:%M:%f', 'now')", "postgresql": "now()"}


def query(store: EventStore, sql: str, **params: Any) -> list[dict[str, Any]]:
    with store.engine.connect() as conn:
        result = conn.execute(sa.text(sql), params)
        return [dict(row._mapping) for row in result]


def query_now(store: EventStore, sql: str) -> tuple[list[dict[str, Any]], datetime]:
    """The rows of ``sql``, which selects ``{now} AS db_now``, and that one instant: the
    database's clock as the views in the same statement read it."""
    rows = query(store, sql.format(now=DB_NOW[store.engine.dialect.name]))
    instants = {as_utc(row.pop("db_now")) for row in rows}
    # PostgreSQL's now() is the transaction's; SQLite's 'now' may tick (1 ms) between rows.
    now = max(instants)
    assert now is not None
    assert now - min(instants) <= timedelta(milliseconds=1), instants
    return rows, now


def add_runs(store: EventStore) -> list[int]:
    """A clean run, a crashed one, and the running one (hand-made, as the daemon does)."""
    common = {"version": "0.1.0", "host": "vps-1", "config_hash": "c0ffee"}
    first = store.start_run(started_at=at(A, "09:59:00"), pid=100, **common)
    store.finish_run(first, stopped_at=at(B, "01:00:05"), clean=True)
    second = store.start_run(started_at=at(B, "01:29:59"), pid=200, **common)
    store.mark_crashed_runs(host="vps-1")  # the third run finds the second never stopped
    third = store.start_run(started_at=at(B, "02:59:59"), pid=300, **common)
    return [first, second, third]


@pytest.fixture
def audit(store: EventStore) -> Audit:
    records = build_records()
    store.append(records)
    add_runs(store)
    return Audit(store, records)


def as_utc(value: Any) -> datetime | None:
    """SQLite hands times back as text, PostgreSQL as aware datetimes."""
    if value is None:
        return None
    if isinstance(value, str):
        return datetime.fromisoformat(value).replace(tzinfo=UTC)
    assert isinstance(value, datetime)
    return value.astimezone(UTC)


def as_day(value: Any) -> date:
    return date.fromisoformat(value) if isinstance(value, str) else value


# -- columns ----------------------------------------------------------------------------


def test_views_have_the_documented_columns_on_both_backends(audit: Audit) -> None:
    with audit.store.engine.connect() as conn:
        for view, columns in VIEW_COLUMNS.items():
            result = conn.execute(sa.text(f"SELECT * FROM {view} LIMIT 0"))
            assert tuple(result.keys()) == columns, view


# -- session_state_intervals ------------------------------------------------------------


def test_state_intervals_by_hand(audit: Audit) -> None:
    rows, now = audit.query_now(
        "SELECT *, {now} AS db_now FROM session_state_intervals ORDER BY session, version"
    )
    got: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        got.setdefault(row["session"], []).append(row)
    assert set(got) == set(INTERVALS)
    reasons = {(r.session, r.at): r.reason for r in audit.records}
    for session, expected in INTERVALS.items():
        assert len(got[session]) == len(expected), session
        for row, (state, start, end, seconds, entered, left) in zip(
            got[session], expected, strict=True
        ):
            where = f"{session} {state} from {start}"
            assert row["state"] == state, where
            assert as_utc(row["started_at"]) == start, where
            assert as_utc(row["ended_at"]) == end, where
            assert row["enter_trigger"] == entered, where
            assert row["exit_trigger"] == left, where
            assert row["enter_reason"] == reasons[(session, start)], where
            assert row["exit_reason"] == (reasons[(session, end)] if end else None), where
            so_far = (now - start).total_seconds()  # while still current
            duration = so_far if seconds is None else seconds
            assert row["duration_s"] == pytest.approx(duration, abs=1e-3), where
    # the next/previous states chain up
    alpha = got["alpha"]
    assert [r["previous_state"] for r in alpha[1:]] == [r["state"] for r in alpha[:-1]]
    assert [r["next_state"] for r in alpha[:-1]] == [r["state"] for r in alpha[1:]]


def test_intervals_crossing_midnight_keep_their_whole_duration(audit: Audit) -> None:
    rows = audit.query(
        "SELECT session, duration_s, started_at, ended_at FROM session_state_intervals "
        "WHERE state = 'STREAMING' AND exit_trigger = 'shutdown' ORDER BY session"
    )
    assert [(r["session"], round(r["duration_s"], 3)) for r in rows] == [
        ("alpha", 7190.0),
        ("beta", 25134.0),
    ]


# -- session_uptime_daily ---------------------------------------------------------------


def test_uptime_per_day_by_hand(audit: Audit) -> None:
    rows, now = audit.query_now(
        "SELECT *, {now} AS db_now FROM session_uptime_daily ORDER BY session, day"
    )
    got = {(r["session"], as_day(r["day"])): r for r in rows}
    expected = expected_daily(now)
    assert set(got) == set(expected), "one row per session per day"
    for (session, day), figures in expected.items():
        row = got[(session, day)]
        where = f"{session} {day}"
        names = ("streaming_s", "stale_s", "not_connected_s", "paused_s")
        for name, seconds in zip(names, figures[:4], strict=True):
            assert row[name] == pytest.approx(seconds, abs=1e-3), f"{where} {name}"
        assert row["disconnects"] == figures[4], where
        assert row["reconnect_attempts"] == figures[5], where
        observed = row["streaming_s"] + row["stale_s"] + row["not_connected_s"] + row["paused_s"]
        assert row["observed_s"] == pytest.approx(observed, abs=1e-6), where
        up = row["observed_s"] - row["paused_s"]
        assert row["uptime_ratio"] == (pytest.approx(row["streaming_s"] / up) if up else None)
    # The ratios, by hand.
    assert got[("alpha", A.date())]["uptime_ratio"] == pytest.approx(7187 / 7200)
    assert got[("alpha", B.date())]["uptime_ratio"] == pytest.approx(82793 / 84600)
    assert got[("beta", A.date())]["uptime_ratio"] == pytest.approx(50326 / 50400)
    assert got[("beta", B.date())]["uptime_ratio"] == pytest.approx(70195 / 72000)
    assert got[("gamma", A.date())]["uptime_ratio"] == pytest.approx(5398 / 5400)
    assert got[("gamma", B.date())]["uptime_ratio"] == pytest.approx(3598 / 57600)
    assert got[("delta", B.date())]["uptime_ratio"] == pytest.approx(50396 / 50400)
    # Whole days the session existed for, and only those.
    assert got[("alpha", B.date())]["observed_s"] == pytest.approx(86400.0)
    assert got[("beta", B.date())]["observed_s"] == pytest.approx(20 * 3600.0)  # removed 20:00
    assert got[("gamma", B.date())]["observed_s"] == pytest.approx(16 * 3600.0)  # back 08:00
    assert got[("delta", B.date())]["observed_s"] == pytest.approx(14 * 3600.0)  # out 10-11


def test_daily_figures_add_up_to_the_intervals(audit: Audit) -> None:
    """The two views read the log the same way: each day's seconds per state are the
    intervals cut at midnight (removed time not counted)."""
    rows, now = audit.query_now("SELECT *, {now} AS db_now FROM session_state_intervals")
    end_of_range = midnight(now)  # compare whole days only
    sums: dict[tuple[str, date, str], float] = {}
    for row in rows:
        if row["enter_trigger"] == "remove":
            continue
        start = as_utc(row["started_at"])
        end = as_utc(row["ended_at"]) or end_of_range
        assert start is not None
        while start < min(end, end_of_range):
            next_day = midnight(start) + timedelta(days=1)
            piece = (min(end, next_day) - start).total_seconds()
            key = (row["session"], start.date(), row["state"])
            sums[key] = sums.get(key, 0.0) + piece
            start = next_day
    daily = audit.query("SELECT * FROM session_uptime_daily")
    for row in daily:
        day = as_day(row["day"])
        if day >= end_of_range.date():
            continue
        of = {
            state: sums.get((row["session"], day, state), 0.0)
            for state in ("STREAMING", "STALE", "PAUSED")
        }
        total = sum(v for (s, d, _), v in sums.items() if s == row["session"] and d == day)
        assert row["streaming_s"] == pytest.approx(of["STREAMING"], abs=1e-3)
        assert row["stale_s"] == pytest.approx(of["STALE"], abs=1e-3)
        assert row["paused_s"] == pytest.approx(of["PAUSED"], abs=1e-3)
        assert row["observed_s"] == pytest.approx(total, abs=1e-3)


def test_one_session_and_a_day_range_filter_the_view(audit: Audit) -> None:
    if audit.store.sqlite:
        since = "date('now', '-1 days')"
    else:
        since = "(now() AT TIME ZONE 'UTC')::date - 1"
    rows, now = audit.query_now(
        "SELECT day, {now} AS db_now FROM session_uptime_daily WHERE session = 'alpha' "
        f"AND day >= {since} ORDER BY day"
    )
    today = now.date()
    assert [as_day(r["day"]) for r in rows] == [today - timedelta(days=1), today]


def test_the_daily_view_counts_utc_days_whatever_the_time_zone(postgres_url: str) -> None:
    store = EventStore(postgres_url)
    try:
        migrate.upgrade(store.engine)
        store.append(build_records())
        with store.engine.connect() as conn:  # one transaction: one now()
            utc_rows = conn.execute(sa.text("SELECT * FROM session_uptime_daily")).all()
            conn.execute(sa.text("SET TIME ZONE 'Pacific/Kiritimati'"))  # UTC+14
            far_rows = conn.execute(sa.text("SELECT * FROM session_uptime_daily")).all()
            intervals = conn.execute(
                sa.text("SELECT started_at FROM session_state_intervals ORDER BY 1 LIMIT 1")
            ).scalar_one()
        key = {(r.session, r.day): r for r in utc_rows}
        assert {(r.session, r.day) for r in far_rows} == set(key)
        for row in far_rows:
            assert tuple(row) == pytest.approx(tuple(key[(row.session, row.day)]))
        assert intervals == at(A, "10:00:00")
    finally:
        store.close()


# -- operator_actions and daemon_run_history -------------------------------------------


def test_operator_actions_say_who_what_when_and_why(audit: Audit) -> None:
    rows = audit.query("SELECT * FROM operator_actions ORDER BY at")
    assert [
        (
            r["session"],
            r["action"],
            as_utc(r["at"]),
            r["uid"],
            r["user_name"],
            r["operator_reason"],
            r["state_before"],
            r["state_after"],
        )
        for r in rows
    ] == [
        ("alpha", "pause", at(B, "12:00:00"), 1000, "alice", "maintenance", "STREAMING", "PAUSED"),
        ("alpha", "resume", at(B, "12:30:00"), 1000, "alice", None, "PAUSED", "DISCONNECTED"),
    ]
    assert rows[0]["reason"] == "paused by uid 1000 (alice): maintenance"


def test_operator_actions_tolerate_events_without_the_detail_keys(store: EventStore) -> None:
    machine = SessionMachine()
    model = machine.register(SessionModel("s"))
    t0 = at(A, "10:00:00")
    store.append(
        [
            machine.fire(model, "start", at=t0, reason="connecting"),
            machine.fire(
                model,
                "reconnect",
                at=t0 + timedelta(seconds=1),
                reason="reconnect requested",
                detail={"uid": "root", "user": 7},
            ),
            machine.fire(model, "pause", at=t0 + timedelta(seconds=2), reason="paused"),
        ]
    )
    with store.engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT action, uid, user_name, operator_reason FROM operator_actions ORDER BY at"
            )
        ).all()
    assert [tuple(r) for r in rows] == [
        ("reconnect", None, None, None),
        ("pause", None, None, None),
    ]


def test_daemon_run_history_is_readable(audit: Audit) -> None:
    rows = audit.query("SELECT * FROM daemon_run_history ORDER BY started_at")
    assert [r["outcome"] for r in rows] == ["clean", "crashed", "not stopped"]
    assert [as_utc(r["started_at"]) for r in rows] == [
        at(A, "09:59:00"),
        at(B, "01:29:59"),
        at(B, "02:59:59"),
    ]
    assert as_utc(rows[0]["stopped_at"]) == at(B, "01:00:05")
    assert rows[0]["ran_s"] == pytest.approx(15 * 3600 + 65)
    assert rows[1]["ran_s"] is None
    assert rows[2]["ran_s"] is None
    assert [as_utc(r["next_started_at"]) for r in rows] == [
        at(B, "01:29:59"),
        at(B, "02:59:59"),
        None,
    ]
    assert {(r["version"], r["host"]) for r in rows} == {("0.1.0", "vps-1")}


# -- the documented questions, through `wirekeep sql` -----------------------------------


def test_the_documented_questions_run_read_only_on_both_backends(audit: Audit) -> None:
    dialect = "sqlite" if audit.store.sqlite else "postgresql"
    t1, t2 = at(B, "00:59:00"), at(B, "01:31:00")
    fmt = "%Y-%m-%d %H:%M:%S" if audit.store.sqlite else "%Y-%m-%d %H:%M:%S+00"
    answers = {}
    for question in QUESTIONS:
        sql = question.sql(dialect).format(t1=t1.strftime(fmt), t2=t2.strftime(fmt))
        answers[question.title] = run_query(audit.store.url, sql)
    down = answers["Which sessions were down between T1 and T2, and why"]
    assert [(r[0], r[1]) for r in down.rows] == [
        ("alpha", "DISCONNECTED"),
        ("beta", "DISCONNECTED"),
        ("alpha", "CONNECTING"),
        ("beta", "CONNECTING"),
        ("alpha", "AUTHENTICATED"),
        ("beta", "AUTHENTICATED"),
    ]
    assert down.rows[0][5] == "daemon shutting down"
    stale = answers["The longest stale period this week"]
    assert stale.rows[0][0] == "gamma"  # still stale since yesterday 09:00
    paused = answers["Who paused a session, and when"]
    assert [(r[1], r[2], r[3], r[4]) for r in paused.rows] == [
        ("alpha", 1000, "alice", "maintenance")
    ]
    uptime = answers["Uptime per session per day, last 30 days"]
    built = {(r[0], as_day(r[1])) for r in uptime.rows if as_day(r[1]) < BUILT.date()}
    assert built == {(s, d.date()) for s, d in DAILY}
    assert {(r[0], as_day(r[1])) for r in uptime.rows if as_day(r[1]) == BUILT.date()} == {
        (s, BUILT.date()) for s in LIVE
    }
    circuit = answers["How often the circuit opened, per venue endpoint"]
    assert [(r[0], r[1], r[2]) for r in circuit.rows] == [("tcp://venue-b:9000", 1, 1)]
    runs = answers["Daemon runs, and how each ended"]
    assert [r[3] for r in runs.rows] == ["clean", "crashed", "not stopped"]
    with pytest.raises(RefusedWrite):
        run_query(audit.store.url, "DELETE FROM session_events")


# -- every view against a fold of the same events ---------------------------------------

#: How the walk moves on from each state (trigger, weight): every kind of transition, with
#: the self-loops (``connected``, ``stable``, ``throttled``) among the most frequent.
WALK = {
    "DISCONNECTED": [("start", 80), ("throttled", 10), ("pause", 5), ("remove", 5)],
    "CONNECTING": [("connected", 35), ("authenticated", 40), ("lost", 10),
                   ("auth_rejected", 5), ("trip", 5), ("reconnect", 5)],
    "AUTHENTICATED": [("data", 90), ("lost", 10)],
    "STREAMING": [("stable", 50), ("stale", 20), ("lost", 8), ("trip", 3), ("reconnect", 3),
                  ("pause", 3), ("failback", 3), ("remove", 2)],
    "STALE": [("data", 70), ("dead", 20), ("lost", 5), ("remove", 5)],
    "BACKOFF": [("retry", 75), ("throttled", 20), ("pause", 5)],
    "CIRCUIT_OPEN": [("probe", 70), ("throttled", 30)],
    "PAUSED": [("resume", 90), ("remove", 10)],
}  # fmt: skip
#: Mean seconds before a session in this state moves on (removed: a day).
MEAN_STAY = {"STREAMING": 1200.0, "STALE": 30.0, "PAUSED": 3600.0, "CIRCUIT_OPEN": 60.0}
LIVE_STATES = frozenset({"CONNECTING", "AUTHENTICATED", "STREAMING", "STALE"})


@dataclass(frozen=True)
class Outage:
    """The daemon is down from ``down`` to ``up``: stopped cleanly, or crashed."""

    down: datetime
    up: datetime
    clean: bool


def walk(rng: random.Random, name: str, begin: datetime, end: datetime) -> list[TransitionRecord]:
    """One session's random walk through the machine from ``begin`` to ``end``, across a
    clean restart and a crash of the daemon (at the same instants for every session)."""
    outages = [
        Outage(at(DAY_A, "01:00:00"), at(DAY_A, "01:20:00"), clean=True),
        Outage(at(DAY_B, "03:00:00"), at(DAY_B, "03:10:00"), clean=False),
    ]
    machine = SessionMachine()
    model = machine.register(SessionModel(name))
    records: list[TransitionRecord] = []

    def fire(trigger: str, when: datetime) -> None:
        detail = operator_detail(1000, "alice", "walk") if trigger in OPERATOR_TRIGGERS else {}
        reason = f"{trigger} at {when:%d %H:%M:%S.%f}"
        records.append(machine.fire(model, trigger, at=when, reason=reason, detail=detail))

    clock, removed = begin, False
    while True:
        state = model.state.name
        mean = 86400.0 if removed else MEAN_STAY.get(state, 3.0)
        following = clock + timedelta(seconds=rng.expovariate(1.0 / mean))
        outage = next((o for o in outages if clock < o.down <= following), None)
        if outage is not None:
            if state in LIVE_STATES and outage.clean:
                fire("shutdown", outage.down)
            elif state in LIVE_STATES:
                fire("recover", outage.up)
            clock = outage.up
            continue
        if following >= end:
            return records
        moves = WALK[state]
        trigger = rng.choices([m for m, _ in moves], [w for _, w in moves])[0]
        if removed:
            trigger = "start"  # added back to the configuration
        fire(trigger, following)
        clock, removed = following, trigger == "remove"


def walk_log(end: datetime) -> list[TransitionRecord]:
    rng = random.Random(20261205)
    begin = DAY_A - timedelta(days=1)
    records = []
    for i in range(6):
        start = begin + timedelta(hours=rng.uniform(0, 20))
        records += walk(rng, f"walk-{i}", start, end)
    return sorted(records, key=lambda r: r.at)


def fold_intervals(records: list[TransitionRecord], now: datetime) -> list[dict[str, Any]]:
    """Stays, from the events: a stay lasts while the state stays the same (a self-loop
    changes nothing) and a ``remove`` begins one whatever the state."""
    stays: dict[str, list[dict[str, Any]]] = {}
    for e in sorted(records, key=lambda r: (r.session, r.version)):
        mine = stays.setdefault(e.session, [])
        if mine and mine[-1]["state"] == e.dest and e.trigger != "remove":
            continue
        if mine:
            mine[-1].update(
                ended_at=e.at, exit_reason=e.reason, exit_trigger=e.trigger, next_state=e.dest
            )
        mine.append(
            {
                "session": e.session,
                "state": e.dest,
                "started_at": e.at,
                "ended_at": None,
                "enter_reason": e.reason,
                "exit_reason": None,
                "enter_trigger": e.trigger,
                "exit_trigger": None,
                "previous_state": e.source,
                "next_state": None,
                "version": e.version,
            }
        )
    out = [stay for session in sorted(stays) for stay in stays[session]]
    for stay in out:
        stay["duration_s"] = ((stay["ended_at"] or now) - stay["started_at"]).total_seconds()
    return out


BUCKETS = {
    **dict.fromkeys(STREAMING_STATES, "streaming_s"),
    **dict.fromkeys(STALE_STATES, "stale_s"),
    **dict.fromkeys(PAUSED_STATES, "paused_s"),
    **dict.fromkeys(NOT_CONNECTED_STATES, "not_connected_s"),
}


def fold_daily(
    records: list[TransitionRecord], stays: list[dict[str, Any]], now: datetime
) -> dict[tuple[str, date], dict[str, Any]]:
    """Each stay cut at UTC midnights (time after a ``remove`` not counted), per state;
    a row for every day the session existed or has an event."""
    days: dict[tuple[str, date], dict[str, Any]] = {}

    def row(session: str, day: date) -> dict[str, Any]:
        empty = dict.fromkeys(BUCKETS.values(), 0.0) | {"disconnects": 0, "reconnect_attempts": 0}
        return days.setdefault((session, day), empty)

    for stay in stays:
        if stay["enter_trigger"] == "remove":
            continue
        start, end = stay["started_at"], stay["ended_at"] or now
        day = midnight(start)
        while day <= end:
            piece = (min(end, day + timedelta(days=1)) - max(start, day)).total_seconds()
            row(stay["session"], day.date())[BUCKETS[stay["state"]]] += piece
            day += timedelta(days=1)
    for e in records:
        figures = row(e.session, e.at.date())
        if e.source in CONNECTED_STATES and e.dest not in CONNECTED_STATES:
            figures["disconnects"] += 1
        if e.trigger in RECONNECT_TRIGGERS:
            figures["reconnect_attempts"] += 1
    for figures in days.values():
        figures["observed_s"] = sum(figures[b] for b in set(BUCKETS.values()))
        up = figures["observed_s"] - figures["paused_s"]
        figures["uptime_ratio"] = figures["streaming_s"] / up if up else None
    return days


def _same(got: Any, expected: Any) -> bool:
    if isinstance(expected, float):
        # SQLite's 'now' has millisecond resolution and is read per row (sqlite3_step), so an
        # open stay's end may differ from the instant read beside it by one millisecond.
        return got == pytest.approx(expected, abs=2e-3)
    if isinstance(expected, datetime):
        return as_utc(got) == expected
    return bool(got == expected)


def test_every_view_agrees_with_a_fold_of_the_same_events(store: EventStore) -> None:
    records = walk_log(end=datetime.now(UTC) - timedelta(minutes=1))
    triggers = {(r.trigger, r.source) for r in records}
    for loop in ("stable", "connected"):
        assert any(t == loop for t, _ in triggers), loop
    assert {("throttled", "BACKOFF"), ("throttled", "CIRCUIT_OPEN")} <= triggers
    assert {"shutdown", "recover", "remove", "pause"} <= {t for t, _ in triggers}
    store.append(records)

    rows, now = query_now(
        store, "SELECT *, {now} AS db_now FROM session_state_intervals ORDER BY session, version"
    )
    stays = fold_intervals(records, now)
    assert len(rows) == len(stays)
    crossing = 0
    for row, stay in zip(rows, stays, strict=True):
        for column, expected in stay.items():
            assert _same(row[column], expected), (column, row, stay)
        crossing += stay["started_at"].date() != (stay["ended_at"] or now).date()
    assert crossing > 10, "stays that cross midnight"

    rows, now = query_now(store, "SELECT *, {now} AS db_now FROM session_uptime_daily")
    days = fold_daily(records, fold_intervals(records, now), now)
    got = {(r["session"], as_day(r["day"])): r for r in rows}
    assert set(got) == set(days)
    for key, figures in days.items():
        for column, expected in figures.items():
            assert _same(got[key][column], expected), (key, column, got[key])
        assert got[key]["uptime_ratio"] is None or got[key]["uptime_ratio"] <= 1.0

    actions = query(store, "SELECT * FROM operator_actions ORDER BY event_id")
    operated = [r for r in records if r.trigger in OPERATOR_TRIGGERS]
    assert len(actions) == len(operated)
    for action, r in zip(actions, sorted(operated, key=lambda r: r.at), strict=True):
        assert (as_utc(action["at"]), action["session"]) == (r.at, r.session)
        assert action["action"] == r.trigger
        assert (action["state_before"], action["state_after"]) == (r.source, r.dest)
        assert (action["uid"], action["user_name"], action["reason"]) == (1000, "alice", r.reason)


# -- the migration ----------------------------------------------------------------------


def _view_names(store: EventStore) -> set[str]:
    with store.engine.connect() as conn:
        return set(sa.inspect(conn).get_view_names())


def test_downgrade_drops_the_views_and_keeps_the_append_only_triggers(store: EventStore) -> None:
    assert _view_names(store) >= set(VIEW_COLUMNS)
    migrate.downgrade(store.engine, "0001")
    assert _view_names(store).isdisjoint(VIEW_COLUMNS)
    assert store.append_only_triggers_present()
    migrate.upgrade(store.engine)
    assert _view_names(store) >= set(VIEW_COLUMNS)
    assert store.append_only_triggers_present()
    store.append(build_records())
    with pytest.raises(sa.exc.DBAPIError, match="append-only"), store.engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM session_events"))


def test_0005_counts_stable_self_loops_as_staying_where_0002_did_not(
    store: EventStore,
) -> None:
    """The issue's log: ten minutes of streaming with a ``stable`` every minute."""
    machine = SessionMachine()
    model = machine.register(SessionModel("s"))
    t0 = at(DAY_A, "10:00:00")
    script = [("start", 0.0), ("authenticated", 0.5), ("data", 1.0)]
    script += [("stable", 60.0 * minute + 1.0) for minute in range(1, 10)]
    script += [("lost", 601.0), ("pause", 602.0), ("remove", 603.0)]
    store.append(
        [
            machine.fire(model, trigger, at=t0 + timedelta(seconds=offset), reason=trigger)
            for trigger, offset in script
        ]
    )
    sql = "SELECT streaming_s, not_connected_s, paused_s, uptime_ratio FROM session_uptime_daily"

    def figures() -> tuple[Any, ...]:
        (row,) = query(store, sql)
        return tuple(row.values())

    assert figures() == pytest.approx((600.0, 2.0, 1.0, 600.0 / 602.0))
    migrate.downgrade(store.engine, "0004")
    streaming, not_connected, _, ratio = figures()
    assert streaming > 600.0 * 100  # each stable added its time of day
    assert not_connected < 0
    assert ratio > 100
    migrate.upgrade(store.engine)
    assert figures() == pytest.approx((600.0, 2.0, 1.0, 600.0 / 602.0))
    assert store.append_only_triggers_present()


# -- the read-only role (PostgreSQL) ---------------------------------------------------


@pytest.fixture
def audit_role(postgres_url: str) -> Iterator[tuple[EventStore, str]]:
    """A migrated schema with history, and a temporary role made by the documented SQL."""
    import secrets

    store = EventStore(postgres_url)
    migrate.upgrade(store.engine)
    store.append(build_records())
    add_runs(store)
    role = f"wk_audit_test_{secrets.token_hex(4)}"
    with store.engine.begin() as conn:
        schema = conn.execute(sa.text("SELECT current_schema()")).scalar_one()
        owner = conn.execute(sa.text("SELECT current_user")).scalar_one()
        database = conn.execute(sa.text("SELECT current_database()")).scalar_one()
        for statement in audit_role_sql(role, schema=schema, owner=owner, database=database):
            conn.execute(sa.text(statement))
    try:
        yield store, role
    finally:
        with store.engine.begin() as conn:
            conn.execute(sa.text(f"DROP OWNED BY {role}"))
            conn.execute(sa.text(f"DROP ROLE {role}"))
        store.close()


def test_the_audit_role_reads_everything_and_writes_nothing(
    audit_role: tuple[EventStore, str],
) -> None:
    store, role = audit_role

    def as_auditor(sql: str) -> Any:
        with store.engine.connect() as conn:
            conn.execute(sa.text(f"SET ROLE {role}"))
            try:
                return conn.execute(sa.text(sql)).all()
            finally:
                conn.rollback()

    for relation in ("session_events", "daemon_runs", "session_snapshots", *VIEW_COLUMNS):
        as_auditor(f"SELECT * FROM {relation} LIMIT 1")
    assert as_auditor("SELECT count(*) FROM session_state_intervals")[0][0] == 53
    for write in (
        "INSERT INTO daemon_runs (started_at, version, host, pid, config_hash) "
        "VALUES (now(), 'x', 'x', 1, 'x')",
        "UPDATE daemon_runs SET clean = true",
        "DELETE FROM daemon_runs",
        "INSERT INTO session_snapshots VALUES ('x', 1, now(), 'PAUSED', '{}')",
        "TRUNCATE session_snapshots",
        "CREATE TABLE audit_scratch (x int)",
        "CREATE VIEW audit_scratch AS SELECT 1",
        "DROP VIEW session_uptime_daily",
        "ALTER TABLE daemon_runs ADD COLUMN x int",
    ):
        # SET ROLE does not apply the role's default_transaction_read_only: what refuses
        # these is the grants alone.
        with store.engine.connect() as conn:
            conn.execute(sa.text(f"SET ROLE {role}"))
            with pytest.raises(sa.exc.ProgrammingError) as refused:
                conn.execute(sa.text(write))
            assert refused.value.orig.sqlstate == "42501", write  # type: ignore[union-attr]
            conn.rollback()


def test_the_audit_role_can_read_views_made_by_later_migrations(
    audit_role: tuple[EventStore, str],
) -> None:
    store, role = audit_role
    with store.engine.begin() as conn:  # as the owner, like a later migration
        conn.execute(sa.text("CREATE VIEW later_view AS SELECT session FROM session_events"))
    with store.engine.connect() as conn:
        conn.execute(sa.text(f"SET ROLE {role}"))
        assert conn.execute(sa.text("SELECT count(*) FROM later_view")).scalar_one() == len(HISTORY)
        conn.rollback()
