"""The simulated venue object: listening ports, the public fault API, counters."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from typing import TypeAlias

import structlog
import trio

from daemon.venue.control import serve_control
from daemon.venue.faults import Fault, FaultName, FaultSchedule, VenueKind
from daemon.venue.hub import Hub, KindCounters, VenueConfig
from daemon.venue.protobuf import serve_protobuf
from daemon.venue.websocket import serve_websocket

__all__ = ["SimulatedVenue", "run_venue"]

log = structlog.get_logger("wirekeep.venue")

_Listener: TypeAlias = trio.SocketListener | trio.SSLListener[trio.SocketStream]
_Serve: TypeAlias = Callable[[Hub, trio.abc.Stream, int], Awaitable[None]]
_Handler: TypeAlias = Callable[[trio.abc.Stream], Awaitable[None]]


class SimulatedVenue:
    """Serves both session kinds with faults that can be switched on at run time.

    Either ``await nursery.start(venue.serve)`` (loopback sockets; bound ports then in
    ``ws_ports``/``pb_ports``/``control_port``), or hand it any Trio stream with
    :meth:`handle_protobuf_stream` / :meth:`handle_websocket_stream` (memory streams
    under a MockClock).
    """

    def __init__(self, config: VenueConfig | None = None) -> None:
        self.config = config or VenueConfig()
        self.hub = Hub(self.config)
        self.ws_ports: list[int] = []
        self.pb_ports: list[int] = []
        self.control_port: int | None = None

    @property
    def ws_port(self) -> int:
        """The first bound WebSocket port (after :meth:`serve` has started)."""
        return _first(self.ws_ports, "WebSocket")

    @property
    def pb_port(self) -> int:
        """The first bound protobuf port (after :meth:`serve` has started)."""
        return _first(self.pb_ports, "protobuf")

    @property
    def ws_url(self) -> str:
        scheme = "wss" if self.config.ssl_context else "ws"
        return f"{scheme}://{self.config.host}:{self.ws_port}{self.config.ws_path or '/'}"

    # -- serving -----------------------------------------------------------------------------

    async def handle_protobuf_stream(self, stream: trio.abc.Stream, *, port: int = 0) -> None:
        """Serve one protobuf client on any stream (``port`` is only for fault scopes)."""
        await serve_protobuf(self.hub, stream, port)

    async def handle_websocket_stream(self, stream: trio.abc.Stream, *, port: int = 0) -> None:
        """Serve one WebSocket client on any stream, HTTP upgrade included."""
        await serve_websocket(self.hub, stream, port)

    async def handle_control_stream(self, stream: trio.abc.Stream) -> None:
        """Answer control lines on any stream until the peer closes it."""
        await serve_control(self, stream)

    async def serve(
        self,
        schedule: FaultSchedule | None = None,
        *,
        task_status: trio.TaskStatus[SimulatedVenue] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Bind every configured port on loopback, report ready, serve until cancelled.

        Binding happens before any nursery opens, so a port in use raises a plain
        OSError out of ``await nursery.start(venue.serve)``.
        """
        bound = await self._bind()
        async with trio.open_nursery() as nursery:
            for handler, listeners in bound:
                nursery.start_soon(trio.serve_listeners, handler, listeners)
            if schedule is not None:
                nursery.start_soon(self.run_schedule, schedule)
            log.info(
                "venue_listening",
                ws_ports=self.ws_ports,
                pb_ports=self.pb_ports,
                control_port=self.control_port,
            )
            task_status.started(self)

    async def _bind(self) -> list[tuple[_Handler, list[_Listener]]]:
        config = self.config
        bound: list[tuple[_Handler, list[_Listener]]] = []
        self.ws_ports.clear()
        self.pb_ports.clear()
        try:
            for serve, wanted, ports in (
                *((serve_websocket, port, self.ws_ports) for port in config.ws_ports),
                *((serve_protobuf, port, self.pb_ports) for port in config.pb_ports),
            ):
                listeners, port = await self._listen(wanted, tls=True)
                bound.append((partial(self._guarded, serve, port=port), listeners))
                ports.append(port)
            if config.control_port is not None:
                listeners, self.control_port = await self._listen(config.control_port, tls=False)
                bound.append((self.handle_control_stream, listeners))
        except BaseException:
            self.ws_ports.clear()
            self.pb_ports.clear()
            for _, listeners in bound:
                for listener in listeners:
                    await trio.aclose_forcefully(listener)
            raise
        return bound

    async def _guarded(self, serve: _Serve, stream: trio.abc.Stream, port: int) -> None:
        try:
            await serve(self.hub, stream, port)
        except Exception:  # one broken connection must not stop the venue (logged)
            log.exception("venue_connection_failed", port=port)

    async def _listen(self, port: int, *, tls: bool) -> tuple[list[_Listener], int]:
        sockets = await trio.open_tcp_listeners(port, host=self.config.host)
        bound_port: int = sockets[0].socket.getsockname()[1]
        context = self.config.ssl_context
        if not tls or context is None:
            return list(sockets), bound_port
        wrapped = [trio.SSLListener(s, context, https_compatible=True) for s in sockets]
        return list(wrapped), bound_port

    # -- faults --------------------------------------------------------------------------------

    def fault(
        self,
        name: FaultName,
        *,
        seconds: float | None = None,
        kind: VenueKind | None = None,
        port: int | None = None,
        status: int = 503,
        delay: float = 0.001,
    ) -> int:
        """Apply one fault (see the package docstring).

        Returns how many open connections an instant fault hit, how many faults a
        ``clear`` removed, and 0 for a timed fault.
        """
        return self.apply_fault(Fault(name, seconds, kind, port, status, delay))

    def apply_fault(self, fault: Fault | Mapping[str, object]) -> int:
        """Apply a :class:`Fault` or its dict form (raises FaultError when malformed)."""
        return self.hub.apply(fault if isinstance(fault, Fault) else Fault.from_dict(fault))

    async def run_schedule(self, schedule: FaultSchedule) -> None:
        await schedule.run(self.apply_fault)

    # -- observability ---------------------------------------------------------------------

    def counters(self, kind: VenueKind) -> KindCounters:
        """The live counters of one kind (a view, not a copy)."""
        return self.hub.counters[kind]

    def open_connections(self, kind: VenueKind | None = None) -> int:
        return self.hub.open_connections(kind)

    async def wait_open_connections(self, count: int, kind: VenueKind | None = None) -> None:
        """Block until exactly ``count`` connections (of ``kind``) are open."""
        await self.hub.wait_open_connections(count, kind)

    def status(self) -> dict[str, object]:
        return {
            **self.hub.status(),
            "ports": {
                "websocket": self.ws_ports,
                "protobuf": self.pb_ports,
                "control": self.control_port,
            },
        }


def _first(ports: list[int], what: str) -> int:
    if not ports:
        raise RuntimeError(f"the venue serves no {what} port (is serve() running?)")
    return ports[0]


async def run_venue(
    config: VenueConfig | None = None,
    schedule: FaultSchedule | None = None,
    *,
    task_status: trio.TaskStatus[SimulatedVenue] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve a new venue (and run ``schedule``) until cancelled.

    ``venue = await nursery.start(run_venue, VenueConfig(rate=50))``.
    """
    await SimulatedVenue(config).serve(schedule, task_status=task_status)
