"""What every simulated-venue connection shares: settings, counters, faults, the registry.

:class:`Hub` is the venue's state without any listening sockets: the per-kind handlers
(:mod:`daemon.venue.protobuf`, :mod:`daemon.venue.websocket`) take a hub and a stream.
Each connection writes through a :class:`FaultStream`, which is where ``silent`` and
``slow_drip`` act, below the protocol, so they hold back or slice *everything* (replies,
heartbeats, WebSocket pongs) exactly as a broken network path would.
"""

from __future__ import annotations

import math
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import asdict, dataclass, field

import structlog
import trio
import trio_websocket

from daemon.venue.faults import KINDS, Fault, FaultBoard, FaultName, VenueKind

__all__ = ["LINK_ERRORS", "Conn", "FaultStream", "Hub", "KindCounters", "VenueConfig"]

log = structlog.get_logger("wirekeep.venue")

#: How a link ends from the venue's side of a stream: the peer went away.
LINK_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, trio_websocket.ConnectionClosed)


@dataclass(frozen=True, slots=True)
class VenueConfig:
    """Everything the simulated venue can be told at start.

    Ports: 0 asks for an ephemeral port; an empty tuple serves no port of that kind;
    ``control_port=None`` opens no control port. ``rate`` is data messages per second per
    connection; ``None`` or 0 means as fast as possible, ``batch_size`` messages per write.
    ``count`` stops the data after that many messages per connection (heartbeats go on).
    Credentials left at None accept any non-empty value.
    """

    host: str = "127.0.0.1"
    ws_ports: tuple[int, ...] = (0,)
    pb_ports: tuple[int, ...] = (0,)
    control_port: int | None = 0
    ws_path: str | None = "/feed"  # None: any path
    ssl_context: ssl.SSLContext | None = None
    rate: float | None = 20.0
    count: int | None = None
    batch_size: int = 256
    heartbeat_interval: float | None = 5.0
    symbols: tuple[str, ...] = ("EURUSD",)
    require_auth: bool = False
    ws_key: str | None = None
    client_secret: str | None = None
    access_token: str | None = None
    handshake_timeout: float = 10.0
    close_timeout: float = 1.0

    def __post_init__(self) -> None:
        if self.rate is not None and not (math.isfinite(self.rate) and self.rate >= 0):
            raise ValueError(f"rate must be a non-negative number or None, not {self.rate}")
        if self.count is not None and self.count < 0:
            raise ValueError(f"count must be non-negative or None, not {self.count}")
        if self.heartbeat_interval is not None and not self.heartbeat_interval > 0:
            raise ValueError(
                f"heartbeat_interval must be positive or None, not {self.heartbeat_interval}"
            )
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {self.batch_size}")
        if not self.symbols:
            raise ValueError("symbols must name at least one symbol")

    @property
    def fast(self) -> bool:
        return not self.rate


@dataclass(slots=True)
class KindCounters:
    """Counts for one kind of session, since the venue started.

    ``accepted`` counts every stream handed to the venue, ``refused`` those closed by the
    refuse fault (or a wrong WebSocket path) before any reply, ``open`` the established
    connections not yet closed (``peak_open`` its maximum). Every auth request counts as
    an attempt (a protobuf session makes two). ``messages_sent`` counts data messages
    (quotes, ticks); heartbeats are counted apart.
    """

    accepted: int = 0
    refused: int = 0
    open: int = 0
    peak_open: int = 0
    dropped: int = 0
    auth_attempts: int = 0
    auth_rejections: int = 0
    messages_sent: int = 0
    heartbeats_sent: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class FaultStream(trio.abc.Stream):
    """A stream whose writes obey ``silent`` and ``slow_drip``; one writer at a time."""

    def __init__(self, inner: trio.abc.Stream, board: FaultBoard, kind: VenueKind, port: int):
        self.inner = inner
        self._board = board
        self._kind = kind
        self._port = port
        self._lock = trio.Lock()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        # acquire_nowait first: ``async with lock`` always yields to the scheduler, one
        # extra pass per message that the paced hot path can do without (the inner
        # send_all checkpoints anyway).
        try:
            self._lock.acquire_nowait()
        except trio.WouldBlock:
            await self._lock.acquire()
        try:
            await self._board.wait_while("silent", self._kind, self._port)
            drip = self._board.active("slow_drip", self._kind, self._port)
            if drip is None:
                await self.inner.send_all(data)
            else:
                await self._drip(data, drip.delay)
        finally:
            self._lock.release()

    async def _drip(self, data: bytes | bytearray | memoryview, delay: float) -> None:
        view = memoryview(data)
        for offset in range(len(view)):
            await self.inner.send_all(view[offset : offset + 1])
            await trio.sleep(delay)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


@dataclass(eq=False)
class Conn:
    """One connection as the venue sees it."""

    kind: VenueKind
    port: int
    raw: trio.abc.Stream
    stream: FaultStream
    opened_at: float
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    ending: str = "closed by the client"
    dropped: bool = False
    messages_sent: int = 0
    _injections: tuple[trio.MemorySendChannel[FaultName], trio.MemoryReceiveChannel[FaultName]] = (
        field(default_factory=lambda: trio.open_memory_channel[FaultName](8))
    )

    def end(self, reason: str) -> None:
        """Stop serving this connection; it is closed gracefully."""
        if not self.scope.cancel_called:
            self.ending = reason
        self.scope.cancel()

    def drop(self) -> None:
        """End abruptly: a TCP reset on sockets, no WebSocket close handshake."""
        self.dropped = True
        self.end("dropped by a fault")

    def inject(self, name: FaultName) -> None:
        """Queue a one-shot fault (garbage, oversized) for this connection's writer."""
        # Full: a burst of faults while the last ones are still being sent; skip this one.
        with suppress(trio.WouldBlock):
            self._injections[0].send_nowait(name)

    async def injected(self, handle: Callable[[FaultName], Awaitable[None]]) -> None:
        """Run ``handle`` for each queued one-shot fault, until the connection ends."""
        with self.ends_on_link_error():
            async for name in self._injections[1]:
                await handle(name)

    @contextmanager
    def ends_on_link_error(self) -> Iterator[None]:
        try:
            yield
        except LINK_ERRORS:
            self.end("closed by the client")


def _reset_on_close(stream: trio.abc.Stream) -> None:
    """SO_LINGER 0: closing the socket sends RST instead of FIN."""
    if isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    if isinstance(stream, trio.SocketStream):
        with suppress(OSError):  # already closed
            stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def _lingering_close(stream: trio.abc.Stream, grace: float) -> None:
    """Half-close, then read until the peer closes too (``grace`` seconds at most).

    Closing a socket with unread input sends RST, which can destroy the reply we just
    wrote (an auth rejection) before the client reads it.
    """
    with trio.move_on_after(grace):
        try:
            if isinstance(stream, trio.abc.HalfCloseableStream):
                await stream.send_eof()
            while await stream.receive_some(65536):
                pass
        except LINK_ERRORS:
            pass


class Hub:
    """Settings, counters, faults in force and the open connections of one venue."""

    def __init__(self, config: VenueConfig) -> None:
        self.config = config
        self.board = FaultBoard()
        self.counters: dict[VenueKind, KindCounters] = {kind: KindCounters() for kind in KINDS}
        self._conns: set[Conn] = set()
        self._changed = trio.Event()

    # -- connection lifecycle -----------------------------------------------------------

    @asynccontextmanager
    async def connection(
        self, kind: VenueKind, port: int, raw: trio.abc.Stream
    ) -> AsyncIterator[Conn]:
        """Track one incoming stream; on exit close it (reset if it was dropped)."""
        stream = FaultStream(raw, self.board, kind, port)
        conn = Conn(kind, port, raw, stream, opened_at=trio.current_time())
        self.counters[kind].accepted += 1
        try:
            with conn.scope:
                yield conn
        except trio.Cancelled:
            conn.ending = "venue stopped"
            raise
        finally:
            self._forget(conn)
            try:
                if not conn.dropped:
                    await _lingering_close(raw, self.config.close_timeout)
            finally:
                self._log_end(conn)
                if conn.dropped:
                    _reset_on_close(raw)
                await trio.aclose_forcefully(raw)

    def refuse(self, conn: Conn, why: str = "refused by a fault") -> None:
        self.counters[conn.kind].refused += 1
        conn.ending = why

    def establish(self, conn: Conn) -> None:
        """The connection passed the refuse check / handshake: it counts as open."""
        counters = self.counters[conn.kind]
        counters.open += 1
        counters.peak_open = max(counters.peak_open, counters.open)
        self._conns.add(conn)
        self._notify()

    def _forget(self, conn: Conn) -> None:
        if conn in self._conns:
            self._conns.remove(conn)
            self.counters[conn.kind].open -= 1
            if conn.dropped:
                self.counters[conn.kind].dropped += 1
            self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _log_end(self, conn: Conn) -> None:
        log.info(
            "venue_connection",
            kind=conn.kind,
            port=conn.port,
            seconds=round(trio.current_time() - conn.opened_at, 3),
            messages=conn.messages_sent,
            how=conn.ending,
        )

    # -- queries ---------------------------------------------------------------------------

    def open_connections(self, kind: VenueKind | None = None) -> int:
        if kind is None:
            return len(self._conns)
        return self.counters[kind].open

    async def wait_open_connections(self, count: int, kind: VenueKind | None = None) -> None:
        """Block until exactly ``count`` connections (of ``kind``) are open."""
        while self.open_connections(kind) != count:
            await self._changed.wait()

    def status(self) -> dict[str, object]:
        return {
            "counters": {kind: c.as_dict() for kind, c in self.counters.items()},
            "faults": self.board.snapshot(),
        }

    # -- faults ----------------------------------------------------------------------------

    def apply(self, fault: Fault) -> int:
        """Apply a fault; returns how many connections (instant) or faults (clear) it hit."""
        if fault.name == "clear":
            hit = self.board.clear(fault)
        elif fault.name == "drop":
            hit = self._each_conn(fault, Conn.drop)
        elif fault.name in ("garbage", "oversized"):
            hit = self._each_conn(fault, lambda conn: conn.inject(fault.name))
        else:
            self.board.set(fault, trio.current_time())
            hit = 0
        log.info("venue_fault", **fault.to_dict(), hit=hit)
        return hit

    def _each_conn(self, fault: Fault, action: Callable[[Conn], None]) -> int:
        targets = [conn for conn in self._conns if fault.applies_to(conn.kind, conn.port)]
        for conn in targets:
            action(conn)
        return len(targets)

    def refusing(self, conn: Conn) -> Fault | None:
        return self.board.active("refuse", conn.kind, conn.port)

    def rejecting_auth(self, conn: Conn) -> bool:
        return self.board.active("reject_auth", conn.kind, conn.port) is not None

    async def until_audible(self, conn: Conn) -> bool:
        """Wait out a ``silent`` fault; True if there was one (pacing restarts then)."""
        return await self.board.wait_while("silent", conn.kind, conn.port)

    def accepts(self, expected: str | None, given: str) -> bool:
        """A credential check: any non-empty value, or exactly the configured one."""
        return bool(given) and (expected is None or given == expected)
