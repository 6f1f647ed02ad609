"""Audit view figures on a 1,000,000-event log of 1,000 sessions spanning 35 days.

    python tests/benchmarks/bench_audit.py [--json] [--events 1000000] [--sessions 1000]
                                           [--days 35] [--postgres URL]

- uptime_one_session_ms: ``session_uptime_daily`` for one session over the last 30
  days (median over several sessions), through a read-only connection as ``wirekeep
  sql`` opens it. Target <= 200 ms.
- uptime_all_sessions_s: the same view for every session over the last 30 days (median
  of 3). Target <= 5 s.
- Baseline, same run: a bare cursor reading (session, at, source, dest) of every event,
  so a slow machine shows as a slow baseline too (``..._ratio_to_raw_scan``).
- For information: the intervals of one session, and the longest stale period of the
  week over all sessions (a window over every event).

The log is a random walk through the machine's legal transitions (connects, stale
periods, drops, backoff, circuit trips, pauses, shutdowns and recoveries, and the
self-loops a real log is full of: ``stable`` while streaming, ``throttled``,
``connected``), written through ``EventStore.append_rows``. This machine's capacity
swings between runs (two vCPUs shared with other work): CPU seconds and the load average
are printed beside the wall-clock figures.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from daemon import migrate
from daemon.readonly import open_sqlite_readonly
from daemon.store import EventStore
from statemachines.session import LEGAL, TransitionRecord

#: How a session moves on from each state (trigger, weight): mostly streaming, with
#: every kind of trouble now and then.
WALK = {
    "DISCONNECTED": [("start", 90), ("throttled", 5), ("pause", 5)],
    "CONNECTING": [("authenticated", 70), ("connected", 10), ("lost", 10),
                   ("auth_rejected", 5), ("trip", 5)],
    "AUTHENTICATED": [("data", 90), ("lost", 10)],
    "STREAMING": [("stable", 40), ("stale", 60), ("lost", 15), ("trip", 3), ("reconnect", 3),
                  ("pause", 2), ("failback", 5), ("shutdown", 6), ("recover", 6)],
    "STALE": [("data", 70), ("dead", 20), ("lost", 10)],
    "BACKOFF": [("retry", 85), ("throttled", 10), ("pause", 5)],
    "CIRCUIT_OPEN": [("probe", 90), ("throttled", 10)],
    "PAUSED": [("resume", 100)],
}  # fmt: skip
#: Mean seconds spent in a state before the next event (scaled to fit the span).
MEAN_STAY = {"STREAMING": 6000.0, "STALE": 20.0, "PAUSED": 1800.0, "CIRCUIT_OPEN": 60.0}


def build_log(store: EventStore, events: int, sessions: int, days: int, seed: int = 7) -> None:
    rng = random.Random(seed)
    per_session = events // sessions
    end = datetime.now(UTC) - timedelta(minutes=5)
    start = end - timedelta(days=days)
    rows: list[tuple[Any, ...]] = []
    for s in range(sessions):
        name = f"venue-{s:04d}"
        endpoint = f"tcp://venue-{s % 37:02d}.example:9000"
        state, clock, steps = "DISCONNECTED", 0.0, []
        for _ in range(per_session):
            moves = WALK[state]
            trigger = rng.choices([m for m, _ in moves], [w for _, w in moves])[0]
            dest = LEGAL[(state, trigger)]
            steps.append((clock, trigger, state, dest))
            clock += rng.expovariate(1.0 / MEAN_STAY.get(dest, 5.0))
            state = dest
        scale = (days * 86400.0 - rng.uniform(0, 3600)) / clock
        for version, (offset, trigger, source, dest) in enumerate(steps, 1):
            detail = {"attempt": version % 7, "endpoint": endpoint}
            record = TransitionRecord(
                name,
                version,
                start + timedelta(seconds=offset * scale),
                trigger,
                source,
                dest,
                f"{trigger}: benchmark event {version}",
                detail,
            )
            rows.append(store.prepare(record))
        if len(rows) >= 100_000:
            store.append_rows(rows)
            rows = []
    store.append_rows(rows)


# -- timing -------------------------------------------------------------------------------


def timed(run: Callable[[], list[Any]]) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds of this process, rows)."""
    wall, cpu = time.perf_counter(), time.process_time()
    rows = run()
    return time.perf_counter() - wall, time.process_time() - cpu, len(rows)


def measure(
    query: Callable[[str, tuple[Any, ...]], list[Any]],
    sql: dict[str, str],
    sessions: int,
    prefix: str,
    *,
    server_side: bool,
) -> dict[str, Any]:
    names = [f"venue-{i:04d}" for i in range(0, sessions, max(1, sessions // 7))][:7]
    query(sql["one"], (names[0],))  # warm the page cache for the first figure
    one = [timed(lambda n=n: query(sql["one"], (n,))) for n in names]
    raw = [timed(lambda: query(sql["raw"], ())) for _ in range(2)]
    every = [timed(lambda: query(sql["all"], ())) for _ in range(3)]
    intervals = [timed(lambda n=n: query(sql["intervals"], (n,))) for n in names[:3]]
    stale = timed(lambda: query(sql["stale"], ()))
    one_ms = statistics.median(w for w, _, _ in one) * 1000
    all_s = statistics.median(w for w, _, _ in every)
    raw_s = min(w for w, _, _ in raw)
    out: dict[str, Any] = {
        f"{prefix}uptime_one_session_ms": round(one_ms, 1),
        f"{prefix}uptime_one_session_rows": one[0][2],
        f"{prefix}uptime_all_sessions_s": round(all_s, 3),
        f"{prefix}uptime_all_sessions_rows": every[0][2],
        f"{prefix}raw_scan_s": round(raw_s, 3),
        f"{prefix}uptime_all_sessions_ratio_to_raw_scan": round(all_s / raw_s, 2),
        f"{prefix}intervals_one_session_ms": round(
            statistics.median(w for w, _, _ in intervals) * 1000, 1
        ),
        f"{prefix}longest_stale_week_all_sessions_s": round(stale[0], 3),
    }
    if not server_side:  # SQLite runs in this process: its CPU time is the query's
        out[f"{prefix}uptime_all_sessions_cpu_s"] = round(
            statistics.median(c for _, c, _ in every), 3
        )
    return out


SQLITE_SQL = {
    "one": "SELECT * FROM session_uptime_daily WHERE session = ? "
    "AND day >= date('now', '-30 days')",
    "all": "SELECT * FROM session_uptime_daily WHERE day >= date('now', '-30 days')",
    "raw": "SELECT session, at, source, dest FROM session_events",
    "intervals": "SELECT * FROM session_state_intervals WHERE session = ?",
    "stale": "SELECT session, started_at, duration_s FROM session_state_intervals "
    "WHERE state = 'STALE' AND started_at >= datetime('now', '-7 days') "
    "ORDER BY duration_s DESC LIMIT 1",
}
POSTGRES_SQL = {
    "one": "SELECT * FROM session_uptime_daily WHERE session = %s "
    "AND day >= (now() AT TIME ZONE 'UTC')::date - 30",
    "all": "SELECT * FROM session_uptime_daily WHERE day >= (now() AT TIME ZONE 'UTC')::date - 30",
    "raw": "SELECT session, at, source, dest FROM session_events",
    "intervals": "SELECT * FROM session_state_intervals WHERE session = %s",
    "stale": "SELECT session, started_at, duration_s FROM session_state_intervals "
    "WHERE state = 'STALE' AND started_at >= now() - interval '7 days' "
    "ORDER BY duration_s DESC LIMIT 1",
}


def bench_sqlite(directory: Path, events: int, sessions: int, days: int) -> dict[str, Any]:
    path = directory / "audit.db"
    store = EventStore(f"sqlite:///{path}")
    migrate.upgrade(store.engine)
    started = time.perf_counter()
    build_log(store, events, sessions, days)
    build_s = time.perf_counter() - started
    assert store.count_events() == events - events % sessions
    store.close()
    conn = open_sqlite_readonly(str(path))  # what `wirekeep sql` opens
    try:
        plan = " ".join(
            row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + SQLITE_SQL["one"], ("x",))
        )

        def query(sql: str, params: tuple[Any, ...]) -> list[Any]:
            return conn.execute(sql, params).fetchall()

        out = measure(query, SQLITE_SQL, sessions, "", server_side=False)
    finally:
        conn.close()
    out["uptime_one_session_uses_index"] = "USING INDEX" in plan and "SEARCH e" in plan
    out["build_log_s"] = round(build_s, 1)
    return out


def bench_postgres(base: str, events: int, sessions: int, days: int) -> dict[str, Any]:
    import psycopg
    import sqlalchemy as sa

    schema = "wirekeep_bench_audit"
    admin = sa.create_engine(base)
    with admin.begin() as conn:
        conn.execute(sa.text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
        conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
    url = sa.engine.make_url(base).update_query_dict({"options": f"-csearch_path={schema}"})
    store = EventStore(url.render_as_string(hide_password=False))
    try:
        migrate.upgrade(store.engine)
        build_log(store, events, sessions, days)
        with store.engine.begin() as conn:
            conn.execute(sa.text("ANALYZE session_events"))  # as autovacuum would, by now
    finally:
        store.close()
    plain = url.set(drivername="postgresql").render_as_string(hide_password=False)
    try:
        with psycopg.connect(plain, autocommit=True) as conn:
            conn.execute("SET default_transaction_read_only = on")

            def query(sql: str, params: tuple[Any, ...]) -> list[Any]:
                return conn.execute(sql, params or None).fetchall()

            return measure(query, POSTGRES_SQL, sessions, "postgres_", server_side=True)
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--days", type=int, default=35)
    parser.add_argument(
        "--postgres",
        metavar="URL",
        default=os.environ.get("WIREKEEP_BENCH_POSTGRES_URL"),
        help="also measure PostgreSQL at this URL",
    )
    args = parser.parse_args()
    results: dict[str, Any] = {
        "machine": f"{os.cpu_count()} cpu, python {sys.version.split()[0]}",
        "events": args.events,
        "sessions": args.sessions,
        "load_average_at_start": round(os.getloadavg()[0], 2),
    }
    with tempfile.TemporaryDirectory(prefix="wirekeep-bench-audit-") as tmp:
        results.update(bench_sqlite(Path(tmp), args.events, args.sessions, args.days))
    if args.postgres:
        results.update(bench_postgres(args.postgres, args.events, args.sessions, args.days))
    results["load_average_at_end"] = round(os.getloadavg()[0], 2)
    if args.json:
        print(json.dumps(results))
    else:
        width = max(map(len, results))
        for key, value in results.items():
            print(f"{key:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
