"""No local peer can crash the daemon (issue 9): fuzzing every endpoint that reads bytes.

The real daemon (controlkit) serves its control socket, its consumer socket and the
consumer WebSocket endpoint; hypothesis writes what a broken or hostile local program
might: random bytes, huge lines, invalid UTF-8 and lone surrogates, valid JSON of the
wrong types, frames whose length prefix lies, raw bytes at the HTTP upgrade, junk
WebSocket frames after a good upgrade. After every example the endpoint still answers a
well-formed request, nothing in the daemon failed while handling it (no ``*_peer_error``
or ``control_command_failed`` line: every input has a clean answer), and after each run
no file descriptor is left open.

Hypothesis runs in a worker thread; each example runs on the daemon's own Trio loop
(``trio.from_thread.run``), under ``trio.fail_after``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
import stat
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import structlog
import trio
import trio_websocket
from controlkit import Running, running_daemon, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.consumer_codec import REQUEST_MAX, ConsumerFrameDecoder, encode_request
from protocol.consumer_pb2 import ConsumerRequest, Subscribe
from protocol.control_codec import MAX_LINE

EXAMPLES = 200
STATUS = {"id": "s", "status": {"include_sessions": True}}
FRAME_TYPES = frozenset({"subscribed", "state_notice", "data", "gap", "error"})
#: What the daemon logs when a connection or a command raised.
FAILURES = frozenset({"control_peer_error", "control_command_failed", "consumer_peer_error"})
#: The library bugs the WebSocket endpoint's guard contains (each ends that connection):
#: wsproto 1.3.2 decodes the Host, Connection, Sec-WebSocket-Extensions and -Protocol
#: headers as ASCII/IDNA and lets UnicodeDecodeError out of receive_data (found by this
#: fuzzing); trio-websocket 0.12.2 sends a 1009 close in LOCAL_CLOSING (issue 9).
KNOWN = (
    "UnicodeDecodeError: 'ascii' codec can't decode",
    "UnicodeError: ",  # the IDNA codec on the Host header
    "LocalProtocolError: Event CloseConnection(code=1009",
)


def endpoint_connections(r: Running, port: int) -> list[int]:
    """Descriptors in /proc/self/fd of connections to the daemon's endpoints, either end.

    Not the whole count of descriptors: the session's link to the venue (both ends are
    in this process) comes and goes on its own.
    """
    names = {str(r.socket), str(r.directory / "consumers.sock"), ("127.0.0.1", port)}
    found = []
    for entry in os.listdir("/proc/self/fd"):
        fd = int(entry)
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            with socket.socket(fileno=os.dup(fd)) as sock:
                ends = [sock.getsockname(), sock.getpeername()]  # a listener: OSError
        except OSError:
            continue  # closed meanwhile, or listening
        if any(end in names for end in ends):
            found.append(fd)
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def fuzz(
    r: Running,
    port: int,
    example: Callable[[Any], Awaitable[None]],
    inputs: st.SearchStrategy[Any],
) -> None:
    """Run ``example`` on hypothesis's ``inputs``; then check that no descriptor leaked."""
    assert not endpoint_connections(r, port)

    async def one(value: Any) -> None:
        with structlog.testing.capture_logs() as logs, trio.fail_after(10):
            await example(value)
        failures = [e for e in logs if e["event"] in FAILURES and not e["reason"].startswith(KNOWN)]
        assert not failures, failures

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
    )
    @given(inputs)
    def run(value: Any) -> None:
        trio.from_thread.run(one, value)

    await trio.to_thread.run_sync(run)
    # The daemon closes each connection a moment after the peer sees the end of it.
    await wait_until(
        lambda: not endpoint_connections(r, port),
        lambda: f"descriptors still open: {endpoint_connections(r, port)}",
    )


# --------------------------------------------------------------------------- inputs

#: Strings JSON cannot carry as UTF-8: lone surrogates (json.dumps writes \\udXXX escapes).
_surrogates = st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1)
_text = st.one_of(st.text(max_size=20), _surrogates, st.sampled_from(["a", "all", "status"]))
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4),
    max_leaves=12,
)


def _dumps(value: object) -> bytes:
    return json.dumps(value).encode()


def _raw_utf8(text: str) -> bytes:
    """``text`` in UTF-8, lone surrogates included (which makes it invalid UTF-8)."""
    return text.encode("utf-8", "surrogatepass")


_control_request = st.one_of(
    st.builds(
        lambda key, value, id_: _dumps({"id": id_, key: value}),
        st.sampled_from(["status", "pause", "resume", "reconnect", "reload", "x"]),
        _json,
        _text,
    ),
    st.builds(
        lambda command, body: _dumps({"id": "f", command: body}),
        st.sampled_from(["pause", "resume", "reconnect"]),
        st.fixed_dictionaries(
            {}, optional={"sessions": _json, "all": _json, "reason": _json, "zz": _json}
        ),
    ),
    _json.map(_dumps),
    _json.map(lambda v: _raw_utf8(json.dumps(v, ensure_ascii=False))),
    st.binary(max_size=200),
    st.integers(1, 3).map(lambda n: b"[" * (n * 5000)),
    st.integers(-2, 2).map(lambda n: b"7" * (MAX_LINE + n)),
)
control_inputs = st.tuples(
    st.lists(_control_request, min_size=1, max_size=4),
    st.sampled_from([b"\n", b"\r\n", b"\n\n"]),
    st.booleans(),  # a last line without its newline
)


def _frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


_subscribe = st.builds(
    lambda names, all_: ConsumerRequest(subscribe=Subscribe(sessions=names, all=all_)),
    st.lists(st.sampled_from(["a", "nope", "", "\x00", "ü" * 40]), max_size=3),
    st.booleans(),
).map(lambda request: request.SerializeToString())
_unix_part = st.one_of(
    _subscribe.map(_frame),
    st.binary(max_size=100).map(_frame),  # a body that is not a ConsumerRequest
    st.tuples(st.integers(0, 2**32 - 1), st.binary(max_size=50)).map(  # a lying prefix
        lambda p: struct.pack(">I", p[0]) + p[1]
    ),
    st.just(_frame(b"x" * (REQUEST_MAX + 1))),
    st.binary(min_size=1, max_size=7),  # half a length prefix, or a little more
)
unix_inputs = st.lists(_unix_part, min_size=1, max_size=4).map(b"".join)

_UPGRADE = (
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def _mutate(data: bytes, cuts: list[tuple[int, bytes]]) -> bytes:
    for where, junk in cuts:
        at = where % (len(data) + 1)
        data = data[:at] + junk + data[at + len(junk) :]
    return data


http_inputs = st.one_of(
    st.binary(max_size=300),
    st.lists(st.tuples(st.integers(0, 400), st.binary(min_size=1, max_size=8)), max_size=4).map(
        lambda cuts: _mutate(_UPGRADE, cuts)
    ),
    st.binary(max_size=100).map(lambda junk: _UPGRADE[:-2] + junk + b"\r\n\r\n"),
    st.integers(1, 3).map(lambda n: b"GET / HTTP/1.1\r\nX: " + b"y" * (n * 30000)),
)


def ws_frame(opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0) -> bytes:
    """One client frame (masked, as a client must), with any opcode and reserved bits."""
    head = bytes([(0x80 if fin else 0) | (rsv & 7) << 4 | opcode & 0x0F])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack(">H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack(">Q", n)
    mask = b"\x01\x02\x03\x04"
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


_ws_message = st.one_of(
    _json.map(_dumps),
    _json.map(lambda v: _raw_utf8(json.dumps(v, ensure_ascii=False))),  # maybe not UTF-8
    st.just(b'{"subscribe":{"sessions":["a"]}}'),
    st.just(b"x" * (70 * 1024)),  # over the endpoint's message limit
)
_ws_part = st.one_of(
    _ws_message.map(lambda m: ws_frame(1, m)),
    _ws_message.map(lambda m: ws_frame(2, m)),
    st.tuples(st.integers(0, 15), st.binary(max_size=140), st.booleans(), st.integers(0, 7)).map(
        lambda f: ws_frame(f[0], f[1], fin=f[2], rsv=f[3])
    ),
    st.tuples(st.integers(0, 5000), st.binary(max_size=10)).map(  # close codes, good and bad
        lambda c: ws_frame(8, struct.pack(">H", c[0]) + c[1])
    ),
    st.binary(min_size=1, max_size=60),  # not a frame at all (unmasked, truncated...)
)
ws_inputs = st.lists(_ws_part, min_size=1, max_size=5).map(b"".join)


# --------------------------------------------------------------------------- clients


async def read_all(stream: trio.abc.ReceiveStream) -> bytes:
    """Everything until the daemon closes the connection (a reset counts as the end)."""
    out = b""
    with contextlib.suppress(trio.BrokenResourceError):
        while data := await stream.receive_some(1 << 20):
            out += data
    return out


async def send_then_eof(stream: trio.SocketStream, data: bytes) -> None:
    """Write ``data`` and half-close; the daemon may hang up first (it may refuse early)."""
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await stream.send_all(data)
        await stream.send_eof()


async def control_status(r: Running) -> None:
    response = await r.call(STATUS)
    assert response["ok"], response


async def unix_subscribed(path: str) -> None:
    stream = await trio.open_unix_socket(path)
    async with stream:
        request = ConsumerRequest(subscribe=Subscribe(sessions=["a"]))
        await stream.send_all(encode_request(request))
        decoder = ConsumerFrameDecoder()
        while not (frames := decoder.messages()):
            data = await stream.receive_some(65536)
            if not data:
                raise EOFError("the daemon closed the connection")
            decoder.feed(data)
        assert frames[0].WhichOneof("frame") == "subscribed", frames[0]


async def websocket_subscribed(port: int) -> None:
    async with trio_websocket.open_websocket_url(f"ws://127.0.0.1:{port}/") as ws:
        try:
            await ws.send_message('{"subscribe":{"sessions":["a"]}}')
            reply = json.loads(await ws.get_message())
        except trio_websocket.ConnectionClosed:
            # trio-websocket 0.12's client leaks its socket when the server closed first.
            await trio.aclose_forcefully(ws._stream)
            raise
        assert reply == {"type": "subscribed", "sessions": ["a"]}


async def upgraded(port: int) -> trio.SocketStream:
    """A TCP connection to the WebSocket endpoint, past a good HTTP upgrade."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(_UPGRADE)
    reply = b""
    while b"\r\n\r\n" not in reply:
        data = await stream.receive_some(4096)
        assert data, reply
        reply += data
    assert reply.startswith(b"HTTP/1.1 101 "), reply
    return stream


def server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """(opcode, payload) of the daemon's (unmasked) frames; a cut-off last one is left out."""
    out = []
    while len(data) >= 2:
        opcode, n = data[0] & 0x0F, data[1] & 0x7F
        at = 2
        if n == 126:
            (n,), at = struct.unpack_from(">H", data, 2), 4
        elif n == 127:
            (n,), at = struct.unpack_from(">Q", data, 2), 10
        if len(data) < at + n:
            break
        out.append((opcode, data[at : at + n]))
        data = data[at + n :]
    return out


@contextlib.asynccontextmanager
async def endpoints(tmp_path: Path) -> AsyncIterator[tuple[Running, int]]:
    """The daemon with a session ``a``, every endpoint on; its WebSocket port."""
    port = free_port()
    keys = {"consumer_websocket_listen": f"127.0.0.1:{port}"}
    async with running_daemon(tmp_path, ["a"], daemon_keys=keys) as r:
        hub = r.daemon.consumers
        assert hub is not None
        hub.handshake_timeout = 0.5  # a half-done upgrade holds its socket this long
        with trio.fail_after(10):
            await control_status(r)
            await unix_subscribed(str(r.directory / "consumers.sock"))
            await websocket_subscribed(port)
        yield r, port


# --------------------------------------------------------------------------- the crashes


async def test_a_bad_request_then_an_oversized_message_ends_only_that_websocket(
    tmp_path: Path,
) -> None:
    """Issue 9: after a request that does not parse the daemon sends Error and a close
    (LOCAL_CLOSING); a 70 KiB message then made trio-websocket's reader task send a 1009
    close, which wsproto refuses in that state: LocalProtocolError ended the endpoint
    and the daemon (exit 1). Now it ends that connection only."""
    async with endpoints(tmp_path) as (r, port):
        hub = r.daemon.consumers
        assert hub is not None
        with trio.fail_after(10), structlog.testing.capture_logs() as logs:
            stream = await upgraded(port)
            async with stream:
                await stream.send_all(ws_frame(1, b"this is not a request"))
                seen = b""
                while 8 not in [opcode for opcode, _ in server_frames(seen)]:
                    data = await stream.receive_some(65536)
                    assert data, server_frames(seen)
                    seen += data
                (error,) = [p for opcode, p in server_frames(seen) if opcode == 1]
                assert json.loads(error)["type"] == "error"
                with contextlib.suppress(trio.BrokenResourceError):
                    await stream.send_all(ws_frame(1, b"x" * (70 * 1024)))
                await read_all(stream)
            await websocket_subscribed(port)  # the endpoint still serves
            await unix_subscribed(str(r.directory / "consumers.sock"))
            await control_status(r)
        (failure,) = [e for e in logs if e["event"] == "consumer_peer_error"]
        assert failure["reason"].startswith("LocalProtocolError: Event CloseConnection(code=1009")
        assert failure["endpoint"] == "websocket"
        assert hub.stats.disconnects["protocol_error"] == 1  # how it ended: the bad request


async def test_a_connection_that_raises_is_counted_and_ends_alone(tmp_path: Path) -> None:
    """A bug met by one consumer's connection (here: acting on its request) ends it
    alone: a warning with the reason, ``internal_error`` in the counters, the socket
    closed; the next consumer is served."""
    async with endpoints(tmp_path) as (r, port):
        hub = r.daemon.consumers
        assert hub is not None
        path = str(r.directory / "consumers.sock")
        with trio.fail_after(10), structlog.testing.capture_logs() as logs:
            clients: list[tuple[str, Callable[[], Awaitable[None]]]] = [
                ("unix", functools.partial(unix_subscribed, path)),
                ("websocket", functools.partial(websocket_subscribed, port)),
            ]
            for endpoint, connect in clients:
                hub.request = lambda *_: 1 / 0  # type: ignore[assignment,method-assign]
                with pytest.raises((EOFError, trio_websocket.ConnectionClosed)):
                    await connect()
                del hub.request  # the method again
                await wait_until(lambda: hub.stats.consumers_connected == 0, "disconnected")
                await connect()
                failure = [e for e in logs if e["event"] == "consumer_peer_error"][-1]
                assert failure["endpoint"] == endpoint
                assert failure["reason"] == "ZeroDivisionError: division by zero"
        assert hub.stats.disconnects["internal_error"] == 2


# --------------------------------------------------------------------------- fuzzing


async def test_fuzz_the_control_socket(tmp_path: Path) -> None:
    async with endpoints(tmp_path) as (r, port):

        async def example(value: tuple[list[bytes], bytes, bool]) -> None:
            lines, newline, cut = value
            data = newline.join(lines) + (b"" if cut else newline)
            stream = await trio.open_unix_socket(str(r.socket))
            async with stream:
                await send_then_eof(stream, data)
                replies = (await read_all(stream)).splitlines()
            expected = 0
            for line in data.split(b"\n"):
                if len(line.rstrip(b"\r")) > MAX_LINE:
                    expected += 1  # an error, then the daemon hangs up
                    break
                expected += bool(line.strip())
            assert len(replies) == expected, (replies, data[:200])
            for reply in map(json.loads, replies):
                assert reply["ok"] or (reply["error"] and reply["code"] in (64, 65, 78)), reply
            await control_status(r)

        await fuzz(r, port, example, control_inputs)


async def test_fuzz_the_consumer_socket(tmp_path: Path) -> None:
    async with endpoints(tmp_path) as (r, port):
        path = str(r.directory / "consumers.sock")

        async def example(data: bytes) -> None:
            stream = await trio.open_unix_socket(path)
            async with stream:
                await send_then_eof(stream, data)
                decoder = ConsumerFrameDecoder()
                decoder.feed(await read_all(stream))
                decoder.end_of_stream()
                kinds = [frame.WhichOneof("frame") for frame in decoder.messages()]
            assert "error" not in kinds[:-1], kinds  # an Error is the last frame
            await unix_subscribed(path)

        await fuzz(r, port, example, unix_inputs)


async def test_fuzz_the_websocket_upgrade(tmp_path: Path) -> None:
    async with endpoints(tmp_path) as (r, port):

        async def example(data: bytes) -> None:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await send_then_eof(stream, data)
                with trio.move_on_after(0.05):  # a refusal, or nothing until the timeout
                    await read_all(stream)
            await websocket_subscribed(port)

        await fuzz(r, port, example, http_inputs)


async def test_fuzz_websocket_frames_after_a_good_upgrade(tmp_path: Path) -> None:
    async with endpoints(tmp_path) as (r, port):

        async def example(data: bytes) -> None:
            stream = await upgraded(port)
            async with stream:
                await send_then_eof(stream, data)
                frames = server_frames(await read_all(stream))
            for opcode, payload in frames:
                if opcode == 1:
                    assert json.loads(payload)["type"] in FRAME_TYPES
            await websocket_subscribed(port)

        await fuzz(r, port, example, ws_inputs)
