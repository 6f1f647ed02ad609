"""An in-process daemon for the control, metrics and reload tests.

The real :class:`daemon.app.Daemon` (SQLite file, threaded writer, control socket,
optional metrics) on the real clock, with its sessions connected to a
:class:`SimulatedVenue` served on loopback in the same Trio run. The sockets are real,
so a peer can also be another process (``wirekeep`` run as another user).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
from processkit import FAST_DEFAULTS, Db, pb_session, toml_value

import daemon
from daemon.adapters.net import adapter_for
from daemon.app import Daemon
from daemon.config import load_config
from daemon.notify import Notifier
from daemon.session import SessionRunner
from daemon.venue import SimulatedVenue, VenueConfig

REPO = Path(daemon.__file__).resolve().parents[1]
WIREKEEP = (sys.executable, "-m", "daemon")


def short_dir() -> Path:
    """A directory for Unix sockets (sun_path is short) that any user may traverse."""
    path = Path(tempfile.mkdtemp(prefix="wk-"))
    path.chmod(0o755)
    return path


def write_config(
    path: Path,
    *,
    database: str,
    control_socket: Path,
    sessions: Sequence[Mapping[str, object]],
    daemon_keys: Mapping[str, object] | None = None,
    defaults: Mapping[str, object] | None = None,
) -> Path:
    lines = ["[daemon]", f"database = {toml_value(database)}"]
    lines.append(f"control_socket = {toml_value(str(control_socket))}")
    lines += [f"{k} = {toml_value(v)}" for k, v in (daemon_keys or {}).items()]
    lines += ["", "[defaults]"]
    lines += [f"{k} = {toml_value(v)}" for k, v in {**FAST_DEFAULTS, **(defaults or {})}.items()]
    for session in sessions:
        lines += ["", "[[sessions]]"]
        lines += [f"{k} = {toml_value(v)}" for k, v in session.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@dataclass
class Running:
    daemon: Daemon
    venue: SimulatedVenue
    config_path: Path
    socket: Path
    database: str
    directory: Path

    @property
    def pb_url(self) -> str:
        return f"tcp://127.0.0.1:{self.venue.pb_port}"

    @property
    def db(self) -> Db:
        return Db(self.database)

    def session(self, name: str, **keys: object) -> dict[str, object]:
        return pb_session(name, self.pb_url, **keys)

    def rewrite(
        self,
        sessions: Sequence[Mapping[str, object]],
        daemon_keys: Mapping[str, object] | None = None,
        defaults: Mapping[str, object] | None = None,
    ) -> None:
        write_config(
            self.config_path,
            database=self.database,
            control_socket=self.socket,
            sessions=sessions,
            daemon_keys=daemon_keys,
            defaults=defaults,
        )

    async def call(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """One request on a fresh connection; the decoded response."""
        (response,) = await self.calls([request])
        return response

    async def calls(self, requests: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        stream = await trio.open_unix_socket(str(self.socket))
        async with stream:
            for request in requests:
                await stream.send_all(json.dumps(request).encode() + b"\n")
            return [json.loads(line) for line in await read_lines(stream, len(requests))]

    async def streaming(self, *names: str, seconds: float = 10.0) -> None:
        wanted = names or tuple(self.daemon.sessions)

        def check() -> bool:  # shown: the transition is durable, not just decided
            sessions = self.daemon.sessions
            return all(n in sessions and _shown(sessions[n]) == "STREAMING" for n in wanted)

        await wait_until(check, lambda: f"{wanted} STREAMING: {self.states()}", seconds)

    def states(self) -> dict[str, str]:
        return {n: r.model.state.name for n, r in self.daemon.sessions.items()}


def _shown(runner: SessionRunner) -> str | None:
    return runner.shown.dest if runner.shown is not None else None


async def wait_until(
    check: Callable[[], object],
    what: Callable[[], str] | str = "a condition",
    seconds: float = 10.0,
) -> None:
    """Poll ``check`` (a value another task changes, with no event to wait on)."""
    with trio.move_on_after(seconds):
        while True:
            if check():
                return
            await trio.sleep(0.02)
    text = what() if callable(what) else what
    pytest.fail(f"timed out after {seconds} s waiting for {text}", pytrace=False)


async def read_lines(stream: trio.abc.ReceiveStream, count: int) -> list[bytes]:
    buffer = b""
    lines: list[bytes] = []
    with trio.fail_after(20):
        while len(lines) < count:
            data = await stream.receive_some(1 << 20)
            if not data:
                break
            buffer += data
            while b"\n" in buffer:
                line, _, buffer = buffer.partition(b"\n")
                lines.append(line)
    return lines


@asynccontextmanager
async def running_daemon(
    tmp_path: Path,
    sessions: Sequence[str] = ("a", "b"),
    *,
    daemon_keys: Mapping[str, object] | None = None,
    session_keys: Mapping[str, object] | None = None,
    venue_rate: float = 50.0,
) -> AsyncIterator[Running]:
    """The daemon with ``sessions`` (protobuf, against the venue), until the block ends.

    On exit the daemon stops as on SIGTERM (every shutdown transition persisted).
    """
    sockets = short_dir()
    venue = SimulatedVenue(
        VenueConfig(ws_ports=(), pb_ports=(0,), control_port=None, rate=venue_rate,
                    heartbeat_interval=0.5)
    )  # fmt: skip
    database = f"sqlite:///{tmp_path / 'events.db'}"
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(venue.serve)
            config_path = tmp_path / "wirekeep.toml"
            running = Running(
                None,  # type: ignore[arg-type]
                venue,
                config_path,
                sockets / "control.sock",
                database,
                sockets,
            )
            running.rewrite(
                [running.session(n, **(session_keys or {})) for n in sessions], daemon_keys
            )
            config = load_config(config_path)
            d = running.daemon = Daemon(
                config=config,
                secrets={},
                database_url=database,
                adapter_factory=adapter_for,
                environ={},
                notifier=Notifier({}),
            )
            finished = trio.Event()

            async def run(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
                try:
                    await d.run(task_status=task_status)
                finally:
                    finished.set()

            await nursery.start(run)
            try:
                yield running
            finally:
                d.stop()
                with trio.fail_after(20):
                    await finished.wait()
                nursery.cancel_scope.cancel()
    finally:
        for leftover in sockets.iterdir():
            leftover.unlink()
        sockets.rmdir()


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WIREKEEP_CONFIG", "NOTIFY_SOCKET")}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


async def wirekeep(
    *args: str, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    """``wirekeep ARGS`` in a child process (the daemon in this process keeps running)."""
    return await trio.run_process(
        [*WIREKEEP, *args], capture_stdout=True, capture_stderr=True, check=False,
        env=dict(env) if env is not None else cli_env(),
    )  # fmt: skip
