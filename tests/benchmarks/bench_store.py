"""Event store figures, each against a raw baseline measured in the same run.

    python tests/benchmarks/bench_store.py [--json] [--sessions 1000] [--events 200000]
                                           [--replay-events 1000000] [--postgres URL]

- append: one Trio task per session appends that session's transitions through the
  group-commit writer, awaiting each event's durable COMMIT before the next (the
  daemon's write-ahead rule; SQLite, WAL, synchronous=FULL). Baseline, same run,
  interleaved round by round: a hand-written sqlite3 writer turning the same records
  into rows and executemany-ing them in batches of the same mean size, same pragmas.
- replay: fold and verify a 1,000,000-event log through the table derived from the
  machine definition. Baseline: a bare cursor iterating the same rows.
- models: bytes per registered session model and time to register 100,000.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import time
import tracemalloc
from datetime import UTC, datetime, timedelta
from pathlib import Path

import trio

from daemon import migrate
from daemon.replay import verify_store
from daemon.store import COLUMNS, EventStore, sqlite_time
from daemon.writer import EventWriter
from statemachines.session import LEGAL, SessionMachine, SessionModel, TransitionRecord

# A legal cycle through the machine: connect, stream, go stale, recover, drop, retry.
CYCLE = ["start", "connected", "authenticated", "data", "stale", "data", "lost", "retry",
         "connected", "authenticated", "data", "reconnect"]  # fmt: skip
T0 = datetime(2026, 1, 1, tzinfo=UTC)
DETAIL = {"attempt": 1, "endpoint": "ws://127.0.0.1:8765/feed", "delay": 0.5}


def fresh_sqlite(directory: Path, name: str) -> str:
    path = directory / name
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    return f"sqlite:///{path}"


def migrated(url: str) -> EventStore:
    store = EventStore(url)
    migrate.upgrade(store.engine)
    return store


# -- append ---------------------------------------------------------------------------


def session_records(sessions: int, per_session: int) -> list[list[TransitionRecord]]:
    """Each session's transitions, fired through the shared machine (outside the timing)."""
    machine = SessionMachine()
    out = []
    for i in range(sessions):
        model = machine.register(SessionModel(f"venue-{i:05d}"))
        out.append([
            machine.fire(model, CYCLE[step % len(CYCLE)], at=T0 + timedelta(microseconds=step),
                         reason="benchmark transition", detail=DETAIL)
            for step in range(per_session)
        ])  # fmt: skip
    return out


async def _append_run(store: EventStore, per_session: list[list[TransitionRecord]]):
    """Every session task appends its events one by one, each awaiting its COMMIT."""
    writer = EventWriter(store)

    async def session_task(records: list[TransitionRecord]) -> None:
        for record in records:
            await writer.append(record)

    async with trio.open_nursery() as outer:
        await outer.start(writer.run)
        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for records in per_session:
                nursery.start_soon(session_task, records)
        elapsed = time.perf_counter() - start
        writer.close()
    return elapsed, writer.stats


def raw_sqlite_append(path: str, schema: list[str], records: list, batch: int) -> float:
    """The baseline: the least code that stores the same records durably in batches."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    for ddl in schema:
        conn.execute(ddl)
    dumps = json.JSONEncoder(separators=(",", ":")).encode
    sql = f"INSERT INTO session_events ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * 8)})"
    start = time.perf_counter()
    for i in range(0, len(records), batch):
        rows = [
            (
                r.session,
                r.version,
                sqlite_time(r.at),
                r.trigger,
                r.source,
                r.dest,
                r.reason,
                dumps(r.detail),
            )
            for r in records[i : i + batch]
        ]
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(sql, rows)
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - start
    conn.close()
    return elapsed


def schema_ddl(url_path: str) -> list[str]:
    conn = sqlite3.connect(url_path)
    ddl = [
        row[0]
        for row in conn.execute(
            "SELECT sql FROM sqlite_master WHERE sql IS NOT NULL AND name NOT LIKE 'sqlite_%' "
            "ORDER BY CASE type WHEN 'table' THEN 0 WHEN 'index' THEN 1 ELSE 2 END"
        )
    ]
    conn.close()
    return ddl


def bench_append(directory: Path, sessions: int, events: int, rounds: int) -> dict:
    per_session = session_records(sessions, max(1, events // sessions))
    flat = [r for step in zip(*per_session, strict=True) for r in step]  # arrival order
    total = len(flat)
    # Long-lived objects (the records) are frozen out of the collector, as the daemon
    # freezes its own after start-up; otherwise every young collection walks them.
    gc.collect()
    gc.freeze()
    ours, raws, ratios, batches, direct = [], [], [], [], []
    for _ in range(rounds):
        store = migrated(fresh_sqlite(directory, "append.db"))
        elapsed, stats = trio.run(_append_run, store, per_session)
        assert store.count_events() == total
        store.close()
        mean_batch = max(1, round(total / stats.batches))
        ddl = schema_ddl(str(directory / "append.db"))
        raw_path = directory / "raw.db"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{raw_path}{suffix}").unlink(missing_ok=True)
        raw_s = raw_sqlite_append(str(raw_path), ddl, flat, mean_batch)
        store = migrated(fresh_sqlite(directory, "direct.db"))
        start = time.perf_counter()
        for i in range(0, total, mean_batch):
            store.append(flat[i : i + mean_batch])
        direct.append(raw_s / (time.perf_counter() - start))
        store.close()
        ours.append(total / elapsed)
        raws.append(total / raw_s)
        ratios.append(raw_s / elapsed)
        batches.append(mean_batch)
    gc.unfreeze()
    return {
        "append_events_per_s": round(statistics.median(ours)),
        "append_raw_events_per_s": round(statistics.median(raws)),
        "append_ratio_to_raw": round(statistics.median(ratios), 3),
        # The database layer alone: EventStore.append, same batches, against the same raw.
        "store_append_ratio_to_raw": round(statistics.median(direct), 3),
        "append_events": total,
        "append_sessions": sessions,
        "append_mean_batch": round(statistics.median(batches)),
        "append_rounds": rounds,
    }


# -- replay ---------------------------------------------------------------------------


def build_log(store: EventStore, events: int, sessions: int) -> None:
    """A legal log of ``events`` events over ``sessions`` sessions, generated from LEGAL."""
    names = [f"venue-{i:05d}" for i in range(sessions)]
    state = dict.fromkeys(names, "DISCONNECTED")
    version = dict.fromkeys(names, 0)
    batch: list[TransitionRecord] = []
    n = 0
    step = 0
    while n < events:
        trigger = CYCLE[step % len(CYCLE)]
        for name in names:
            if n >= events:
                break
            dest = LEGAL[(state[name], trigger)]
            version[name] += 1
            batch.append(
                TransitionRecord(
                    name,
                    version[name],
                    T0 + timedelta(milliseconds=n),
                    trigger,
                    state[name],
                    dest,
                    "replay benchmark",
                    DETAIL,
                )
            )
            state[name] = dest
            n += 1
        step += 1
        if len(batch) >= 50_000:
            store.append(batch)
            batch = []
    store.append(batch)


def bare_read(store: EventStore) -> float:
    """The baseline: a bare DB-API cursor iterating the same rows, doing nothing with them."""
    raw = store.engine.raw_connection()
    try:
        cursor = raw.cursor() if store.sqlite else raw.driver_connection.cursor(name="bare")
        start = time.perf_counter()
        cursor.execute(
            'SELECT session, version, "trigger", source, dest FROM session_events ORDER BY id'
        )
        count = 0
        while rows := cursor.fetchmany(50_000):
            for _row in rows:
                count += 1
        elapsed = time.perf_counter() - start
        cursor.close()
    finally:
        raw.close()
    return elapsed


def bench_replay(url: str, events: int, sessions: int, prefix: str) -> dict:
    store = migrated(url)
    build_log(store, events, sessions)
    bare_read(store)  # warm the page cache for both
    raw_s = min(bare_read(store) for _ in range(2))
    runs = []
    for _ in range(2):
        start = time.perf_counter()
        finals = verify_store(store)
        runs.append(time.perf_counter() - start)
    assert len(finals) == sessions
    store.close()
    ours_s = min(runs)
    return {
        f"{prefix}replay_events_per_s": round(events / ours_s),
        f"{prefix}replay_raw_read_rows_per_s": round(events / raw_s),
        f"{prefix}replay_ratio_to_raw_read": round(raw_s / ours_s, 3),
        f"{prefix}replay_events": events,
    }


# -- models ---------------------------------------------------------------------------


def bench_models(count: int = 100_000) -> dict:
    gc.collect()
    machine = SessionMachine()
    start = time.perf_counter()
    models = [machine.register(SessionModel(f"venue-{i:06d}")) for i in range(count)]
    register_s = time.perf_counter() - start
    tracemalloc.start()
    more = [machine.register(SessionModel(f"extra-{i:06d}")) for i in range(10_000)]
    size, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(machine) == len(models) + len(more)
    return {
        "register_100k_sessions_s": round(register_s, 3),
        "bytes_per_session_model": round(size / len(more)),
    }


# -- postgres -------------------------------------------------------------------------


def bench_postgres_append(url: str, sessions: int, events: int) -> dict:
    store = migrated(url)
    per_session = session_records(sessions, max(1, events // sessions))
    elapsed, _stats = trio.run(_append_run, store, per_session)
    total = store.count_events()
    store.close()
    return {"postgres_append_events_per_s": round(total / elapsed)}


def fresh_postgres_schema(base: str, name: str) -> str:
    import sqlalchemy as sa

    engine = sa.create_engine(base)
    with engine.begin() as conn:
        conn.execute(sa.text(f"DROP SCHEMA IF EXISTS {name} CASCADE"))
        conn.execute(sa.text(f"CREATE SCHEMA {name}"))
    engine.dispose()
    url = sa.engine.make_url(base).update_query_dict({"options": f"-csearch_path={name}"})
    return url.render_as_string(hide_password=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--sessions", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3, help="append rounds (median reported)")
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--replay-events", type=int, default=1_000_000)
    parser.add_argument(
        "--postgres",
        metavar="URL",
        default=os.environ.get("WIREKEEP_BENCH_POSTGRES_URL"),
        help="also measure PostgreSQL at this URL",
    )
    args = parser.parse_args()

    results: dict = {"machine": f"{os.cpu_count()} cpu, python {sys.version.split()[0]}"}
    with tempfile.TemporaryDirectory(prefix="wirekeep-bench-") as tmp:
        directory = Path(tmp)
        results.update(bench_append(directory, args.sessions, args.events, args.rounds))
        results.update(
            bench_replay(fresh_sqlite(directory, "replay.db"), args.replay_events, 1000, "")
        )
    results.update(bench_models())
    if args.postgres:
        schema = "wirekeep_bench"
        results.update(
            bench_postgres_append(
                fresh_postgres_schema(args.postgres, schema), args.sessions, args.events
            )
        )
        results.update(
            bench_replay(
                fresh_postgres_schema(args.postgres, schema), args.replay_events, 1000, "postgres_"
            )
        )
        import sqlalchemy as sa

        engine = sa.create_engine(args.postgres)
        with engine.begin() as conn:
            conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
        engine.dispose()
    if args.json:
        print(json.dumps(results))
    else:
        width = max(map(len, results))
        for key, value in results.items():
            print(f"{key:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
