"""Every command fails cleanly: one line on stderr saying what and where, its documented
exit status, no traceback; and ``wirekeep status`` imports only what the client needs.

Commands that read a database run in this process (``daemon.cli.main``: an uncaught
exception would fail the test with its traceback); the daemon, the demo and the pipe and
socket cases run as real processes, as a user would meet them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
import trio
from controlkit import cli_env, running_daemon, wirekeep
from processkit import WIREKEEP, child_env, run_clis

from daemon import cli, migrate
from daemon import config as cfg
from daemon.cli_ops import socket_path
from daemon.store import EventStore
from statemachines.session import TransitionRecord

#: Nobody listens on port 1; the password must never show.
UNREACHABLE_PG = "postgresql+psycopg://wirekeep:hunter2@127.0.0.1:1/events"
SHOWN_PG = "postgresql+psycopg://wirekeep:***@127.0.0.1:1/events"

CAPTURE = pytest.CaptureFixture[str]


def run(capsys: CAPTURE, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line(err: str, *needles: str) -> None:
    assert "Traceback" not in err
    assert err.count("\n") == 1, err
    assert err.startswith("wirekeep: "), err
    for needle in needles:
        assert needle in err, (needle, err)
    assert "hunter2" not in err


def bad_databases(tmp_path: Path) -> dict[str, tuple[str, str]]:
    """name -> (URL, what the message must name)."""
    return {
        "unreachable postgresql": (UNREACHABLE_PG, SHOWN_PG),
        "sqlite, no such directory": (
            f"sqlite:///{tmp_path / 'gone' / 'events.db'}",
            str(tmp_path / "gone"),
        ),
        "sqlite, no such file": (f"sqlite:///{tmp_path / 'none.db'}", str(tmp_path / "none.db")),
    }


READERS = [
    ["replay"],
    ["replay", "--json", "--at", "-1h"],
    ["replay", "--around", "-1h"],
    ["sql", "SELECT 1"],
    ["timeline", "--output", "{tmp}/t.svg"],
    ["db", "upgrade"],
]


@pytest.mark.parametrize("command", READERS, ids=" ".join)
@pytest.mark.parametrize(
    "which", ["unreachable postgresql", "sqlite, no such directory", "sqlite, no such file"]
)
def test_a_database_that_is_not_there_is_one_line_and_status_5(
    tmp_path: Path, capsys: CAPTURE, command: list[str], which: str
) -> None:
    url, where = bad_databases(tmp_path)[which]
    if command == ["db", "upgrade"] and which == "sqlite, no such file":
        pytest.skip("db upgrade creates a new SQLite database: that is its job")
    argv = [arg.replace("{tmp}", str(tmp_path)) for arg in command]
    code, out, err = run(capsys, *argv, "--database", url)
    assert (code, out) == (cli.EXIT_DATABASE, "")
    assert_one_line(err, where)
    assert not (tmp_path / "none.db").exists()


def write_config(tmp_path: Path, database: str) -> Path:
    path = tmp_path / "wirekeep.toml"
    path.write_text(
        f'[daemon]\ndatabase = "{database}"\ncontrol_socket = "{tmp_path / "control.sock"}"\n'
    )
    return path


@pytest.mark.parametrize("which", ["unreachable postgresql", "sqlite, no such directory"])
def test_check_config_says_when_the_database_cannot_be_reached(
    tmp_path: Path, capsys: CAPTURE, which: str
) -> None:
    url, where = bad_databases(tmp_path)[which]
    config = write_config(tmp_path, url)
    code, out, err = run(capsys, "check-config", "--config", str(config))
    assert (code, out) == (cli.EXIT_DATABASE, "")
    assert_one_line(err, str(config), "the configuration is valid, but", where)


def test_check_config_says_the_database_is_reachable(
    tmp_path: Path, capsys: CAPTURE, db_url: str
) -> None:
    config = write_config(tmp_path, db_url)
    code, out, _ = run(capsys, "check-config", "--config", str(config))
    assert code == 0
    if db_url.startswith("sqlite"):
        assert "not created yet" in out
        assert not (tmp_path / "events.db").exists()
    else:
        assert "reachable" in out


async def test_the_daemon_and_the_demo_fail_in_one_line(tmp_path: Path) -> None:
    bad = bad_databases(tmp_path)
    pg_config = write_config(tmp_path, UNREACHABLE_PG)
    sqlite_dir = tmp_path / "sqlite"
    sqlite_dir.mkdir()
    sqlite_config = write_config(sqlite_dir, bad["sqlite, no such directory"][0])
    not_a_directory = tmp_path / "a-file"
    not_a_directory.write_text("")
    calls = {
        "daemon, unreachable postgresql": (
            ["daemon", "--config", str(pg_config)],
            cli.EXIT_DATABASE,
            SHOWN_PG,
        ),
        "daemon, sqlite in no directory": (
            ["daemon", "--config", str(sqlite_config)],
            cli.EXIT_DATABASE,
            str(tmp_path / "gone"),
        ),
        "demo in a file": (
            ["demo", "--dir", str(not_a_directory / "demo"), "--duration", "1"],
            cli.EXIT_DATABASE,
            str(not_a_directory),
        ),
    }
    results = await run_clis(*(argv for argv, _, _ in calls.values()), cwd=tmp_path)
    for (name, (_, status, where)), result in zip(calls.items(), results, strict=True):
        assert result.returncode == status, (name, result.stderr)
        assert_one_line(result.stderr, where)


# --------------------------------------------------------------------------- pipes, sockets


def one_event_database(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'events.db'}"
    store = EventStore(url)
    try:
        migrate.upgrade(store.engine)
        at = datetime.now(UTC)
        store.append([TransitionRecord("s", 1, at, "pause", "DISCONNECTED", "PAUSED", "paused")])
    finally:
        store.close()
    return url


def test_replay_into_a_closed_pipe_stops_quietly_with_status_141(tmp_path: Path) -> None:
    url = one_event_database(tmp_path)
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader went away (``| head`` after its lines)
    try:
        result = subprocess.run(
            [*WIREKEEP, "replay", "--json", "--database", url],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            env=child_env(),
            timeout=30,
            check=False,
        )
    finally:
        os.close(write_end)
    assert (result.returncode, result.stderr) == (cli.EXIT_PIPE, "")


async def test_status_on_the_consumer_socket_and_tail_on_the_control_socket(
    tmp_path: Path,
) -> None:
    async with running_daemon(tmp_path, ["a"]) as r:
        consumers = r.daemon.config.daemon.consumer_socket
        status = await wirekeep("status", "--json", "--socket", consumers, "--timeout", "5")
        tail = await wirekeep("tail", "--all", "--socket", str(r.socket))
    err = status.stderr.decode()
    assert status.returncode == cli.EXIT_UNREACHABLE, err
    assert_one_line(err, consumers)
    assert status.stdout == b""
    err = tail.stderr.decode()
    assert tail.returncode == cli.EXIT_REFUSED, err
    assert "Traceback" not in err
    assert err.count("\n") == 1


# --------------------------------------------------------------------------- what status imports

HEAVY = ("sqlalchemy", "trio", "structlog", "daemon.config", "google.protobuf", "psycopg")

REPORT_MODULES = """
import json, sys
from daemon.cli import main
code = main(sys.argv[1:])
heavy = sorted(m for m in {heavy!r} if m in sys.modules)
print(json.dumps({{"code": code, "heavy": heavy}}), file=sys.stderr)
"""


async def test_status_imports_only_what_the_client_needs(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, ["a"]) as r:
        result = await trio_run_python(
            REPORT_MODULES.format(heavy=HEAVY), "status", "--json", "--socket", str(r.socket)
        )
    report = json.loads(result.stderr.decode().splitlines()[-1])
    assert report == {"code": 0, "heavy": []}
    assert json.loads(result.stdout)["sessions"][0]["name"] == "a"


async def trio_run_python(script: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process(
        [sys.executable, "-c", script, *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env=cli_env(),
    )


def test_the_help_and_the_socket_lookup_agree_with_daemon_config(tmp_path: Path) -> None:
    """cli.py keeps copies of two constants so that ``status`` need not import
    daemon.config; cli_ops finds the configuration file as daemon.config does."""
    assert (cli.CONFIG_ENV_VAR, cli.DEFAULT_CONFIG_PATH) == (
        cfg.CONFIG_ENV_VAR,
        cfg.DEFAULT_CONFIG_PATH,
    )
    config = write_config(tmp_path, "sqlite:///x.db")
    env = {cfg.CONFIG_ENV_VAR: str(config)}
    parsed = cli.build_parser().parse_args(["status"])
    assert cfg.config_path(None, env) == str(config)
    assert socket_path(parsed, env) == str(tmp_path / "control.sock")
