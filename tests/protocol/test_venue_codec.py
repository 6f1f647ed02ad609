"""VenueDecoder and the venue encoders: two pure ends back to back."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import venue_pb2 as pb
from protocol.errors import FrameTooLarge, LocalProtocolError, RemoteProtocolError
from protocol.framing import encode_frame, encode_frames
from protocol.kinds import MessageKind
from protocol.venue_codec import (
    FROM_CLIENT,
    FROM_VENUE,
    HEARTBEAT_FRAME,
    PAYLOAD_CLASSES,
    RawEnvelope,
    RelayBatch,
    Role,
    VenueBody,
    VenueDecoder,
    VenueMessage,
    decode_message,
    describe_error,
    encode,
    encode_batch,
    encode_error,
    kind_of,
    payload_type_name,
)

CLIENT_SENDS: list[tuple[int, VenueBody]] = [
    (pb.APPLICATION_AUTH_REQ, pb.ApplicationAuthReq(client_id="app", client_secret="s3cret")),
    (pb.ACCOUNT_AUTH_REQ, pb.AccountAuthReq(account_id=42, access_token="tok")),
    (pb.SUBSCRIBE_REQ, pb.SubscribeReq(symbols=["EURUSD", "GBPUSD"])),
    (pb.HEARTBEAT_EVENT, pb.HeartbeatEvent()),
]
VENUE_SENDS: list[tuple[int, VenueBody]] = [
    (pb.APPLICATION_AUTH_RES, pb.ApplicationAuthRes()),
    (pb.ACCOUNT_AUTH_RES, pb.AccountAuthRes(account_id=42)),
    (pb.SUBSCRIBE_RES, pb.SubscribeRes(symbols=["EURUSD"])),
    (pb.HEARTBEAT_EVENT, pb.HeartbeatEvent()),
    (
        pb.QUOTE_EVENT,
        pb.QuoteEvent(symbol="EURUSD", bid=1.0812, ask=1.0813, venue_time_ns=2**63 + 5, seq=7),
    ),
    (pb.TICK_EVENT, pb.TickEvent(symbol="EURUSD", price=1.0812, size=1e6, venue_time_ns=1, seq=8)),
    (pb.ERROR_RES, pb.ErrorRes(error_code="CH_CLIENT_AUTH_FAILURE", description="bad secret")),
]


def test_every_payload_type_has_a_class_and_a_direction() -> None:
    numbers = set(pb.PayloadType.values()) - {pb.PAYLOAD_TYPE_UNSPECIFIED}
    assert set(PAYLOAD_CLASSES) == numbers
    assert numbers == FROM_CLIENT | FROM_VENUE
    assert {pb.HEARTBEAT_EVENT} == FROM_CLIENT & FROM_VENUE
    assert {pt for pt, _ in CLIENT_SENDS} == FROM_CLIENT
    assert {pt for pt, _ in VENUE_SENDS} == FROM_VENUE


@pytest.mark.parametrize(("payload_type", "message"), VENUE_SENDS)
def test_round_trip_venue_to_client(payload_type: int, message: VenueBody) -> None:
    decoder = VenueDecoder(Role.CLIENT)
    decoder.feed(encode(payload_type, message, client_msg_id="m-1"))
    assert decoder.messages() == [VenueMessage(payload_type, message, "m-1")]


@pytest.mark.parametrize(("payload_type", "message"), CLIENT_SENDS)
def test_round_trip_client_to_venue(payload_type: int, message: VenueBody) -> None:
    decoder = VenueDecoder(Role.SERVER)
    decoder.feed(encode(payload_type, message))
    assert decoder.messages() == [VenueMessage(payload_type, message, "")]


def test_stream_split_at_every_byte_boundary() -> None:
    stream = encode_batch(VENUE_SENDS)
    expected = [VenueMessage(pt, m) for pt, m in VENUE_SENDS]
    for cut in range(len(stream) + 1):
        decoder = VenueDecoder()
        decoder.feed(stream[:cut])
        got = decoder.messages()
        decoder.feed(stream[cut:])
        got += decoder.messages()
        assert got == expected, cut


def test_one_byte_at_a_time_on_the_relay_path() -> None:
    stream = encode_batch(VENUE_SENDS)
    decoder = VenueDecoder()
    raw: list[RawEnvelope] = []
    for i in range(len(stream)):
        decoder.feed(stream[i : i + 1])
        raw += decoder.envelopes()
    assert [r.payload_type for r in raw] == [pt for pt, _ in VENUE_SENDS]
    assert encode_frames(r.frame for r in raw) == stream  # relayed bytes are untouched


def test_relay_path_kinds_and_frames() -> None:
    decoder = VenueDecoder()
    decoder.feed(encode_batch(VENUE_SENDS))
    raw = decoder.envelopes()
    assert [r.kind for r in raw] == [
        MessageKind.DATA,
        MessageKind.DATA,
        MessageKind.DATA,
        MessageKind.HEARTBEAT,
        MessageKind.DATA,
        MessageKind.DATA,
        MessageKind.ERROR,
    ]
    # a relayed frame can be fully decoded later (e.g. to read an error)
    error = decode_message(raw[-1].frame).message
    assert isinstance(error, pb.ErrorRes)
    assert describe_error(error) == "venue error CH_CLIENT_AUTH_FAILURE: bad secret"
    quote = decode_message(raw[4].frame)
    assert quote.message == VENUE_SENDS[4][1]


def test_kind_of() -> None:
    assert kind_of(pb.HEARTBEAT_EVENT) is MessageKind.HEARTBEAT
    assert kind_of(pb.ERROR_RES) is MessageKind.ERROR
    assert kind_of(pb.QUOTE_EVENT) is MessageKind.DATA


def test_heartbeat_frame_constant() -> None:
    decoder = VenueDecoder(Role.SERVER)
    decoder.feed(HEARTBEAT_FRAME * 3)
    assert [m.payload_type for m in decoder.messages()] == [pb.HEARTBEAT_EVENT] * 3


def test_encode_error_and_describe() -> None:
    decoder = VenueDecoder()
    decoder.feed(encode_error("RATE_LIMITED", "too many requests", client_msg_id="7"))
    (message,) = decoder.messages()
    assert message.client_msg_id == "7"
    assert isinstance(message.message, pb.ErrorRes)
    assert describe_error(message.message) == "venue error RATE_LIMITED: too many requests"
    assert describe_error(pb.ErrorRes()) == "venue error without a code"


def test_payload_type_name() -> None:
    assert payload_type_name(pb.QUOTE_EVENT) == "QUOTE_EVENT"
    assert payload_type_name(9999) == "payload type 9999"


def _frame(envelope: pb.Envelope) -> bytes:
    return encode_frame(envelope.SerializeToString())


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (_frame(pb.Envelope(payload_type=9999)), "venue sent unknown payload type 9999"),
        (_frame(pb.Envelope()), "venue sent an envelope without a payload type"),
        (
            _frame(pb.Envelope(payload_type=pb.APPLICATION_AUTH_REQ)),
            "venue sent APPLICATION_AUTH_REQ, which only a client sends",
        ),
        (encode_frame(b"\xff\xff\xff\xff"), "frame of 4 bytes is not a valid venue envelope"),
        (
            _frame(pb.Envelope(payload_type=pb.QUOTE_EVENT, payload=b"\x0a\xff")),
            "QUOTE_EVENT payload of 2 bytes does not parse",
        ),
    ],
)
def test_remote_errors_have_clear_reasons(frame: bytes, reason: str) -> None:
    decoder = VenueDecoder()
    decoder.feed(frame)
    with pytest.raises(RemoteProtocolError) as caught:
        decoder.messages()
    assert str(caught.value) == reason
    # fail-stop: the decoder stays broken
    for call in (lambda: decoder.feed(b""), decoder.messages, decoder.envelopes, decoder.relay):
        with pytest.raises(RemoteProtocolError) as again:
            call()
        assert again.value is caught.value
    assert decoder.error is caught.value


def test_relay_path_checks_the_envelope_too() -> None:
    decoder = VenueDecoder()
    decoder.feed(_frame(pb.Envelope(payload_type=9999)))
    with pytest.raises(RemoteProtocolError, match="unknown payload type 9999"):
        decoder.envelopes()


def test_server_refuses_what_only_a_venue_sends() -> None:
    decoder = VenueDecoder(Role.SERVER)
    decoder.feed(encode(pb.QUOTE_EVENT, pb.QuoteEvent(symbol="X")))
    with pytest.raises(
        RemoteProtocolError, match="client sent QUOTE_EVENT, which only a server sends"
    ):
        decoder.messages()


def test_messages_before_a_bad_frame_are_delivered_then_it_raises() -> None:
    decoder = VenueDecoder()
    decoder.feed(HEARTBEAT_FRAME + _frame(pb.Envelope(payload_type=9999)) + HEARTBEAT_FRAME)
    assert [m.payload_type for m in decoder.messages()] == [pb.HEARTBEAT_EVENT]
    with pytest.raises(RemoteProtocolError, match="9999"):
        decoder.messages()
    with pytest.raises(RemoteProtocolError, match="9999"):
        decoder.feed(HEARTBEAT_FRAME)


def test_oversized_frame_from_the_venue() -> None:
    decoder = VenueDecoder(max_frame=64)
    with pytest.raises(FrameTooLarge):
        decoder.feed(b"\x00\x00\x01\x00")
    with pytest.raises(FrameTooLarge):
        decoder.feed(b"")
    assert isinstance(decoder.error, FrameTooLarge)


def test_end_of_stream() -> None:
    decoder = VenueDecoder()
    decoder.feed(HEARTBEAT_FRAME)
    decoder.end_of_stream()
    decoder.feed(HEARTBEAT_FRAME[:-1])
    assert decoder.pending_bytes == len(HEARTBEAT_FRAME) - 1
    with pytest.raises(RemoteProtocolError, match="middle of a frame"):
        decoder.end_of_stream()


def test_encode_refuses_a_mismatched_message() -> None:
    with pytest.raises(
        LocalProtocolError, match="QUOTE_EVENT carries a QuoteEvent, not a TickEvent"
    ):
        encode(pb.QUOTE_EVENT, pb.TickEvent())
    with pytest.raises(LocalProtocolError, match="unknown payload type 12"):
        encode(12, pb.TickEvent())


def test_our_role() -> None:
    assert VenueDecoder().our_role is Role.CLIENT
    assert VenueDecoder(Role.SERVER).our_role is Role.SERVER


@settings(database=None, deadline=None)
@given(garbage=st.binary(max_size=500))
def test_garbage_only_raises_protocol_errors(garbage: bytes) -> None:
    decoder = VenueDecoder(max_frame=1024)
    try:
        decoder.feed(encode_frame(garbage))
        decoder.messages()
    except RemoteProtocolError:
        pass


# --------------------------------------------------------------------------- relay()


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | 0x80 if value else byte)
        if not value:
            return bytes(out)


def _envelope(payload_type: int, message: VenueBody, client_msg_id: str = "") -> bytes:
    """The serialized envelope (a frame's payload), as the venue encoder writes it."""
    return encode(payload_type, message, client_msg_id)[4:]


def _reordered(payload_type: int, payload: bytes, client_msg_id: str = "") -> bytes:
    """An envelope with its fields in a non-canonical order: 2 (and 3) before 1."""
    out = b"\x12" + _varint(len(payload)) + payload
    if client_msg_id:
        out += b"\x1a" + _varint(len(client_msg_id)) + client_msg_id.encode()
    return out + b"\x08" + _varint(payload_type)


QUOTE_1 = (pb.QUOTE_EVENT, pb.QuoteEvent(symbol="EURUSD", bid=1.0812, ask=1.0813, seq=1))
QUOTE_2 = (pb.QUOTE_EVENT, pb.QuoteEvent(symbol="EURUSD", bid=1.0814, ask=1.0815, seq=2))
SOFT_ERROR = pb.ErrorRes(error_code="SOFT", description="venue hiccup")
# data, heartbeat, error, data
RELAY_STREAM = encode_batch(
    [QUOTE_1, (pb.HEARTBEAT_EVENT, pb.HeartbeatEvent()), (pb.ERROR_RES, SOFT_ERROR), QUOTE_2]
)
RELAY_EXPECTED = RelayBatch(
    [_envelope(*QUOTE_1), _envelope(pb.ERROR_RES, SOFT_ERROR), _envelope(*QUOTE_2)],
    1,
    [SOFT_ERROR],
)


def _merge(batches: list[RelayBatch]) -> RelayBatch:
    return RelayBatch(
        [frame for batch in batches for frame in batch.frames],
        sum(batch.heartbeats for batch in batches),
        [error for batch in batches for error in batch.errors],
    )


def test_relay_data_heartbeat_error_data() -> None:
    decoder = VenueDecoder()
    decoder.feed(RELAY_STREAM)
    batch = decoder.relay()
    assert type(batch) is RelayBatch
    assert batch == RELAY_EXPECTED
    assert decoder.relay() == RelayBatch([], 0, [])  # nothing left, nothing invented
    assert decoder.pending_bytes == 0


def test_relay_stream_split_at_every_byte_boundary() -> None:
    for cut in range(len(RELAY_STREAM) + 1):
        decoder = VenueDecoder()
        decoder.feed(RELAY_STREAM[:cut])
        first = decoder.relay()
        decoder.feed(RELAY_STREAM[cut:])
        second = decoder.relay()
        assert _merge([first, second]) == RELAY_EXPECTED, cut
        assert decoder.pending_bytes == 0, cut


def test_relay_every_pair_of_cuts() -> None:
    # Each frame split at every byte boundary while the ones around it are split too.
    stream = RELAY_STREAM
    for i in range(len(stream) + 1):
        for j in range(i, len(stream) + 1):
            decoder = VenueDecoder()
            batches = []
            for piece in (stream[:i], stream[i:j], stream[j:]):
                decoder.feed(piece)
                batches.append(decoder.relay())
            assert _merge(batches) == RELAY_EXPECTED, (i, j)


def test_relay_one_byte_at_a_time() -> None:
    decoder = VenueDecoder()
    batches = []
    for i in range(len(RELAY_STREAM)):
        decoder.feed(RELAY_STREAM[i : i + 1])
        batches.append(decoder.relay())
    assert _merge(batches) == RELAY_EXPECTED
    # A frame is only handed over once its last byte is there.
    assert sum(1 for batch in batches if batch.frames or batch.heartbeats) == 4


def test_relay_counts_heartbeats_without_returning_them() -> None:
    decoder = VenueDecoder()
    decoder.feed(HEARTBEAT_FRAME * 5)
    assert decoder.relay() == RelayBatch([], 5, [])
    decoder.feed(HEARTBEAT_FRAME + encode(*QUOTE_1) + HEARTBEAT_FRAME * 2)
    assert decoder.relay() == RelayBatch([_envelope(*QUOTE_1)], 3, [])


def test_relay_an_empty_heartbeat_envelope_is_two_bytes() -> None:
    assert HEARTBEAT_FRAME[4:] == b"\x08" + bytes([pb.HEARTBEAT_EVENT])
    assert len(HEARTBEAT_FRAME) == 6
    decoder = VenueDecoder()
    decoder.feed(encode_frame(b"\x08\x33"))
    assert decoder.relay() == RelayBatch([], 1, [])
    # Its server-bound twin: a simulated venue counts a client's heartbeats the same way.
    server = VenueDecoder(Role.SERVER)
    server.feed(HEARTBEAT_FRAME * 2)
    assert server.relay() == RelayBatch([], 2, [])


def test_relay_empty_error_and_empty_data_envelopes() -> None:
    # An ErrorRes without fields is two bytes too; an empty ApplicationAuthRes is three.
    empty_error = _envelope(pb.ERROR_RES, pb.ErrorRes())
    empty_reply = _envelope(pb.APPLICATION_AUTH_RES, pb.ApplicationAuthRes())
    assert (len(empty_error), len(empty_reply)) == (2, 3)
    decoder = VenueDecoder()
    decoder.feed(encode_frames([empty_error, empty_reply]))
    assert decoder.relay() == RelayBatch([empty_error, empty_reply], 0, [pb.ErrorRes()])


def test_relay_parses_errors_and_keeps_their_bytes() -> None:
    errors = [
        pb.ErrorRes(error_code="RATE_LIMITED", description="too many requests"),
        pb.ErrorRes(error_code="CH_CLIENT_AUTH_FAILURE", description="x" * 300),
    ]
    frames = [_envelope(pb.ERROR_RES, errors[0], "req-7"), _envelope(pb.ERROR_RES, errors[1])]
    decoder = VenueDecoder()
    decoder.feed(encode_frames(frames))
    batch = decoder.relay()
    assert batch == RelayBatch(frames, 0, errors)
    assert describe_error(batch.errors[0]) == "venue error RATE_LIMITED: too many requests"


def test_relay_every_payload_type_a_venue_sends() -> None:
    decoder = VenueDecoder()
    decoder.feed(encode_batch(VENUE_SENDS))
    assert decoder.relay() == RelayBatch(
        [_envelope(pt, m) for pt, m in VENUE_SENDS if pt != pb.HEARTBEAT_EVENT],
        1,
        [pb.ErrorRes(error_code="CH_CLIENT_AUTH_FAILURE", description="bad secret")],
    )


def test_relay_all_data_in_one_read() -> None:
    quotes = [
        (pb.QUOTE_EVENT, pb.QuoteEvent(symbol="EURUSD", bid=1.0, ask=1.1, seq=i))
        for i in range(1000)
    ]
    decoder = VenueDecoder()
    decoder.feed(encode_batch(quotes) + encode(*QUOTE_1)[:7])
    batch = decoder.relay()
    assert batch == RelayBatch([_envelope(*q) for q in quotes], 0, [])
    assert decoder.pending_bytes == 7


@pytest.mark.parametrize(
    ("envelope", "expected"),
    [
        # Field 2 before field 1.
        (_reordered(pb.QUOTE_EVENT, QUOTE_1[1].SerializeToString()), "data"),
        (_reordered(pb.HEARTBEAT_EVENT, b""), "heartbeat"),
        (_reordered(pb.ERROR_RES, SOFT_ERROR.SerializeToString()), "error"),
        # Field 3 first, then 2, then 1.
        (_reordered(pb.TICK_EVENT, pb.TickEvent(seq=3).SerializeToString(), "m-9"), "data"),
        # A varint written in more bytes than needed: a valid encoding of the same number.
        (b"\x08\xb3\x80\x00", "heartbeat"),
        (b"\x08" + _varint(pb.QUOTE_EVENT)[:1] + b"\x90\x00\x12\x00", "data"),
        # A field this version does not know (4), after field 1.
        (b"\x08\x33\x22\x01z", "heartbeat"),
    ],
)
def test_relay_non_canonical_envelopes_take_the_slow_path(envelope: bytes, expected: str) -> None:
    parsed = pb.Envelope.FromString(envelope)
    # What protobuf itself reads is the reference.
    assert parsed.payload_type in FROM_VENUE
    assert kind_of(parsed.payload_type).value == expected
    frames = [_envelope(*QUOTE_1), envelope, _envelope(*QUOTE_2)]
    decoder = VenueDecoder()
    decoder.feed(encode_frames(frames))
    batch = decoder.relay()
    if expected == "heartbeat":
        assert batch == RelayBatch([frames[0], frames[2]], 1, [])
    elif expected == "error":
        assert batch == RelayBatch(frames, 0, [pb.ErrorRes.FromString(parsed.payload)])
    else:
        assert batch == RelayBatch(frames, 0, [])  # untouched, in order


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"\xff\xfe not protobuf", "frame of 15 bytes is not a valid venue envelope"),
        (b"\xff\xff\xff\xff", "frame of 4 bytes is not a valid venue envelope"),
        (b"\x08", "frame of 1 bytes is not a valid venue envelope"),  # a cut-off varint
        (b"\x12\x05ab", "frame of 4 bytes is not a valid venue envelope"),  # overlong field
        (b"", "venue sent an envelope without a payload type"),
        (b"\x12\x00", "venue sent an envelope without a payload type"),
        # A quote's opening cut inside its two-byte varint.
        (_envelope(*QUOTE_1)[:2], "frame of 2 bytes is not a valid venue envelope"),
        (b"\x08\x4e", "venue sent unknown payload type 78"),
        (
            pb.Envelope(payload_type=9999).SerializeToString(),
            "venue sent unknown payload type 9999",
        ),
        (
            pb.Envelope(payload_type=pb.ERROR_RES, payload=b"\x0a\xff").SerializeToString(),
            "ERROR_RES payload of 2 bytes does not parse",
        ),
    ],
)
def test_relay_garbage_after_good_frames(body: bytes, reason: str) -> None:
    decoder = VenueDecoder()
    decoder.feed(RELAY_STREAM + encode_frame(body) + encode(*QUOTE_2))
    # The frames before the bad one first, whole...
    assert decoder.relay() == RELAY_EXPECTED
    # ...then the error, and the decoder stays broken (the frame after it is never seen).
    with pytest.raises(RemoteProtocolError) as caught:
        decoder.relay()
    assert str(caught.value) == reason
    for call in (decoder.relay, decoder.envelopes, decoder.messages, lambda: decoder.feed(b"")):
        with pytest.raises(RemoteProtocolError) as again:
            call()
        assert again.value is caught.value
    assert decoder.error is caught.value


def test_relay_garbage_after_heartbeats_only() -> None:
    decoder = VenueDecoder()
    decoder.feed(HEARTBEAT_FRAME * 2 + encode_frame(b"\xff\xfe"))
    assert decoder.relay() == RelayBatch([], 2, [])
    with pytest.raises(RemoteProtocolError, match="not a valid venue envelope"):
        decoder.relay()


def test_relay_garbage_first_raises_at_once() -> None:
    decoder = VenueDecoder()
    decoder.feed(encode_frame(b"\xff\xfe") + RELAY_STREAM)
    with pytest.raises(RemoteProtocolError, match="frame of 2 bytes is not a valid venue envelope"):
        decoder.relay()
    with pytest.raises(RemoteProtocolError, match="frame of 2 bytes"):
        decoder.relay()


@pytest.mark.parametrize(
    ("payload_type", "message", "reason"),
    [
        (
            pb.APPLICATION_AUTH_REQ,
            pb.ApplicationAuthReq(client_id="app", client_secret="s"),
            "venue sent APPLICATION_AUTH_REQ, which only a client sends",
        ),
        (
            pb.ACCOUNT_AUTH_REQ,
            pb.AccountAuthReq(account_id=1),
            "venue sent ACCOUNT_AUTH_REQ, which only a client sends",
        ),
        (
            pb.SUBSCRIBE_REQ,
            pb.SubscribeReq(symbols=["X"]),
            "venue sent SUBSCRIBE_REQ, which only a client sends",
        ),
    ],
)
def test_relay_refuses_what_only_a_client_sends(
    payload_type: int, message: VenueBody, reason: str
) -> None:
    decoder = VenueDecoder()
    decoder.feed(encode(*QUOTE_1) + encode(payload_type, message))
    assert decoder.relay() == RelayBatch([_envelope(*QUOTE_1)], 0, [])
    with pytest.raises(RemoteProtocolError) as caught:
        decoder.relay()
    assert str(caught.value) == reason
    # Alone in its read, and with its fields reordered: the same verdict.
    for envelope in (_envelope(payload_type, message), _reordered(payload_type, b"")):
        alone = VenueDecoder()
        alone.feed(encode_frame(envelope))
        with pytest.raises(RemoteProtocolError, match=reason):
            alone.relay()


def test_relay_on_the_server_side_refuses_what_only_a_venue_sends() -> None:
    decoder = VenueDecoder(Role.SERVER)
    decoder.feed(encode(pb.SUBSCRIBE_REQ, pb.SubscribeReq(symbols=["X"])))
    assert decoder.relay() == RelayBatch(
        [_envelope(pb.SUBSCRIBE_REQ, pb.SubscribeReq(symbols=["X"]))], 0, []
    )
    for payload_type, message in (QUOTE_1, (pb.ERROR_RES, SOFT_ERROR)):
        server = VenueDecoder(Role.SERVER)
        server.feed(encode(payload_type, message))
        with pytest.raises(RemoteProtocolError, match="which only a server sends"):
            server.relay()


def test_relay_after_an_oversized_frame() -> None:
    decoder = VenueDecoder(max_frame=64)
    with pytest.raises(FrameTooLarge):
        decoder.feed(HEARTBEAT_FRAME + b"\x00\x00\x01\x00")
    assert decoder.relay() == RelayBatch([], 1, [])  # what came before the bad header
    assert isinstance(decoder.error, FrameTooLarge)


# The venue's messages, with field values drawn by hypothesis.
_text = st.text(max_size=12)
_seq = st.integers(min_value=0, max_value=2**64 - 1)
_price = st.floats(allow_nan=False)
VENUE_MESSAGES = st.one_of(
    st.builds(
        lambda s, b, a, n: (pb.QUOTE_EVENT, pb.QuoteEvent(symbol=s, bid=b, ask=a, seq=n)),
        _text, _price, _price, _seq,
    ),
    st.builds(
        lambda s, p, n: (pb.TICK_EVENT, pb.TickEvent(symbol=s, price=p, seq=n)),
        _text, _price, _seq,
    ),
    st.just((pb.HEARTBEAT_EVENT, pb.HeartbeatEvent())),
    st.builds(
        lambda c, d: (pb.ERROR_RES, pb.ErrorRes(error_code=c, description=d)), _text, _text
    ),
    st.builds(
        lambda s: (pb.SUBSCRIBE_RES, pb.SubscribeRes(symbols=s)), st.lists(_text, max_size=3)
    ),
    st.just((pb.APPLICATION_AUTH_RES, pb.ApplicationAuthRes())),
    st.builds(
        lambda n: (pb.ACCOUNT_AUTH_RES, pb.AccountAuthRes(account_id=n)),
        st.integers(min_value=-(2**63), max_value=2**63 - 1),
    ),
)  # fmt: skip


@st.composite
def venue_envelopes(draw: st.DrawFn) -> bytes:
    """One envelope a venue may send, canonical or with its fields reordered."""
    payload_type, message = draw(VENUE_MESSAGES)
    client_msg_id = draw(st.sampled_from(["", "req-1", "x" * 200]))
    if draw(st.booleans()):
        return _envelope(payload_type, message, client_msg_id)
    return _reordered(payload_type, message.SerializeToString(), client_msg_id)


@settings(database=None, deadline=None, max_examples=300)
@given(
    envelopes=st.lists(venue_envelopes(), max_size=30),
    cuts=st.lists(st.integers(min_value=0, max_value=5000), max_size=6),
)
def test_relay_agrees_with_envelopes(envelopes: list[bytes], cuts: list[int]) -> None:
    stream = encode_frames(envelopes)
    bounds = sorted({0, len(stream), *(c for c in cuts if c < len(stream))})
    relay, slow = VenueDecoder(), VenueDecoder()
    batches: list[RelayBatch] = []
    raw: list[RawEnvelope] = []
    for start, stop in itertools.pairwise(bounds):
        relay.feed(stream[start:stop])
        slow.feed(stream[start:stop])
        batches.append(relay.relay())
        raw += slow.envelopes()
    got = _merge(batches)
    assert [r.frame for r in raw] == envelopes
    assert got.frames == [r.frame for r in raw if r.kind is not MessageKind.HEARTBEAT]
    assert got.heartbeats == sum(r.kind is MessageKind.HEARTBEAT for r in raw)
    assert got.errors == [
        decode_message(r.frame).message for r in raw if r.kind is MessageKind.ERROR
    ]


@settings(database=None, deadline=None)
@given(body=st.binary(max_size=200).filter(lambda b: not b.startswith(b"\x08")))
def test_relay_judges_garbage_as_envelopes_does(body: bytes) -> None:
    # A frame that does not open with field 1 is parsed for real: the verdict is the
    # reference parser's (frames that do open with field 1 are trusted by design).
    reference = VenueDecoder()
    reference.feed(encode_frame(body))
    refusal = ""
    try:
        expected = reference.envelopes()
    except RemoteProtocolError as exc:
        refusal = str(exc)
    if refusal:
        decoder = VenueDecoder()
        decoder.feed(HEARTBEAT_FRAME + encode(*QUOTE_1) + encode_frame(body))
        assert decoder.relay() == RelayBatch([_envelope(*QUOTE_1)], 1, [])
        with pytest.raises(RemoteProtocolError) as caught:
            decoder.relay()
        assert str(caught.value) == refusal
        return
    decoder = VenueDecoder()
    decoder.feed(encode_frame(body))
    try:
        batch = decoder.relay()
    except RemoteProtocolError:
        # Only an ErrorRes is parsed further than the envelope.
        assert expected[0].kind is MessageKind.ERROR
        return
    (only,) = expected
    if only.kind is MessageKind.HEARTBEAT:
        assert batch == RelayBatch([], 1, [])
    else:
        assert batch.frames == [body]
        assert batch.heartbeats == 0
        assert len(batch.errors) == (only.kind is MessageKind.ERROR)


@settings(database=None, deadline=None)
@given(garbage=st.binary(max_size=500))
def test_relay_garbage_only_raises_protocol_errors(garbage: bytes) -> None:
    decoder = VenueDecoder(max_frame=1024)
    try:
        decoder.feed(encode_frame(garbage))
        decoder.relay()
    except RemoteProtocolError:
        pass
