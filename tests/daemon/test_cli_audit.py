"""The audit side of the command line (daemon/cli.py, daemon/readonly.py) on both backends:
`db upgrade`, read-only `sql`, `replay`, and `check-config`."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa

from daemon import migrate
from daemon.cli import EXIT_USAGE, main
from daemon.config import EX_CONFIG
from daemon.readonly import QueryError, RefusedWrite, run_query
from daemon.store import EventStore
from daemon.timeparse import iso
from statemachines.session import SessionMachine, SessionModel, TransitionRecord, Trigger

NOW = datetime.now(UTC).replace(microsecond=0)
CAPTURE = pytest.CaptureFixture[str]

# (session, first event's offset from now, triggers)
SCRIPT = [
    ("old", timedelta(days=-3), ["start", "connected", "authenticated", "data", "stale", "dead"]),
    (
        "venue-a",
        timedelta(hours=-2),
        ["start", "connected", "authenticated", "data", "stale", "data", "lost", "retry"],
    ),
    (
        "venue-b",
        timedelta(minutes=-30),
        ["start", "auth_rejected", "retry", "connected", "authenticated", "data"],
    ),
]


@dataclass
class AuditLog:
    url: str
    store: EventStore
    records: list[TransitionRecord]

    def of(self, session: str) -> list[TransitionRecord]:
        return [r for r in self.records if r.session == session]


def build_records() -> list[TransitionRecord]:
    machine = SessionMachine()
    out = []
    for name, offset, triggers in SCRIPT:
        model = machine.register(SessionModel(name))
        for i, trigger in enumerate(triggers):
            out.append(
                machine.fire(
                    model,
                    Trigger(trigger),
                    at=NOW + offset + timedelta(minutes=i),
                    reason=f"{name}: {trigger} ({i + 1})",
                    detail={"step": i + 1, "note": 'é,"q"'},
                )
            )
    return out


@pytest.fixture
def audit(store: EventStore) -> AuditLog:
    records = build_records()
    store.append(records[:5])
    store.append(records[5:])
    return AuditLog(store.url, store, records)


def run(capsys: CAPTURE, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def count(store: EventStore) -> int:
    return store.count_events()


# -- db upgrade ----------------------------------------------------------------------------


def test_db_upgrade_twice(db_url: str, capsys: CAPTURE) -> None:
    head = migrate.head_revision()
    code, out, err = run(capsys, "db", "upgrade", "--database", db_url)
    assert code == 0, err
    assert f"upgraded from an empty database to revision {head}" in out
    code, out, err = run(capsys, "db", "upgrade", "--database", db_url)
    assert code == 0, err
    assert f"already at revision {head}" in out
    st = EventStore(db_url)
    try:
        assert migrate.current_revision(st.engine) == head
        assert st.append_only_triggers_present()
    finally:
        st.close()


# -- sql: read-only ------------------------------------------------------------------------------

COMMON_WRITES = [
    "DELETE FROM session_events",
    "UPDATE session_events SET reason = 'rewritten'",
    "DROP TABLE session_events",
    "INSERT INTO session_events (session, version, at, trigger, source, dest, reason, detail) "
    "VALUES ('evil', 1, '2026-01-01 00:00:00', 'start', 'DISCONNECTED', 'CONNECTING', 'x', '{}')",
    "CREATE TABLE evil (x INTEGER)",
    "DELETE FROM daemon_runs",
    "DELETE FROM session_snapshots",
]
SQLITE_WRITES = [
    "PRAGMA query_only=0",
    "PRAGMA query_only = OFF",
    "PRAGMA journal_mode=DELETE",
    "ATTACH DATABASE '{tmp}/attached.db' AS other",
    "DETACH DATABASE main",
    "VACUUM",
    "REINDEX",
    "CREATE TEMP TABLE t (x INTEGER)",
    "CREATE INDEX evil_ix ON session_events (reason)",
    "ALTER TABLE session_events ADD COLUMN evil TEXT",
]
POSTGRES_WRITES = [
    "TRUNCATE session_events",
    "CREATE INDEX evil_ix ON session_events (reason)",
    "ALTER TABLE session_events ADD COLUMN evil TEXT",
    # Ending the read-only transaction must not open a writable one.
    "COMMIT; INSERT INTO session_events (session, version, at, trigger, source, dest, reason, "
    "detail) VALUES ('evil', 1, now(), 'start', 'DISCONNECTED', 'CONNECTING', 'x', '{}')",
    "COMMIT; CREATE TABLE evil1 (x integer)",
    "ROLLBACK; SET default_transaction_read_only = off; CREATE TABLE evil2 (x integer)",
    "SELECT 1; COMMIT; CREATE TABLE evil3 (x integer)",
]


def _tables(store: EventStore) -> set[str]:
    with store.engine.connect() as conn:
        return set(sa.inspect(conn).get_table_names())


def _state(store: EventStore) -> tuple[object, ...]:
    with store.engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT id, session, version, reason FROM session_events ORDER BY id")
        ).all()
        columns = [c["name"] for c in sa.inspect(conn).get_columns("session_events")]
    return (tuple(map(tuple, rows)), _tables(store), tuple(columns))


def test_sql_refuses_every_write(audit: AuditLog, capsys: CAPTURE, tmp_path: Path) -> None:
    writes = COMMON_WRITES + (SQLITE_WRITES if audit.store.sqlite else POSTGRES_WRITES)
    problems = []
    for sql in writes:
        before = _state(audit.store)
        code, _, err = run(
            capsys, "sql", "--database", audit.url, sql.replace("{tmp}", str(tmp_path))
        )
        changed = _state(audit.store) != before
        if code != 1 or "read-only" not in err or changed:
            problems.append(f"{sql!r}: exit {code}, database changed: {changed}")
    assert problems == []
    assert count(audit.store) == len(audit.records)
    assert not (tmp_path / "attached.db").exists()
    assert audit.store.append_only_triggers_present()


def test_sql_refusal_message(audit: AuditLog, capsys: CAPTURE) -> None:
    code, out, err = run(capsys, "sql", "--database", audit.url, "DELETE FROM session_events")
    assert code == 1
    assert out == ""
    assert "read-only" in err
    assert "nothing was changed" in err
    assert count(audit.store) == len(audit.records)


def test_sql_select_prints_a_table(audit: AuditLog, capsys: CAPTURE) -> None:
    code, out, err = run(
        capsys,
        "sql",
        "--database",
        audit.url,
        "SELECT session, version, dest FROM session_events WHERE session = 'venue-a' ORDER BY id",
    )
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["session", "version", "dest"]
    assert set(lines[1]) <= {"-", " "}
    body = [line.split() for line in lines[2:-1]]
    expected = [[r.session, str(r.version), r.dest] for r in audit.of("venue-a")]
    assert body == expected
    assert lines[-1] == f"({len(expected)} rows)"

    code, out, _ = run(capsys, "sql", "--database", audit.url, "SELECT 1 AS one")
    assert code == 0
    assert out.splitlines()[-1] == "(1 row)"
    code, out, _ = run(
        capsys,
        "sql",
        "--database",
        audit.url,
        "--limit",
        "2",
        "SELECT id FROM session_events ORDER BY id",
    )
    assert code == 0
    assert out.splitlines()[-1] == "(2 rows)"


def test_sql_json(audit: AuditLog, capsys: CAPTURE) -> None:
    code, out, err = run(
        capsys,
        "sql",
        "--database",
        audit.url,
        "--json",
        "SELECT session, version, reason, detail FROM session_events ORDER BY id",
    )
    assert code == 0, err
    rows = json.loads(out)
    assert isinstance(rows, list)
    assert all(isinstance(r, dict) for r in rows)
    assert [(r["session"], r["version"], r["reason"]) for r in rows] == [
        (r.session, r.version, r.reason) for r in audit.records
    ]
    detail = rows[0]["detail"]
    detail = json.loads(detail) if isinstance(detail, str) else detail
    assert detail == {"step": 1, "note": 'é,"q"'}


def test_sql_csv(audit: AuditLog, capsys: CAPTURE) -> None:
    code, out, err = run(
        capsys,
        "sql",
        "--database",
        audit.url,
        "--csv",
        "SELECT session, version, reason FROM session_events ORDER BY id",
    )
    assert code == 0, err
    rows = list(csv.reader(io.StringIO(out)))
    assert rows[0] == ["session", "version", "reason"]
    assert rows[1:] == [[r.session, str(r.version), r.reason] for r in audit.records]


def test_sql_error_is_reported(audit: AuditLog, capsys: CAPTURE) -> None:
    for sql in ["SELEC 1", "SELECT * FROM no_such_table", "SELECT nonsense FROM session_events"]:
        code, out, err = run(capsys, "sql", "--database", audit.url, sql)
        assert code == 1, sql
        assert "query failed" in err, sql
        assert out == ""


def test_sql_percent_sign_is_literal(audit: AuditLog, capsys: CAPTURE) -> None:
    code, out, err = run(
        capsys,
        "sql",
        "--database",
        audit.url,
        "--json",
        "SELECT count(*) AS n FROM session_events WHERE session LIKE 'venue-%'",
    )
    assert code == 0, err
    assert json.loads(out) == [{"n": len(audit.of("venue-a")) + len(audit.of("venue-b"))}]


# -- sql on SQLite files -------------------------------------------------------------------------


def _closed_sqlite_db(directory: Path) -> tuple[str, int]:
    """A WAL database the daemon wrote and then closed cleanly (no -wal/-shm left)."""
    path = directory / "events.db"
    st = EventStore(f"sqlite:///{path}")
    migrate.upgrade(st.engine)
    records = build_records()
    st.append(records)
    with st.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    st.close()
    assert not Path(f"{path}-wal").exists()
    return f"sqlite:///{path}", len(records)


def test_sqlite_read_only_on_a_cleanly_closed_wal_database(tmp_path: Path, capsys: CAPTURE) -> None:
    url, n = _closed_sqlite_db(tmp_path)
    result = run_query(url, "SELECT count(*) AS n FROM session_events")
    assert list(result.columns) == ["n"]
    assert [tuple(r) for r in result.rows] == [(n,)]
    with pytest.raises(RefusedWrite):
        run_query(url, "DELETE FROM session_events")
    code, out, _ = run(
        capsys, "sql", "--database", url, "--json", "SELECT count(*) AS n FROM session_events"
    )
    assert code == 0
    assert json.loads(out) == [{"n": n}]


def test_sqlite_missing_file_is_an_error_not_a_new_database(tmp_path: Path) -> None:
    path = tmp_path / "nope.db"
    with pytest.raises(QueryError, match="no such database file"):
        run_query(f"sqlite:///{path}", "SELECT 1")
    assert not path.exists()


def test_sqlite_path_with_a_hash_sign(tmp_path: Path) -> None:
    """A database path is a file name, not URI text: '#' (or '?') in it must not cut the
    path short and open (and create) another file."""
    directory = tmp_path / "audit#1"
    directory.mkdir()
    url, n = _closed_sqlite_db(directory)
    before = {p.name for p in tmp_path.iterdir()}
    try:
        rows: object = [
            tuple(r) for r in run_query(url, "SELECT count(*) FROM session_events").rows
        ]
    except QueryError as exc:
        rows = exc
    stray = sorted({p.name for p in tmp_path.iterdir()} - before)
    assert (rows, stray) == ([(n,)], []), f"read {rows!r}; created {stray}"


@pytest.fixture
def other_user_dir() -> Iterator[Path]:
    """A directory the daemon's user owns and another user (nobody) can only read."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run a command as another user")
    directory = Path(tempfile.mkdtemp(prefix="wk-audit-"))
    directory.chmod(0o755)
    try:
        yield directory
    finally:
        shutil.rmtree(directory)


def _as_nobody(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            sys.executable,
            "-m",
            "daemon",
            *argv,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=cwd,
        env={**os.environ, "HOME": str(cwd)},
    )


def test_sql_as_another_user_after_a_clean_shutdown(other_user_dir: Path) -> None:
    """PITFALLS: mode=ro fails for another user once the WAL files are gone; sql still works."""
    url, n = _closed_sqlite_db(other_user_dir)
    (other_user_dir / "events.db").chmod(0o644)
    proc = _as_nobody(
        "sql",
        "--database",
        url,
        "--json",
        "SELECT count(*) AS n FROM session_events",
        cwd=other_user_dir,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [{"n": n}]
    proc = _as_nobody("sql", "--database", url, "DELETE FROM session_events", cwd=other_user_dir)
    assert proc.returncode == 1
    assert "read-only" in proc.stderr


def test_replay_as_another_user_after_a_clean_shutdown(other_user_dir: Path) -> None:
    """An incident reviewer with read access replays the log of a stopped daemon."""
    url, n = _closed_sqlite_db(other_user_dir)
    (other_user_dir / "events.db").chmod(0o644)
    proc = _as_nobody("replay", "--database", url, "--json", cwd=other_user_dir)
    assert proc.returncode == 0, proc.stderr.strip().splitlines()[-1]
    assert len(json.loads(proc.stdout)) == n


# -- replay --------------------------------------------------------------------------------


def _replay_json(capsys: CAPTURE, url: str, *extra: str) -> list[dict[str, object]]:
    code, out, err = run(capsys, "replay", "--database", url, "--json", *extra)
    assert code == 0, err
    events = json.loads(out)
    assert isinstance(events, list)
    return events


def _keys(events: list[dict[str, object]]) -> list[tuple[object, object]]:
    return [(e["session"], e["version"]) for e in events]


def _expected(records: list[TransitionRecord]) -> list[tuple[object, object]]:
    return [(r.session, r.version) for r in records]


def test_replay_timeline(audit: AuditLog, capsys: CAPTURE) -> None:
    code, out, err = run(capsys, "replay", "--database", audit.url)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["at", "session", "version", "transition", "reason"]
    body = lines[2:]
    assert len(body) == len(audit.records)
    for line, r in zip(body, audit.records, strict=True):
        assert line.startswith(iso(r.at))
        assert f"{r.source} --{r.trigger}--> {r.dest}" in line
        assert r.session in line


def test_replay_json_is_every_event_in_order(audit: AuditLog, capsys: CAPTURE) -> None:
    events = _replay_json(capsys, audit.url)
    assert _keys(events) == _expected(audit.records)
    first, rec = events[0], audit.records[0]
    assert (first["trigger"], first["source"], first["dest"], first["reason"]) == (
        rec.trigger,
        rec.source,
        rec.dest,
        rec.reason,
    )
    assert datetime.fromisoformat(str(first["at"])) == rec.at
    assert first["detail"] == dict(rec.detail)
    ids = [e["id"] for e in events]
    assert ids == sorted(ids)  # type: ignore[type-var]


def test_replay_session(audit: AuditLog, capsys: CAPTURE) -> None:
    assert _keys(_replay_json(capsys, audit.url, "--session", "venue-a")) == _expected(
        audit.of("venue-a")
    )
    both = _replay_json(capsys, audit.url, "--session", "venue-b", "--session", "old")
    assert _keys(both) == _expected([r for r in audit.records if r.session in ("old", "venue-b")])
    assert _replay_json(capsys, audit.url, "--session", "nobody") == []


def test_replay_since_relative(audit: AuditLog, capsys: CAPTURE) -> None:
    expected = _expected(audit.of("venue-a") + audit.of("venue-b"))
    for since in [["--since=-1d"], ["--since", "-1d"], ["--since", "-24h"], ["--since=-1440m"]]:
        assert _keys(_replay_json(capsys, audit.url, *since)) == expected, since


def test_replay_since_relative_as_separate_tokens_everywhere(
    audit: AuditLog, capsys: CAPTURE
) -> None:
    expected = _expected(audit.of("venue-b"))
    for argv in (
        ["replay", "--since", "-90m", "--database", audit.url, "--json"],
        ["replay", "--database", audit.url, "--json", "--since", "-90m"],
        ["replay", "--session", "venue-b", "--since", "-1.5h", "--database", audit.url, "--json"],
    ):
        code, out, err = run(capsys, *argv)
        assert code == 0, (argv, err)
        assert _keys(json.loads(out)) == expected, argv


def test_replay_since_and_until_iso(audit: AuditLog, capsys: CAPTURE) -> None:
    a = audit.of("venue-a")
    until = a[3].at + timedelta(seconds=30)
    events = _replay_json(capsys, audit.url, "--until", iso(until))
    assert _keys(events) == _expected(audit.of("old") + a[:4])
    since = a[2].at
    events = _replay_json(capsys, audit.url, "--since", iso(since), "--until", iso(until))
    assert _keys(events) == _expected(a[2:4])  # both ends inclusive
    # Naive ISO is UTC; an offset is honoured.
    plus2 = since.astimezone(timezone(timedelta(hours=2)))
    events = _replay_json(capsys, audit.url, "--since", plus2.isoformat(), "--until", iso(until))
    assert _keys(events) == _expected(a[2:4])
    naive = since.replace(tzinfo=None).isoformat()
    events = _replay_json(capsys, audit.url, "--since", naive, "--until", iso(until))
    assert _keys(events) == _expected(a[2:4])


def test_replay_csv(audit: AuditLog, capsys: CAPTURE) -> None:
    code, out, err = run(capsys, "replay", "--database", audit.url, "--csv", "--session", "venue-b")
    assert code == 0, err
    rows = list(csv.reader(io.StringIO(out)))
    assert rows[0] == [
        "id",
        "at",
        "session",
        "version",
        "trigger",
        "source",
        "dest",
        "reason",
        "detail",
    ]
    b = audit.of("venue-b")
    assert [(r[2], int(r[3]), r[4], r[5], r[6], r[7]) for r in rows[1:]] == [
        (r.session, r.version, r.trigger, r.source, r.dest, r.reason) for r in b
    ]
    assert json.loads(rows[1][8]) == dict(b[0].detail)


def test_replay_at_gives_every_sessions_state(audit: AuditLog, capsys: CAPTURE) -> None:
    a = audit.of("venue-a")
    for at, expected in [
        (a[3].at + timedelta(seconds=30), {"old": audit.of("old")[-1], "venue-a": a[3]}),
        (a[3].at, {"old": audit.of("old")[-1], "venue-a": a[3]}),  # inclusive
        (
            NOW + timedelta(seconds=1),
            {name: audit.of(name)[-1] for name in ("old", "venue-a", "venue-b")},
        ),
        (NOW - timedelta(days=30), {}),
    ]:
        code, out, err = run(capsys, "replay", "--database", audit.url, "--at", iso(at), "--json")
        assert code == 0, err
        doc = json.loads(out)
        assert datetime.fromisoformat(doc["at"].replace("Z", "+00:00")) == at
        got = {s["session"]: (s["state"], s["version"], s["reason"]) for s in doc["sessions"]}
        assert got == {n: (r.dest, r.version, r.reason) for n, r in expected.items()}, at
        for s in doc["sessions"]:
            assert datetime.fromisoformat(s["since"]) == expected[s["session"]].at

    code, out, _ = run(
        capsys, "replay", "--database", audit.url, "--at", "-1h", "--json", "--session", "venue-a"
    )
    assert code == 0
    doc = json.loads(out)
    assert [(s["session"], s["state"]) for s in doc["sessions"]] == [("venue-a", a[-1].dest)]

    code, out, _ = run(capsys, "replay", "--database", audit.url, "--at", "now")
    assert code == 0
    assert "state of every session at" in out
    assert all(name in out for name in ("old", "venue-a", "venue-b"))


def test_replay_bad_time_is_a_usage_error(audit: AuditLog, capsys: CAPTURE) -> None:
    for argv in [
        ["--since", "yesterday"],
        ["--until", "2026-13-45"],
        ["--at", "soon"],
        ["--at", "-5x"],
        ["--since=tomorrow"],
    ]:
        code, out, err = run(capsys, "replay", "--database", audit.url, *argv)
        assert code == EXIT_USAGE == 2, argv
        assert "not a time" in err, argv
        assert out == ""


# -- check-config --------------------------------------------------------------------------

VALID = """
[daemon]
database = "sqlite:///{tmp}/events.db"

[[sessions]]
name = "venue-a"
kind = "websocket"
url = "ws://127.0.0.1:9/x"
"""


def test_check_config_valid(tmp_path: Path, capsys: CAPTURE) -> None:
    path = tmp_path / "wirekeep.toml"
    path.write_text(VALID.format(tmp=tmp_path))
    for argv in (["check-config", "--config", str(path)], ["--config", str(path), "check-config"]):
        code, out, err = run(capsys, *argv)
        assert code == 0, err
        assert str(path) in out
        assert "ok" in out
        assert "1 sessions" in out
    assert not (tmp_path / "events.db").exists()  # checking does not create the database


@pytest.mark.parametrize(
    ("replace", "key"),
    [
        (('kind = "websocket"', 'kind = "carrier-pigeon"'), "kind"),
        (
            ('url = "ws://127.0.0.1:9/x"', 'url = "ws://127.0.0.1:9/x"\nstale_after = "soon"'),
            "stale_after",
        ),
        (('name = "venue-a"', 'name = "venue-a"\nbogus_key = 1'), "bogus_key"),
    ],
    ids=["bad kind", "bad type", "unknown key"],
)
def test_check_config_invalid(
    tmp_path: Path, capsys: CAPTURE, replace: tuple[str, str], key: str
) -> None:
    path = tmp_path / "wirekeep.toml"
    path.write_text(VALID.format(tmp=tmp_path).replace(*replace))
    code, out, err = run(capsys, "check-config", "--config", str(path))
    assert code == EX_CONFIG == 78
    assert str(path) in err
    assert key in err
    assert out == ""


def test_check_config_duplicate_key_and_broken_toml(tmp_path: Path, capsys: CAPTURE) -> None:
    path = tmp_path / "wirekeep.toml"
    path.write_text(textwrap.dedent(VALID.format(tmp=tmp_path)) + '\n[daemon]\ndatabase = "x"\n')
    code, _, err = run(capsys, "check-config", "--config", str(path))
    assert code == EX_CONFIG
    assert str(path) in err
    path.write_text("[daemon\n")
    code, _, err = run(capsys, "check-config", "--config", str(path))
    assert code == EX_CONFIG
    assert str(path) in err
