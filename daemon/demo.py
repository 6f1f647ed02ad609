"""``wirekeep demo``: the simulated venue and the daemon on an embedded SQLite file.

Everything a newcomer should see within a minute: sessions of both kinds connect and
stream; scheduled faults on the venue make them go STALE and come back, die silently
and reconnect with backoff, get rejected until the circuit opens and probes, hit the
per-host connect budget (THROTTLED), and one session is paused and resumed by an
"operator". Transitions print as they happen; the database stays for ``replay`` and
``sql`` afterwards.

A folder whose demo (or any daemon on its database) is running is refused before
anything in it changes: the daemon takes the database's writer lock first, and the
configuration file is written only once the daemon holds it.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import structlog
import trio

from daemon import config as cfg
from daemon import logs
from daemon.adapters.net import adapter_for
from daemon.app import Daemon
from daemon.dberrors import DatabaseUnavailable, translate
from daemon.session import CommandKind
from daemon.venue import FaultSchedule, SimulatedVenue, VenueConfig

log = structlog.get_logger("wirekeep.demo")

#: Protobuf venue ports, one per behaviour, so each fault hits one session's path.
PB_STEADY, PB_DROPS, PB_AUTH, PB_SILENT, PB_BUSY = range(5)


@dataclass(frozen=True)
class DemoPaths:
    directory: Path

    @property
    def database(self) -> Path:
        return self.directory / "events.db"

    @property
    def config(self) -> Path:
        return self.directory / "wirekeep.toml"

    @property
    def control_socket(self) -> Path:
        return self.directory / "control.sock"


def demo_config(paths: DemoPaths, venue: SimulatedVenue) -> str:
    """The demo's configuration file: five sessions on the running venue's ports."""
    pb = venue.pb_ports
    auth = (
        'auth = { client_id = "demo", client_secret = "demo-secret", account_id = 1001, '
        'access_token = "demo-token" }'
    )

    def pb_session(name: str, port: int, extra: str = "") -> str:
        return (
            f'[[sessions]]\nname = "{name}"\nkind = "protobuf"\n'
            f'url = "tcp://127.0.0.1:{port}"\n{auth}\nsubscribe = ["EURUSD", "GBPUSD"]\n{extra}\n'
        )

    return (
        "# Written by `wirekeep demo`.\n"
        "[daemon]\n"
        f'database = "sqlite:///{paths.database}"\n'
        f'control_socket = "{paths.control_socket}"\n'
        'log_format = "console"\n\n'
        "[defaults]\n"
        "connect_timeout = 3.0\nauth_timeout = 3.0\nheartbeat_interval = 2.0\n"
        "stale_after = 3.0\ndead_after = 8.0\n"
        "backoff = { initial = 0.5, max = 4.0, multiplier = 2.0, jitter = 0.2, "
        "reset_after = 10.0 }\n"
        "circuit = { failures = 3, cooldown = 15.0 }\n\n"
        '[[sessions]]\nname = "ticks-ws"\nkind = "websocket"\n'
        f'url = "ws://127.0.0.1:{venue.ws_port}/feed"\n'
        """auth_message = '{"op":"auth","key":"demo-key"}'\n"""
        "auth_expect = { ok = true }\n"
        """subscribe = ['{"op":"subscribe","channel":"ticks"}']\n\n"""
        + pb_session("quotes-steady", pb[PB_STEADY])
        + pb_session("quotes-drops", pb[PB_DROPS])
        + pb_session("quotes-auth", pb[PB_AUTH])
        + pb_session("quotes-silent", pb[PB_SILENT])
        + pb_session("busy-1", pb[PB_BUSY], "connect_rate = { per_host = 2, window = 20.0 }")
        + pb_session("busy-2", pb[PB_BUSY], "connect_rate = { per_host = 2, window = 20.0 }")
        + pb_session("busy-3", pb[PB_BUSY], "connect_rate = { per_host = 2, window = 20.0 }")
    )


def fault_schedule(venue: SimulatedVenue) -> FaultSchedule:
    """One minute of trouble, repeated."""
    pb = venue.pb_ports
    return FaultSchedule(
        [
            (5.0, {"fault": "silent", "seconds": 5, "kind": "websocket"}),  # STALE, back
            (8.0, {"fault": "drop", "port": pb[PB_DROPS]}),  # BACKOFF, reconnect
            (10.0, {"fault": "reject_auth", "seconds": 25, "port": pb[PB_AUTH]}),
            (11.0, {"fault": "drop", "port": pb[PB_AUTH]}),  # rejected 3x: CIRCUIT_OPEN
            (14.0, {"fault": "silent", "seconds": 20, "port": pb[PB_SILENT]}),  # dead
            (20.0, {"fault": "garbage", "port": pb[PB_DROPS]}),  # a protocol error
            (25.0, {"fault": "drop", "port": pb[PB_BUSY]}),  # 3 sessions, 2 slots: THROTTLED
            (40.0, {"fault": "oversized", "port": pb[PB_DROPS]}),
        ],
        repeat_every=60.0,
    )


async def operator(daemon: Daemon) -> None:
    """Pause one session for a while, as an operator would."""
    while True:
        await trio.sleep(30)
        runner = daemon.sessions.get("quotes-steady")
        if runner is not None:
            await runner.command(
                CommandKind.PAUSE, "paused by the demo operator: maintenance window",
                uid=os.getuid(), user="demo", operator_reason="maintenance window",
            )  # fmt: skip
            await trio.sleep(10)
            await runner.command(
                CommandKind.RESUME, "resumed by the demo operator", uid=os.getuid(), user="demo"
            )
        await trio.sleep(20)


async def run_demo(directory: Path, duration: float | None, out: TextIO) -> int:
    paths = DemoPaths(Path(await trio.Path(directory).resolve()))
    try:
        await trio.Path(paths.directory).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatabaseUnavailable(
            f"cannot create the demo's directory {paths.directory}: {exc.strerror or exc}"
        ) from None
    venue = SimulatedVenue(
        VenueConfig(pb_ports=(0,) * 5, control_port=0, rate=5.0, heartbeat_interval=1.0)
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(venue.serve)
        text = demo_config(paths, venue)
        config = cfg.parse_config(text.encode(), str(paths.config))
        daemon = Daemon(
            config=config,
            secrets={},
            database_url=config.daemon.database,
            adapter_factory=adapter_for,
        )
        await nursery.start(daemon.handle_signals)
        # Refused here (DatabaseBusy) when this folder's demo runs: before the file is written.
        await nursery.start(_run_daemon, daemon, nursery.cancel_scope)
        await trio.Path(paths.config).write_text(text)
        print(_banner(paths, venue), file=out, flush=True)
        nursery.start_soon(venue.run_schedule, fault_schedule(venue))
        nursery.start_soon(_stop_after, daemon, duration)
        nursery.start_soon(operator, daemon)
    print(_afterwards(paths), file=out, flush=True)
    return 0


async def _run_daemon(
    daemon: Daemon,
    everything: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The daemon until it stops; then the venue and the demo's helpers stop too."""
    await daemon.run(task_status=task_status)
    everything.cancel()


async def _stop_after(daemon: Daemon, duration: float | None) -> None:
    if duration is not None:
        await trio.sleep(duration)
        daemon.stop()


def _banner(paths: DemoPaths, venue: SimulatedVenue) -> str:
    return (
        "wirekeep demo: a simulated venue and the daemon, on an embedded SQLite file.\n"
        f"  venue      websocket {venue.ws_url}, protobuf ports {venue.pb_ports}, "
        f"control 127.0.0.1:{venue.control_port}\n"
        f"  config     {paths.config}\n"
        f"  database   {paths.database}\n"
        f"  status     wirekeep status --config {paths.config}\n"
        "Faults are scheduled every minute; every transition prints below. Ctrl-C stops.\n"
    )


def _afterwards(paths: DemoPaths) -> str:
    url = f"sqlite:///{paths.database}"
    return (
        "\nStopped cleanly. The event log stays; look back at it with:\n"
        f"  wirekeep replay --database {url}\n"
        f"  wirekeep replay --database {url} --at -30s\n"
        f'  wirekeep sql --database {url} "SELECT session, dest, count(*) FROM session_events '
        'GROUP BY 1, 2"\n'
    )


def demo_command(directory: str, duration: float | None) -> int:
    logs.configure("console" if sys.stdout.isatty() else "json")
    url = f"sqlite:///{DemoPaths(Path(directory).resolve()).database}"
    with translate(url):
        return trio.run(run_demo, Path(directory), duration, sys.stdout)
