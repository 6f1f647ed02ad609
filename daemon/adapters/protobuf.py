"""The adapter for length-prefixed protobuf venues (``tcp://host:port``, ``tls://host:port``).

A thin Trio shell around :class:`protocol.venue_codec.VenueDecoder`: no background task,
the caller's task does every read. The handshake (application auth, account auth,
subscribe) reads fully parsed messages; :meth:`ProtobufLink.receive_batch` is the relay
hot path: one ``receive_some`` of up to 64 KiB, every complete frame in it checked by the
codec's relay path (:meth:`~protocol.venue_codec.VenueDecoder.relay`), and one
:class:`~daemon.adapters.base.Batch` carrying the serialized envelopes exactly as the
venue sent them.

Every failure leaves as AdapterError with a human reason; secret values are redacted from
reasons and the credentials are never part of one.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from contextlib import suppress
from typing import Final

import trio

from daemon.adapters.base import (
    AdapterError,
    AuthRejected,
    Batch,
    ConnectionLost,
    StreamOpener,
)
from daemon.adapters.net import (
    Redactor,
    default_opener,
    describe_transport_error,
    open_transport,
    parse_endpoint,
)
from daemon.config import ProtobufCredentials, redact_url
from protocol.errors import FrameTooLarge, RemoteProtocolError
from protocol.framing import DEFAULT_MAX_FRAME
from protocol.kinds import MessageKind
from protocol.venue_codec import (
    HEARTBEAT_FRAME,
    RawEnvelope,
    Role,
    VenueDecoder,
    decode_message,
    describe_error,
    encode,
)
from protocol.venue_pb2 import (
    ACCOUNT_AUTH_REQ,
    ACCOUNT_AUTH_RES,
    APPLICATION_AUTH_REQ,
    APPLICATION_AUTH_RES,
    ERROR_RES,
    SUBSCRIBE_REQ,
    SUBSCRIBE_RES,
    AccountAuthReq,
    ApplicationAuthReq,
    ErrorRes,
    SubscribeReq,
)

__all__ = ["RECEIVE_SIZE", "ProtobufAdapter", "ProtobufLink"]

#: Bytes asked of the transport per read: large enough to carry a thousand small quotes,
#: small enough to stay below glibc's mmap threshold (a fresh 64 KiB buffer per read is
#: a cheap malloc; 256 KiB would be an mmap/munmap pair).
RECEIVE_SIZE: Final = 65536
#: The client_msg_id of our SubscribeReq: an ErrorRes echoing it refuses the subscription.
SUBSCRIBE_ID: Final = "wirekeep-subscribe"


class ProtobufAdapter:
    """Connects to a protobuf venue; one instance serves every attempt of a session.

    ``credentials`` (None: no authentication), ``symbols`` (empty: no SubscribeReq),
    ``wait_subscribed``: whether :meth:`ProtobufLink.subscribe` waits for the
    SubscribeRes. ``opener`` replaces TCP (tests); ``ssl_context`` replaces the default
    context for tls:// (``ssl.create_default_context()``, the host name checked).
    """

    def __init__(
        self,
        *,
        credentials: ProtobufCredentials | None = None,
        symbols: Sequence[str] = (),
        max_frame: int = DEFAULT_MAX_FRAME,
        opener: StreamOpener | None = None,
        ssl_context: ssl.SSLContext | None = None,
        wait_subscribed: bool = True,
        redactor: Redactor | None = None,
        receive_size: int = RECEIVE_SIZE,
    ) -> None:
        self._credentials = credentials
        self._symbols = tuple(symbols)
        self._max_frame = max_frame
        self._opener = opener or default_opener
        self._ssl_context = ssl_context
        self._wait_subscribed = wait_subscribed
        self._redact = redactor or Redactor(
            () if credentials is None else (credentials.client_secret, credentials.access_token)
        )
        self._receive_size = receive_size

    def _tls_context(self) -> ssl.SSLContext:
        # Built once: loading the system CA store takes milliseconds.
        if self._ssl_context is None:
            self._ssl_context = ssl.create_default_context()
        return self._ssl_context

    def __repr__(self) -> str:
        return f"ProtobufAdapter(symbols={self._symbols!r}, max_frame={self._max_frame})"

    async def connect(self, nursery: trio.Nursery, url: str) -> ProtobufLink:
        """Open TCP (and TLS for tls://). No background task: ``nursery`` is not used."""
        try:
            endpoint = parse_endpoint(url, ("tcp", "tls"))
            tls = self._tls_context() if endpoint.tls else None
            stream = await open_transport(self._opener, endpoint, tls)
        except AdapterError as exc:
            raise type(exc)(self._redact(exc.reason)) from None
        return ProtobufLink(
            stream,
            endpoint=self._redact(redact_url(url)),
            credentials=self._credentials,
            symbols=self._symbols,
            max_frame=self._max_frame,
            wait_subscribed=self._wait_subscribed,
            redactor=self._redact,
            receive_size=self._receive_size,
        )


class ProtobufLink:
    """One established protobuf connection (the :class:`~daemon.adapters.base.Connection`).

    One task reads (authenticate, subscribe, receive_batch are not concurrent with each
    other); writes (subscribe, heartbeat) may come from any task and are serialized.
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        endpoint: str,
        credentials: ProtobufCredentials | None,
        symbols: tuple[str, ...],
        max_frame: int,
        wait_subscribed: bool,
        redactor: Redactor,
        receive_size: int,
    ) -> None:
        self._stream = stream
        self._endpoint = endpoint
        self._credentials = credentials
        self._symbols = symbols
        self._wait_subscribed = wait_subscribed
        self._redact = redactor
        self._receive_size = receive_size
        self._decoder = VenueDecoder(Role.CLIENT, max_frame)
        self._send_lock = trio.Lock()
        # Messages that arrived while the handshake waited for a reply, for the next batch.
        self._pending = Batch([], False)

    @property
    def endpoint(self) -> str:
        """The URL of this connection, with secret-looking query values redacted."""
        return self._endpoint

    def __repr__(self) -> str:
        return f"ProtobufLink({self._endpoint})"

    # ----------------------------------------------------------------- handshake

    async def authenticate(self) -> None:
        """ApplicationAuthReq -> ApplicationAuthRes, then AccountAuthReq -> AccountAuthRes.

        An ErrorRes is AuthRejected with the venue's description; the venue closing the
        connection is AuthRejected too. Heartbeats and data that arrive meanwhile are kept
        for the next :meth:`receive_batch`.
        """
        credentials = self._credentials
        if credentials is None:
            return
        request = ApplicationAuthReq(
            client_id=credentials.client_id, client_secret=credentials.client_secret
        )
        await self._send(encode(APPLICATION_AUTH_REQ, request))
        await self._await_reply(APPLICATION_AUTH_RES, "ApplicationAuthReq", auth=True)
        account = AccountAuthReq(
            account_id=credentials.account_id, access_token=credentials.access_token
        )
        await self._send(encode(ACCOUNT_AUTH_REQ, account))
        await self._await_reply(ACCOUNT_AUTH_RES, "AccountAuthReq", auth=True)

    async def subscribe(self) -> None:
        """Send SubscribeReq with the configured symbols; wait for SubscribeRes if asked.

        Data that arrives before the SubscribeRes is kept for the next receive_batch. An
        ErrorRes echoing our request id is ConnectionLost("subscription refused: ...").
        """
        if not self._symbols:
            return
        request = SubscribeReq(symbols=self._symbols)
        await self._send(encode(SUBSCRIBE_REQ, request, SUBSCRIBE_ID))
        if self._wait_subscribed:
            await self._await_reply(SUBSCRIBE_RES, "SubscribeReq", auth=False)

    async def _await_reply(self, expected: int, request: str, *, auth: bool) -> None:
        while True:
            envelopes = await self._read_envelopes(auth=auth)
            for index, (_, payload_type, frame) in enumerate(envelopes):
                if payload_type == expected:
                    self._keep(envelopes[index + 1 :])
                    return
                if payload_type == ERROR_RES:
                    self._refusal(frame, request, auth=auth)
                self._keep([envelopes[index]])

    def _refusal(self, frame: bytes, request: str, *, auth: bool) -> None:
        """Raise if the ErrorRes in ``frame`` answers our request; return if it does not."""
        try:
            message = decode_message(frame)
        except RemoteProtocolError as exc:
            raise self._protocol_error(exc) from None
        assert isinstance(message.message, ErrorRes)
        reason = describe_error(message.message)
        if auth:
            raise AuthRejected(self._redact(f"auth rejected: {reason}"))
        if message.client_msg_id == SUBSCRIBE_ID:
            raise ConnectionLost(self._redact(f"{request} refused: {reason}"))

    def _keep(self, envelopes: Sequence[RawEnvelope]) -> None:
        pending = self._pending
        for kind, _, frame in envelopes:
            if kind is MessageKind.HEARTBEAT:
                pending.heartbeats += 1
                continue
            if kind is MessageKind.ERROR:
                try:
                    pending.errors.append(_error_text(frame))
                except RemoteProtocolError as exc:
                    raise self._protocol_error(exc) from None
            pending.messages.append(frame)

    async def _read_envelopes(self, *, auth: bool) -> list[RawEnvelope]:
        """At least one envelope (the handshake's slow path)."""
        decoder = self._decoder
        while True:
            if decoder.error is not None:
                raise self._protocol_error(decoder.error)
            data = await self._receive()
            if not data:
                raise self._end_of_stream(auth=auth)
            # After bad bytes, the frames before them come first; the error on the next call.
            with suppress(RemoteProtocolError):
                decoder.feed(data)
            try:
                envelopes = decoder.envelopes()
            except RemoteProtocolError as exc:
                raise self._protocol_error(exc) from None
            if envelopes:
                return envelopes

    # ----------------------------------------------------------------- streaming

    async def receive_batch(self) -> Batch:
        """Every message of the next chunk the venue sent (at least one).

        Raises ConnectionLost when the venue closes the connection, the transport breaks,
        or the bytes break the protocol (messages decoded before the bad bytes are
        returned first; the next call raises).
        """
        if self._pending:
            batch, self._pending = self._pending, Batch([], False)
            return batch
        decoder = self._decoder
        receive_some = self._stream.receive_some
        size = self._receive_size
        while True:
            if decoder.error is not None:
                raise self._protocol_error(decoder.error)
            try:
                data = await receive_some(size)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise ConnectionLost(self._redact(describe_transport_error(exc))) from None
            if not data:
                raise self._end_of_stream(auth=False)
            with suppress(RemoteProtocolError):  # as in _read_envelopes
                decoder.feed(data)
            try:
                frames, heartbeats, errors = decoder.relay()
            except RemoteProtocolError as exc:
                raise self._protocol_error(exc) from None
            if frames or heartbeats:
                return Batch(frames, False, heartbeats, [describe_error(e) for e in errors])

    async def heartbeat(self) -> None:
        """Send a HeartbeatEvent (the venue only needs to see traffic; no reply awaited)."""
        await self._send(HEARTBEAT_FRAME)

    async def aclose(self) -> None:
        """Close the stream at once (a TLS close_notify is not waited for)."""
        await trio.aclose_forcefully(self._stream)

    # ----------------------------------------------------------------- transport

    async def _receive(self) -> bytes | bytearray:
        try:
            return await self._stream.receive_some(self._receive_size)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ConnectionLost(self._redact(describe_transport_error(exc))) from None

    async def _send(self, data: bytes) -> None:
        # ``async with lock`` yields to the scheduler even when the lock is free: one
        # extra task switch per heartbeat, 10,000 sessions over. send_all checkpoints.
        lock = self._send_lock
        try:
            lock.acquire_nowait()
        except trio.WouldBlock:
            await lock.acquire()
        try:
            await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ConnectionLost(self._redact(describe_transport_error(exc))) from None
        finally:
            lock.release()

    def _end_of_stream(self, *, auth: bool) -> AdapterError:
        try:
            self._decoder.end_of_stream()
        except RemoteProtocolError as exc:
            return ConnectionLost(self._redact(f"venue closed the connection: {exc}"))
        if auth:
            return AuthRejected("venue closed the connection during authentication")
        return ConnectionLost("venue closed the connection")

    def _protocol_error(self, exc: RemoteProtocolError) -> ConnectionLost:
        if isinstance(exc, FrameTooLarge):
            return ConnectionLost(str(exc))
        return ConnectionLost(self._redact(f"garbage from venue: {exc}"))


def _error_text(frame: bytes) -> str:
    message = decode_message(frame).message
    return describe_error(message) if isinstance(message, ErrorRes) else "venue error"
