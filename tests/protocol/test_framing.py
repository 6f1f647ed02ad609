"""FrameDecoder / encode_frame(s): any chunking, size guard, fail-stop."""

from __future__ import annotations

import pickle
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import FrameTooLarge, LocalProtocolError, RemoteProtocolError
from protocol.framing import (
    DEFAULT_MAX_FRAME,
    HEADER_SIZE,
    FrameDecoder,
    encode_frame,
    encode_frames,
)

NO_DB = settings(database=None, deadline=None)

STREAMS: dict[str, list[bytes]] = {
    "small": [b"a", b"bc", b"def"],
    "with empty frames": [b"", b"x", b"", b"", b"yz", b""],
    "header-like bytes": [b"\x00\x00\x00\x05hello", b"\x00\x00\x00\x00", b"\xff" * 7],
    "mixed sizes": [b"q" * 300, b"", bytes(range(256)), b"z"],
}


def decode_in_chunks(
    stream: bytes, cuts: list[int], max_frame: int = DEFAULT_MAX_FRAME
) -> list[bytes]:
    decoder = FrameDecoder(max_frame)
    out: list[bytes] = []
    previous = 0
    for cut in [*cuts, len(stream)]:
        decoder.feed(stream[previous:cut])
        out.extend(decoder.frames())
        previous = cut
    assert decoder.pending_bytes == 0
    decoder.end_of_stream()
    return out


@pytest.mark.parametrize("name", STREAMS)
def test_split_at_every_byte_boundary(name: str) -> None:
    payloads = STREAMS[name]
    stream = encode_frames(payloads)
    for cut in range(len(stream) + 1):
        assert decode_in_chunks(stream, [cut]) == payloads, cut


def test_split_at_every_pair_of_boundaries() -> None:
    payloads = STREAMS["small"] + STREAMS["with empty frames"]
    stream = encode_frames(payloads)
    for first in range(len(stream) + 1):
        for second in range(first, len(stream) + 1):
            assert decode_in_chunks(stream, [first, second]) == payloads, (first, second)


@pytest.mark.parametrize("name", STREAMS)
def test_one_byte_at_a_time(name: str) -> None:
    payloads = STREAMS[name]
    stream = encode_frames(payloads)
    assert decode_in_chunks(stream, list(range(1, len(stream)))) == payloads


def test_many_frames_in_one_chunk() -> None:
    payloads = [b"%06d" % i * (i % 7) for i in range(5000)]
    decoder = FrameDecoder()
    decoder.feed(encode_frames(payloads))
    assert decoder.frames() == payloads
    assert decoder.frames() == []
    assert decoder.pending_bytes == 0


def test_iteration_drains_frames() -> None:
    decoder = FrameDecoder()
    decoder.feed(encode_frames([b"a", b"b"]) + b"\x00")
    assert list(decoder) == [b"a", b"b"]
    assert list(decoder) == []
    assert decoder.pending_bytes == 1


def test_large_frame_in_small_pieces() -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB
    stream = encode_frames([b"before", payload, b"after"])
    cuts = list(range(1000, len(stream), 1000))
    assert decode_in_chunks(stream, cuts, max_frame=len(payload)) == [b"before", payload, b"after"]


def test_pending_bytes_counts_the_incomplete_frame() -> None:
    decoder = FrameDecoder()
    stream = encode_frame(b"hello")
    for i in range(len(stream) - 1):
        decoder.feed(stream[i : i + 1])
        assert decoder.pending_bytes == i + 1
        assert decoder.frames() == []
    decoder.feed(stream[-1:])
    assert decoder.pending_bytes == 0
    assert decoder.frames() == [b"hello"]


def test_accepts_bytearray_and_memoryview_and_returns_bytes() -> None:
    stream = encode_frames([b"one", b"two"])
    decoder = FrameDecoder()
    decoder.feed(bytearray(stream[:5]))
    decoder.feed(memoryview(stream)[5:])
    frames = decoder.frames()
    assert frames == [b"one", b"two"]
    assert all(type(frame) is bytes for frame in frames)


def test_empty_feed_is_harmless() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"")
    decoder.feed(b"\x00\x00")
    decoder.feed(b"")
    decoder.feed(b"\x00\x01!")
    assert decoder.frames() == [b"!"]


def test_frame_at_the_limit_is_accepted() -> None:
    decoder = FrameDecoder(max_frame=10)
    decoder.feed(encode_frame(b"0123456789"))
    assert decoder.frames() == [b"0123456789"]


def test_zero_limit_allows_only_empty_frames() -> None:
    decoder = FrameDecoder(max_frame=0)
    decoder.feed(encode_frames([b"", b""]))
    assert decoder.frames() == [b"", b""]
    with pytest.raises(FrameTooLarge):
        decoder.feed(encode_frame(b"x"))


@pytest.mark.parametrize("max_frame", [-1, 2**32])
def test_invalid_limit(max_frame: int) -> None:
    with pytest.raises(ValueError, match="max_frame"):
        FrameDecoder(max_frame)


def test_oversized_frame_raises_as_soon_as_the_header_arrives() -> None:
    decoder = FrameDecoder(max_frame=1_048_576)
    header = struct.pack(">I", 20_000_000)
    decoder.feed(header[:3])  # not yet
    with pytest.raises(FrameTooLarge) as caught:
        decoder.feed(header[3:])  # no body byte has arrived
    error = caught.value
    assert error.size == 20_000_000
    assert error.limit == 1_048_576
    assert str(error) == "frame of 20000000 bytes exceeds the 1048576-byte limit"
    assert isinstance(error, RemoteProtocolError)
    assert decoder.error is error
    # terminal: every later feed raises the same error
    for more in (b"", b"\x00\x00\x00\x00", b"x" * 100):
        with pytest.raises(FrameTooLarge) as again:
            decoder.feed(more)
        assert again.value is error
    with pytest.raises(FrameTooLarge):
        decoder.end_of_stream()
    assert decoder.pending_bytes == 0


def test_oversized_header_after_good_frames_in_one_chunk() -> None:
    decoder = FrameDecoder(max_frame=8)
    good = encode_frames([b"ok", b"fine"])
    with pytest.raises(FrameTooLarge, match="frame of 9 bytes exceeds the 8-byte limit"):
        decoder.feed(good + struct.pack(">I", 9) + b"123")
    # frames completed before the error are still delivered
    assert decoder.frames() == [b"ok", b"fine"]
    with pytest.raises(FrameTooLarge):
        decoder.feed(b"")


def test_oversized_header_completing_a_partial_one() -> None:
    decoder = FrameDecoder(max_frame=100)
    decoder.feed(encode_frame(b"a") + b"\x00\x00")
    with pytest.raises(FrameTooLarge):
        decoder.feed(b"\xff\xffbody")
    assert decoder.frames() == [b"a"]


def test_garbage_is_rejected_by_the_size_guard() -> None:
    decoder = FrameDecoder(max_frame=1024)
    with pytest.raises(FrameTooLarge):
        decoder.feed(b"GET / HTTP/1.1\r\nHost: example\r\n\r\n")


def test_end_of_stream_in_the_middle_of_a_frame() -> None:
    decoder = FrameDecoder()
    decoder.feed(encode_frame(b"hello")[:7])
    with pytest.raises(RemoteProtocolError, match=r"middle of a frame \(3 of 5 bytes\)"):
        decoder.end_of_stream()
    with pytest.raises(RemoteProtocolError):
        decoder.feed(b"")


def test_end_of_stream_in_the_middle_of_a_header() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"\x00\x00")
    with pytest.raises(RemoteProtocolError, match="2 of the 4 header bytes"):
        decoder.end_of_stream()


def test_encode_frame() -> None:
    assert encode_frame(b"hi") == b"\x00\x00\x00\x02hi"
    assert encode_frame(b"") == b"\x00\x00\x00\x00"
    assert encode_frames([]) == b""
    assert encode_frames([b"a", b"bc"]) == encode_frame(b"a") + encode_frame(b"bc")
    assert encode_frames(iter([bytearray(b"x"), memoryview(b"yz")])) == encode_frames([b"x", b"yz"])
    assert len(encode_frame(b"x" * 70000)) == HEADER_SIZE + 70000


class _Huge(bytes):
    def __len__(self) -> int:
        return 2**32


def test_encode_refuses_what_a_4_byte_prefix_cannot_declare() -> None:
    with pytest.raises(LocalProtocolError, match="4294967296 bytes"):
        encode_frame(_Huge())
    with pytest.raises(LocalProtocolError, match="4294967296 bytes"):
        encode_frames([b"ok", _Huge()])


def test_frame_too_large_pickles() -> None:
    error = pickle.loads(pickle.dumps(FrameTooLarge(5, 4)))
    assert (error.size, error.limit, str(error)) == (
        5,
        4,
        "frame of 5 bytes exceeds the 4-byte limit",
    )


@NO_DB
@given(
    payloads=st.lists(st.binary(max_size=300), max_size=20),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=30),
)
def test_any_chunking_round_trips(payloads: list[bytes], cuts: list[int]) -> None:
    stream = encode_frames(payloads)
    cuts = sorted({cut for cut in cuts if cut <= len(stream)})
    assert decode_in_chunks(stream, cuts) == payloads


@NO_DB
@given(garbage=st.binary(max_size=2000), chunk=st.integers(min_value=1, max_value=64))
def test_garbage_never_raises_anything_but_protocol_errors(garbage: bytes, chunk: int) -> None:
    decoder = FrameDecoder(max_frame=256)
    frames: list[bytes] = []
    try:
        for i in range(0, len(garbage), chunk):
            decoder.feed(garbage[i : i + chunk])
            frames.extend(decoder.frames())
        decoder.end_of_stream()
    except RemoteProtocolError:
        assert decoder.error is not None
    frames.extend(decoder.frames())
    # whatever was decoded is a prefix of the garbage read as frames
    assert encode_frames(frames) == garbage[: len(encode_frames(frames))]
