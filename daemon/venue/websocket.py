"""The JSON-over-WebSocket side of the simulated venue.

Per connection: the HTTP upgrade (refused with the fault's status while ``refuse`` is in
force, 404 for another path); then the first text message is the auth message
(``{"op":"auth","key":...}``), answered ``{"op":"auth","ok":true}`` or rejected with
``{"op":"auth","ok":false,"error":"invalid api key"}`` and close code 4001. When
``require_auth`` is off a client may skip auth and subscribe at once.
``{"op":"subscribe","channel":X}`` is answered ``{"op":"subscribed","channel":X}`` and
starts the ticks; ``{"type":"heartbeat"}`` goes out every ``heartbeat_interval``.
WebSocket pings are answered by trio-websocket itself.
"""

from __future__ import annotations

import json
import os
import time
from typing import Final

import trio
import trio_websocket

from daemon.venue.faults import FaultName
from daemon.venue.hub import Conn, Hub
from daemon.venue.pacing import quote_prices, send_heartbeats, stream_data

__all__ = [
    "AUTH_CLOSE_CODE",
    "AUTH_OK",
    "HEARTBEAT_TEXT",
    "OVERSIZED_MESSAGE_SIZE",
    "serve_websocket",
]

AUTH_OK: Final = '{"op":"auth","ok":true}'
AUTH_CLOSE_CODE: Final = 4001
HEARTBEAT_TEXT: Final = '{"type":"heartbeat"}'
OVERSIZED_MESSAGE_SIZE: Final = 2 * 1024 * 1024
GARBAGE_TEXT: Final = "\x00garbage}{ not json"


def _auth_refusal(error: str) -> str:
    return json.dumps({"op": "auth", "ok": False, "error": error}, separators=(",", ":"))


def _error(text: str) -> str:
    return json.dumps({"op": "error", "error": text}, separators=(",", ":"))


def _as_object(text: str) -> dict[str, object] | None:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


class _Stream:
    """One (channel, symbol) pair of a subscription, with its sequence number."""

    __slots__ = ("prefix", "seq", "symbol_index")

    def __init__(self, channel: str, symbol: str, symbol_index: int) -> None:
        self.prefix = f'{{"channel":{json.dumps(channel)},"symbol":{json.dumps(symbol)},'
        self.symbol_index = symbol_index
        self.seq = 0

    def next_tick(self, now_ns: int) -> str:
        self.seq += 1
        bid, ask = quote_prices(self.symbol_index, self.seq)
        return f'{self.prefix}"bid":{bid},"ask":{ask},"seq":{self.seq},"ts":{now_ns}}}'


class WebSocketSession:
    """The auth, subscription and streaming state of one WebSocket connection."""

    def __init__(self, hub: Hub, conn: Conn, ws: trio_websocket.WebSocketConnection) -> None:
        self.hub = hub
        self.conn = conn
        self.ws = ws
        self.counters = hub.counters["websocket"]
        self.authed = False
        self.streams: dict[tuple[str, str], _Stream] = {}
        self.order: list[_Stream] = []
        self.cursor = 0
        self.streaming = False

    async def read(self, nursery: trio.Nursery) -> None:
        with self.conn.ends_on_link_error():
            while True:
                message = await self.ws.get_message()
                if isinstance(message, str):
                    await self.on_text(message, nursery)

    async def on_text(self, text: str, nursery: trio.Nursery) -> None:
        obj = _as_object(text)
        op = None if obj is None else obj.get("op")
        needs_auth = self.hub.config.require_auth and not self.authed
        if obj is not None and (op == "auth" or "key" in obj):
            await self.authenticate(obj)
        elif obj is not None and obj.get("type") == "heartbeat":
            pass  # a client heartbeat: accepted silently, even before auth
        elif needs_auth:
            await self.reject_auth("not authenticated")
        elif obj is None:
            await self.ws.send_message(_error("message is not a JSON object"))
        elif op == "subscribe":
            await self.subscribe(obj, nursery)
        elif op == "ping":
            await self.ws.send_message('{"op":"pong"}')
        else:
            await self.ws.send_message(_error(f"unknown op {op!r}"))

    async def authenticate(self, obj: dict[str, object]) -> None:
        self.counters.auth_attempts += 1
        key = obj.get("key")
        hub = self.hub
        if (
            isinstance(key, str)
            and hub.accepts(hub.config.ws_key, key)
            and not hub.rejecting_auth(self.conn)
        ):
            self.authed = True
            await self.ws.send_message(AUTH_OK)
        else:
            await self.reject_auth("invalid api key")

    async def reject_auth(self, error: str) -> None:
        self.counters.auth_rejections += 1
        await self.ws.send_message(_auth_refusal(error))
        with trio.move_on_after(self.hub.config.close_timeout):
            await self.ws.aclose(AUTH_CLOSE_CODE, error)
        self.conn.end(f"auth rejected: {error}")

    async def subscribe(self, obj: dict[str, object], nursery: trio.Nursery) -> None:
        channel = obj.get("channel")
        if not isinstance(channel, str) or not channel:
            await self.ws.send_message(_error("subscribe needs a channel"))
            return
        requested = obj.get("symbols")
        symbols = (
            [s for s in requested if isinstance(s, str)]
            if isinstance(requested, list)
            else list(self.hub.config.symbols)
        )
        for index, symbol in enumerate(symbols):
            if (channel, symbol) not in self.streams:
                stream = _Stream(channel, symbol, index)
                self.streams[channel, symbol] = stream
                self.order.append(stream)
        reply = {"op": "subscribed", "channel": channel}
        await self.ws.send_message(json.dumps(reply, separators=(",", ":")))
        if self.order and not self.streaming:
            self.streaming = True
            nursery.start_soon(stream_data, self.hub, self.conn, self.emit)

    async def emit(self, n: int) -> None:
        """``n`` tick messages back to back (trio-websocket sends one per call)."""
        now_ns = time.time_ns()
        for _ in range(n):
            stream = self.order[self.cursor % len(self.order)]
            self.cursor += 1
            await self.ws.send_message(stream.next_tick(now_ns))
            self.counters.messages_sent += 1
            self.conn.messages_sent += 1

    async def heartbeat(self) -> None:
        await self.ws.send_message(HEARTBEAT_TEXT)

    async def inject(self, name: FaultName) -> None:
        if name == "garbage":
            await self.ws.send_message(os.urandom(32))
            await self.ws.send_message(GARBAGE_TEXT)
        elif name == "oversized":
            await self.ws.send_message("x" * OVERSIZED_MESSAGE_SIZE)


def _refusal(hub: Hub, conn: Conn, request: trio_websocket.WebSocketRequest) -> int:
    """The HTTP status to refuse this handshake with, or 0 to accept it."""
    fault = hub.refusing(conn)
    if fault is not None:
        return fault.status
    wanted = hub.config.ws_path
    if wanted is not None and request.path.partition("?")[0] != wanted:
        return 404
    return 0


async def _handshake_and_serve(hub: Hub, conn: Conn, nursery: trio.Nursery) -> None:
    request: trio_websocket.WebSocketRequest | None = None
    with trio.move_on_after(hub.config.handshake_timeout):
        request = await trio_websocket.wrap_server_stream(nursery, conn.stream)
    if request is None:
        conn.ending = "no WebSocket handshake"
        return
    with conn.ends_on_link_error():
        status = _refusal(hub, conn, request)
        if status:
            hub.refuse(conn, f"handshake refused with HTTP {status}")
            await request.reject(status)
            return
        ws = await request.accept()
        hub.establish(conn)
        session = WebSocketSession(hub, conn, ws)
        nursery.start_soon(send_heartbeats, hub, conn, session.heartbeat)
        nursery.start_soon(conn.injected, session.inject)
        await session.read(nursery)


async def serve_websocket(hub: Hub, raw: trio.abc.Stream, port: int) -> None:
    """Serve one WebSocket client on ``raw`` until it leaves or a fault ends it."""
    async with hub.connection("websocket", port, raw) as conn, trio.open_nursery() as nursery:
        try:
            await _handshake_and_serve(hub, conn, nursery)
        finally:
            nursery.cancel_scope.cancel()
