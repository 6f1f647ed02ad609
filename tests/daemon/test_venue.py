"""The simulated venue: both kinds on loopback and on memory streams, every fault.

Loopback tests use port 0 and a ``fail_after``; timing tests run the venue's handlers on
``trio.testing.memory_stream_pair()`` under ``MockClock(autojump_threshold=0)`` (the
``autojump_clock`` fixture) and assert exact virtual times.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import ssl
import subprocess
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing
import trio_websocket

from daemon.venue import (
    AUTH_CLOSE_CODE,
    HEARTBEAT_TEXT,
    OVERSIZED_LENGTH,
    OVERSIZED_MESSAGE_SIZE,
    Fault,
    FaultError,
    FaultSchedule,
    SimulatedVenue,
    VenueConfig,
    add_venue_arguments,
)
from daemon.venue.command import config_from_args, load_schedule, run_until
from daemon.venue.control import handle_control_line
from protocol import venue_pb2 as pb
from protocol.errors import FrameTooLarge, RemoteProtocolError
from protocol.venue_codec import Role, VenueBody, VenueDecoder, VenueMessage, encode

LOOPBACK_LIMIT = 10


# -- helpers -----------------------------------------------------------------------------


class PbClient:
    """A protobuf venue client made of the protocol codecs and a stream."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.decoder = VenueDecoder(Role.CLIENT)
        self.pending: deque[VenueMessage] = deque()
        self.chunks: list[int] = []  # sizes of the reads, for slow_drip

    async def __aenter__(self) -> PbClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stream.aclose()

    async def send(self, payload_type: int, message: VenueBody, msg_id: str = "") -> None:
        await self.stream.send_all(encode(payload_type, message, msg_id))

    async def receive(self) -> VenueMessage:
        while not self.pending:
            data = await self.stream.receive_some(1 << 20)
            if not data:
                raise EOFError
            self.chunks.append(len(data))
            self.decoder.feed(data)
            self.pending.extend(self.decoder.messages())
        return self.pending.popleft()

    async def receive_type(self, payload_type: int) -> VenueMessage:
        while (message := await self.receive()).payload_type != payload_type:
            pass
        return message

    async def login_and_subscribe(self, *symbols: str) -> None:
        await self.send(
            pb.APPLICATION_AUTH_REQ, pb.ApplicationAuthReq(client_id="a", client_secret="s")
        )
        await self.receive_type(pb.APPLICATION_AUTH_RES)
        await self.send(pb.ACCOUNT_AUTH_REQ, pb.AccountAuthReq(account_id=7, access_token="t"))
        await self.receive_type(pb.ACCOUNT_AUTH_RES)
        await self.send(pb.SUBSCRIBE_REQ, pb.SubscribeReq(symbols=list(symbols)))
        await self.receive_type(pb.SUBSCRIBE_RES)

    async def read_until_closed(self) -> bytes:
        """Everything left until EOF."""
        out = bytearray()
        while data := await self.stream.receive_some(1 << 20):
            out += data
        return bytes(out)


def pb_over_memory(nursery: trio.Nursery, venue: SimulatedVenue) -> PbClient:
    client, server = trio.testing.memory_stream_pair()
    nursery.start_soon(venue.handle_protobuf_stream, server)
    return PbClient(client)


async def ws_over_memory(
    nursery: trio.Nursery,
    venue: SimulatedVenue,
    path: str = "/feed",
    max_message_size: int = 2**20,  # trio-websocket's default
) -> trio_websocket.WebSocketConnection:
    client, server = trio.testing.memory_stream_pair()
    nursery.start_soon(venue.handle_websocket_stream, server)
    # wrap_client_stream is annotated for socket streams, but takes any Stream.
    return await trio_websocket.wrap_client_stream(
        nursery,
        client,  # type: ignore[arg-type]
        "venue.test",
        path,
        max_message_size=max_message_size,
    )


async def serve(nursery: trio.Nursery, **settings: object) -> SimulatedVenue:
    venue = SimulatedVenue(VenueConfig(**settings))  # type: ignore[arg-type]
    await nursery.start(venue.serve)
    return venue


@asynccontextmanager
async def ws_over_tcp(venue: SimulatedVenue) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """A WebSocket client that always closes its socket.

    trio-websocket 0.12's client leaves its socket open when the server closes the
    connection, rejects the handshake or goes away (ResourceWarning at GC), so these
    tests own the TCP stream.
    """
    async with (
        await trio.open_tcp_stream("127.0.0.1", venue.ws_port) as stream,
        trio.open_nursery() as nursery,
    ):
        yield await trio_websocket.wrap_client_stream(nursery, stream, "127.0.0.1", "/feed")
        nursery.cancel_scope.cancel()


def rejected_with(status: int) -> pytest.RaisesGroup[trio_websocket.ConnectionRejected]:
    """Over a bare stream the client raises the rejection from its reader task."""
    return pytest.RaisesGroup(
        pytest.RaisesExc(trio_websocket.ConnectionRejected, check=lambda e: e.status_code == status)
    )


async def pb_over_tcp(venue: SimulatedVenue) -> PbClient:
    return PbClient(await trio.open_tcp_stream("127.0.0.1", venue.pb_port))


async def next_json(ws: trio_websocket.WebSocketConnection) -> dict[str, object]:
    """The next JSON object that is not a heartbeat."""
    while (message := await ws.get_message()) == HEARTBEAT_TEXT:
        pass
    assert isinstance(message, str)
    value = json.loads(message)
    assert isinstance(value, dict)
    return value


async def drain(ws: trio_websocket.WebSocketConnection) -> None:
    while True:
        await ws.get_message()


async def next_tick(ws: trio_websocket.WebSocketConnection) -> dict[str, object]:
    while "seq" not in (message := await next_json(ws)):
        pass
    return message


# -- protobuf over loopback --------------------------------------------------------------


async def test_protobuf_auth_subscribe_quotes_and_heartbeats(nursery: trio.Nursery) -> None:
    venue = await serve(nursery, rate=200.0, heartbeat_interval=0.02, control_port=None)
    with trio.fail_after(LOOPBACK_LIMIT):
        async with await pb_over_tcp(venue) as client:
            await client.send(
                pb.APPLICATION_AUTH_REQ,
                pb.ApplicationAuthReq(client_id="a", client_secret="s"),
                "m1",
            )
            reply = await client.receive()
            assert (reply.payload_type, reply.client_msg_id) == (pb.APPLICATION_AUTH_RES, "m1")
            await client.send(
                pb.ACCOUNT_AUTH_REQ, pb.AccountAuthReq(account_id=42, access_token="t"), "m2"
            )
            reply = await client.receive_type(pb.ACCOUNT_AUTH_RES)
            assert reply.client_msg_id == "m2"
            assert isinstance(reply.message, pb.AccountAuthRes)
            assert reply.message.account_id == 42
            await client.send(pb.SUBSCRIBE_REQ, pb.SubscribeReq(symbols=["EURUSD", "GBPUSD"]), "m3")
            reply = await client.receive_type(pb.SUBSCRIBE_RES)
            assert reply.client_msg_id == "m3"
            assert isinstance(reply.message, pb.SubscribeRes)
            assert list(reply.message.symbols) == ["EURUSD", "GBPUSD"]
            seqs: dict[str, list[int]] = {"EURUSD": [], "GBPUSD": []}
            heartbeats = 0
            while heartbeats < 2 or min(len(s) for s in seqs.values()) < 3:
                message = await client.receive()
                if message.payload_type == pb.HEARTBEAT_EVENT:
                    heartbeats += 1
                    continue
                quote = message.message
                assert isinstance(quote, pb.QuoteEvent)
                assert quote.ask > quote.bid > 0
                assert quote.venue_time_ns > 1_600_000_000 * 10**9
                seqs[quote.symbol].append(quote.seq)
            for sequence in seqs.values():
                assert sequence == list(range(1, len(sequence) + 1))
            await client.send(pb.HEARTBEAT_EVENT, pb.HeartbeatEvent())  # accepted silently
        await venue.wait_open_connections(0, "protobuf")
    counters = venue.counters("protobuf")
    assert (counters.accepted, counters.auth_attempts, counters.auth_rejections) == (1, 2, 0)
    assert counters.peak_open == 1
    assert counters.messages_sent >= 6
    assert counters.heartbeats_sent >= 2


@pytest.mark.parametrize(
    ("request_type", "auth_request", "code", "description"),
    [
        (
            pb.APPLICATION_AUTH_REQ,
            pb.ApplicationAuthReq(client_id="a", client_secret="wrong"),
            "CH_CLIENT_AUTH_FAILURE",
            "invalid client credentials",
        ),
        (
            pb.ACCOUNT_AUTH_REQ,
            pb.AccountAuthReq(account_id=1, access_token="expired"),
            "CH_ACCESS_TOKEN_INVALID",
            "access token is invalid or expired",
        ),
    ],
)
async def test_protobuf_rejected_credentials_get_error_res_then_close(
    nursery: trio.Nursery, request_type: int, auth_request: VenueBody, code: str, description: str
) -> None:
    venue = await serve(
        nursery, client_secret="s3cret", access_token="tok", control_port=None, ws_ports=()
    )
    with trio.fail_after(LOOPBACK_LIMIT):
        async with await pb_over_tcp(venue) as client:
            await client.send(request_type, auth_request, "id-9")
            reply = await client.receive()
            assert reply.payload_type == pb.ERROR_RES
            assert reply.client_msg_id == "id-9"
            assert isinstance(reply.message, pb.ErrorRes)
            assert (reply.message.error_code, reply.message.description) == (code, description)
            assert await client.read_until_closed() == b""
    counters = venue.counters("protobuf")
    assert (counters.auth_attempts, counters.auth_rejections) == (1, 1)


async def test_protobuf_exact_credentials_are_accepted(autojump_clock: object) -> None:
    venue = SimulatedVenue(VenueConfig(client_secret="s3cret", access_token="tok"))
    async with trio.open_nursery() as nursery:
        client = pb_over_memory(nursery, venue)
        await client.send(
            pb.APPLICATION_AUTH_REQ, pb.ApplicationAuthReq(client_id="a", client_secret="s3cret")
        )
        assert (await client.receive()).payload_type == pb.APPLICATION_AUTH_RES
        await client.send(pb.ACCOUNT_AUTH_REQ, pb.AccountAuthReq(account_id=3, access_token="tok"))
        assert (await client.receive()).payload_type == pb.ACCOUNT_AUTH_RES
        nursery.cancel_scope.cancel()


async def test_protobuf_require_auth_refuses_an_early_subscribe(autojump_clock: object) -> None:
    venue = SimulatedVenue(VenueConfig(require_auth=True))
    async with trio.open_nursery() as nursery:
        client = pb_over_memory(nursery, venue)
        await client.send(pb.SUBSCRIBE_REQ, pb.SubscribeReq(symbols=["EURUSD"]), "s")
        reply = await client.receive()
        assert isinstance(reply.message, pb.ErrorRes)
        assert reply.message.error_code == "CH_CLIENT_NOT_AUTHENTICATED"
        assert await client.read_until_closed() == b""


async def test_protobuf_client_garbage_gets_invalid_request(autojump_clock: object) -> None:
    venue = SimulatedVenue()
    async with trio.open_nursery() as nursery:
        client = pb_over_memory(nursery, venue)
        await client.stream.send_all(b"\x00\x00\x00\x02\xff\xff")
        reply = await client.receive()
        assert isinstance(reply.message, pb.ErrorRes)
        assert reply.message.error_code == "INVALID_REQUEST"
        assert "not a valid venue envelope" in reply.message.description
        assert await client.read_until_closed() == b""


# -- websocket over loopback -------------------------------------------------------------


async def test_websocket_auth_subscribe_ticks_and_heartbeats(nursery: trio.Nursery) -> None:
    venue = await serve(nursery, rate=200.0, heartbeat_interval=0.02, control_port=None)
    assert venue.ws_url == f"ws://127.0.0.1:{venue.ws_port}/feed"
    with trio.fail_after(LOOPBACK_LIMIT):
        async with trio_websocket.open_websocket_url(venue.ws_url) as ws:
            await ws.send_message('{"op":"auth","key":"anything"}')
            assert await next_json(ws) == {"op": "auth", "ok": True}
            await ws.send_message('{"op":"subscribe","channel":"ticks"}')
            assert await next_json(ws) == {"op": "subscribed", "channel": "ticks"}
            seqs: list[int] = []
            heartbeats = 0
            while heartbeats < 2 or len(seqs) < 5:
                message = await ws.get_message()
                if message == HEARTBEAT_TEXT:
                    heartbeats += 1
                    continue
                assert isinstance(message, str)
                tick = json.loads(message)
                assert tick["channel"] == "ticks"
                assert tick["symbol"] == "EURUSD"
                assert tick["ask"] > tick["bid"] > 0
                assert tick["ts"] > 1_600_000_000 * 10**9
                seqs.append(tick["seq"])
            assert seqs == list(range(1, len(seqs) + 1))
            await ws.ping(b"are you there")  # answered by trio-websocket
            assert venue.open_connections("websocket") == 1
        await venue.wait_open_connections(0)
    counters = venue.counters("websocket")
    assert (counters.accepted, counters.auth_attempts, counters.auth_rejections) == (1, 1, 0)


async def test_websocket_bad_key_is_rejected_with_4001(nursery: trio.Nursery) -> None:
    venue = await serve(nursery, ws_key="right", control_port=None, pb_ports=())
    with trio.fail_after(LOOPBACK_LIMIT):
        async with ws_over_tcp(venue) as ws:
            await ws.send_message('{"op":"auth","key":"wrong"}')
            assert await next_json(ws) == {"op": "auth", "ok": False, "error": "invalid api key"}
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                await ws.get_message()
            assert closed.value.reason is not None
            assert closed.value.reason.code == AUTH_CLOSE_CODE
        async with trio_websocket.open_websocket_url(venue.ws_url) as ws:
            await ws.send_message('{"op":"auth","key":"right"}')
            assert await next_json(ws) == {"op": "auth", "ok": True}
    counters = venue.counters("websocket")
    assert (counters.auth_attempts, counters.auth_rejections) == (2, 1)


async def test_websocket_without_auth_subscribes_at_once(autojump_clock: object) -> None:
    venue = SimulatedVenue(VenueConfig(symbols=("EURUSD", "USDJPY")))
    async with trio.open_nursery() as nursery:
        ws = await ws_over_memory(nursery, venue)
        await ws.send_message('{"op":"subscribe","channel":"fx"}')
        assert await next_json(ws) == {"op": "subscribed", "channel": "fx"}
        ticks = [await next_tick(ws) for _ in range(4)]
        assert [(t["symbol"], t["seq"]) for t in ticks] == [
            ("EURUSD", 1),
            ("USDJPY", 1),
            ("EURUSD", 2),
            ("USDJPY", 2),
        ]
        assert {t["channel"] for t in ticks} == {"fx"}
        nursery.cancel_scope.cancel()


async def test_websocket_require_auth_rejects_a_subscribe_first(autojump_clock: object) -> None:
    venue = SimulatedVenue(VenueConfig(require_auth=True))
    async with trio.open_nursery() as nursery:
        ws = await ws_over_memory(nursery, venue)
        await ws.send_message('{"op":"subscribe","channel":"ticks"}')
        reply = await next_json(ws)
        assert reply == {"op": "auth", "ok": False, "error": "not authenticated"}
        with pytest.raises(trio_websocket.ConnectionClosed) as closed:
            await ws.get_message()
        assert closed.value.reason is not None
        assert closed.value.reason.code == AUTH_CLOSE_CODE


async def test_websocket_other_messages(autojump_clock: object) -> None:
    venue = SimulatedVenue(VenueConfig(require_auth=True, heartbeat_interval=None))
    async with trio.open_nursery() as nursery:
        ws = await ws_over_memory(nursery, venue)
        await ws.send_message(HEARTBEAT_TEXT)  # accepted silently, even before auth
        await ws.send_message('{"op":"auth","key":"k"}')
        assert await next_json(ws) == {"op": "auth", "ok": True}
        for request, reply in [
            ("not json", {"op": "error", "error": "message is not a JSON object"}),
            ('{"op":"ping"}', {"op": "pong"}),
            ('{"op":"fly"}', {"op": "error", "error": "unknown op 'fly'"}),
            ('{"op":"subscribe"}', {"op": "error", "error": "subscribe needs a channel"}),
        ]:
            await ws.send_message(request)
            assert await next_json(ws) == reply
        await ws.send_message(b"binary is ignored")
        await ws.send_message('{"op":"subscribe","channel":"a","symbols":["X"]}')
        assert await next_json(ws) == {"op": "subscribed", "channel": "a"}
        await ws.send_message('{"op":"subscribe","channel":"b","symbols":["X"]}')
        ticks = [await next_tick(ws) for _ in range(4)]  # the first is due at 0.05 s
        assert [(t["channel"], t["seq"]) for t in ticks] == [("a", 1), ("b", 1), ("a", 2), ("b", 2)]
        nursery.cancel_scope.cancel()


async def test_websocket_wrong_path_is_404(autojump_clock: object) -> None:
    venue = SimulatedVenue()
    with rejected_with(404):
        async with trio.open_nursery() as nursery:
            await ws_over_memory(nursery, venue, path="/other")
    assert venue.counters("websocket").refused == 1


# -- faults ------------------------------------------------------------------------------


async def test_drop_resets_protobuf_and_websocket_connections(nursery: trio.Nursery) -> None:
    venue = await serve(nursery, rate=100.0, control_port=None)
    with trio.fail_after(LOOPBACK_LIMIT):
        async with await pb_over_tcp(venue) as pb_client:
            await pb_client.login_and_subscribe("EURUSD")
            async with ws_over_tcp(venue) as ws:
                await ws.send_message('{"op":"subscribe","channel":"ticks"}')
                await next_tick(ws)
                assert venue.fault("drop", kind="protobuf") == 1
                with pytest.raises(trio.BrokenResourceError):  # RST: connection reset by peer
                    await pb_client.read_until_closed()
                await next_tick(ws)  # the other kind is untouched
                assert venue.fault("drop") == 1
                with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                    await drain(ws)
                assert closed.value.reason is not None
                assert closed.value.reason.code == 1006  # no close handshake
    assert venue.open_connections() == 0
    assert venue.counters("protobuf").dropped == venue.counters("websocket").dropped == 1


async def test_silent_stops_everything_for_exactly_n_seconds(autojump_clock: object) -> None:
    venue = SimulatedVenue(VenueConfig(rate=10.0, heartbeat_interval=1.0))
    async with trio.open_nursery() as nursery:
        client = pb_over_memory(nursery, venue)
        await client.login_and_subscribe()
        start = trio.current_time()
        await client.receive_type(pb.QUOTE_EVENT)
        assert trio.current_time() == start + 0.1
        venue.fault("silent", seconds=10.0)
        await client.send(pb.HEARTBEAT_EVENT, pb.HeartbeatEvent())  # still read, not answered
        # Held messages (the due heartbeat and quote 2) go out the moment it ends.
        arrivals: list[tuple[float, int]] = []
        while len(arrivals) < 3:
            message = await client.receive()
            arrivals.append((trio.current_time(), message.payload_type))
        assert sorted(arrivals) == [
            (start + 10.1, pb.HEARTBEAT_EVENT),
            (start + 10.1, pb.QUOTE_EVENT),
            (start + 10.1 + 0.1, pb.QUOTE_EVENT),
        ]
        nursery.cancel_scope.cancel()
    # Pacing restarted after the silence: nothing was made up.
    assert venue.counters("protobuf").messages_sent == 3


async def test_silent_until_cleared_holds_websocket_pongs(autojump_clock: object) -> None:
    venue = SimulatedVenue(VenueConfig(heartbeat_interval=2.0))
    async with trio.open_nursery() as nursery:
        ws = await ws_over_memory(nursery, venue)
        venue.fault("silent", kind="websocket")
        nursery.start_soon(_clear_at, venue, 7.0)
        await ws.ping(b"p")
        assert trio.current_time() == 7.0
        assert venue.status()["faults"] == []
        nursery.cancel_scope.cancel()


async def _clear_at(venue: SimulatedVenue, at: float) -> None:
    await trio.sleep_until(at)
    assert venue.fault("clear") == 1


async def test_refuse_websocket_with_503_then_429_then_accept(nursery: trio.Nursery) -> None:
    venue = await serve(nursery, control_port=None, pb_ports=())
    with trio.fail_after(LOOPBACK_LIMIT):
        venue.fault("refuse", seconds=60.0)
        with rejected_with(503):
            async with ws_over_tcp(venue):
                pass
        venue.fault("refuse", seconds=60.0, status=429)
        with rejected_with(429):
            async with ws_over_tcp(venue):
                pass
        venue.fault("clear")
        async with trio_websocket.open_websocket_url(venue.ws_url) as ws:
            await ws.send_message('{"op":"auth","key":"k"}')
            assert await next_json(ws) == {"op": "auth", "ok": True}
    counters = venue.counters("websocket")
    assert (counters.accepted, counters.refused, counters.peak_open) == (3, 2, 1)


async def test_refuse_protobuf_closes_before_any_reply(autojump_clock: object) -> None:
    venue = SimulatedVenue()
    venue_port = 8766
    async with trio.open_nursery() as nursery:
        venue.fault("refuse", seconds=5.0, port=venue_port)
        client, server = trio.testing.memory_stream_pair()
        nursery.start_soon(partial_handler(venue, venue_port), server)
        await client.send_all(encode(pb.APPLICATION_AUTH_REQ, pb.ApplicationAuthReq()))
        assert await client.receive_some() == b""
        other = pb_over_memory(nursery, venue)  # port 0: out of the fault's scope
        await other.send(
            pb.APPLICATION_AUTH_REQ, pb.ApplicationAuthReq(client_id="a", client_secret="s")
        )
        assert (await other.receive()).payload_type == pb.APPLICATION_AUTH_RES
        await trio.sleep(5.0)
        client, server = trio.testing.memory_stream_pair()
        nursery.start_soon(partial_handler(venue, venue_port), server)
        late = PbClient(client)
        await late.send(
            pb.APPLICATION_AUTH_REQ, pb.ApplicationAuthReq(client_id="a", client_secret="s")
        )
        assert (await late.receive()).payload_type == pb.APPLICATION_AUTH_RES
        nursery.cancel_scope.cancel()
    counters = venue.counters("protobuf")
    assert (counters.accepted, counters.refused, counters.peak_open) == (3, 1, 2)


def partial_handler(venue: SimulatedVenue, port: int):  # type: ignore[no-untyped-def]
    async def handle(stream: trio.abc.Stream) -> None:
        await venue.handle_protobuf_stream(stream, port=port)

    return handle


async def test_reject_auth_for_a_while(autojump_clock: object) -> None:
    venue = SimulatedVenue()
    async with trio.open_nursery() as nursery:
        venue.fault("reject_auth", seconds=30.0)
        client = pb_over_memory(nursery, venue)
        await client.send(
            pb.APPLICATION_AUTH_REQ, pb.ApplicationAuthReq(client_id="a", client_secret="s")
        )
        reply = await client.receive()
        assert isinstance(reply.message, pb.ErrorRes)
        assert reply.message.error_code == "CH_CLIENT_AUTH_FAILURE"
        ws = await ws_over_memory(nursery, venue)
        await ws.send_message('{"op":"auth","key":"k"}')
        assert (await next_json(ws))["ok"] is False
        await trio.sleep(30.0)
        ws = await ws_over_memory(nursery, venue)
        await ws.send_message('{"op":"auth","key":"k"}')
        assert await next_json(ws) == {"op": "auth", "ok": True}
        nursery.cancel_scope.cancel()
    assert venue.counters("websocket").auth_rejections == 1
    assert venue.counters("protobuf").auth_rejections == 1


async def test_garbage_arrives_as_garbage(autojump_clock: object) -> None:
    venue = SimulatedVenue(VenueConfig(heartbeat_interval=None))
    async with trio.open_nursery() as nursery:
        client = pb_over_memory(nursery, venue)
        ws = await ws_over_memory(nursery, venue)
        await venue.wait_open_connections(2)
        assert venue.fault("garbage") == 2
        with pytest.raises(RemoteProtocolError, match="not a valid venue envelope"):
            await client.receive()
        binary = await ws.get_message()
        assert isinstance(binary, bytes)
        text = await ws.get_message()
        assert isinstance(text, str)
        with pytest.raises(ValueError, match=r"Expecting value|Extra data"):
            json.loads(text)
        nursery.cancel_scope.cancel()


async def test_oversized_arrives_as_such(autojump_clock: object) -> None:
    venue = SimulatedVenue(VenueConfig(heartbeat_interval=None))
    async with trio.open_nursery() as nursery:
        client = pb_over_memory(nursery, venue)
        ws = await ws_over_memory(nursery, venue, max_message_size=4 * OVERSIZED_MESSAGE_SIZE)
        await venue.wait_open_connections(2)
        venue.fault("oversized")
        with pytest.raises(FrameTooLarge) as too_large:
            await client.receive()
        assert too_large.value.size == OVERSIZED_LENGTH
        assert len(await ws.get_message()) == OVERSIZED_MESSAGE_SIZE
        await venue.wait_open_connections(1, "websocket")  # protobuf closed after the header
        nursery.cancel_scope.cancel()


async def test_oversized_websocket_message_trips_the_default_client_limit(
    autojump_clock: object,
) -> None:
    venue = SimulatedVenue(VenueConfig(heartbeat_interval=None))
    async with trio.open_nursery() as nursery:
        ws = await ws_over_memory(nursery, venue)
        await venue.wait_open_connections(1)
        venue.fault("oversized")
        with pytest.raises(trio_websocket.ConnectionClosed) as closed:
            await ws.get_message()
        assert closed.value.reason is not None
        assert closed.value.reason.code == 1009  # message too big
        nursery.cancel_scope.cancel()


async def test_slow_drip_delivers_whole_frames_a_byte_at_a_time(autojump_clock: object) -> None:
    venue = SimulatedVenue(VenueConfig(rate=1.0, heartbeat_interval=None))
    async with trio.open_nursery() as nursery:
        client = pb_over_memory(nursery, venue)
        await client.login_and_subscribe("EURUSD")
        venue.fault("slow_drip", seconds=100.0, delay=0.01)
        client.chunks.clear()
        start = trio.current_time()
        quotes = [(await client.receive_type(pb.QUOTE_EVENT)).message for _ in range(3)]
        assert [q.seq for q in quotes if isinstance(q, pb.QuoteEvent)] == [1, 2, 3]
        assert set(client.chunks) == {1}
        frame_size = len(client.chunks) // 3
        # Quote k leaves at start + k seconds; its last byte arrives (size - 1) delays later.
        assert trio.current_time() == pytest.approx(start + 3.0 + (frame_size - 1) * 0.01)
        nursery.cancel_scope.cancel()


async def test_fault_scope_by_kind_and_port(autojump_clock: object) -> None:
    venue = SimulatedVenue(VenueConfig(rate=10.0))
    async with trio.open_nursery() as nursery:
        client = pb_over_memory(nursery, venue)
        ws = await ws_over_memory(nursery, venue)
        await ws.send_message('{"op":"subscribe","channel":"ticks"}')
        await client.login_and_subscribe()
        venue.fault("silent", seconds=50.0, kind="websocket")
        venue.fault("silent", seconds=50.0, port=1234)
        await client.receive_type(pb.QUOTE_EVENT)
        assert trio.current_time() < 1.0
        await next_tick(ws)
        assert trio.current_time() == 50.0
        nursery.cancel_scope.cancel()


# -- pacing ------------------------------------------------------------------------------


async def test_rate_paces_exactly_in_virtual_time(autojump_clock: object) -> None:
    venue = SimulatedVenue(VenueConfig(rate=10.0, heartbeat_interval=None))
    async with trio.open_nursery() as nursery:
        client = pb_over_memory(nursery, venue)
        await client.login_and_subscribe()
        start = trio.current_time()
        for k in range(1, 21):
            quote = (await client.receive()).message
            assert isinstance(quote, pb.QuoteEvent)
            assert quote.seq == k
            assert trio.current_time() == start + k / 10
        assert trio.current_time() == start + 2.0
        ws = await ws_over_memory(nursery, venue)
        await ws.send_message('{"op":"subscribe","channel":"ticks"}')
        await next_json(ws)
        start = trio.current_time()
        for _ in range(10):
            await next_tick(ws)
        assert trio.current_time() == start + 1.0
        nursery.cancel_scope.cancel()


async def test_count_stops_the_data_and_heartbeats_go_on(autojump_clock: object) -> None:
    venue = SimulatedVenue(VenueConfig(rate=100.0, count=5, heartbeat_interval=1.0))
    async with trio.open_nursery() as nursery:
        client = pb_over_memory(nursery, venue)
        await client.login_and_subscribe()
        kinds = [(await client.receive()).payload_type for _ in range(8)]
        assert kinds == [pb.QUOTE_EVENT] * 5 + [pb.HEARTBEAT_EVENT] * 3
        assert trio.current_time() == 3.0
        nursery.cancel_scope.cancel()


async def test_fast_mode_sends_count_messages_in_batches(nursery: trio.Nursery) -> None:
    venue = await serve(nursery, rate=None, count=600, batch_size=256, heartbeat_interval=None)
    with trio.fail_after(LOOPBACK_LIMIT):
        async with await pb_over_tcp(venue) as client:
            await client.login_and_subscribe("A", "B")
            seqs: dict[str, int] = {"A": 0, "B": 0}
            for _ in range(600):
                quote = (await client.receive()).message
                assert isinstance(quote, pb.QuoteEvent)
                assert quote.seq == seqs[quote.symbol] + 1
                seqs[quote.symbol] = quote.seq
            assert seqs == {"A": 300, "B": 300}
            assert len(client.chunks) < 60  # coalesced, not one write per message
            async with trio_websocket.open_websocket_url(venue.ws_url) as ws:
                await ws.send_message('{"op":"subscribe","channel":"ticks"}')
                await next_json(ws)
                last = [(await next_tick(ws))["seq"] for _ in range(600)][-1]
                assert last == 600
                with trio.move_on_after(0.05):
                    await ws.get_message()
                    pytest.fail("more than count messages")
    assert venue.counters("protobuf").messages_sent == 600
    assert venue.counters("websocket").messages_sent == 600


# -- control port, schedule, API ---------------------------------------------------------


async def test_control_port_lines(nursery: trio.Nursery) -> None:
    venue = await serve(nursery)
    assert venue.control_port
    with trio.fail_after(LOOPBACK_LIMIT):
        async with await trio.open_tcp_stream("127.0.0.1", venue.control_port) as stream:
            lines = _Lines(stream)
            await stream.send_all(b'{"fault":"silent","seconds":10}\n{"status":true}\r\n\n')
            assert await lines.next() == {"ok": True, "hit": 0}
            status = await lines.next()
            assert status["ok"] is True
            (fault,) = status["faults"]
            assert fault == {
                "fault": "silent",
                "seconds": 10,
                "remaining": pytest.approx(10, abs=1),
            }
            assert set(status["counters"]) == {"websocket", "protobuf"}
            assert status["counters"]["protobuf"]["open"] == 0
            assert status["ports"]["control"] == venue.control_port
            await stream.send_all(b"hello\n")
            assert (await lines.next())["ok"] is False
            await stream.send_all(b'{"fault":"nope"}\n[1]\n{"what":1}\n')
            errors = [await lines.next() for _ in range(3)]
            assert all(reply["ok"] is False for reply in errors)
            assert "unknown fault 'nope'" in errors[0]["error"]
            await stream.send_all(b'{"fault":"clear"}\n')
            assert await lines.next() == {"ok": True, "hit": 1}
        async with await trio.open_tcp_stream("127.0.0.1", venue.control_port) as again:
            await again.send_all(b'{"status":true}\n')
            assert (await _Lines(again).next())["faults"] == []


class _Lines:
    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buffer = b""

    async def next(self) -> dict:  # type: ignore[type-arg]
        while b"\n" not in self.buffer:
            data = await self.stream.receive_some()
            assert data, "control connection closed"
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\n", 1)
        reply = json.loads(line)
        assert isinstance(reply, dict)
        return reply


async def test_control_line_too_long_closes(autojump_clock: object) -> None:
    venue = SimulatedVenue()
    async with trio.open_nursery() as nursery:
        client, server = trio.testing.memory_stream_pair()
        nursery.start_soon(venue.handle_control_stream, server)
        await client.send_all(b"x" * 70_000)
        reply = await _Lines(client).next()
        assert reply == {"ok": False, "error": "line too long"}


def test_control_line_replies() -> None:
    venue = SimulatedVenue()
    assert handle_control_line(venue, b'{"status": true, "x": 1}')["ok"] is False
    reply = handle_control_line(venue, b'{"fault":"silent","seconds":-1}')
    assert reply == {"ok": False, "error": "seconds must be a positive number, not -1"}
    reply = handle_control_line(venue, b'{"fault":"drop","seconds":3}')
    assert reply == {"ok": False, "error": "drop happens at once; it takes no seconds"}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"fault": "silent", "kind": "fix"}, "kind must be one of websocket, protobuf"),
        ({"fault": "refuse", "status": 200}, "status must be between 300 and 599"),
        ({"fault": "refuse", "status": "503"}, "status must be an HTTP status code"),
        ({"fault": "silent", "port": -1}, "port must be a port number"),
        ({"fault": "silent", "seconds": True}, "seconds must be a number"),
        ({"fault": "slow_drip", "delay": "x"}, "delay must be a number"),
        ({"fault": "silent", "for": 3}, "unknown key 'for'"),
        ({"seconds": 3}, "'fault' must name a fault"),
    ],
)
def test_fault_dicts_are_validated(spec: dict[str, object], message: str) -> None:
    with pytest.raises(FaultError, match=message):
        Fault.from_dict(spec)


def test_fault_round_trips_through_its_dict() -> None:
    fault = Fault("refuse", seconds=5.0, kind="websocket", port=8765, status=429)
    assert Fault.from_dict(fault.to_dict()) == fault
    assert Fault.from_dict({"fault": "slow_drip", "delay": 0.5}).to_dict() == {
        "fault": "slow_drip",
        "delay": 0.5,
    }


async def test_schedule_applies_faults_at_their_times(autojump_clock: object) -> None:
    venue = SimulatedVenue()
    schedule = FaultSchedule(
        [(5.0, {"fault": "silent", "seconds": 2}), (1.0, Fault("reject_auth", seconds=1.0))],
        repeat_every=10.0,
    )
    seen: list[tuple[float, list[str]]] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(venue.run_schedule, schedule)
        for at in (0.5, 1.5, 2.5, 5.5, 7.5, 11.5, 15.5):
            await trio.sleep_until(at)
            faults = venue.status()["faults"]
            assert isinstance(faults, list)
            seen.append((at, [f["fault"] for f in faults]))
        nursery.cancel_scope.cancel()
    assert seen == [
        (0.5, []),
        (1.5, ["reject_auth"]),
        (2.5, []),
        (5.5, ["silent"]),
        (7.5, []),
        (11.5, ["reject_auth"]),
        (15.5, ["silent"]),
    ]
    with pytest.raises(FaultError, match="repeat_every"):
        FaultSchedule([(5.0, Fault("drop"))], repeat_every=5.0)


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="rate"):
        VenueConfig(rate=-1.0)
    with pytest.raises(ValueError, match="symbols"):
        VenueConfig(symbols=())
    assert VenueConfig(rate=0.0).fast
    with pytest.raises(RuntimeError, match="no WebSocket port"):
        _ = SimulatedVenue().ws_port


# -- command line ------------------------------------------------------------------------


def test_cli_arguments_make_a_config(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_venue_arguments(parser)
    args = parser.parse_args(
        ["--ws-port", "1", "--ws-port", "2", "--rate", "0", "--symbols", "A, B", "--ws-key", "k"]
    )
    config = config_from_args(args)
    assert config.ws_ports == (1, 2)
    assert config.pb_ports == (8764,)
    assert config.control_port == 8767
    assert config.fast
    assert config.symbols == ("A", "B")
    assert config.ws_key == "k"
    path = tmp_path / "schedule.json"
    path.write_text(json.dumps({"steps": [[3, {"fault": "drop"}]], "repeat_every": 9}))
    schedule = load_schedule(path)
    assert schedule is not None
    assert schedule.steps == ((3.0, Fault("drop")),)
    path.write_text(json.dumps([[1, "drop"]]))
    with pytest.raises(FaultError, match="each step"):
        load_schedule(path)


async def test_cli_run_until_prints_the_addresses() -> None:
    out, err = io.StringIO(), io.StringIO()
    config = VenueConfig(ws_ports=(0, 0), pb_ports=(0,))
    with trio.fail_after(LOOPBACK_LIMIT):
        status = await run_until(config, None, trio.lowlevel.checkpoint, out, err)
    assert status == 0
    lines = out.getvalue().splitlines()
    assert [line.split()[0] for line in lines] == ["websocket", "websocket", "protobuf", "control"]
    assert lines[0].startswith("websocket  ws://127.0.0.1:")
    assert lines[2].startswith("protobuf   tcp://127.0.0.1:")


async def test_cli_reports_a_port_in_use(nursery: trio.Nursery) -> None:
    venue = await serve(nursery, ws_ports=(), control_port=None)
    out, err = io.StringIO(), io.StringIO()
    config = VenueConfig(ws_ports=(), pb_ports=(venue.pb_port,), control_port=None)
    with trio.fail_after(LOOPBACK_LIMIT):
        status = await run_until(config, None, trio.lowlevel.checkpoint, out, err)
    assert status == 1
    assert "cannot listen" in err.getvalue()


# -- TLS -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A throwaway self-signed certificate for 127.0.0.1 (needs the openssl command)."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command to make a test certificate")
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-days", "1", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


async def test_tls_for_both_kinds(nursery: trio.Nursery, tls_files: tuple[Path, Path]) -> None:
    cert, key = tls_files
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    client_context = ssl.create_default_context(cafile=str(cert))
    venue = await serve(nursery, ssl_context=server_context, control_port=None)
    assert venue.ws_url.startswith("wss://")
    with trio.fail_after(LOOPBACK_LIMIT):
        stream = await trio.open_ssl_over_tcp_stream(
            "127.0.0.1", venue.pb_port, ssl_context=client_context
        )
        async with PbClient(stream) as client:
            await client.login_and_subscribe("EURUSD")
            assert (await client.receive_type(pb.QUOTE_EVENT)).payload_type == pb.QUOTE_EVENT
        async with trio_websocket.open_websocket_url(venue.ws_url, client_context) as ws:
            await ws.send_message('{"op":"subscribe","channel":"ticks"}')
            assert (await next_tick(ws))["seq"] == 1
