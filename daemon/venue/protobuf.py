"""The length-prefixed protobuf side of the simulated venue (cTrader-style).

Per connection: read requests with a server-role :class:`VenueDecoder`; answer
ApplicationAuthReq, AccountAuthReq and SubscribeReq (echoing ``client_msg_id``); after a
subscribe, stream QuoteEvents round-robin over the symbols with a per-symbol ``seq``;
send a HeartbeatEvent every ``heartbeat_interval``. A rejected credential gets an
ErrorRes and the connection is closed. Client heartbeats are accepted silently.
"""

from __future__ import annotations

import os
import struct
import time
from typing import Final

import trio

from daemon.venue.faults import FaultName
from daemon.venue.hub import Conn, Hub
from daemon.venue.pacing import quote_prices, send_heartbeats, stream_data
from protocol.errors import RemoteProtocolError
from protocol.framing import encode_frame, encode_frames
from protocol.venue_codec import HEARTBEAT_FRAME, Role, VenueDecoder, VenueMessage, encode
from protocol.venue_codec import encode_error as _encode_error
from protocol.venue_pb2 import (
    ACCOUNT_AUTH_RES,
    APPLICATION_AUTH_RES,
    QUOTE_EVENT,
    SUBSCRIBE_RES,
    AccountAuthReq,
    AccountAuthRes,
    ApplicationAuthReq,
    ApplicationAuthRes,
    Envelope,
    QuoteEvent,
    SubscribeReq,
    SubscribeRes,
)

__all__ = [
    "BAD_ACCESS_TOKEN",
    "BAD_CLIENT",
    "NOT_AUTHENTICATED",
    "OVERSIZED_LENGTH",
    "garbage_frame",
    "serve_protobuf",
]

BAD_CLIENT: Final = ("CH_CLIENT_AUTH_FAILURE", "invalid client credentials")
BAD_ACCESS_TOKEN: Final = ("CH_ACCESS_TOKEN_INVALID", "access token is invalid or expired")
NOT_AUTHENTICATED: Final = ("CH_CLIENT_NOT_AUTHENTICATED", "authenticate before this request")
#: What the oversized fault's frame header declares: 64 MiB.
OVERSIZED_LENGTH: Final = 64 * 1024 * 1024
_OVERSIZED_SENT: Final = 64 * 1024  # body bytes actually sent after that header
_READ_SIZE: Final = 65536


def garbage_frame() -> bytes:
    """A well-framed payload that is not an envelope (0x0F: field 1 of wire type 7)."""
    return encode_frame(b"\x0f" + os.urandom(31))


def oversized_prefix() -> bytes:
    return struct.pack(">I", OVERSIZED_LENGTH) + bytes(_OVERSIZED_SENT)


class ProtobufSession:
    """The request/response and streaming state of one protobuf connection."""

    def __init__(self, hub: Hub, conn: Conn) -> None:
        self.hub = hub
        self.conn = conn
        self.counters = hub.counters["protobuf"]
        self.decoder = VenueDecoder(Role.SERVER)
        self.app_ok = False
        self.account_ok = False
        self.symbols: list[str] = []
        self.seqs: list[int] = []
        self.next_symbol = 0
        self.streaming = False

    async def send(self, data: bytes) -> None:
        await self.conn.stream.send_all(data)

    async def read(self, nursery: trio.Nursery) -> None:
        """Answer requests until the client closes or breaks the protocol."""
        with self.conn.ends_on_link_error():
            while data := await self.conn.stream.receive_some(_READ_SIZE):
                try:
                    self.decoder.feed(data)
                    messages = self.decoder.messages()
                except RemoteProtocolError as exc:
                    await self.protocol_error(exc)
                    return
                for message in messages:
                    await self.handle(message, nursery)
                if self.decoder.error is not None:
                    await self.protocol_error(self.decoder.error)
                    return

    async def protocol_error(self, exc: RemoteProtocolError) -> None:
        await self.send(_encode_error("INVALID_REQUEST", str(exc)))
        self.conn.end(f"client broke the protocol: {exc}")

    async def handle(self, message: VenueMessage, nursery: trio.Nursery) -> None:
        body, msg_id = message.message, message.client_msg_id
        match body:
            case ApplicationAuthReq():
                await self.application_auth(body, msg_id)
            case AccountAuthReq():
                await self.account_auth(body, msg_id)
            case SubscribeReq():
                await self.subscribe(body, msg_id, nursery)
            case _:
                pass  # a client HeartbeatEvent: nothing to answer

    async def reject(self, error: tuple[str, str], msg_id: str) -> None:
        self.counters.auth_rejections += 1
        await self.send(_encode_error(*error, msg_id))
        self.conn.end(f"auth rejected: {error[1]}")

    async def application_auth(self, body: ApplicationAuthReq, msg_id: str) -> None:
        self.counters.auth_attempts += 1
        hub = self.hub
        if (
            hub.rejecting_auth(self.conn)
            or not hub.accepts(None, body.client_id)
            or not hub.accepts(hub.config.client_secret, body.client_secret)
        ):
            await self.reject(BAD_CLIENT, msg_id)
            return
        self.app_ok = True
        await self.send(encode(APPLICATION_AUTH_RES, ApplicationAuthRes(), msg_id))

    async def account_auth(self, body: AccountAuthReq, msg_id: str) -> None:
        self.counters.auth_attempts += 1
        hub = self.hub
        if hub.config.require_auth and not self.app_ok:
            await self.reject(NOT_AUTHENTICATED, msg_id)
        elif hub.rejecting_auth(self.conn) or not hub.accepts(
            hub.config.access_token, body.access_token
        ):
            await self.reject(BAD_ACCESS_TOKEN, msg_id)
        else:
            self.account_ok = True
            reply = AccountAuthRes(account_id=body.account_id)
            await self.send(encode(ACCOUNT_AUTH_RES, reply, msg_id))

    async def subscribe(self, body: SubscribeReq, msg_id: str, nursery: trio.Nursery) -> None:
        if self.hub.config.require_auth and not self.account_ok:
            await self.send(_encode_error(*NOT_AUTHENTICATED, msg_id))
            self.conn.end(f"subscribe refused: {NOT_AUTHENTICATED[1]}")
            return
        symbols = list(body.symbols) or list(self.hub.config.symbols)
        for symbol in symbols:
            if symbol not in self.symbols:
                self.symbols.append(symbol)
                self.seqs.append(0)
        await self.send(encode(SUBSCRIBE_RES, SubscribeRes(symbols=symbols), msg_id))
        if not self.streaming:
            self.streaming = True
            nursery.start_soon(stream_data, self.hub, self.conn, self.emit)

    async def emit(self, n: int) -> None:
        """``n`` QuoteEvents in one write.

        Envelopes are built here rather than with ``encode_batch``: same bytes, a third
        cheaper (no per-message type check), which matters in fast mode.
        """
        now_ns = time.time_ns()
        frames: list[bytes] = []
        for _ in range(n):
            index = self.next_symbol
            self.next_symbol = (index + 1) % len(self.symbols)
            seq = self.seqs[index] = self.seqs[index] + 1
            bid, ask = quote_prices(index, seq)
            quote = QuoteEvent(
                symbol=self.symbols[index], bid=bid, ask=ask, venue_time_ns=now_ns, seq=seq
            )
            envelope = Envelope(payload_type=QUOTE_EVENT, payload=quote.SerializeToString())
            frames.append(envelope.SerializeToString())
        await self.send(encode_frames(frames))
        self.counters.messages_sent += n
        self.conn.messages_sent += n

    async def heartbeat(self) -> None:
        await self.send(HEARTBEAT_FRAME)

    async def inject(self, name: FaultName) -> None:
        if name == "garbage":
            await self.send(garbage_frame())
        elif name == "oversized":
            # Whatever follows would be read as the body of that frame: stop here.
            await self.send(oversized_prefix())
            self.conn.end("sent an oversized frame")


async def serve_protobuf(hub: Hub, raw: trio.abc.Stream, port: int) -> None:
    """Serve one protobuf client on ``raw`` until it leaves or a fault ends it."""
    async with hub.connection("protobuf", port, raw) as conn:
        if hub.refusing(conn):
            hub.refuse(conn)
            return
        hub.establish(conn)
        session = ProtobufSession(hub, conn)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_heartbeats, hub, conn, session.heartbeat)
            nursery.start_soon(conn.injected, session.inject)
            await session.read(nursery)
            nursery.cancel_scope.cancel()
