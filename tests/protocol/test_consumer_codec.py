"""Consumer frames: length-prefixed protobuf for the Unix socket, JSON for WebSocket."""

from __future__ import annotations

import base64
import json

import pytest

from protocol import consumer_pb2 as pb
from protocol.consumer_codec import (
    CAUSE_CONSUMER_TOO_SLOW,
    CAUSE_UPSTREAM_RECONNECT,
    ConsumerFrameDecoder,
    ConsumerRequestDecoder,
    DataEncoder,
    data_json,
    decode_json,
    decode_request_json,
    encode,
    encode_json,
    encode_many,
    encode_request,
    encode_request_json,
    frame_end,
    frame_from_json,
    frame_to_json,
    gap_sentence,
)
from protocol.errors import FrameTooLarge, LocalProtocolError, RemoteProtocolError
from protocol.framing import encode_frame

NS = 1_732_000_000_123_456_789

FRAMES = [
    pb.ConsumerFrame(
        data=pb.Data(session="venue-a", seq=1, received_at_ns=NS, payload=b'{"px":1.5}', text=True)
    ),
    pb.ConsumerFrame(
        data=pb.Data(session="venue-b", seq=2, received_at_ns=NS, payload=b"\x08\xce\x10\x12\x00")
    ),
    pb.ConsumerFrame(
        state_notice=pb.StateNotice(
            session="venue-a",
            state="STALE",
            previous="STREAMING",
            reason="no data for 5.0 s",
            at_ns=NS,
            version=17,
        )
    ),
    pb.ConsumerFrame(
        gap=pb.Gap(
            session="venue-a",
            first_missing=10,
            last_missing=20,
            interrupted_s=2.5,
            cause=CAUSE_UPSTREAM_RECONNECT,
        )
    ),
    pb.ConsumerFrame(
        gap=pb.Gap(
            session="venue-a", first_missing=3, last_missing=3, cause=CAUSE_CONSUMER_TOO_SLOW
        )
    ),
    pb.ConsumerFrame(error=pb.Error(message="unknown session 'venue-z'")),
    pb.ConsumerFrame(subscribed=pb.Subscribed(sessions=["venue-a", "venue-b"])),
    pb.ConsumerFrame(subscribed=pb.Subscribed()),
]


def test_round_trip_every_frame_type_over_the_unix_socket_form() -> None:
    decoder = ConsumerFrameDecoder()
    decoder.feed(b"".join(encode(frame) for frame in FRAMES))
    assert decoder.messages() == FRAMES


def test_split_at_every_byte_boundary() -> None:
    stream = encode_many(FRAMES)
    for cut in range(len(stream) + 1):
        decoder = ConsumerFrameDecoder()
        decoder.feed(stream[:cut])
        got = decoder.messages()
        decoder.feed(stream[cut:])
        got += list(decoder)
        assert got == FRAMES, cut
        decoder.end_of_stream()


def test_data_encoder_matches_plain_encoding() -> None:
    encoder = DataEncoder("venue-a", text=True)
    records = [(seq, NS + seq, b'{"n":%d}' % seq) for seq in range(1, 200)]
    one_by_one = b"".join(encoder.encode(*record) for record in records)
    coalesced = encoder.encode_many(records)
    assert coalesced == one_by_one
    expected = [
        pb.ConsumerFrame(
            data=pb.Data(session="venue-a", seq=s, received_at_ns=t, payload=p, text=True)
        )
        for s, t, p in records
    ]
    assert coalesced == encode_many(expected)
    decoder = ConsumerFrameDecoder()
    for i in range(len(coalesced)):
        decoder.feed(coalesced[i : i + 1])
    assert decoder.messages() == expected


def test_data_encoder_runs_of_one_read() -> None:
    encoder = DataEncoder("venue-a", text=False)
    payloads = [b"\x08\x01", b"", b"\xff" * 300]
    run = encoder.encode_run(41, NS, payloads)
    assert run == encoder.encode_many((41 + i, NS, p) for i, p in enumerate(payloads))
    assert encoder.encode_run(1, NS, []) == b""
    # The encoder keeps no state between calls that a run could leak into the next.
    assert encoder.encode(7, 8, b"x") == encode(
        pb.ConsumerFrame(data=pb.Data(session="venue-a", seq=7, received_at_ns=8, payload=b"x"))
    )


def test_frame_end_finds_the_end_of_an_interrupted_frame() -> None:
    frames = encode_many(FRAMES[:3])
    sizes = [len(encode(f)) for f in FRAMES[:3]]
    assert frame_end(frames, 0) == 0
    assert frame_end(frames, 1) == sizes[0]
    assert frame_end(frames, sizes[0]) == sizes[0]
    assert frame_end(frames, sizes[0] + 5) == sizes[0] + sizes[1]
    assert frame_end(memoryview(frames), len(frames)) == len(frames)
    with pytest.raises(ValueError, match="outside"):
        frame_end(frames, len(frames) + 1)
    with pytest.raises(LocalProtocolError, match="middle of a frame"):
        frame_end(frames[:-1], 1 + sizes[0] + sizes[1])


def test_gap_sentences() -> None:
    assert gap_sentence(FRAMES[4].gap) == (
        "wirekeep sequence 3 to 3 missing from this consumer (1 message over 0.000 s; "
        "consumer too slow)"
    )  # missing left at 0 by an older daemon: read as a count of last - first + 1
    slow = pb.Gap(session="a", first_missing=10, last_missing=19, missing=10,
                  interrupted_s=0.25, cause=CAUSE_CONSUMER_TOO_SLOW)  # fmt: skip
    assert gap_sentence(slow).startswith("wirekeep sequence 10 to 19 missing from this consumer")
    back = pb.Gap(session="a", first_missing=20, last_missing=19, missing=0,
                  interrupted_s=2.5, cause=CAUSE_UPSTREAM_RECONNECT)  # fmt: skip
    assert gap_sentence(back) == (
        "resumed after 2.5 s (upstream reconnect); no wirekeep sequence number is missing, "
        "but what the venue sent meanwhile never arrived; next is 20"
    )


def test_data_encoder_empty_batch_and_binary() -> None:
    encoder = DataEncoder("venue-b", text=False)
    assert encoder.encode_many([]) == b""
    decoder = ConsumerFrameDecoder()
    decoder.feed(encoder.encode(5, 6, b"\x00\xff"))
    (frame,) = decoder.messages()
    assert frame.data == pb.Data(session="venue-b", seq=5, received_at_ns=6, payload=b"\x00\xff")


def test_empty_frames_are_refused_both_ways() -> None:
    with pytest.raises(LocalProtocolError):
        encode(pb.ConsumerFrame())
    with pytest.raises(LocalProtocolError):
        encode_request(pb.ConsumerRequest())
    decoder = ConsumerFrameDecoder()
    decoder.feed(encode_frame(b""))
    with pytest.raises(RemoteProtocolError, match="ConsumerFrame with nothing in it"):
        decoder.messages()


def test_garbage_frame() -> None:
    decoder = ConsumerFrameDecoder()
    decoder.feed(encode(FRAMES[0]) + encode_frame(b"\xff\xff\xff"))
    assert decoder.messages() == [FRAMES[0]]  # delivered before the bad one
    with pytest.raises(RemoteProtocolError, match="frame of 3 bytes is not a valid ConsumerFrame"):
        decoder.messages()
    with pytest.raises(RemoteProtocolError):
        decoder.feed(b"")
    assert decoder.error is not None


def test_requests_round_trip_and_size_limit() -> None:
    request = pb.ConsumerRequest(subscribe=pb.Subscribe(sessions=["venue-a"]))
    everything = pb.ConsumerRequest(subscribe=pb.Subscribe(all=True))
    decoder = ConsumerRequestDecoder()
    decoder.feed(encode_request(request) + encode_request(everything))
    assert decoder.messages() == [request, everything]
    assert decoder.pending_bytes == 0
    small = ConsumerRequestDecoder(max_frame=16)
    with pytest.raises(FrameTooLarge):
        small.feed(encode_request(pb.ConsumerRequest(subscribe=pb.Subscribe(sessions=["x" * 20]))))
    with pytest.raises(FrameTooLarge):
        small.end_of_stream()


# --- JSON form ---------------------------------------------------------------------


def test_json_round_trip_every_frame_type() -> None:
    for frame in FRAMES:
        text = encode_json(frame)
        assert "\n" not in text
        assert decode_json(text) == frame
        assert frame_from_json(frame_to_json(frame)) == frame


def test_json_shapes() -> None:
    assert frame_to_json(FRAMES[0]) == {
        "type": "data",
        "session": "venue-a",
        "seq": 1,
        "received_at_ns": NS,
        "text": True,
        "payload": '{"px":1.5}',
    }
    binary = frame_to_json(FRAMES[1])
    assert binary["text"] is False
    assert binary["payload"] == base64.b64encode(b"\x08\xce\x10\x12\x00").decode()
    assert frame_to_json(FRAMES[3]) == {
        "type": "gap",
        "session": "venue-a",
        "first_missing": 10,
        "last_missing": 20,
        "interrupted_s": 2.5,
        "cause": "upstream reconnect",
        "missing": 0,
    }
    assert frame_to_json(FRAMES[6]) == {"type": "subscribed", "sessions": ["venue-a", "venue-b"]}
    assert json.loads(encode_json(FRAMES[2]))["state"] == "STALE"


def test_data_json_without_a_message() -> None:
    assert data_json("s", 1, 2, "é".encode(), text=True)["payload"] == "é"
    with pytest.raises(LocalProtocolError, match="marked as text but is not UTF-8"):
        data_json("s", 1, 2, b"\xff", text=True)
    with pytest.raises(LocalProtocolError):
        encode_json(pb.ConsumerFrame())


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("not json", "consumer frame is not JSON"),
        ("[1]", "consumer frame is not a JSON object"),
        ('{"type":"bogus"}', "unknown type: 'bogus'"),
        ('{"session":"a"}', "unknown type: None"),
        ('{"type":"data","payload":"!!!"}', "payload is not base64"),
        ('{"type":"data","payload":5}', "payload is not a string"),
        ('{"type":"data","payload":"","seq":-1}', "bad data frame"),
        ('{"type":"gap","first_missing":"x"}', "bad gap frame"),
        ('{"type":"error","nonsense":1}', "bad error frame"),
    ],
)
def test_bad_json_frames(text: str, reason: str) -> None:
    with pytest.raises(RemoteProtocolError, match=reason):
        decode_json(text)


def test_json_requests() -> None:
    request = pb.ConsumerRequest(subscribe=pb.Subscribe(sessions=["venue-a"], all=False))
    text = encode_request_json(request)
    assert json.loads(text) == {"subscribe": {"sessions": ["venue-a"], "all": False}}
    assert decode_request_json(text) == request
    assert decode_request_json('{"subscribe":{"all":true}}').subscribe.all
    with pytest.raises(RemoteProtocolError, match="asks for nothing"):
        decode_request_json("{}")
    with pytest.raises(RemoteProtocolError, match="bad consumer request"):
        decode_request_json('{"subscribe":{"sessions":"venue-a"}}')
    with pytest.raises(RemoteProtocolError, match="bad consumer request"):
        decode_request_json('{"unsubscribe":{}}')
    with pytest.raises(RemoteProtocolError, match="bad consumer request"):
        decode_request_json("garbage")
