"""sd_notify (daemon/notify.py): the datagrams, the watchdog, and the real daemon's lifecycle.

The last test is the acceptance test: ``wirekeep daemon`` as a child process with
``NOTIFY_SOCKET`` pointing at a datagram socket this test bound, and ``WATCHDOG_USEC``.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest
import structlog
import trio
import trio.testing
from controlkit import short_dir, wait_until, write_config
from processkit import WIREKEEP, Db, ProcessGroup, child_env, pb_session, start_venue

from daemon.app import state_summary
from daemon.notify import Notifier, watchdog


def drain(sock: socket.socket) -> list[str]:
    out = []
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except BlockingIOError:
            return out


@pytest.fixture
def listener(tmp_path: Path):  # type: ignore[no-untyped-def]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify.sock")
    sock.bind(path)
    sock.setblocking(False)
    yield sock, path
    sock.close()


def test_messages(listener) -> None:  # type: ignore[no-untyped-def]
    sock, path = listener
    n = Notifier({"NOTIFY_SOCKET": path})
    assert n.enabled
    n.ready("2 sessions: 2 STREAMING")
    n.status("2 sessions: 2 STREAMING")  # unchanged: not sent again
    n.status("2 sessions: 1 STREAMING, 1 PAUSED")
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    n.reloading()
    n.stopping()
    got = drain(sock)
    assert got[0] == "READY=1\nSTATUS=2 sessions: 2 STREAMING"
    assert got[1] == "STATUS=2 sessions: 1 STREAMING, 1 PAUSED"
    reloading = dict(line.split("=", 1) for line in got[2].splitlines())
    assert reloading["RELOADING"] == "1"
    assert 0 <= int(reloading["MONOTONIC_USEC"]) - before < 5_000_000
    assert got[3] == "STOPPING=1\nSTATUS=stopping"
    n.close()


def test_abstract_socket_and_no_socket() -> None:
    name = f"wirekeep-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.setblocking(False)
    n = Notifier({"NOTIFY_SOCKET": "@" + name})
    try:
        assert n.send("READY=1")
        assert drain(sock) == ["READY=1"]
    finally:
        n.close()
        sock.close()
    quiet = Notifier({})
    assert not quiet.enabled
    assert not quiet.send("READY=1")
    assert quiet.watchdog_interval is None


def test_a_vanished_socket_is_logged_once(tmp_path: Path) -> None:
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    with structlog.testing.capture_logs() as logs:
        assert not n.send("READY=1")
        assert not n.send("WATCHDOG=1")
    n.close()
    assert [e["event"] for e in logs] == ["sd_notify_failed"]


def test_watchdog_interval() -> None:
    assert Notifier({"WATCHDOG_USEC": "30000000"}).watchdog_interval == 15.0
    mine = {"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier(mine).watchdog_interval == 2.0
    assert Notifier({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"}).watchdog_interval is None
    assert Notifier({"WATCHDOG_USEC": "0"}).watchdog_interval is None
    assert Notifier({"WATCHDOG_USEC": "x"}).watchdog_interval is None


async def test_watchdog_cadence_and_withheld_while_the_writer_is_stuck(
    listener,  # type: ignore[no-untyped-def]
    autojump_clock: trio.testing.MockClock,
) -> None:
    sock, path = listener
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "10000000"})  # ping every 5 s
    stuck = [0.0]
    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(watchdog, n, lambda: stuck[0], stuck_after=30.0))
        await trio.sleep(12)
        assert drain(sock) == ["WATCHDOG=1"] * 3  # at 0, 5 and 10 s
        stuck[0] = 31.0  # a COMMIT has hung for 31 s
        with structlog.testing.capture_logs() as logs:
            await trio.sleep(15)
        assert drain(sock) == []  # 15, 20, 25: withheld, so systemd restarts the daemon
        assert [e["event"] for e in logs] == ["watchdog_withheld"]
        stuck[0] = 0.0
        await trio.sleep(5)
        assert drain(sock) == ["WATCHDOG=1"]  # at 30 s
        nursery.cancel_scope.cancel()
    n.close()
    assert trio.current_time() == 32.0


def test_status_summary() -> None:
    class R:
        def __init__(self, state: str) -> None:
            from types import SimpleNamespace

            from statemachines.session import State

            self.durable = SimpleNamespace(state=State[state])  # what the log holds

    sessions = {"a": R("STREAMING"), "b": R("STREAMING"), "c": R("BACKOFF")}
    assert state_summary(sessions) == "3 sessions: 2 STREAMING, 1 BACKOFF"  # type: ignore[arg-type]
    assert state_summary({}) == "0 sessions"


# --------------------------------------------------------------------------- acceptance


class Datagrams:
    """What the daemon sent to NOTIFY_SOCKET, with the time each arrived."""

    def __init__(self) -> None:
        self.got: list[tuple[float, dict[str, str]]] = []

    async def collect(self, sock: trio.socket.SocketType) -> None:
        while True:
            data = await sock.recv(65536)
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.got.append((time.monotonic(), fields))

    def with_key(self, key: str, after: int = 0) -> list[tuple[float, dict[str, str]]]:
        return [(t, f) for t, f in self.got[after:] if key in f]

    def statuses(self, after: int = 0) -> list[str]:
        return [f["STATUS"] for _, f in self.got[after:] if "STATUS" in f]


async def test_the_real_daemon_talks_to_systemd(tmp_path: Path) -> None:
    """READY after the sessions start, WATCHDOG at half of WATCHDOG_USEC, STATUS following
    the sessions, RELOADING+MONOTONIC_USEC then READY on SIGHUP and on `wirekeep reload`,
    STOPPING on SIGTERM, exit 0, and the shutdown transitions in the database."""
    notify_path = str(tmp_path / "notify.sock")
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await sock.bind(notify_path)
    seen = Datagrams()
    group = ProcessGroup(tmp_path)
    sockets = short_dir()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(seen.collect, sock)
            venue = await start_venue(group, rate=20.0)
            database = f"sqlite:///{tmp_path / 'events.db'}"
            config = tmp_path / "wirekeep.toml"
            control = sockets / "control.sock"
            sessions = [pb_session("a", venue.pb_url), pb_session("b", venue.pb_url)]
            write_config(config, database=database, control_socket=control, sessions=sessions)
            env = child_env({"NOTIFY_SOCKET": notify_path, "WATCHDOG_USEC": "400000"})
            daemon = group.start("daemon", [*WIREKEEP, "daemon", "--config", str(config)], env)

            def where() -> str:
                return f"{seen.got}{daemon.describe()}"

            await wait_until(lambda: seen.with_key("READY"), where, 30)
            (ready_at, ready), *_ = seen.with_key("READY")
            assert ready["STATUS"].startswith("2 sessions")
            started = [e for e in daemon.json_lines() if e.get("event") == "daemon_started"]
            assert started  # logged before READY=1, once every session task runs
            assert started[0]["sessions"] == 2

            await wait_until(lambda: "2 sessions: 2 STREAMING" in seen.statuses(), where)

            # WATCHDOG=1 every 0.2 s (half of 0.4 s), from the Trio loop.
            mark = len(seen.got)
            await trio.sleep(1.5)
            pings = [t for t, _ in seen.with_key("WATCHDOG", mark)]
            gaps = [b - a for a, b in itertools.pairwise(pings)]
            assert len(pings) >= 5, where()
            assert sorted(gaps)[len(gaps) // 2] == pytest.approx(0.2, abs=0.06)
            assert max(gaps) < 0.4

            # STATUS follows the sessions.
            line = json.dumps({"id": "1", "pause": {"sessions": ["a"], "reason": "test"}})
            stream = await trio.open_unix_socket(str(control))
            async with stream:
                await stream.send_all(line.encode() + b"\n")
                assert b'"ok": true' in await stream.receive_some(65536)
            await wait_until(
                lambda: "2 sessions: 1 STREAMING, 1 PAUSED" in seen.statuses(mark), where
            )

            # Reload on SIGHUP: RELOADING=1 with MONOTONIC_USEC, then READY=1.
            sessions.append(pb_session("c", venue.pb_url))
            write_config(config, database=database, control_socket=control, sessions=sessions)
            mark = len(seen.got)
            now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            daemon.send_signal(signal.SIGHUP)
            await wait_until(lambda: seen.with_key("READY", mark), where)
            reloading = seen.with_key("RELOADING", mark)
            assert len(reloading) == 1
            assert 0 <= int(reloading[0][1]["MONOTONIC_USEC"]) - now_usec < 10_000_000
            assert reloading[0][0] <= seen.with_key("READY", mark)[0][0]
            await wait_until(lambda: "3 sessions: 2 STREAMING, 1 PAUSED" in seen.statuses(), where)

            # `wirekeep reload` (ExecReload) waits for the result.
            mark = len(seen.got)
            done = await trio.run_process(
                [*WIREKEEP, "reload", "--socket", str(control)], capture_stdout=True,
                capture_stderr=True, check=False, env=child_env(),
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            assert b"unchanged: 3" in done.stdout
            keys = [next(iter(f)) for _, f in seen.got[mark:] if "WATCHDOG" not in f]
            assert keys[:2] == ["RELOADING", "READY"]

            mark = len(seen.got)
            daemon.send_signal(signal.SIGTERM)
            assert await daemon.wait(20) == 0
            await wait_until(lambda: seen.with_key("STOPPING", mark), where, 5)
            nursery.cancel_scope.cancel()
        assert ready_at < seen.with_key("STOPPING")[0][0]
        db = Db(database)
        last = {name: events[-1] for name, events in db.by_session().items()}
        assert last["a"]["trigger"] == "pause"  # a paused session has no link to shut down
        for name in ("b", "c"):
            assert (last[name]["trigger"], last[name]["dest"]) == ("shutdown", "DISCONNECTED")
        assert db.runs()[-1]["clean"] is True
        db.verify()
    finally:
        group.close()
        sock.close()
        for leftover in sockets.iterdir():
            leftover.unlink()
        sockets.rmdir()
