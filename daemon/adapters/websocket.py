"""The adapter for JSON-over-WebSocket venues (``ws://`` and ``wss://``), on trio-websocket.

trio-websocket runs one reader task per connection that parses frames (wsproto) and puts
each complete message into a bounded memory channel; ``get_message()`` takes one. Around
it this module adds what a long-lived venue session needs and the library leaves out:

- **Opening.** The transport comes from a :data:`~daemon.adapters.base.StreamOpener`
  (TCP with keepalive in production, memory streams in tests); TLS is handshaken
  explicitly (a certificate problem is a ConnectFailed that says so), then the stream is
  handed to ``trio_websocket.wrap_client_stream``. ``connect_websocket_url`` is not used:
  it gives no access to the socket before the handshake, and a TLS failure inside it
  leaves the caller waiting for a handshake that never comes.
- **Containment.** The reader task runs in the caller's nursery, but under a guard
  (:class:`_ReaderGuard`): trio-websocket raises an HTTP rejection (503, 429) *from the
  reader task*, which would otherwise cancel the caller's whole nursery; and when the
  venue drops the connection before answering the upgrade, the library's handshake wait
  never ends. The guard records the reader's error and ends the handshake wait when the
  reader ends, so both become a ConnectFailed with the reason.
- **Reasons.** A thin stream wrapper (:class:`_ObservedStream`) remembers why the
  transport ended (reset, EOF) and whether the library answered a close frame, which the
  library's close code 1006 / 1002 alone cannot tell apart.
- **Batches.** :meth:`WebSocketLink.receive_batch` awaits one message, then takes every
  message already queued (of the same type, text or binary) without waiting, through
  ``receive_nowait()`` on the library's message channel. That channel is a private
  attribute (``_recv_channel``, a ``trio.MemoryReceiveChannel``); it is the only way to
  drain the queue: the public ``get_message()`` is a checkpoint per message and, inside
  an already-cancelled scope (``move_on_after(0)``), raises Cancelled before looking at
  the queue. When the attribute is missing (a future trio-websocket), batches hold one
  message each: still correct, only slower.
"""

from __future__ import annotations

import http
import ssl
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from typing import Any, Final, cast

import trio
import trio_websocket

from daemon.adapters.base import (
    AdapterError,
    AuthRejected,
    Batch,
    ConnectFailed,
    ConnectionLost,
    StreamOpener,
)
from daemon.adapters.net import (
    Endpoint,
    Redactor,
    default_opener,
    describe_transport_error,
    open_transport,
    parse_endpoint,
)
from daemon.config import redact_url
from protocol.framing import DEFAULT_MAX_FRAME
from protocol.kinds import MessageKind
from protocol.ws_codec import check_auth_reply, classify

__all__ = [
    "CLOSE_TIMEOUT",
    "QUEUE_SIZE",
    "RECEIVE_SIZE",
    "WebSocketAdapter",
    "WebSocketLink",
]

#: Messages trio-websocket may hold decoded before we take them; the most one batch holds.
#: Memory held at worst: QUEUE_SIZE messages of up to max_frame characters each.
QUEUE_SIZE: Final = 16
#: Bytes per read of the library's reader task (its own default is 4 KiB).
RECEIVE_SIZE: Final = 65536
#: How long aclose() waits for the venue to answer our close frame.
CLOSE_TIMEOUT: Final = 1.0

_ABNORMAL_CLOSURE: Final = 1006
_MESSAGE_TOO_BIG: Final = 1009
# First byte of a close frame: FIN bit + opcode 0x8 (RFC 6455, section 5.2). trio-websocket
# writes each frame it sends with one send_all, so this byte starts the call.
_CLOSE_FRAME_START: Final = b"\x88"
_ERROR: Final = MessageKind.ERROR
_HEARTBEAT: Final = MessageKind.HEARTBEAT


class WebSocketAdapter:
    """Connects to a JSON-over-WebSocket venue; one instance serves every attempt.

    ``auth_message``: the rendered auth message (secrets filled in), or None for no
    authentication; ``auth_expect``: the keys its reply must contain
    (:func:`protocol.ws_codec.check_auth_reply`); ``subscribe``: messages sent by
    :meth:`WebSocketLink.subscribe`. ``max_frame`` caps a message (trio-websocket counts
    ``len()``: characters for text). A pong must come within ``pong_timeout`` (default
    ``heartbeat_interval``). ``opener`` replaces TCP (tests); ``ssl_context`` replaces
    ``ssl.create_default_context()`` for wss://. ``redactor`` removes secret values from
    the reasons raised (:func:`daemon.adapters.net.adapter_for` passes the session's).
    """

    def __init__(
        self,
        *,
        auth_message: str | None = None,
        auth_expect: Mapping[str, object] | None = None,
        subscribe: Sequence[str] = (),
        max_frame: int = DEFAULT_MAX_FRAME,
        heartbeat_interval: float = 10.0,
        pong_timeout: float | None = None,
        opener: StreamOpener | None = None,
        ssl_context: ssl.SSLContext | None = None,
        queue_size: int = QUEUE_SIZE,
        close_timeout: float = CLOSE_TIMEOUT,
        redactor: Redactor | None = None,
    ) -> None:
        self._auth_message = auth_message
        self._auth_expect: Mapping[str, object] = dict(auth_expect or {})
        self._subscribe = tuple(subscribe)
        self._max_frame = max_frame
        self._pong_timeout = float(heartbeat_interval if pong_timeout is None else pong_timeout)
        self._opener = opener or default_opener
        self._ssl_context = ssl_context
        self._queue_size = queue_size
        self._close_timeout = close_timeout
        self._redact = redactor or Redactor()

    def _tls_context(self) -> ssl.SSLContext:
        # Built once: loading the system CA store takes milliseconds.
        if self._ssl_context is None:
            self._ssl_context = ssl.create_default_context()
        return self._ssl_context

    def __repr__(self) -> str:
        auth = "with auth" if self._auth_message is not None else "no auth"
        return f"WebSocketAdapter({auth}, {len(self._subscribe)} subscribe messages)"

    async def connect(self, nursery: trio.Nursery, url: str) -> WebSocketLink:
        """Transport, TLS, HTTP upgrade. The library's reader task goes in ``nursery``.

        Raises ConnectFailed: refused, unresolvable, TLS, HTTP rejection (503, 429, ...),
        or the venue dropping the connection during the upgrade.
        """
        try:
            endpoint = parse_endpoint(url, ("ws", "wss"))
            tls = self._tls_context() if endpoint.tls else None
            transport = await open_transport(self._opener, endpoint, tls)
        except AdapterError as exc:
            raise type(exc)(self._redact(exc.reason)) from None
        stream = _ObservedStream(transport)
        reader = _ReaderGuard(nursery)
        ws: trio_websocket.WebSocketConnection | None = None
        try:
            with trio.CancelScope() as handshake:
                reader.on_exit = handshake.cancel
                ws = await trio_websocket.wrap_client_stream(
                    # The library only calls start_soon() on its nursery argument, and
                    # only uses the stream through the trio.abc.Stream methods.
                    cast("trio.Nursery", reader),
                    cast("trio.SocketStream", stream),
                    endpoint.host_header,
                    endpoint.resource,
                    message_queue_size=self._queue_size,
                    max_message_size=self._max_frame,
                    receive_buffer_size=RECEIVE_SIZE,
                )
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        if ws is None:
            await trio.aclose_forcefully(stream)
            raise ConnectFailed(self._redact(_handshake_failure(reader.error, stream, endpoint)))
        return WebSocketLink(
            ws,
            stream,
            reader,
            endpoint=self._redact(redact_url(url)),
            auth_message=self._auth_message,
            auth_expect=self._auth_expect,
            subscribe=self._subscribe,
            max_frame=self._max_frame,
            pong_timeout=self._pong_timeout,
            close_timeout=self._close_timeout,
            redactor=self._redact,
        )


class WebSocketLink:
    """One established WebSocket connection (the :class:`~daemon.adapters.base.Connection`).

    One task reads (authenticate, subscribe, receive_batch); heartbeat() may run in
    another. trio-websocket serializes the writes.
    """

    def __init__(
        self,
        ws: trio_websocket.WebSocketConnection,
        stream: _ObservedStream,
        reader: _ReaderGuard,
        *,
        endpoint: str,
        auth_message: str | None,
        auth_expect: Mapping[str, object],
        subscribe: tuple[str, ...],
        max_frame: int,
        pong_timeout: float,
        close_timeout: float,
        redactor: Redactor,
    ) -> None:
        self._ws = ws
        self._stream = stream
        self._reader = reader
        self._endpoint = endpoint
        self._auth_message = auth_message
        self._auth_expect = auth_expect
        self._subscribe = subscribe
        self._max_frame = max_frame
        self._pong_timeout = pong_timeout
        self._close_timeout = close_timeout
        self._redact = redactor
        self._pending = Batch([], True)
        self._held: str | bytes | None = None  # a message of the other type than its batch
        self._pings = 0
        self._closing = False  # aclose() was called
        self._failed = False  # a ConnectionLost was raised: aclose() does not linger
        channel = getattr(ws, "_recv_channel", None)
        self._receive_nowait: Callable[[], str | bytes] | None = (
            channel.receive_nowait if isinstance(channel, trio.MemoryReceiveChannel) else None
        )

    @property
    def endpoint(self) -> str:
        """The URL of this connection, with secret-looking query values redacted."""
        return self._endpoint

    def __repr__(self) -> str:
        return f"WebSocketLink({self._endpoint})"

    # ----------------------------------------------------------------- handshake

    async def authenticate(self) -> None:
        """Send the auth message and judge the first reply that is not a heartbeat.

        Rejected (AuthRejected): a reply that does not match ``auth_expect`` (the venue's
        error text is the reason), or the venue closing the connection instead of
        replying. Returns at once when no auth message is configured.
        """
        if self._auth_message is None:
            return
        await self._send(self._auth_message, auth=True)
        while True:
            message = await self._get(auth=True)
            if isinstance(message, str):
                text = message
                if classify(text) is _HEARTBEAT:
                    self._pending.heartbeats += 1
                    continue
            else:
                text = message.decode("utf-8", "replace")
            verdict = check_auth_reply(text, self._auth_expect)
            if verdict.accepted:
                return
            raise AuthRejected(self._redact(f"auth rejected: {verdict.reason}"))

    async def subscribe(self) -> None:
        """Send each configured subscribe message (replies arrive as ordinary messages)."""
        for message in self._subscribe:
            await self._send(message, auth=False)

    # ----------------------------------------------------------------- streaming

    async def receive_batch(self) -> Batch:
        """Wait for one message, then take every message of the same type already decoded.

        Text messages are classified (:func:`protocol.ws_codec.classify`): heartbeats are
        counted, data and errors carried as UTF-8. A binary message ends a text batch (and
        the other way round); it opens the next one.
        """
        if self._pending:
            batch, self._pending = self._pending, Batch([], True)
            return batch
        if self._held is not None:
            message, self._held = self._held, None
        else:
            try:
                message = await self._ws.get_message()
            except trio_websocket.ConnectionClosed:
                raise self._lost() from None
        text = isinstance(message, str)
        batch = Batch([], text)
        _add(batch, message)
        receive_nowait = self._receive_nowait
        if receive_nowait is not None:
            while True:
                try:
                    message = receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                    break
                if isinstance(message, str) is not text:
                    self._held = message
                    break
                _add(batch, message)
        return batch

    async def heartbeat(self) -> None:
        """A WebSocket ping; returns when its pong arrives.

        ConnectionLost("no pong within X s") when it does not arrive within the pong
        timeout (the caller may also put its own deadline around this call).
        """
        self._pings += 1
        payload = self._pings.to_bytes(8, "big")
        with trio.move_on_after(self._pong_timeout) as waited:
            try:
                await self._ws.ping(payload)
            except trio_websocket.ConnectionClosed:
                raise self._lost() from None
        if waited.cancelled_caught:
            self._failed = True
            raise ConnectionLost(f"no pong within {self._pong_timeout} s")

    async def aclose(self) -> None:
        """Send a close frame and wait briefly for the venue's answer, then drop the stream.

        After a failure (missed pong, garbage, ...) the stream is dropped at once.
        """
        self._closing = True
        try:
            if not self._failed:
                # Best effort by contract: whatever goes wrong here, the link is going.
                with trio.move_on_after(self._close_timeout), suppress(Exception):
                    await self._ws.aclose()
        finally:
            await trio.aclose_forcefully(self._stream)

    # ----------------------------------------------------------------- internals

    async def _send(self, message: str, *, auth: bool) -> None:
        try:
            await self._ws.send_message(message)
        except trio_websocket.ConnectionClosed:
            raise self._lost(auth=auth) from None

    async def _get(self, *, auth: bool) -> str | bytes:
        try:
            return await self._ws.get_message()
        except trio_websocket.ConnectionClosed:
            raise self._lost(auth=auth) from None

    def _lost(self, *, auth: bool = False) -> AdapterError:
        """The exception for a closed connection, with the reason it closed.

        During authentication, the venue closing the connection (with a close frame, or
        a clean end of the stream) is its answer: AuthRejected.
        """
        reason, by_venue = self._close_reason()
        reason = self._redact(reason)
        if auth and by_venue:
            return AuthRejected(reason)
        self._failed = True
        return ConnectionLost(reason)

    def _close_reason(self) -> tuple[str, bool]:
        """(reason, whether the venue closed the connection deliberately)."""
        if self._closing:
            return "connection closed locally", False
        stream, error = self._stream, self._reader.error
        close = self._ws.closed
        code = close.code if close is not None else _ABNORMAL_CLOSURE
        if code == _ABNORMAL_CLOSURE:
            if stream.error is not None:
                return describe_transport_error(stream.error), False
            if error is not None:
                return f"WebSocket error: {_exception_text(error)}", False
            if stream.eof:
                return "venue closed the connection (no close frame)", True
            return "connection lost", False
        text = (close.reason if close is not None else None) or ""
        if code == _MESSAGE_TOO_BIG and text == _too_big_text(self._max_frame):
            return f"venue sent a message larger than the {self._max_frame}-byte limit", False
        if not stream.close_sent:
            # wsproto turned bytes it could not parse into a close event; nothing was
            # received from the venue as a close frame, and nothing was answered.
            return f"garbage from venue: {text or f'close code {code}'}", False
        if text:
            return f"venue closed the connection (code {code}: {text})", True
        return f"venue closed the connection (code {code})", True


def _too_big_text(limit: int) -> str:
    """The close reason trio-websocket uses when a message exceeds max_message_size."""
    return f"Exceeded maximum message size: {limit} bytes"


def _exception_text(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _handshake_failure(
    error: BaseException | None, stream: _ObservedStream, endpoint: Endpoint
) -> str:
    """Why the HTTP upgrade did not complete."""
    if isinstance(error, trio_websocket.ConnectionRejected):
        status = error.status_code
        try:
            phrase = " " + http.HTTPStatus(status).phrase
        except ValueError:
            phrase = ""
        retry = next((v for k, v in error.headers if k.lower() == b"retry-after"), None)
        suffix = f" (Retry-After: {retry.decode('latin-1')})" if retry else ""
        return f"handshake rejected: HTTP {status}{phrase}{suffix}"
    if error is not None:
        # An answer that is not a valid upgrade makes wsproto raise RemoteProtocolError
        # ("Bad HTTP message", "Bad accept token", "Missing header ..."); the library's
        # handling of it then fails inside h11, so it reaches us in the __context__ chain.
        cause = _wsproto_remote_error(error)
        if cause is not None:
            return (
                "handshake failed: the answer is not a WebSocket upgrade"
                f" ({_exception_text(cause)})"
            )
        return f"handshake failed: {_exception_text(error)}"
    if stream.error is not None:
        return f"{describe_transport_error(stream.error)} during the WebSocket handshake"
    return f"{endpoint.host_port} closed the connection during the WebSocket handshake"


def _wsproto_remote_error(error: BaseException) -> BaseException | None:
    """wsproto's RemoteProtocolError in the context chain of ``error``, if there is one.

    Matched by name and module: wsproto is trio-websocket's dependency, not ours.
    """
    seen: BaseException | None = error
    for _ in range(8):
        if seen is None:
            return None
        kind = type(seen)
        if kind.__name__ == "RemoteProtocolError" and kind.__module__.startswith("wsproto"):
            return seen
        seen = seen.__context__
    return None


class _ReaderGuard:
    """What trio-websocket gets as its nursery: runs the reader task in the real nursery,
    keeps the reader's exception (a rejected handshake is raised there) out of it, and
    calls ``on_exit`` when the reader ends."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self.error: BaseException | None = None
        self.on_exit: Callable[[], None] | None = None

    def start_soon(self, async_fn: Callable[..., Any], *args: object, name: object = None) -> None:
        self._nursery.start_soon(self._run, async_fn, args, name=name or "websocket-reader")

    async def _run(self, async_fn: Callable[..., Any], args: tuple[object, ...]) -> None:
        try:
            await async_fn(*args)
        except Exception as exc:  # noqa: BLE001 - kept as the reason, never raised into the nursery
            self.error = exc
        finally:
            if self.on_exit is not None:
                self.on_exit()


class _ObservedStream(trio.abc.Stream):
    """Passes everything through to ``transport`` and remembers how it ended."""

    def __init__(self, transport: trio.abc.Stream) -> None:
        self.transport = transport
        self.error: BaseException | None = None  # the first BrokenResourceError
        self.eof = False  # the venue ended the stream
        self.close_sent = False  # a WebSocket close frame was written

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if data[:1] == _CLOSE_FRAME_START:
            self.close_sent = True
        try:
            await self.transport.send_all(data)
        except trio.BrokenResourceError as exc:
            self.error = self.error or exc
            raise

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        try:
            data = await self.transport.receive_some(max_bytes)
        except trio.BrokenResourceError as exc:
            self.error = self.error or exc
            raise
        if not data:
            self.eof = True
        return data

    async def aclose(self) -> None:
        await self.transport.aclose()


def _add(batch: Batch, message: str | bytes) -> None:
    if isinstance(message, bytes):
        batch.messages.append(message)
        return
    kind = classify(message)
    if kind is _HEARTBEAT:
        batch.heartbeats += 1
        return
    if kind is _ERROR:
        batch.errors.append(message[:200])
    batch.messages.append(message.encode())
