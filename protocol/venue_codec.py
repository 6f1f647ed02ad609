"""Sans-IO codec for the length-prefixed protobuf venue protocol (venue.proto).

Each frame's payload is a serialized :class:`Envelope`: a payload type and the
inner message as bytes. Two ways to read a stream:

- :meth:`VenueDecoder.messages` parses the envelope *and* the inner message:
  for the handshake, and for the simulated venue reading requests.
- :meth:`VenueDecoder.envelopes` parses only the envelope and returns the frame
  payload untouched, with its :class:`MessageKind`: the relay fast path (the
  daemon forwards those bytes to consumers as they are and only needs to know
  whether they are data, a heartbeat or an error). Inner payloads are not
  validated there.

A decoder knows its role (as in h11): a client accepts what a venue may send,
a server what a client may send; anything else, an unknown payload type, or
bytes that do not parse raise :class:`RemoteProtocolError`, and the decoder
stays in that error state (fail-stop). Messages decoded before the bad frame
are still returned; the next call raises.
"""

from __future__ import annotations

import enum
import operator
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple, TypeAlias

from google.protobuf.message import DecodeError

from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.framing import DEFAULT_MAX_FRAME, FrameDecoder, encode_frame, encode_frames
from protocol.kinds import MessageKind
from protocol.venue_pb2 import (
    ACCOUNT_AUTH_REQ,
    ACCOUNT_AUTH_RES,
    APPLICATION_AUTH_REQ,
    APPLICATION_AUTH_RES,
    ERROR_RES,
    HEARTBEAT_EVENT,
    QUOTE_EVENT,
    SUBSCRIBE_REQ,
    SUBSCRIBE_RES,
    TICK_EVENT,
    AccountAuthReq,
    AccountAuthRes,
    ApplicationAuthReq,
    ApplicationAuthRes,
    Envelope,
    ErrorRes,
    HeartbeatEvent,
    PayloadType,
    QuoteEvent,
    SubscribeReq,
    SubscribeRes,
    TickEvent,
)

__all__ = [
    "FROM_CLIENT",
    "FROM_VENUE",
    "HEARTBEAT_FRAME",
    "PAYLOAD_CLASSES",
    "RawEnvelope",
    "RelayBatch",
    "Role",
    "VenueBody",
    "VenueDecoder",
    "VenueMessage",
    "decode_message",
    "describe_error",
    "encode",
    "encode_batch",
    "encode_error",
    "kind_of",
    "payload_type_name",
]

VenueBody: TypeAlias = (
    ApplicationAuthReq
    | ApplicationAuthRes
    | AccountAuthReq
    | AccountAuthRes
    | SubscribeReq
    | SubscribeRes
    | HeartbeatEvent
    | QuoteEvent
    | TickEvent
    | ErrorRes
)

PAYLOAD_CLASSES: dict[int, type[VenueBody]] = {
    APPLICATION_AUTH_REQ: ApplicationAuthReq,
    APPLICATION_AUTH_RES: ApplicationAuthRes,
    ACCOUNT_AUTH_REQ: AccountAuthReq,
    ACCOUNT_AUTH_RES: AccountAuthRes,
    SUBSCRIBE_REQ: SubscribeReq,
    SUBSCRIBE_RES: SubscribeRes,
    HEARTBEAT_EVENT: HeartbeatEvent,
    QUOTE_EVENT: QuoteEvent,
    TICK_EVENT: TickEvent,
    ERROR_RES: ErrorRes,
}

# What each side may send. Heartbeats go both ways (the client keeps the
# connection alive with them, as in cTrader).
FROM_CLIENT: frozenset[int] = frozenset(
    {APPLICATION_AUTH_REQ, ACCOUNT_AUTH_REQ, SUBSCRIBE_REQ, HEARTBEAT_EVENT}
)
FROM_VENUE: frozenset[int] = frozenset(
    {
        APPLICATION_AUTH_RES,
        ACCOUNT_AUTH_RES,
        SUBSCRIBE_RES,
        HEARTBEAT_EVENT,
        QUOTE_EVENT,
        TICK_EVENT,
        ERROR_RES,
    }
)

_KINDS: dict[int, MessageKind] = {
    HEARTBEAT_EVENT: MessageKind.HEARTBEAT,
    ERROR_RES: MessageKind.ERROR,
}


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


_DATA, _HEARTBEAT, _ERROR = 0, 1, 2
_CATEGORY: dict[int, int] = {HEARTBEAT_EVENT: _HEARTBEAT, ERROR_RES: _ERROR}


def _openings(accepted: frozenset[int]) -> dict[bytes, int]:
    """The first three bytes an envelope of each accepted payload type may start with.

    Field 1 (tag 0x08) and its varint come first; a one-byte varint is followed by field
    2 (0x12), field 3 (0x1a), or nothing at all (an empty envelope, e.g. a heartbeat).
    """
    openings: dict[bytes, int] = {}
    for payload_type in accepted:
        category = _CATEGORY.get(payload_type, _DATA)
        prefix = b"\x08" + _varint(payload_type)
        if len(prefix) >= 3:
            openings[prefix[:3]] = category
        else:
            for follow in (b"", b"\x12", b"\x1a"):
                openings[prefix + follow] = category
    return openings


_first3 = operator.itemgetter(slice(None, 3))


class RelayBatch(NamedTuple):
    """What one read brought, for relaying: see :meth:`VenueDecoder.relay`."""

    frames: list[bytes]  # data and error envelopes, exactly as sent, in order
    heartbeats: int  # heartbeat envelopes seen (not in ``frames``)
    errors: list[ErrorRes]  # the parsed ErrorRes among ``frames`` (rare)


class Role(enum.Enum):
    """Which end of the connection a decoder is on."""

    CLIENT = "client"  # the daemon
    SERVER = "server"  # a venue (the bundled simulated one)


@dataclass(frozen=True, slots=True)
class VenueMessage:
    """One fully parsed message."""

    payload_type: int
    message: VenueBody
    client_msg_id: str = ""


class RawEnvelope(NamedTuple):
    """One frame on the relay fast path: its kind, and the bytes to forward."""

    kind: MessageKind
    payload_type: int
    frame: bytes  # the serialized Envelope exactly as the venue sent it


def payload_type_name(payload_type: int) -> str:
    """``"QUOTE_EVENT"``, or ``"payload type 9999"`` for a number we do not know."""
    try:
        name: str = PayloadType.Name(payload_type)
    except ValueError:
        return f"payload type {payload_type}"
    return name


def kind_of(payload_type: int) -> MessageKind:
    """HEARTBEAT_EVENT is a heartbeat, ERROR_RES an error, everything else data."""
    return _KINDS.get(payload_type, MessageKind.DATA)


def describe_error(error: ErrorRes) -> str:
    """A reason sentence for an ErrorRes: ``"venue error CODE: description"``."""
    code = error.error_code or "without a code"
    if error.description:
        return f"venue error {code}: {error.description}"
    return f"venue error {code}"


def _accepted(our_role: Role) -> frozenset[int]:
    return FROM_VENUE if our_role is Role.CLIENT else FROM_CLIENT


def _not_an_envelope(frame: bytes) -> RemoteProtocolError:
    return RemoteProtocolError(f"frame of {len(frame)} bytes is not a valid venue envelope")


def _unexpected(payload_type: int, our_role: Role) -> RemoteProtocolError:
    peer = "venue" if our_role is Role.CLIENT else "client"
    if payload_type == 0:
        return RemoteProtocolError(f"{peer} sent an envelope without a payload type")
    if payload_type not in PAYLOAD_CLASSES:
        return RemoteProtocolError(f"{peer} sent unknown payload type {payload_type}")
    return RemoteProtocolError(
        f"{peer} sent {payload_type_name(payload_type)}, which only a {our_role.value} sends"
    )


def _parse_envelope(frame: bytes, accepted: frozenset[int], our_role: Role) -> Envelope:
    try:
        envelope: Envelope = Envelope.FromString(frame)
    except DecodeError:
        raise _not_an_envelope(frame) from None
    if envelope.payload_type not in accepted:
        raise _unexpected(envelope.payload_type, our_role)
    return envelope


def _parse_body(envelope: Envelope) -> VenueMessage:
    payload_type = envelope.payload_type
    try:
        body = PAYLOAD_CLASSES[payload_type].FromString(envelope.payload)
    except DecodeError:
        raise RemoteProtocolError(
            f"{payload_type_name(payload_type)} payload of {len(envelope.payload)} bytes"
            " does not parse"
        ) from None
    return VenueMessage(payload_type, body, envelope.client_msg_id)


def decode_message(frame: bytes, our_role: Role = Role.CLIENT) -> VenueMessage:
    """Parse one frame payload (an envelope) and its inner message."""
    return _parse_body(_parse_envelope(frame, _accepted(our_role), our_role))


class VenueDecoder:
    """Bytes from the peer in, venue messages out.

    ``our_role=Role.CLIENT`` (the daemon) accepts what a venue sends;
    ``Role.SERVER`` (the simulated venue) accepts what a client sends.
    """

    __slots__ = ("_accepted", "_error", "_frames", "_openings", "_role")

    def __init__(self, our_role: Role = Role.CLIENT, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self._role = our_role
        self._accepted = _accepted(our_role)
        self._openings = _openings(self._accepted)
        self._frames = FrameDecoder(max_frame)
        self._error: RemoteProtocolError | None = None

    @property
    def our_role(self) -> Role:
        return self._role

    @property
    def pending_bytes(self) -> int:
        return self._frames.pending_bytes

    @property
    def error(self) -> RemoteProtocolError | None:
        return self._error or self._frames.error

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Accept the next bytes from the peer (any chunking)."""
        if self._error is not None:
            raise self._error
        self._frames.feed(data)

    def end_of_stream(self) -> None:
        """The peer closed the stream; raises if it did so mid-frame."""
        if self._error is not None:
            raise self._error
        self._frames.end_of_stream()

    def messages(self) -> list[VenueMessage]:
        """Every complete message so far, envelope and inner message parsed."""
        if self._error is not None:
            raise self._error
        out: list[VenueMessage] = []
        accepted, role = self._accepted, self._role
        try:
            for frame in self._frames.frames():
                out.append(_parse_body(_parse_envelope(frame, accepted, role)))
        except RemoteProtocolError as exc:
            self._error = exc
            if not out:
                raise
        return out

    def envelopes(self) -> list[RawEnvelope]:
        """Every complete frame so far, for relaying: only the envelope is parsed."""
        if self._error is not None:
            raise self._error
        out: list[RawEnvelope] = []
        append = out.append
        accepted, role = self._accepted, self._role
        kind_for, data = _KINDS.get, MessageKind.DATA
        parse = Envelope.FromString
        make = tuple.__new__  # RawEnvelope(...) without NamedTuple's Python-level __new__
        try:
            for frame in self._frames.frames():
                try:
                    payload_type = parse(frame).payload_type
                except DecodeError:
                    raise _not_an_envelope(frame) from None
                if payload_type not in accepted:
                    raise _unexpected(payload_type, role)
                append(make(RawEnvelope, (kind_for(payload_type, data), payload_type, frame)))
        except RemoteProtocolError as exc:
            self._error = exc
            if not out:
                raise
        return out

    def relay(self) -> RelayBatch:
        """Every complete frame so far, for relaying as is: the hot path.

        The payload type is read from each envelope's first bytes (field 1, which every
        protobuf encoder writes first in practice) and checked against what a venue may
        send, without parsing; a batch of data frames costs two C-level passes. A frame
        that does not open that way is parsed for real, so an encoder with another field
        order still works and garbage is still a :class:`RemoteProtocolError`. Inner
        payloads are not validated (consumers receive them untouched).
        """
        if self._error is not None:
            raise self._error
        frames = self._frames.frames()
        categories = list(map(self._openings.get, map(_first3, frames)))
        # All data (0) and none unknown (None): the common case.
        if not any(categories) and None not in categories:
            return RelayBatch(frames, 0, [])
        return self._relay_slow(frames, categories)

    def _relay_slow(self, frames: list[bytes], categories: list[int | None]) -> RelayBatch:
        out: list[bytes] = []
        errors: list[ErrorRes] = []
        heartbeats = 0
        try:
            for frame, opening in zip(frames, categories, strict=True):
                category = _category(self._parse_type(frame)) if opening is None else opening
                if category == _HEARTBEAT:
                    heartbeats += 1
                    continue
                if category == _ERROR:
                    errors.append(_parse_error(frame))
                out.append(frame)
        except RemoteProtocolError as exc:
            self._error = exc
            if not out and not heartbeats:
                raise
        return RelayBatch(out, heartbeats, errors)

    def _parse_type(self, frame: bytes) -> int:
        try:
            payload_type = Envelope.FromString(frame).payload_type
        except DecodeError:
            raise _not_an_envelope(frame) from None
        if payload_type not in self._accepted:
            raise _unexpected(payload_type, self._role)
        return payload_type


def _category(payload_type: int) -> int:
    return _CATEGORY.get(payload_type, _DATA)


def _parse_error(frame: bytes) -> ErrorRes:
    message = decode_message(frame, Role.CLIENT).message
    assert isinstance(message, ErrorRes)
    return message


def _envelope_bytes(payload_type: int, message: VenueBody, client_msg_id: str) -> bytes:
    expected = PAYLOAD_CLASSES.get(payload_type)
    if expected is None:
        raise LocalProtocolError(f"cannot send unknown payload type {payload_type}")
    if type(message) is not expected:
        raise LocalProtocolError(
            f"{payload_type_name(payload_type)} carries a {expected.__name__},"
            f" not a {type(message).__name__}"
        )
    envelope = Envelope(
        payload_type=payload_type,
        payload=message.SerializeToString(),
        client_msg_id=client_msg_id,
    )
    serialized: bytes = envelope.SerializeToString()
    return serialized


def encode(payload_type: int, message: VenueBody, client_msg_id: str = "") -> bytes:
    """One framed envelope, ready to write."""
    return encode_frame(_envelope_bytes(payload_type, message, client_msg_id))


def encode_batch(messages: Iterable[tuple[int, VenueBody]]) -> bytes:
    """Many framed envelopes coalesced into one bytes object."""
    return encode_frames(_envelope_bytes(pt, message, "") for pt, message in messages)


def encode_error(error_code: str, description: str, client_msg_id: str = "") -> bytes:
    """A framed ErrorRes (what a venue sends when it refuses a request)."""
    return encode(
        ERROR_RES, ErrorRes(error_code=error_code, description=description), client_msg_id
    )


HEARTBEAT_FRAME: bytes = encode(HEARTBEAT_EVENT, HeartbeatEvent())
"""A framed HeartbeatEvent, the same bytes every time."""
