"""``wirekeep db snapshot`` (daemon/snapshot.py): a consistent, read-only copy of a live
SQLite database, that opens read-only with no -wal/-shm files, while the daemon writes
and after it stopped. (The PostgreSQL read-only role is in test_audit_views.py.)"""

from __future__ import annotations

import argparse
import os
import sqlite3
import stat
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from daemon import migrate
from daemon.cli import CliError
from daemon.cli_audit import register
from daemon.replay import verify_store
from daemon.snapshot import SnapshotError, snapshot_sqlite
from daemon.store import EventStore
from statemachines.session import SessionMachine, SessionModel, TransitionRecord

CAPTURE = pytest.CaptureFixture[str]
T0 = datetime(2026, 11, 20, 14, 0, tzinfo=UTC)
CYCLE = [
    "start",
    "authenticated",
    "data",
    "stale",
    "data",
    "lost",
    "retry",
    "authenticated",
    "data",
    "reconnect",
]


class Log:
    """Legal transitions for a few sessions, handed out in batches."""

    def __init__(self, sessions: int = 5) -> None:
        self.machine = SessionMachine()
        self.models = [self.machine.register(SessionModel(f"s{i}")) for i in range(sessions)]
        self.step = 0

    def batch(self, rounds: int = 1) -> list[TransitionRecord]:
        out = []
        for _ in range(rounds):
            trigger = CYCLE[self.step % len(CYCLE)]
            at = T0 + timedelta(milliseconds=self.step)
            out.extend(
                self.machine.fire(m, trigger, at=at, reason=f"{trigger} {self.step}")
                for m in self.models
            )
            self.step += 1
        return out


@pytest.fixture
def live(sqlite_url: str) -> Iterator[tuple[EventStore, Log]]:
    """A WAL database with a writer that keeps it open, as a running daemon does."""
    store = EventStore(sqlite_url)
    migrate.upgrade(store.engine)
    log = Log()
    store.append(log.batch(20))
    try:
        yield store, log
    finally:
        store.close()


def db_path(store: EventStore) -> Path:
    database = store.engine.url.database
    assert database
    return Path(database)


def header_mode(path: Path) -> tuple[int, int]:
    """Bytes 18 and 19 of an SQLite file: 1 for rollback journal, 2 for WAL."""
    head = path.read_bytes()[:20]
    return head[18], head[19]


def test_a_snapshot_of_a_live_database_is_a_plain_read_only_file(
    live: tuple[EventStore, Log], tmp_path: Path
) -> None:
    store, _ = live
    source = db_path(store)
    assert Path(f"{source}-wal").exists(), "the daemon's WAL is in use"
    dest = tmp_path / "copy" / "audit.db"
    dest.parent.mkdir()
    result = snapshot_sqlite(source, dest)
    assert (result.events, result.sessions) == (100, 5)
    assert result.revision == migrate.head_revision()
    assert header_mode(dest) == (1, 1)  # rollback journal: no -wal/-shm needed to read it
    assert stat.S_IMODE(dest.stat().st_mode) & 0o222 == 0  # nobody may write it
    conn = sqlite3.connect(f"file:{dest}?mode=ro", uri=True)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        assert conn.execute("SELECT count(*) FROM session_events").fetchone()[0] == 100
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        assert {"session_events_no_update", "session_events_no_delete"} <= names
        assert "session_uptime_daily" in names  # the audit views come along
    finally:
        conn.close()
    assert sorted(p.name for p in dest.parent.iterdir()) == ["audit.db"]
    # replay reads it as it reads the live database
    copy = EventStore(f"sqlite:///{dest}", readonly=True)
    try:
        assert verify_store(copy) == verify_store(store)
    finally:
        copy.close()


def test_a_snapshot_taken_while_the_daemon_writes_is_consistent(
    live: tuple[EventStore, Log], tmp_path: Path
) -> None:
    store, log = live
    batches = [log.batch(3) for _ in range(150)]
    stop = threading.Event()
    written = [store.count_events()]

    def writer() -> None:
        for batch in batches:
            if stop.is_set():
                return
            store.append(batch)
            written.append(written[-1] + len(batch))

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        results = []
        for i in range(5):
            results.append(snapshot_sqlite(db_path(store), tmp_path / f"during-{i}.db"))
    finally:
        stop.set()
        thread.join()
    for i, result in enumerate(results):
        # a whole number of committed batches: one transaction's worth, never half of one
        assert result.events in written, result
        copy = EventStore(f"sqlite:///{tmp_path / f'during-{i}.db'}", readonly=True)
        try:
            finals = verify_store(copy)  # no gap, no half-written session
            assert sum(version for _, version in finals.values()) == result.events
        finally:
            copy.close()


def test_a_snapshot_after_a_clean_shutdown(live: tuple[EventStore, Log], tmp_path: Path) -> None:
    store, _ = live
    source = db_path(store)
    store.close()  # the last connection checkpoints and removes the WAL files
    assert not Path(f"{source}-wal").exists()
    os.chmod(source, 0o440)
    result = snapshot_sqlite(source, tmp_path / "after.db")
    assert result.events == 100
    assert stat.S_IMODE((tmp_path / "after.db").stat().st_mode) == 0o440
    # Nothing was created beside the source: a -wal/-shm owned by whoever ran the snapshot
    # (root, with sudo) would keep the daemon from opening its own database.
    assert sorted(p.name for p in source.parent.iterdir() if p.name.startswith("events")) == [
        "events.db"
    ]
    Path(f"{source}-wal").touch()  # a -wal without its -shm: not readable without writing
    with pytest.raises(SnapshotError, match="no -shm"):
        snapshot_sqlite(source, tmp_path / "again.db")


def test_a_snapshot_never_overwrites_by_accident(
    live: tuple[EventStore, Log], tmp_path: Path
) -> None:
    store, log = live
    dest = tmp_path / "audit.db"
    snapshot_sqlite(db_path(store), dest)
    with pytest.raises(SnapshotError, match="exists; pass --force"):
        snapshot_sqlite(db_path(store), dest)
    store.append(log.batch())
    assert snapshot_sqlite(db_path(store), dest, force=True).events == 105
    with pytest.raises(SnapshotError, match="live database itself"):
        snapshot_sqlite(db_path(store), db_path(store), force=True)
    with pytest.raises(SnapshotError, match="no such directory"):
        snapshot_sqlite(db_path(store), tmp_path / "missing" / "x.db")
    with pytest.raises(SnapshotError, match="no such database file"):
        snapshot_sqlite(tmp_path / "nothing.db", tmp_path / "y.db")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="wirekeep")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, handler: Callable[..., int], help_text: str, into: Any = sub) -> Any:
        p = into.add_parser(name, help=help_text)
        p.set_defaults(handler=handler)
        return p

    def db_option(p: argparse.ArgumentParser) -> None:
        p.add_argument("--database", metavar="URL")

    db = sub.add_parser("db")
    register(add, db_option, db.add_subparsers(dest="db_command", required=True))
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except CliError as exc:
        print(f"wirekeep: {exc}", file=sys.stderr)
        return exc.code


def test_db_snapshot_command(live: tuple[EventStore, Log], tmp_path: Path, capsys: CAPTURE) -> None:
    store, _ = live
    dest = tmp_path / "audit.db"
    assert run(["db", "snapshot", str(dest), "--database", store.url]) == 0
    out = capsys.readouterr().out
    assert f"wrote {dest}: 100 events of 5 sessions" in out
    assert f"sqlite3 -readonly {dest}" in out
    assert run(["db", "snapshot", str(dest), "--database", store.url]) == 1
    assert "exists; pass --force" in capsys.readouterr().err


def test_db_snapshot_on_postgresql_points_to_the_audit_role(
    postgres_url: str, tmp_path: Path, capsys: CAPTURE
) -> None:
    assert run(["db", "snapshot", str(tmp_path / "x.db"), "--database", postgres_url]) == 1
    assert "db audit-role" in capsys.readouterr().err
    assert not (tmp_path / "x.db").exists()


def test_db_audit_role_prints_the_grants(postgres_url: str, capsys: CAPTURE) -> None:
    assert run(["db", "audit-role", "--database", postgres_url, "--schema", "wirekeep"]) == 0
    out = capsys.readouterr().out
    assert 'CREATE ROLE "wirekeep_audit" NOLOGIN;' in out
    assert 'GRANT SELECT ON ALL TABLES IN SCHEMA "wirekeep" TO "wirekeep_audit";' in out
    assert 'ALTER DEFAULT PRIVILEGES FOR ROLE "postgres" IN SCHEMA "wirekeep"' in out
    assert "INSERT" not in out
    assert "UPDATE" not in out
    assert "DELETE" not in out


def test_db_audit_role_is_for_postgresql(sqlite_url: str, capsys: CAPTURE) -> None:
    assert run(["db", "audit-role", "--database", sqlite_url]) == 1
    assert "db snapshot" in capsys.readouterr().err
