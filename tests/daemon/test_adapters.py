"""The venue adapters against real servers written in the test with Trio primitives.

Protobuf: a plain Trio TCP server speaking the length-prefixed envelopes through
``VenueDecoder(Role.SERVER)``. WebSocket: ``trio_websocket.serve_websocket`` on port 0, or a
raw TCP server when the test needs bytes no well-behaved server sends. Everything runs on
loopback (or memory streams under the mock clock) with a ``fail_after`` around the I/O.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import struct
import subprocess
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
import trio_websocket

from daemon.adapters import net
from daemon.adapters.base import (
    AdapterError,
    AuthRejected,
    Batch,
    ConnectFailed,
    ConnectionLost,
    StreamOpener,
)
from daemon.adapters.protobuf import SUBSCRIBE_ID, ProtobufAdapter, ProtobufLink
from daemon.adapters.websocket import WebSocketAdapter, WebSocketLink
from daemon.config import FrozenMap, ProtobufAuth, ProtobufCredentials, SessionConfig
from protocol import venue_pb2 as pb
from protocol.framing import encode_frame
from protocol.venue_codec import (
    HEARTBEAT_FRAME,
    Role,
    VenueBody,
    VenueDecoder,
    VenueMessage,
    encode,
    encode_batch,
    encode_error,
)

SECRET = "Zq7-S3CRET-k3y-4a1b"  # recognizable, and must never show up in an error
TOKEN = "Tk9-ACCESS-t0ken-77c"
CREDENTIALS = ProtobufCredentials(
    client_id="app-1", client_secret=SECRET, account_id=42, access_token=TOKEN
)
LIMIT = 1024 * 1024

Handler = Callable[[trio.SocketStream], Awaitable[None]]


# --------------------------------------------------------------------------- helpers


@contextmanager
def io_deadline(seconds: float = 10) -> Iterator[None]:
    with trio.fail_after(seconds):
        yield


@asynccontextmanager
async def tcp_server(handler: Handler) -> AsyncIterator[int]:
    """A loopback TCP server on a free port, running ``handler`` per connection."""
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        yield listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def ws_server(
    handler: Callable[[trio_websocket.WebSocketRequest], Awaitable[None]],
) -> AsyncIterator[int]:
    """A trio-websocket server on a free loopback port."""

    async def guarded(request: trio_websocket.WebSocketRequest) -> None:
        with suppress(trio_websocket.ConnectionClosed, trio.BrokenResourceError):
            await handler(request)

    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            partial(trio_websocket.serve_websocket, guarded, "127.0.0.1", 0, None)
        )
        yield server.port
        nursery.cancel_scope.cancel()


def closed_port() -> int:
    """A loopback port nobody listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def assert_secret_free(exc: BaseException) -> None:
    for text in (str(exc), repr(exc), getattr(exc, "reason", "")):
        assert SECRET not in text
        assert TOKEN not in text


class VenuePeer:
    """The venue's end of one protobuf connection."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.decoder = VenueDecoder(Role.SERVER)
        self.inbox: deque[VenueMessage] = deque()

    async def receive(self) -> VenueMessage | None:
        while not self.inbox:
            data = await self.stream.receive_some(65536)
            if not data:
                return None
            self.decoder.feed(data)
            self.inbox.extend(self.decoder.messages())
        return self.inbox.popleft()

    async def expect(self, payload_type: int) -> VenueMessage:
        message = await self.receive()
        assert message is not None
        assert message.payload_type == payload_type
        return message

    async def send(self, *frames: bytes) -> None:
        await self.stream.send_all(b"".join(frames))

    async def accept_auth(self) -> None:
        await self.expect(pb.APPLICATION_AUTH_REQ)
        await self.send(encode(pb.APPLICATION_AUTH_RES, pb.ApplicationAuthRes()))
        await self.expect(pb.ACCOUNT_AUTH_REQ)
        await self.send(encode(pb.ACCOUNT_AUTH_RES, pb.AccountAuthRes(account_id=42)))


def quote(seq: int) -> tuple[int, VenueBody]:
    return pb.QUOTE_EVENT, pb.QuoteEvent(symbol="EURUSD", bid=1.08, ask=1.09, seq=seq)


def envelope_of(payload_type: int, message: VenueBody) -> bytes:
    return encode(payload_type, message)[4:]


def protobuf_adapter(**kwargs: Any) -> ProtobufAdapter:
    kwargs.setdefault("credentials", CREDENTIALS)
    kwargs.setdefault("symbols", ("EURUSD",))
    return ProtobufAdapter(**kwargs)


def error_of(error_code: str, description: str, client_msg_id: str = "") -> bytes:
    return encode_error(error_code, description, client_msg_id)[4:]


async def collect(link: ProtobufLink | WebSocketLink, count: int) -> list[Batch]:
    """Batches until ``count`` messages (heartbeats included) have arrived."""
    batches: list[Batch] = []
    while sum(map(len, batches)) < count:
        batch = await link.receive_batch()
        assert type(batch) is Batch
        assert len(batch) > 0  # a batch is never empty
        batches.append(batch)
    return batches


def messages_of(batches: list[Batch]) -> list[bytes]:
    return [message for batch in batches for message in batch.messages]


def errors_of(batches: list[Batch]) -> list[str]:
    return [error for batch in batches for error in batch.errors]


def memory_venue() -> tuple[StreamOpener, trio.abc.Stream]:
    """An opener whose connection is a memory stream, and the venue's end of it.

    Nothing is chunked behind our back: one ``send_all`` of the venue is one read of the
    adapter, so what arrives during the handshake is exactly what the test wrote.
    """
    client_end, venue_end = trio.testing.memory_stream_pair()

    async def opener(host: str, port: int) -> trio.abc.Stream:
        assert host == "venue.test"
        return client_end

    return opener, venue_end


# --------------------------------------------------------------------------- protobuf


async def test_protobuf_auth_subscribe_and_many_frames_per_batch() -> None:
    seen: list[VenueMessage] = []

    async def venue(stream: trio.SocketStream) -> None:
        peer = VenuePeer(stream)
        seen.append(await peer.expect(pb.APPLICATION_AUTH_REQ))
        await peer.send(encode(pb.APPLICATION_AUTH_RES, pb.ApplicationAuthRes()))
        seen.append(await peer.expect(pb.ACCOUNT_AUTH_REQ))
        await peer.send(encode(pb.ACCOUNT_AUTH_RES, pb.AccountAuthRes(account_id=42)))
        subscribe = await peer.expect(pb.SUBSCRIBE_REQ)
        seen.append(subscribe)
        # A quote before the SubscribeRes, in the same write: kept for the first batch.
        await peer.send(
            encode(*quote(0)),
            encode(pb.SUBSCRIBE_RES, pb.SubscribeRes(symbols=["EURUSD"]), SUBSCRIBE_ID),
        )
        await peer.send(
            encode_batch([quote(i) for i in range(1, 1000)]),
            HEARTBEAT_FRAME,
            encode_error("SOFT", "venue hiccup"),
        )
        assert (await peer.receive()) is None

    with io_deadline():
        async with tcp_server(venue) as port, trio.open_nursery() as nursery:
            link = await protobuf_adapter().connect(nursery, f"tcp://127.0.0.1:{port}")
            assert link.endpoint == f"tcp://127.0.0.1:{port}"
            await link.authenticate()
            await link.subscribe()
            batches = await collect(link, 1002)
            await link.aclose()

    app, account, subscribe = (m.message for m in seen)
    assert app == pb.ApplicationAuthReq(client_id="app-1", client_secret=SECRET)
    assert account == pb.AccountAuthReq(account_id=42, access_token=TOKEN)
    assert subscribe == pb.SubscribeReq(symbols=["EURUSD"])
    assert seen[2].client_msg_id == SUBSCRIBE_ID
    assert sum(map(len, batches)) == 1002
    assert max(map(len, batches)) > 100  # one read carries many frames
    # The quote that came before the SubscribeRes opens the first batch (kept during the
    # handshake, with whatever the same read brought after the reply); the SubscribeRes
    # itself is not relayed.
    assert batches[0].messages[0] == envelope_of(*quote(0))
    # Data and the error exactly as sent, in order; the heartbeat only counted.
    assert messages_of(batches) == [envelope_of(*quote(i)) for i in range(1000)] + [
        error_of("SOFT", "venue hiccup")
    ]
    assert sum(batch.heartbeats for batch in batches) == 1
    assert errors_of(batches) == ["venue error SOFT: venue hiccup"]
    assert [len(batch.errors) for batch in batches][-1] == 1  # in the batch that carried it
    assert not any(batch.text for batch in batches)


async def test_protobuf_without_credentials_or_symbols_skips_the_handshake() -> None:
    async def venue(stream: trio.SocketStream) -> None:
        await stream.send_all(encode(*quote(1)))
        await trio.sleep_forever()

    with io_deadline():
        async with tcp_server(venue) as port, trio.open_nursery() as nursery:
            adapter = ProtobufAdapter()
            link = await adapter.connect(nursery, f"tcp://127.0.0.1:{port}")
            await link.authenticate()
            await link.subscribe()
            assert await link.receive_batch() == Batch([envelope_of(*quote(1))], False)
            await link.aclose()


async def test_protobuf_subscribe_without_waiting_for_the_reply() -> None:
    async def venue(stream: trio.SocketStream) -> None:
        peer = VenuePeer(stream)
        await peer.expect(pb.SUBSCRIBE_REQ)
        await peer.send(encode(*quote(1)))
        await trio.sleep_forever()

    with io_deadline():
        async with tcp_server(venue) as port, trio.open_nursery() as nursery:
            adapter = protobuf_adapter(credentials=None, wait_subscribed=False)
            link = await adapter.connect(nursery, f"tcp://127.0.0.1:{port}")
            await link.subscribe()
            assert await link.receive_batch() == Batch([envelope_of(*quote(1))], False)
            await link.aclose()


@pytest.mark.parametrize("step", ["application", "account"])
async def test_protobuf_auth_rejected_carries_the_venue_text(step: str) -> None:
    async def venue(stream: trio.SocketStream) -> None:
        peer = VenuePeer(stream)
        await peer.expect(pb.APPLICATION_AUTH_REQ)
        if step == "account":
            await peer.send(
                HEARTBEAT_FRAME, encode(pb.APPLICATION_AUTH_RES, pb.ApplicationAuthRes())
            )
            await peer.expect(pb.ACCOUNT_AUTH_REQ)
        await peer.send(encode_error("CH_CLIENT_AUTH_FAILURE", f"bad secret {SECRET}"))
        await trio.sleep_forever()

    with io_deadline():
        async with tcp_server(venue) as port, trio.open_nursery() as nursery:
            link = await protobuf_adapter().connect(nursery, f"tcp://127.0.0.1:{port}")
            with pytest.raises(AuthRejected) as caught:
                await link.authenticate()
            await link.aclose()
    assert caught.value.reason == (
        "auth rejected: venue error CH_CLIENT_AUTH_FAILURE: bad secret ***"
    )
    assert_secret_free(caught.value)


async def test_protobuf_eof_during_auth_is_a_rejection() -> None:
    async def venue(stream: trio.SocketStream) -> None:
        await VenuePeer(stream).expect(pb.APPLICATION_AUTH_REQ)
        await stream.aclose()

    with io_deadline():
        async with tcp_server(venue) as port, trio.open_nursery() as nursery:
            link = await protobuf_adapter().connect(nursery, f"tcp://127.0.0.1:{port}")
            with pytest.raises(AuthRejected, match=r"^venue closed the connection during auth"):
                await link.authenticate()
            await link.aclose()


async def test_protobuf_subscription_refused() -> None:
    async def venue(stream: trio.SocketStream) -> None:
        peer = VenuePeer(stream)
        await peer.accept_auth()
        await peer.expect(pb.SUBSCRIBE_REQ)
        # An error that is not the answer comes through as data; the answer is fatal.
        await peer.send(
            encode_error("OTHER", "unrelated"),
            encode_error("UNKNOWN_SYMBOL", "no such symbol: EURUSD", SUBSCRIBE_ID),
        )
        await trio.sleep_forever()

    with io_deadline():
        async with tcp_server(venue) as port, trio.open_nursery() as nursery:
            link = await protobuf_adapter().connect(nursery, f"tcp://127.0.0.1:{port}")
            await link.authenticate()
            with pytest.raises(ConnectionLost) as caught:
                await link.subscribe()
            await link.aclose()
    assert caught.value.reason == (
        "SubscribeReq refused: venue error UNKNOWN_SYMBOL: no such symbol: EURUSD"
    )


async def test_protobuf_connection_refused_names_the_address() -> None:
    port = closed_port()
    with io_deadline():
        async with trio.open_nursery() as nursery:
            with pytest.raises(ConnectFailed) as caught:
                await protobuf_adapter().connect(nursery, f"tcp://127.0.0.1:{port}")
    assert caught.value.reason == f"connection refused by 127.0.0.1:{port}"
    assert caught.value.error_class == "ConnectFailed"


GARBAGE = encode_frame(b"\xff\xfe not protobuf")
GARBAGE_REASON = "garbage from venue: frame of 15 bytes is not a valid venue envelope"
BAD_ERROR = encode_frame(
    pb.Envelope(payload_type=pb.ERROR_RES, payload=b"\x0a\xff").SerializeToString()
)


@pytest.mark.parametrize(
    ("good", "first", "bad", "reason"),
    [
        (encode(*quote(1)), Batch([envelope_of(*quote(1))], False), GARBAGE, GARBAGE_REASON),
        # Only heartbeats before the bad frame: they still come first, counted.
        (HEARTBEAT_FRAME * 2, Batch([], False, heartbeats=2), GARBAGE, GARBAGE_REASON),
        (
            encode_error("SOFT", "hiccup") + HEARTBEAT_FRAME,
            Batch([error_of("SOFT", "hiccup")], False, 1, ["venue error SOFT: hiccup"]),
            GARBAGE,
            GARBAGE_REASON,
        ),
        # A payload type only a client sends is as fatal as bytes that do not parse.
        (
            encode(*quote(1)),
            Batch([envelope_of(*quote(1))], False),
            encode(pb.APPLICATION_AUTH_REQ, pb.ApplicationAuthReq(client_id="x")),
            "garbage from venue: venue sent APPLICATION_AUTH_REQ, which only a client sends",
        ),
        # An error whose ErrorRes does not parse: its text cannot be read.
        (
            HEARTBEAT_FRAME,
            Batch([], False, heartbeats=1),
            BAD_ERROR,
            "garbage from venue: ERROR_RES payload of 2 bytes does not parse",
        ),
    ],
)
async def test_protobuf_garbage_after_good_frames(
    good: bytes, first: Batch, bad: bytes, reason: str
) -> None:
    opener, venue_end = memory_venue()

    async def venue() -> None:
        peer = VenuePeer(venue_end)
        await peer.accept_auth()
        await peer.send(good, bad, encode(*quote(2)))  # one read: good, bad, good
        await trio.sleep_forever()

    with io_deadline():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(venue)
            adapter = protobuf_adapter(symbols=(), opener=opener)
            link = await adapter.connect(nursery, "tcp://venue.test:1")
            await link.authenticate()
            assert await link.receive_batch() == first  # the good frames first
            with pytest.raises(ConnectionLost) as caught:
                await link.receive_batch()
            with pytest.raises(ConnectionLost) as again:  # and the link stays broken
                await link.receive_batch()
            await link.aclose()
            nursery.cancel_scope.cancel()
    assert caught.value.reason == reason
    assert again.value.reason == reason


async def test_protobuf_messages_during_the_handshake_make_the_first_batch() -> None:
    opener, venue_end = memory_venue()

    async def venue() -> None:
        peer = VenuePeer(venue_end)
        await peer.expect(pb.APPLICATION_AUTH_REQ)
        # Heartbeats and data around the reply, in one write: before it, and after it.
        await peer.send(
            HEARTBEAT_FRAME,
            encode(*quote(0)),
            HEARTBEAT_FRAME,
            encode(pb.APPLICATION_AUTH_RES, pb.ApplicationAuthRes()),
            encode(*quote(1)),
        )
        await peer.expect(pb.ACCOUNT_AUTH_REQ)
        await peer.send(
            HEARTBEAT_FRAME, encode(pb.ACCOUNT_AUTH_RES, pb.AccountAuthRes(account_id=42))
        )
        await peer.expect(pb.SUBSCRIBE_REQ)
        # An error that does not answer the SubscribeReq is kept like data.
        await peer.send(
            encode(*quote(2)),
            encode_error("NOTICE", "maintenance at 22:00", "other-request"),
            HEARTBEAT_FRAME,
            encode(pb.SUBSCRIBE_RES, pb.SubscribeRes(symbols=["EURUSD"]), SUBSCRIBE_ID),
            encode(*quote(3)),
        )
        # Nothing more until the client speaks: the first batch can only be the kept one.
        await peer.expect(pb.HEARTBEAT_EVENT)
        await peer.send(encode(*quote(4)))
        await trio.sleep_forever()

    with io_deadline():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(venue)
            link = await protobuf_adapter(opener=opener).connect(nursery, "tcp://venue.test:1")
            await link.authenticate()
            await link.subscribe()
            first = await link.receive_batch()
            await link.heartbeat()
            second = await link.receive_batch()
            await link.aclose()
            nursery.cancel_scope.cancel()

    assert first == Batch(
        [
            envelope_of(*quote(0)),
            envelope_of(*quote(1)),
            envelope_of(*quote(2)),
            error_of("NOTICE", "maintenance at 22:00", "other-request"),
            envelope_of(*quote(3)),
        ],
        False,
        heartbeats=4,
        errors=["venue error NOTICE: maintenance at 22:00"],
    )
    assert len(first) == 9
    assert second == Batch([envelope_of(*quote(4))], False)


async def test_protobuf_frame_over_the_limit() -> None:
    async def venue(stream: trio.SocketStream) -> None:
        await stream.send_all(struct.pack(">I", 64 * 1024 * 1024) + b"\x08")
        await trio.sleep_forever()

    with io_deadline():
        async with tcp_server(venue) as port, trio.open_nursery() as nursery:
            link = await ProtobufAdapter(max_frame=LIMIT).connect(
                nursery, f"tcp://127.0.0.1:{port}"
            )
            with pytest.raises(ConnectionLost) as caught:
                await link.receive_batch()
            await link.aclose()
    assert caught.value.reason == "frame of 67108864 bytes exceeds the 1048576-byte limit"


async def test_protobuf_heartbeat_round_trip() -> None:
    async def venue(stream: trio.SocketStream) -> None:
        peer = VenuePeer(stream)
        while (message := await peer.receive()) is not None:
            assert message.payload_type == pb.HEARTBEAT_EVENT
            await peer.send(HEARTBEAT_FRAME)

    with io_deadline():
        async with tcp_server(venue) as port, trio.open_nursery() as nursery:
            link = await ProtobufAdapter().connect(nursery, f"tcp://127.0.0.1:{port}")
            for _ in range(3):
                await link.heartbeat()
                assert await link.receive_batch() == Batch([], False, heartbeats=1)
            await link.aclose()


@pytest.mark.parametrize(
    ("tail", "reason"),
    [
        (b"", "venue closed the connection"),
        (
            b"\x00\x00\x00\x09abc",
            "venue closed the connection: stream ended in the middle of a frame (3 of 9 bytes)",
        ),
    ],
)
async def test_protobuf_venue_closes_while_streaming(tail: bytes, reason: str) -> None:
    async def venue(stream: trio.SocketStream) -> None:
        await stream.send_all(encode(*quote(1)) + tail)
        await stream.aclose()

    with io_deadline():
        async with tcp_server(venue) as port, trio.open_nursery() as nursery:
            link = await ProtobufAdapter().connect(nursery, f"tcp://127.0.0.1:{port}")
            assert await link.receive_batch() == Batch([envelope_of(*quote(1))], False)
            with pytest.raises(ConnectionLost) as caught:
                await link.receive_batch()
            await link.aclose()
    assert caught.value.reason == reason


async def test_protobuf_reset_by_peer() -> None:
    async def venue(stream: trio.SocketStream) -> None:
        await stream.receive_some(10)  # the heartbeat
        # SO_LINGER with a zero timeout: close() sends RST instead of FIN.
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        stream.socket.close()

    with io_deadline():
        async with tcp_server(venue) as port, trio.open_nursery() as nursery:
            link = await ProtobufAdapter().connect(nursery, f"tcp://127.0.0.1:{port}")
            await link.heartbeat()
            with pytest.raises(ConnectionLost) as caught:
                await link.receive_batch()
            await link.aclose()
    assert caught.value.reason == "connection reset by peer"


async def test_protobuf_heartbeat_after_close_is_connection_lost() -> None:
    async def venue(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    with io_deadline():
        async with tcp_server(venue) as port, trio.open_nursery() as nursery:
            link = await ProtobufAdapter().connect(nursery, f"tcp://127.0.0.1:{port}")
            await link.aclose()
            with pytest.raises(ConnectionLost, match="connection closed locally"):
                await link.heartbeat()
            with pytest.raises(ConnectionLost, match="connection closed locally"):
                await link.receive_batch()


# --------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (made by the openssl command)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


def server_context(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certificate)
    return context


def client_context(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(certificate[0]))


async def test_protobuf_over_tls(certificate: tuple[Path, Path]) -> None:
    async def venue(stream: trio.SSLStream[trio.SocketStream]) -> None:
        peer = VenuePeer(stream)
        await peer.accept_auth()
        await peer.send(encode_batch([quote(i) for i in range(10)]))
        await trio.sleep_forever()

    with io_deadline():
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                partial(
                    trio.serve_ssl_over_tcp, venue, 0, server_context(certificate), host="127.0.0.1"
                )
            )
            port = listeners[0].transport_listener.socket.getsockname()[1]
            adapter = protobuf_adapter(symbols=(), ssl_context=client_context(certificate))
            link = await adapter.connect(nursery, f"tls://127.0.0.1:{port}")
            await link.authenticate()
            batches = await collect(link, 10)
            assert messages_of(batches) == [envelope_of(*quote(i)) for i in range(10)]
            assert sum(map(len, batches)) == 10
            await link.aclose()
            nursery.cancel_scope.cancel()


async def test_tls_to_an_untrusted_certificate_fails_to_connect(
    certificate: tuple[Path, Path],
) -> None:
    async def venue(stream: trio.SSLStream[trio.SocketStream]) -> None:
        with suppress(trio.BrokenResourceError):  # the client hangs up on our certificate
            await stream.do_handshake()

    with io_deadline():
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                partial(
                    trio.serve_ssl_over_tcp, venue, 0, server_context(certificate), host="127.0.0.1"
                )
            )
            port = listeners[0].transport_listener.socket.getsockname()[1]
            with pytest.raises(ConnectFailed) as caught:
                await ProtobufAdapter().connect(nursery, f"tls://127.0.0.1:{port}")
            nursery.cancel_scope.cancel()
    assert caught.value.reason.startswith(
        f"TLS handshake with 127.0.0.1:{port} failed: certificate verify failed"
    )


async def test_tls_to_a_plain_server_fails_to_connect() -> None:
    async def venue(stream: trio.SocketStream) -> None:
        await stream.send_all(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        await stream.aclose()

    with io_deadline():
        async with tcp_server(venue) as port, trio.open_nursery() as nursery:
            with pytest.raises(ConnectFailed) as caught:
                await ProtobufAdapter().connect(nursery, f"tls://127.0.0.1:{port}")
    assert caught.value.reason.startswith(f"TLS handshake with 127.0.0.1:{port} failed: ")


# --------------------------------------------------------------------------- websocket


def ws_adapter(**kwargs: Any) -> WebSocketAdapter:
    kwargs.setdefault("auth_message", f'{{"op":"auth","key":"{SECRET}"}}')
    kwargs.setdefault("auth_expect", {"ok": True})
    kwargs.setdefault("subscribe", ('{"op":"subscribe","channel":"ticks"}',))
    return WebSocketAdapter(**kwargs)


async def test_websocket_auth_subscribe_and_batches() -> None:
    received: list[str | bytes] = []
    sent_all = trio.Event()

    async def venue(request: trio_websocket.WebSocketRequest) -> None:
        assert request.path == "/feed?x=1"
        ws = await request.accept()
        received.append(await ws.get_message())
        await ws.send_message('{"op":"pong"}')  # heartbeats before the reply are skipped
        await ws.send_message('{"ok":true}')
        received.append(await ws.get_message())
        for i in range(40):
            await ws.send_message(f'{{"channel":"ticks","seq":{i}}}')
        await ws.send_message(b"\x00\x01binary")
        await ws.send_message('{"error":"rate limited","code":429}')
        sent_all.set()
        await trio.sleep_forever()

    with io_deadline():
        async with ws_server(venue) as port, trio.open_nursery() as nursery:
            link = await ws_adapter().connect(nursery, f"ws://127.0.0.1:{port}/feed?x=1")
            await link.authenticate()
            await link.subscribe()
            await sent_all.wait()
            await trio.testing.wait_all_tasks_blocked(cushion=0.05)
            batches = await collect(link, 43)
            await link.aclose()
            nursery.cancel_scope.cancel()

    assert received == [f'{{"op":"auth","key":"{SECRET}"}}', '{"op":"subscribe","channel":"ticks"}']
    error = '{"error":"rate limited","code":429}'
    # The heartbeat that came before the auth reply is counted in the first batch.
    assert batches[0] == Batch([], True, heartbeats=1)
    # The binary message is a batch of its own: it ended the text batch before it, and
    # the text error after it opened the next one.
    assert batches[-2:] == [
        Batch([b"\x00\x01binary"], False),
        Batch([error.encode()], True, errors=[error]),
    ]
    assert all(batch.text and not batch.errors for batch in batches[1:-2])
    assert messages_of(batches) == [
        *(f'{{"channel":"ticks","seq":{i}}}'.encode() for i in range(40)),
        b"\x00\x01binary",
        error.encode(),
    ]
    assert sum(batch.heartbeats for batch in batches) == 1
    assert sum(map(len, batches)) == 43
    assert max(map(len, batches)) > 10  # what was queued came in one batch


@asynccontextmanager
async def memory_ws_venue(
    serve: Callable[[trio_websocket.WebSocketConnection], Awaitable[None]],
) -> AsyncIterator[StreamOpener]:
    """A trio-websocket venue on a memory stream; yields the opener that reaches it."""
    opener, venue_end = memory_venue()

    async def venue() -> None:
        with suppress(trio_websocket.ConnectionClosed):
            async with trio.open_nursery() as reader:
                request = await trio_websocket.wrap_server_stream(reader, venue_end)
                await serve(await request.accept())
                await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(venue)
        yield opener
        nursery.cancel_scope.cancel()


async def test_websocket_text_and_binary_messages_never_share_a_batch() -> None:
    long_error = '{"error":"' + "é" * 300 + '"}'
    sent = trio.Event()

    async def serve(ws: trio_websocket.WebSocketConnection) -> None:
        messages: list[str | bytes] = [
            '{"seq":1}',
            '{"symbol":"€","seq":2}',
            b"\x00bin",
            b'{"op":"ping"}',  # binary messages are never classified: data
            '{"op":"ping"}',
            long_error,
            '{"seq":5}',
            b"\xff",
            "pong",
            b"\x01",
        ]
        for message in messages:
            await ws.send_message(message)
        sent.set()

    with io_deadline():
        async with memory_ws_venue(serve) as opener, trio.open_nursery() as nursery:
            link = await WebSocketAdapter(opener=opener).connect(nursery, "ws://venue.test/")
            await sent.wait()
            await trio.testing.wait_all_tasks_blocked()  # everything sent is queued
            batches = await collect(link, 10)
            await link.aclose()
            nursery.cancel_scope.cancel()

    assert batches == [
        Batch([b'{"seq":1}', '{"symbol":"€","seq":2}'.encode()], True),
        Batch([b"\x00bin", b'{"op":"ping"}'], False),
        # Text as UTF-8; the error's text truncated to 200 characters, its message whole.
        Batch(
            [long_error.encode("utf-8"), b'{"seq":5}'],
            True,
            heartbeats=1,
            errors=[long_error[:200]],
        ),
        Batch([b"\xff"], False),
        Batch([], True, heartbeats=1),  # a text batch of heartbeats only
        Batch([b"\x01"], False),
    ]
    assert len(batches[2].errors[0]) == 200
    assert [len(batch) for batch in batches] == [2, 2, 3, 1, 1, 1]


async def test_websocket_heartbeats_before_the_auth_reply_make_the_first_batch() -> None:
    received: list[str | bytes] = []

    async def serve(ws: trio_websocket.WebSocketConnection) -> None:
        received.append(await ws.get_message())
        await ws.send_message('{"op":"ping"}')
        await ws.send_message("pong")
        await ws.send_message('{"ok":true}')
        received.append(await ws.get_message())
        await ws.send_message('{"channel":"ticks","seq":0}')

    with io_deadline():
        async with memory_ws_venue(serve) as opener, trio.open_nursery() as nursery:
            link = await ws_adapter(opener=opener).connect(nursery, "ws://venue.test/feed")
            await link.authenticate()
            await link.subscribe()
            first = await link.receive_batch()
            second = await link.receive_batch()
            await link.aclose()
            nursery.cancel_scope.cancel()

    assert received == [f'{{"op":"auth","key":"{SECRET}"}}', '{"op":"subscribe","channel":"ticks"}']
    assert first == Batch([], True, heartbeats=2)
    assert len(first) == 2
    assert second == Batch([b'{"channel":"ticks","seq":0}'], True)


async def test_websocket_without_auth_returns_at_once() -> None:
    async def venue(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        await ws.send_message("hello")
        await trio.sleep_forever()

    with io_deadline():
        async with ws_server(venue) as port, trio.open_nursery() as nursery:
            link = await WebSocketAdapter().connect(nursery, f"ws://127.0.0.1:{port}")
            await link.authenticate()
            await link.subscribe()
            assert await link.receive_batch() == Batch([b"hello"], True)
            await link.aclose()
            nursery.cancel_scope.cancel()


async def test_websocket_auth_rejected_by_reply() -> None:
    async def venue(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        await ws.get_message()
        await ws.send_message(f'{{"ok":false,"error":"invalid api key {SECRET}"}}')
        await trio.sleep_forever()

    with io_deadline():
        async with ws_server(venue) as port, trio.open_nursery() as nursery:
            link = await ws_adapter(redactor=net.Redactor([SECRET])).connect(
                nursery, f"ws://127.0.0.1:{port}"
            )
            with pytest.raises(AuthRejected) as caught:
                await link.authenticate()
            await link.aclose()
            nursery.cancel_scope.cancel()
    assert caught.value.reason == "auth rejected: invalid api key ***"
    assert_secret_free(caught.value)


async def test_websocket_auth_answered_by_a_close() -> None:
    async def venue(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        await ws.get_message()
        await ws.aclose(code=4001, reason="invalid api key")

    with io_deadline():
        async with ws_server(venue) as port, trio.open_nursery() as nursery:
            link = await ws_adapter().connect(nursery, f"ws://127.0.0.1:{port}")
            with pytest.raises(AuthRejected) as caught:
                await link.authenticate()
            await link.aclose()
            nursery.cancel_scope.cancel()
    assert caught.value.reason == "venue closed the connection (code 4001: invalid api key)"


@pytest.mark.parametrize(
    ("status", "headers", "body", "reason"),
    [
        (503, [], None, "handshake rejected: HTTP 503 Service Unavailable"),
        (
            429,
            [(b"Retry-After", b"30")],
            b"slow down",
            "handshake rejected: HTTP 429 Too Many Requests (Retry-After: 30)",
        ),
    ],
)
async def test_websocket_handshake_rejected(
    status: int, headers: list[tuple[bytes, bytes]], body: bytes | None, reason: str
) -> None:
    async def venue(request: trio_websocket.WebSocketRequest) -> None:
        await request.reject(status, extra_headers=list(headers), body=body)

    with io_deadline():
        async with ws_server(venue) as port, trio.open_nursery() as nursery:
            with pytest.raises(ConnectFailed) as caught:
                await ws_adapter().connect(nursery, f"ws://127.0.0.1:{port}/feed")
            # The caller's nursery is untouched: the rejection did not escape into it.
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    assert caught.value.reason == reason


async def test_websocket_connection_refused() -> None:
    port = closed_port()
    with io_deadline():
        async with trio.open_nursery() as nursery:
            with pytest.raises(ConnectFailed) as caught:
                await ws_adapter().connect(nursery, f"ws://127.0.0.1:{port}/")
    assert caught.value.reason == f"connection refused by 127.0.0.1:{port}"


@pytest.mark.parametrize(
    ("answer", "problem"),
    [
        (b"SSH-2.0-OpenSSH_9.2\r\n\x00\x01\x02\r\n\r\n", "Bad HTTP message"),
        (
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: nope\r\n\r\n",
            "Bad accept token",
        ),
    ],
)
async def test_websocket_handshake_answered_with_garbage(answer: bytes, problem: str) -> None:
    async def venue(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        await stream.send_all(answer)
        await trio.sleep_forever()

    with io_deadline():
        async with tcp_server(venue) as port, trio.open_nursery() as nursery:
            with pytest.raises(ConnectFailed) as caught:
                await ws_adapter().connect(nursery, f"ws://127.0.0.1:{port}/")
    assert caught.value.reason == (
        f"handshake failed: the answer is not a WebSocket upgrade ({problem})"
    )


async def test_websocket_handshake_dropped_does_not_hang() -> None:
    async def venue(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        await stream.aclose()

    with io_deadline():
        async with tcp_server(venue) as port, trio.open_nursery() as nursery:
            with pytest.raises(ConnectFailed) as caught:
                await ws_adapter().connect(nursery, f"ws://127.0.0.1:{port}/")
    assert caught.value.reason == (
        f"127.0.0.1:{port} closed the connection during the WebSocket handshake"
    )


async def test_websocket_connect_cancelled_by_the_caller_leaves_no_task() -> None:
    async def venue(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()  # never answers the upgrade

    with io_deadline():
        async with tcp_server(venue) as port:
            async with trio.open_nursery() as nursery:
                with trio.move_on_after(0.2) as timeout:
                    await ws_adapter().connect(nursery, f"ws://127.0.0.1:{port}/")
            # The nursery closed by itself: the reader task ended with the stream.
            assert timeout.cancelled_caught


@asynccontextmanager
async def raw_ws_venue(
    after_accept: Callable[
        [trio.SocketStream, trio_websocket.WebSocketConnection], Awaitable[None]
    ],
) -> AsyncIterator[int]:
    """A venue that completes the upgrade, then may write raw bytes to the socket."""

    async def handler(stream: trio.SocketStream) -> None:
        async with trio.open_nursery() as nursery:
            request = await trio_websocket.wrap_server_stream(nursery, stream)
            ws = await request.accept()
            await after_accept(stream, ws)
            nursery.cancel_scope.cancel()

    async with tcp_server(handler) as port:
        yield port


async def test_websocket_garbage_frames() -> None:
    async def after_accept(stream: trio.SocketStream, ws: Any) -> None:
        await ws.send_message("fine")
        await stream.send_all(b"\x8f\x00")  # a frame with an undefined opcode
        await trio.sleep_forever()

    with io_deadline():
        async with raw_ws_venue(after_accept) as port, trio.open_nursery() as nursery:
            link = await WebSocketAdapter().connect(nursery, f"ws://127.0.0.1:{port}/")
            assert await link.receive_batch() == Batch([b"fine"], True)
            with pytest.raises(ConnectionLost) as caught:
                await link.receive_batch()
            await link.aclose()
    assert caught.value.reason == "garbage from venue: Invalid opcode 0xf"


async def test_websocket_message_over_the_limit() -> None:
    async def venue(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        await ws.send_message("x" * 5000)
        await trio.sleep_forever()

    with io_deadline():
        async with ws_server(venue) as port, trio.open_nursery() as nursery:
            link = await WebSocketAdapter(max_frame=4096).connect(
                nursery, f"ws://127.0.0.1:{port}/"
            )
            with pytest.raises(ConnectionLost) as caught:
                await link.receive_batch()
            await link.aclose()
            nursery.cancel_scope.cancel()
    assert caught.value.reason == "venue sent a message larger than the 4096-byte limit"


@pytest.mark.parametrize(
    ("code", "text", "reason"),
    [
        (1000, None, "venue closed the connection (code 1000)"),
        (1001, "going away", "venue closed the connection (code 1001: going away)"),
    ],
)
async def test_websocket_venue_closes_while_streaming(
    code: int, text: str | None, reason: str
) -> None:
    async def venue(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        await ws.send_message("last")
        await ws.aclose(code=code, reason=text)

    with io_deadline():
        async with ws_server(venue) as port, trio.open_nursery() as nursery:
            link = await WebSocketAdapter().connect(nursery, f"ws://127.0.0.1:{port}/")
            assert await link.receive_batch() == Batch([b"last"], True)
            with pytest.raises(ConnectionLost) as caught:
                await link.receive_batch()
            await link.aclose()
            nursery.cancel_scope.cancel()
    assert caught.value.reason == reason


async def test_websocket_stream_ends_without_a_close_frame() -> None:
    async def after_accept(stream: trio.SocketStream, ws: Any) -> None:
        await ws.send_message("last")
        await stream.aclose()

    with io_deadline():
        async with raw_ws_venue(after_accept) as port, trio.open_nursery() as nursery:
            link = await WebSocketAdapter().connect(nursery, f"ws://127.0.0.1:{port}/")
            assert await link.receive_batch() == Batch([b"last"], True)
            with pytest.raises(ConnectionLost) as caught:
                await link.receive_batch()
            await link.aclose()
    assert caught.value.reason == "venue closed the connection (no close frame)"


async def test_websocket_reset_by_peer() -> None:
    async def after_accept(stream: trio.SocketStream, ws: Any) -> None:
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        stream.socket.close()

    with io_deadline():
        async with raw_ws_venue(after_accept) as port, trio.open_nursery() as nursery:
            link = await WebSocketAdapter().connect(nursery, f"ws://127.0.0.1:{port}/")
            with pytest.raises(ConnectionLost) as caught:
                await link.receive_batch()
            await link.aclose()
    assert caught.value.reason == "connection reset by peer"


async def test_websocket_heartbeat_round_trip() -> None:
    async def venue(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        await ws.get_message()  # trio-websocket answers pings while it reads

    with io_deadline():
        async with ws_server(venue) as port, trio.open_nursery() as nursery:
            link = await WebSocketAdapter().connect(nursery, f"ws://127.0.0.1:{port}/")
            for _ in range(3):
                await link.heartbeat()
            await link.aclose()
            nursery.cancel_scope.cancel()


async def test_websocket_pong_timeout_at_the_exact_virtual_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client_end, venue_end = trio.testing.memory_stream_pair()

    async def opener(host: str, port: int) -> trio.abc.Stream:
        assert (host, port) == ("venue.test", 80)
        return client_end

    async def deaf_venue(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # Completes the upgrade, then stops reading: pings are never answered.
        with trio.CancelScope() as reading:
            async with trio.open_nursery() as nursery:
                request = await trio_websocket.wrap_server_stream(nursery, venue_end)
                await request.accept()
                reading.cancel()
        task_status.started()
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(deaf_venue)
        adapter = WebSocketAdapter(heartbeat_interval=10.0, opener=opener)
        link = await adapter.connect(nursery, "ws://venue.test/feed")
        start = trio.current_time()
        with pytest.raises(ConnectionLost) as caught:
            await link.heartbeat()
        assert trio.current_time() - start == 10.0
        await link.aclose()
        assert trio.current_time() - start == 10.0  # a failed link is not closed politely
        nursery.cancel_scope.cancel()
    assert caught.value.reason == "no pong within 10.0 s"


async def test_websocket_over_tls(certificate: tuple[Path, Path]) -> None:
    async def venue(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        await ws.send_message("secure")
        await ws.get_message()

    with io_deadline():
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                partial(
                    trio_websocket.serve_websocket,
                    venue,
                    "127.0.0.1",
                    0,
                    server_context(certificate),
                )
            )
            adapter = WebSocketAdapter(ssl_context=client_context(certificate))
            link = await adapter.connect(nursery, f"wss://127.0.0.1:{server.port}/")
            assert await link.receive_batch() == Batch([b"secure"], True)
            await link.heartbeat()
            await link.aclose()
            nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------- secrets


def ws_session(url: str) -> SessionConfig:
    return SessionConfig(
        name="venue-a",
        kind="websocket",
        url=url,
        auth_message='{"op":"auth","key":"${env:VENUE_KEY}"}',
        auth_expect=FrozenMap({"ok": True}),
        subscribe=('{"op":"subscribe"}',),
    )


def pb_session(url: str) -> SessionConfig:
    return SessionConfig(
        name="venue-b",
        kind="protobuf",
        url=url,
        auth=ProtobufAuth(
            client_id="app-1",
            client_secret="${env:CLIENT_SECRET}",
            account_id=42,
            access_token=TOKEN,  # written literally: still redacted
        ),
        subscribe=("EURUSD",),
    )


SECRETS = {"env:VENUE_KEY": SECRET, "env:CLIENT_SECRET": SECRET, "env:URL_TOKEN": SECRET}


async def test_no_secret_reaches_any_websocket_error() -> None:
    errors: list[AdapterError] = []

    async def echo_venue(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        auth = await ws.get_message()
        assert isinstance(auth, str)
        assert SECRET in auth
        if request.path.startswith("/reply"):
            await ws.send_message(f'{{"ok":false,"error":{auth!r}}}'.replace("'", '"'))
            await ws.get_message()
        else:
            await ws.aclose(code=4001, reason=f"bad key {SECRET}")

    with io_deadline():
        async with ws_server(echo_venue) as port, trio.open_nursery() as nursery:
            for path in ("/reply", "/close"):
                url = f"ws://127.0.0.1:{port}{path}?token=${{env:URL_TOKEN}}"
                session = ws_session(url)
                adapter = net.adapter_for(session, SECRETS)
                link = await adapter.connect(nursery, session.resolved_url(url, SECRETS))
                assert SECRET not in link.endpoint
                assert SECRET not in repr(link)
                assert SECRET not in repr(adapter)
                with pytest.raises(AdapterError) as caught:
                    await link.authenticate()
                errors.append(caught.value)
                await link.aclose()
            refused = f"ws://127.0.0.1:{closed_port()}/?key={SECRET}"
            with pytest.raises(ConnectFailed) as refused_error:
                await adapter.connect(nursery, refused)
            errors.append(refused_error.value)
            nursery.cancel_scope.cancel()

    assert [type(e) for e in errors] == [AuthRejected, AuthRejected, ConnectFailed]
    assert "***" in errors[0].reason
    assert errors[1].reason == "venue closed the connection (code 4001: bad key ***)"
    for error in errors:
        assert_secret_free(error)


async def test_no_secret_reaches_any_protobuf_error() -> None:
    async def echo_venue(stream: trio.SocketStream) -> None:
        peer = VenuePeer(stream)
        app = await peer.expect(pb.APPLICATION_AUTH_REQ)
        assert isinstance(app.message, pb.ApplicationAuthReq)
        secret = app.message.client_secret
        await peer.send(encode(pb.APPLICATION_AUTH_RES, pb.ApplicationAuthRes()))
        account = await peer.expect(pb.ACCOUNT_AUTH_REQ)
        assert isinstance(account.message, pb.AccountAuthReq)
        await peer.send(
            encode_error("AUTH", f"secret {secret} token {account.message.access_token}")
        )
        await trio.sleep_forever()

    with io_deadline():
        async with tcp_server(echo_venue) as port, trio.open_nursery() as nursery:
            url = f"tcp://127.0.0.1:{port}"
            adapter = net.adapter_for(pb_session(url), SECRETS)
            assert SECRET not in repr(adapter)
            link = await adapter.connect(nursery, url)
            with pytest.raises(AuthRejected) as caught:
                await link.authenticate()
            await link.aclose()
            nursery.cancel_scope.cancel()
    assert caught.value.reason == "auth rejected: venue error AUTH: secret *** token ***"
    assert_secret_free(caught.value)


# --------------------------------------------------------------------------- net helpers


def test_adapter_for_builds_the_adapter_of_the_session_kind() -> None:
    assert isinstance(net.adapter_for(ws_session("ws://h/"), SECRETS), WebSocketAdapter)
    assert isinstance(net.adapter_for(pb_session("tcp://h:1"), SECRETS), ProtobufAdapter)


def test_parse_endpoint() -> None:
    assert net.parse_endpoint("ws://Example.COM/feed?a=1", ("ws", "wss")) == net.Endpoint(
        "ws", "example.com", 80, "/feed?a=1"
    )
    wss = net.parse_endpoint("wss://[::1]:8443", ("ws", "wss"))
    assert wss == net.Endpoint("wss", "::1", 8443, "/")
    assert wss.host_header == "[::1]:8443"
    assert wss.tls
    assert net.parse_endpoint("wss://h", ("wss",)).host_header == "h"
    assert net.parse_endpoint("tcp://h:9", ("tcp",)) == net.Endpoint("tcp", "h", 9, "")
    with pytest.raises(ConnectFailed, match="the port is missing"):
        net.parse_endpoint("tcp://h", ("tcp", "tls"))
    with pytest.raises(ConnectFailed, match=r"expected ws:// or wss://"):
        net.parse_endpoint("http://h/?token=abc", ("ws", "wss"))
    with pytest.raises(ConnectFailed) as caught:
        net.parse_endpoint("ws://h:99999/?token=abc", ("ws", "wss"))
    assert "abc" not in caught.value.reason


async def test_default_opener_turns_on_keepalive() -> None:
    async def venue(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    with io_deadline():
        async with tcp_server(venue) as port:
            stream = await net.default_opener("127.0.0.1", port)
            sock = net.socket_of(stream)
            assert sock is not None
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            if hasattr(socket, "TCP_KEEPIDLE"):
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 30
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 10
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3
            await stream.aclose()
    assert net.socket_of(trio.testing.memory_stream_pair()[0]) is None


def test_connect_error_sentences() -> None:
    gai = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    assert net.describe_connect_error(gai, "nowhere.invalid", 443) == (
        "cannot resolve nowhere.invalid: name or service not known"
    )
    all_failed = OSError("all attempts to connect to h:1 failed")
    all_failed.__cause__ = ExceptionGroup("x", [ConnectionRefusedError(111, "refused")])
    assert net.describe_connect_error(all_failed, "::1", 1) == "connection refused by [::1]:1"
    timeout = TimeoutError(110, "Connection timed out")
    assert net.describe_connect_error(timeout, "h", 1) == "connection to h:1 timed out"
    other = OSError(113, "No route to host")
    assert net.describe_connect_error(other, "h", 1) == "h:1 is unreachable (no route to host)"


def test_batch_length_counts_heartbeats_and_errors_default_empty() -> None:
    batch = Batch([b"a", b"b"], True, heartbeats=3)
    assert len(batch) == 5
    assert batch.errors == []
    assert Batch([], False).errors is not Batch([], False).errors  # no shared default
    assert not Batch([], True)
    assert Batch([], True, heartbeats=1)


def test_redactor_matches_encoded_forms() -> None:
    redact = net.Redactor(['a"b/c', ""])
    assert redact('x a"b/c y a%22b%2Fc z a\\"b/c') == "x *** y *** z ***"
    assert not net.Redactor()
    assert net.Redactor()("text") == "text"
