"""Real processes for end-to-end tests: the simulated venue and the daemon as subprocesses.

Everything a test waits for is polled with a deadline (:func:`eventually`): the
daemon's stdout (one JSON line per log entry; a ``transition`` line is written only
after its event is committed, so those lines are the *acknowledged* transitions) and
the database, read through the same read-only path as ``wirekeep sql``.

Each child's stdout and stderr go to files in the test's directory, so a chatty child
can never block on a full pipe, and the files are there to read when a test fails.
Processes are ended by their own handle (never by name), and every process a
:class:`ProcessGroup` started is killed when the test ends.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any, TypeVar

import pytest
import trio

#: ``python -m daemon ...`` is the ``wirekeep`` command of this interpreter's environment.
WIREKEEP = (sys.executable, "-m", "daemon")
#: Variables of the test runner's environment that would change what a child does.
_CLEAN_ENV = ("WIREKEEP_CONFIG", "CREDENTIALS_DIRECTORY", "JOURNAL_STREAM", "NOTIFY_SOCKET")
#: States with a transport (see statemachines.session.LIVE).
LIVE = frozenset({"CONNECTING", "AUTHENTICATED", "STREAMING", "STALE"})

T = TypeVar("T")


def child_env(
    extra: Mapping[str, str] | None = None, *, drop: Iterable[str] = ()
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _CLEAN_ENV and k not in set(drop)}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


# --------------------------------------------------------------------------- waiting


async def eventually(
    check: Callable[[], T | None],
    what: str | Callable[[], str],
    *,
    seconds: float = 15.0,
    interval: float = 0.05,
    tolerate: tuple[type[BaseException], ...] = (),
) -> T:
    """Poll ``check`` until it returns something truthy; fail the test after ``seconds``.

    ``tolerate``: exceptions that mean "not yet" (e.g. the database does not exist yet).
    """
    last_error: BaseException | None = None
    with trio.move_on_after(seconds):
        while True:
            try:
                result = check()
            except tolerate as exc:
                last_error = exc
            else:
                if result:
                    return result
            await trio.sleep(interval)
    text = what() if callable(what) else what
    if last_error is not None:
        text += f"\n(last error: {last_error!r})"
    pytest.fail(f"timed out after {seconds} s waiting for {text}", pytrace=False)


# --------------------------------------------------------------------------- processes


class Process:
    """One child process with its stdout/stderr in files."""

    def __init__(
        self, name: str, argv: Sequence[str], directory: Path, env: Mapping[str, str]
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.out_path = directory / f"{name}.stdout"
        self.err_path = directory / f"{name}.stderr"
        self._files: list[IO[bytes]] = [self.out_path.open("wb"), self.err_path.open("wb")]
        self.popen = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._files[0],
            stderr=self._files[1],
            cwd=directory,
            env=dict(env),
        )
        self.pid = self.popen.pid

    # -- output ------------------------------------------------------------------------

    def stdout(self) -> str:
        return self.out_path.read_bytes().decode("utf-8", "replace")

    def stderr(self) -> str:
        return self.err_path.read_bytes().decode("utf-8", "replace")

    def output_bytes(self) -> bytes:
        return self.out_path.read_bytes() + self.err_path.read_bytes()

    def json_lines(self) -> list[dict[str, Any]]:
        """Every complete stdout line that is a JSON object (a line cut by a kill is not)."""
        text = self.stdout()
        complete = text[: text.rfind("\n") + 1]
        out = []
        for line in complete.splitlines():
            if line.startswith("{"):
                try:
                    obj = json.loads(line)
                except ValueError:
                    continue
                if isinstance(obj, dict):
                    out.append(obj)
        return out

    def events(self, name: str) -> list[dict[str, Any]]:
        return [line for line in self.json_lines() if line.get("event") == name]

    def transitions(self, session: str | None = None) -> list[dict[str, Any]]:
        """The acknowledged transitions: ``transition`` lines (logged after the commit)."""
        return [
            t for t in self.events("transition") if session is None or t.get("session") == session
        ]

    def describe(self, lines: int = 25) -> str:
        def tail(text: str) -> str:
            return "\n".join(text.splitlines()[-lines:])

        return (
            f"\n--- {self.name} (pid {self.pid}, exit {self.popen.poll()}) stdout tail ---\n"
            f"{tail(self.stdout())}\n--- {self.name} stderr tail ---\n{tail(self.stderr())}"
        )

    # -- lifetime ----------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.popen.poll() is None

    def send_signal(self, signum: int) -> None:
        self.popen.send_signal(signum)

    def sigkill(self) -> int:
        """SIGKILL this process (by its handle) and reap it."""
        self.popen.kill()
        return self.popen.wait()

    async def wait(self, seconds: float = 15.0) -> int:
        code = await eventually(
            lambda: (self.popen.poll(),) if self.popen.poll() is not None else None,
            lambda: f"{self.name} to exit{self.describe()}",
            seconds=seconds,
            interval=0.02,
        )
        return int(code[0])

    async def stop(self, seconds: float = 15.0, signum: int = signal.SIGTERM) -> int:
        """SIGTERM (or ``signum``), then wait for the exit status."""
        self.send_signal(signum)
        return await self.wait(seconds)

    def close(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()
        for f in self._files:
            f.close()


@dataclass
class ProcessGroup:
    """The processes a test started; whatever still runs at the end is killed."""

    directory: Path
    processes: list[Process] = field(default_factory=list)

    def start(
        self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None
    ) -> Process:
        process = Process(name, argv, self.directory, env if env is not None else child_env())
        self.processes.append(process)
        return process

    def close(self) -> None:
        for process in reversed(self.processes):
            process.close()


def run_cli(
    args: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``wirekeep ARGS`` to completion (30 s at most)."""
    return subprocess.run(
        [*WIREKEEP, *args],
        capture_output=True,
        text=True,
        env=dict(env) if env is not None else child_env(),
        cwd=cwd,
        timeout=30,
        check=False,
    )


async def run_clis(
    *calls: Sequence[str], env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> list[subprocess.CompletedProcess[str]]:
    """Several ``wirekeep ARGS`` at once (each one's start-up is mostly imports)."""
    results: list[subprocess.CompletedProcess[str] | None] = [None] * len(calls)

    async def one(index: int, args: Sequence[str]) -> None:
        results[index] = await trio.to_thread.run_sync(lambda: run_cli(args, env=env, cwd=cwd))

    async with trio.open_nursery() as nursery:
        for index, args in enumerate(calls):
            nursery.start_soon(one, index, args)
    return [r for r in results if r is not None]


# --------------------------------------------------------------------------- the venue

_ADDRESS_RE = re.compile(r"^(websocket|protobuf|control)\s+(\S+)", re.MULTILINE)


@dataclass
class Venue:
    """``wirekeep venue`` in a child process, and its control port."""

    process: Process
    ws_urls: list[str]
    pb_urls: list[str]
    control_port: int

    @property
    def ws_url(self) -> str:
        return self.ws_urls[0]

    @property
    def pb_url(self) -> str:
        return self.pb_urls[0]

    @staticmethod
    def port_of(url: str) -> int:
        return int(url.rsplit(":", 1)[1].split("/", 1)[0])

    async def control(self, *requests: Mapping[str, object]) -> list[dict[str, Any]]:
        """Send JSON lines on the control port; the replies, each checked for ``ok``."""
        replies: list[dict[str, Any]] = []
        with trio.fail_after(10):
            await self._exchange(requests, replies)
        return replies

    async def _exchange(
        self, requests: Sequence[Mapping[str, object]], replies: list[dict[str, Any]]
    ) -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", self.control_port)
        async with stream:
            buffer = b""
            for request in requests:
                await stream.send_all(json.dumps(request).encode() + b"\n")
                while b"\n" not in buffer:
                    data = await stream.receive_some(65536)
                    assert data, f"venue closed the control connection after {request}"
                    buffer += data
                line, _, buffer = buffer.partition(b"\n")
                reply = json.loads(line)
                assert reply.get("ok") is True, f"venue refused {request}: {reply}"
                replies.append(reply)

    async def fault(self, name: str, **scope: object) -> int:
        """Apply one fault; how many connections (instant) or faults (clear) it hit."""
        (reply,) = await self.control({"fault": name, **scope})
        return int(reply["hit"])


async def start_venue(
    group: ProcessGroup,
    *args: str,
    name: str = "venue",
    ws_ports: int = 1,
    pb_ports: int = 1,
    rate: float = 20.0,
) -> Venue:
    argv = [*WIREKEEP, "venue", "--control-port", "0", "--rate", str(rate)]
    argv += ["--ws-port", "0"] * ws_ports + ["--pb-port", "0"] * pb_ports
    process = group.start(name, [*argv, *args])

    def addresses() -> dict[str, list[str]] | None:
        if not process.running:
            pytest.fail(f"the venue exited early{process.describe()}", pytrace=False)
        found: dict[str, list[str]] = {"websocket": [], "protobuf": [], "control": []}
        for kind, address in _ADDRESS_RE.findall(process.stdout()):
            found[kind].append(address)
        complete = (
            len(found["websocket"]) == ws_ports
            and len(found["protobuf"]) == pb_ports
            and found["control"]
        )
        return found if complete else None

    found = await eventually(addresses, lambda: f"the venue's addresses{process.describe()}")
    control_port = int(found["control"][0].rsplit(":", 1)[1])
    return Venue(process, found["websocket"], found["protobuf"], control_port)


def unused_port() -> int:
    """A loopback TCP port nobody listens on (connections to it are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------------- the daemon


async def start_daemon(
    group: ProcessGroup,
    config: Path,
    *,
    name: str = "daemon",
    env: Mapping[str, str] | None = None,
    seconds: float = 20.0,
) -> Process:
    """``wirekeep daemon --config CONFIG``; returns once it logged ``daemon_started``."""
    process = group.start(name, [*WIREKEEP, "daemon", "--config", str(config)], env)

    def started() -> bool:
        if not process.running:
            pytest.fail(f"the daemon exited early{process.describe()}", pytrace=False)
        return bool(process.events("daemon_started"))

    await eventually(started, lambda: f"daemon_started{process.describe()}", seconds=seconds)
    return process


# --------------------------------------------------------------------------- configuration


def toml_value(value: object) -> str:
    """A TOML literal for the few value types a config needs."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # ASCII-only JSON strings are TOML basic strings
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"no TOML for {value!r}")


#: Small timeouts, so that every fault plays out in well under a second.
FAST_DEFAULTS: dict[str, object] = {
    "connect_timeout": 2.0,
    "auth_timeout": 2.0,
    "heartbeat_interval": 1.0,
    "stale_after": 1.0,
    "dead_after": 3.0,
    "backoff": {"initial": 0.05, "max": 0.5},
}


def socket_dir(tmp_path: Path) -> Path:
    """A directory for the daemon's Unix sockets whose paths fit in sun_path."""
    if len(os.fsencode(tmp_path / "consumers.sock")) <= 100:
        return tmp_path
    return Path(tempfile.mkdtemp(prefix="wk-"))


def remove_socket_dir(directory: Path, tmp_path: Path) -> None:
    if directory != tmp_path:
        shutil.rmtree(directory, ignore_errors=True)


def write_config(
    path: Path,
    *,
    database: str,
    sockets: Path,
    sessions: Sequence[Mapping[str, object]],
    defaults: Mapping[str, object] | None = None,
) -> Path:
    lines = [
        "[daemon]",
        f"database = {toml_value(database)}",
        f"control_socket = {toml_value(str(sockets / 'control.sock'))}",
        "",
        "[defaults]",
    ]
    lines += [f"{k} = {toml_value(v)}" for k, v in {**FAST_DEFAULTS, **(defaults or {})}.items()]
    for session in sessions:
        lines += ["", "[[sessions]]"]
        lines += [f"{k} = {toml_value(v)}" for k, v in session.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def ws_session(name: str, url: str, **keys: object) -> dict[str, object]:
    return {
        "name": name,
        "kind": "websocket",
        "url": url,
        "auth_message": '{"op":"auth","key":"plain-test-key-not-secret"}',
        "auth_expect": {"ok": True},
        "subscribe": ['{"op":"subscribe","channel":"ticks"}'],
        **keys,
    }


def pb_session(name: str, url: str, **keys: object) -> dict[str, object]:
    return {
        "name": name,
        "kind": "protobuf",
        "url": url,
        "auth": {
            "client_id": "wirekeep-tests",
            "client_secret": "plain-client-secret-for-tests",
            "account_id": 1001,
            "access_token": "plain-access-token-for-tests",
        },
        "subscribe": ["EURUSD"],
        **keys,
    }


# --------------------------------------------------------------------------- the database


def _detail(value: object) -> dict[str, Any]:
    if isinstance(value, str):
        value = json.loads(value)
    assert isinstance(value, dict)
    return value


def _flag(value: object) -> bool | None:
    return None if value is None else bool(value)


@dataclass(frozen=True)
class Db:
    """Read-only access to the daemon's database while it runs (or after)."""

    url: str

    def rows(self, sql: str) -> list[dict[str, Any]]:
        from daemon.readonly import run_query

        result = run_query(self.url, sql)
        return [dict(zip(result.columns, row, strict=True)) for row in result.rows]

    def events(self, session: str | None = None) -> list[dict[str, Any]]:
        """Every event in log order; ``detail`` parsed."""
        rows = self.rows(
            "SELECT id, session, version, at, trigger, source, dest, reason, detail "
            "FROM session_events ORDER BY id"
        )
        out = []
        for row in rows:
            if session is None or row["session"] == session:
                row["detail"] = _detail(row["detail"])
                out.append(row)
        return out

    def by_session(self) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {}
        for event in self.events():
            out.setdefault(event["session"], []).append(event)
        return out

    def runs(self) -> list[dict[str, Any]]:
        rows = self.rows(
            "SELECT id, started_at, stopped_at, clean, pid, last_event_id FROM daemon_runs "
            "ORDER BY id"
        )
        for row in rows:
            row["clean"] = _flag(row["clean"])
        return rows

    def verify(self) -> dict[str, tuple[str, int]]:
        """Fold the whole log through the machine's table (raises CorruptLog)."""
        from daemon.replay import verify_store
        from daemon.store import EventStore

        store = EventStore(self.url, readonly=True)
        try:
            return verify_store(store)
        finally:
            store.close()


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value)
