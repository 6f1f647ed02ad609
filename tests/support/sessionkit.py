"""A harness for session tests: the real adapters and the real simulated venue, connected
by memory streams, under Trio's MockClock. Events go to an in-memory log (the threaded
writer cannot run under an autojump clock: virtual time jumps while a thread works).
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import trio
import trio.testing

from daemon.adapters.net import adapter_for
from daemon.config import SessionConfig, parse_config
from daemon.replay import verify_rows
from daemon.session import SessionClocks, SessionRunner
from daemon.venue import SimulatedVenue, VenueConfig
from statemachines.policy import ConnectRateLimiter
from statemachines.session import SessionMachine, TransitionRecord

T0 = datetime(2026, 11, 21, 14, 0, tzinfo=UTC)
#: Ports of the memory-stream "network": protobuf venues on 1xxx, WebSocket on 2xxx.
PB_PORT, WS_PORT = 1000, 2000


class MemoryLog:
    """An in-memory event sink that checks the chain as it goes."""

    def __init__(self) -> None:
        self.records: list[TransitionRecord] = []

    async def append(self, record: TransitionRecord) -> None:
        await trio.lowlevel.checkpoint()
        self.records.append(record)

    def of(self, session: str) -> list[TransitionRecord]:
        return [r for r in self.records if r.session == session]

    def path(self, session: str) -> list[tuple[str, str]]:
        return [(r.trigger, r.dest) for r in self.of(session)]

    def timeline(self, session: str) -> list[tuple[float, str, str]]:
        """(virtual seconds, trigger, dest) for each event of ``session``."""
        return [((r.at - T0).total_seconds(), r.trigger, r.dest) for r in self.of(session)]

    def verify(self) -> None:
        verify_rows((r.session, r.version, r.trigger, r.source, r.dest) for r in self.records)


def clocks(uniform: float = 0.5) -> SessionClocks:
    """Wall time = T0 + virtual time; jitter off by default (2u - 1 == 0)."""
    return SessionClocks(
        wall=lambda: T0 + timedelta(seconds=trio.current_time()),
        wall_ns=lambda: int((T0.timestamp() + trio.current_time()) * 1e9),
        uniform=lambda: uniform,
    )


def sessions_from(toml: str) -> tuple[SessionConfig, ...]:
    return parse_config(toml.encode(), "test.toml").sessions


@dataclass
class Net:
    """Memory-stream 'network': hosts map to venues; down hosts refuse connections."""

    nursery: trio.Nursery
    venues: dict[str, SimulatedVenue]
    down: set[str] = field(default_factory=set)
    hang: set[str] = field(default_factory=set)  # TCP connect never completes
    opened: list[tuple[str, int]] = field(default_factory=list)

    async def open(self, host: str, port: int) -> trio.abc.Stream:
        self.opened.append((host, port))
        if host in self.hang:
            await trio.sleep_forever()
        if host in self.down or host not in self.venues:
            raise OSError(errno.ECONNREFUSED, f"Connection refused: {host}:{port}")
        venue = self.venues[host]
        client, server = trio.testing.memory_stream_pair()
        handler = venue.handle_protobuf_stream if port < WS_PORT else venue.handle_websocket_stream
        self.nursery.start_soon(_serve, handler, server, port)
        return client


async def _serve(handler, stream, port) -> None:  # type: ignore[no-untyped-def]
    await handler(stream, port=port)


@dataclass
class Kit:
    net: Net
    log: MemoryLog
    machine: SessionMachine = field(default_factory=SessionMachine)
    limiters: dict[str, ConnectRateLimiter] = field(default_factory=dict)
    uniform: float = 0.5

    def runner(self, session: SessionConfig, **kwargs: object) -> SessionRunner:
        def limiter(url: str) -> ConnectRateLimiter:
            host = session.host_key(url)
            if host not in self.limiters:
                self.limiters[host] = ConnectRateLimiter(session.connect_rate)
            return self.limiters[host]

        return SessionRunner(
            session,
            machine=self.machine,
            sink=self.log,
            adapter=adapter_for(session, {}, opener=self.net.open),
            limiters=limiter,
            clocks=clocks(self.uniform),
            **kwargs,  # type: ignore[arg-type]
        )


def venue(**overrides: object) -> SimulatedVenue:
    settings: dict[str, object] = {"rate": 10.0, "heartbeat_interval": 1.0, "control_port": None}
    settings.update(overrides)
    return SimulatedVenue(VenueConfig(**settings))  # type: ignore[arg-type]


def session_toml(name: str = "s", kind: str = "protobuf", **keys: object) -> str:
    url = f"tcp://venue:{PB_PORT}" if kind == "protobuf" else f"ws://venue:{WS_PORT}/feed"
    lines = ["[[sessions]]", f'name = "{name}"', f'kind = "{kind}"', f'url = "{url}"']
    if kind == "protobuf":
        lines.append(
            'auth = { client_id = "c", client_secret = "s3cret", account_id = 1, '
            'access_token = "t0ken" }'
        )
        lines.append('subscribe = ["EURUSD"]')
    for key, value in keys.items():
        lines.append(f"{key} = {_toml(value)}")
    return "\n".join(lines) + "\n"


def _toml(value: object) -> str:
    if isinstance(value, str):
        return value if value.startswith(("{", "[", "'")) else f'"{value}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def transitions_at(kit: Kit, name: str) -> Iterator[tuple[float, str]]:
    for at, _trigger, dest in kit.log.timeline(name):
        yield at, dest
