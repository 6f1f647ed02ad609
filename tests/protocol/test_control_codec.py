"""The control socket's newline-delimited JSON."""

from __future__ import annotations

import json

import pytest

from protocol import control_pb2 as pb
from protocol.control_codec import (
    MAX_LINE,
    ErrorCode,
    LineDecoder,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
    error_response,
)
from protocol.errors import LocalProtocolError, ProtocolError, RemoteProtocolError

REQUESTS = [
    pb.ControlRequest(id="1", status=pb.Status(include_sessions=True)),
    pb.ControlRequest(id="2", status=pb.Status()),
    pb.ControlRequest(id="3", pause=pb.Pause(sessions=["venue-a"], reason="maintenance")),
    pb.ControlRequest(id="4", resume=pb.Resume(all=True)),
    pb.ControlRequest(
        id="5", reconnect=pb.Reconnect(sessions=["a", "b"], reason="operator\nsaid so")
    ),
    pb.ControlRequest(id="6", reload=pb.Reload()),
]

STATUS = pb.ControlResponse(
    id="1",
    ok=True,
    status=pb.StatusResult(
        daemon=pb.DaemonInfo(
            pid=4242,
            uptime_s=12.5,
            version="0.1.0",
            database="postgresql+psycopg://wirekeep@db/wirekeep",
            events_written=2**53 + 1,  # too big for a JSON number: stays a string
            writer_lag_s=0.004,
            started_at="2025-11-21T06:00:00Z",
        ),
        sessions=[
            pb.SessionStatus(
                name="venue-a",
                state="STREAMING",
                since="2025-11-21T06:00:01Z",
                attempt=1,
                endpoint="ws://127.0.0.1:8765/feed",
                msgs_per_s=1234.5,
                seconds_since_last_message=0.01,
                kind="websocket",
                consumers=3,
                dropped=12,
            ),
            pb.SessionStatus(name="venue-b", state="BACKOFF", last_error="connection refused"),
        ],
    ),
)
RESPONSES = [
    STATUS,
    pb.ControlResponse(
        id="3", ok=True, action=pb.ActionResult(sessions=["venue-a"], skipped=[], message="paused")
    ),
    pb.ControlResponse(
        id="6",
        ok=True,
        reload=pb.ReloadResult(added=["c"], removed=["d"], changed=["a"], config_hash="ab12"),
    ),
    pb.ControlResponse(
        id="6", ok=False, error="bad config", code=78, reload=pb.ReloadResult(errors=["x"])
    ),
    error_response("9", "unknown session 'venue-z'", ErrorCode.USAGE),
]


@pytest.mark.parametrize("request_", REQUESTS)
def test_request_round_trip(request_: pb.ControlRequest) -> None:
    line = encode_request(request_)
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    assert line.isascii()
    assert decode_request(line) == request_
    assert decode_request(line.decode()) == request_


@pytest.mark.parametrize("response", RESPONSES)
def test_response_round_trip(response: pb.ControlResponse) -> None:
    line = encode_response(response)
    assert line.count(b"\n") == 1
    assert decode_response(line) == response


def test_wire_form_is_what_scripts_expect() -> None:
    assert json.loads(encode_request(REQUESTS[0])) == {
        "id": "1",
        "status": {"include_sessions": True},
    }
    status = json.loads(encode_response(STATUS))
    assert status["ok"] is True
    assert status["code"] == 0
    assert status["error"] == ""
    session = status["status"]["sessions"][0]
    assert {"name", "state", "since", "attempt", "last_error"} <= session.keys()
    assert session["dropped"] == 12  # a number, not "12"
    assert status["status"]["sessions"][1]["attempt"] == 0  # defaults are printed
    assert status["status"]["daemon"]["events_written"] == str(2**53 + 1)


def test_what_people_type_into_socat() -> None:
    assert decode_request(b'{"id":"x","status":{}}\r\n').status == pb.Status()
    assert decode_request('{"id":"1","status":{"includeSessions":true}}').status.include_sessions
    assert decode_request('{"pause":{"all":true}}').id == ""
    response = decode_response('{"id":"1","ok":true,"status":{"daemon":{"events_written":"7"}}}')
    assert response.status.daemon.events_written == 7


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"garbage", "control request is not JSON: Expecting value"),
        (b"\xff\xfe{}", "control request is not UTF-8"),
        (b"", "control request is empty"),
        (b"   \n", "control request is empty"),
        (b"[1]", "control request is a JSON array, not an object"),
        (b"null", "control request is a JSON null, not an object"),
        (b'"status"', "control request is a JSON string, not an object"),
        (b'{"id":"1","id":"2","status":{}}', "duplicate key 'id'"),
        (b"[" * 50_000, "control request is not JSON"),
        # wrong types
        (b'{"id":5,"status":{}}', "bad control request: Failed to parse id field"),
        (b'{"id":"1","status":{"include_sessions":"yes"}}', "include_sessions"),
        (b'{"id":"1","status":[]}', "bad control request: status must be an object, not an array"),
        (b'{"id":"1","status":"x"}', "bad control request: status must be an object, not a string"),
        (b'{"id":"1","pause":{"sessions":"a"}}', "pause.sessions must be an array, not a string"),
        (b'{"id":"1","pause":{"sessions":[1]}}', "Failed to parse sessions field"),
        # unknown fields and commands
        (b'{"id":"1","status":{},"verbose":true}', 'no field named "verbose"'),
        (b'{"id":"1","shutdown":{}}', 'no field named "shutdown"'),
        (b'{"id":"1","status":{"include_session":true}}', 'no field named "include_session"'),
        # requests that ask for nothing, or for two things
        (b'{"id":"1"}', "request has no command (expected one of status, pause, resume"),
        (b'{"id":"1","status":{},"reload":{}}', "multiple"),
        (b'{"id":"1","pause":{}}', "pause names no sessions (give sessions, or all)"),
        (
            b'{"id":"1","resume":{"sessions":["a"],"all":true}}',
            "resume names sessions and also says all",
        ),
    ],
)
def test_bad_requests(line: bytes, reason: str) -> None:
    with pytest.raises(RemoteProtocolError) as caught:
        decode_request(line)
    assert reason in str(caught.value)
    assert len(str(caught.value)) < 300


def test_oversized_request_line() -> None:
    prefix = b'{"id":"'
    suffix = b'","reload":{}}'
    exactly = prefix + b"x" * (MAX_LINE - len(prefix) - len(suffix)) + suffix
    assert len(exactly) == MAX_LINE
    assert decode_request(exactly + b"\n").WhichOneof("command") == "reload"
    too_long = prefix + b"x" * (MAX_LINE + 1 - len(prefix) - len(suffix)) + suffix
    with pytest.raises(
        RemoteProtocolError, match="control request of 65537 bytes exceeds the 65536-byte limit"
    ):
        decode_request(too_long)


def test_encoders_refuse_what_the_other_end_would_reject() -> None:
    with pytest.raises(LocalProtocolError, match="exceeds the 65536-byte limit"):
        encode_request(pb.ControlRequest(id="x" * MAX_LINE, reload=pb.Reload()))
    with pytest.raises(LocalProtocolError, match="no command"):
        encode_request(pb.ControlRequest(id="1"))
    with pytest.raises(LocalProtocolError, match="names no sessions"):
        encode_request(pb.ControlRequest(id="1", reconnect=pb.Reconnect()))
    with pytest.raises(LocalProtocolError, match="exceeds the 100-byte limit"):
        encode_response(STATUS, max_line=100)
    with pytest.raises(LocalProtocolError, match="non-zero code"):
        error_response("1", "oops", 0)


def test_bad_responses() -> None:
    with pytest.raises(RemoteProtocolError, match="control response is not JSON"):
        decode_response("Traceback (most recent call last):")
    with pytest.raises(RemoteProtocolError, match="bad control response"):
        decode_response('{"id":"1","ok":"yes"}')
    with pytest.raises(
        RemoteProtocolError, match=r"status\.sessions must be an array, not an object"
    ):
        decode_response('{"id":"1","status":{"sessions":{"name":"a"}}}')
    with pytest.raises(
        RemoteProtocolError, match=r"status\.sessions must be an object, not a number"
    ):
        decode_response('{"id":"1","status":{"sessions":[1]}}')
    with pytest.raises(RemoteProtocolError, match=r"action\.results must be an object"):
        decode_response('{"id":"1","action":{"results":[["a","paused"]]}}')
    with pytest.raises(RemoteProtocolError, match="bad control response"):
        decode_response('{"id":"1","action":{"results":{"a":1}}}')
    assert decode_response('{"id":"1","action":{"results":{"a":"paused"}}}').action.results == {
        "a": "paused"
    }
    assert decode_response('{"id":"1","status":null,"error":null}') == pb.ControlResponse(id="1")
    with pytest.raises(RemoteProtocolError, match="exceeds the 10-byte limit"):
        decode_response('{"id":"1","ok":true}', max_line=10)


def test_error_response() -> None:
    response = error_response("7", "daemon is shutting down", ErrorCode.UNAVAILABLE)
    assert (response.id, response.ok, response.error, response.code) == (
        "7",
        False,
        "daemon is shutting down",
        69,
    )
    assert error_response("8", "bad").code == ErrorCode.BAD_REQUEST == 65
    assert ErrorCode.CONFIG == 78


# --- LineDecoder --------------------------------------------------------------------


def test_line_decoder_every_byte_boundary() -> None:
    stream = b"".join(encode_request(r) for r in REQUESTS)
    for cut in range(len(stream) + 1):
        decoder = LineDecoder()
        decoder.feed(stream[:cut])
        lines = decoder.lines()
        decoder.feed(stream[cut:])
        lines += decoder.lines()
        assert [decode_request(line) for line in lines] == REQUESTS, cut
        assert decoder.pending_bytes == 0


def test_line_decoder_one_byte_at_a_time_crlf_and_blank_lines() -> None:
    decoder = LineDecoder()
    for byte in b'\n\r\n{"a":1}\r\n  \n{"b":2}\n':
        decoder.feed(bytes([byte]))
    assert decoder.lines() == [b'{"a":1}', b'{"b":2}']
    assert decoder.lines() == []


def test_line_decoder_last_line_without_newline() -> None:
    decoder = LineDecoder()
    decoder.feed(b'{"id":"1","reload":{}}')
    assert decoder.lines() == []
    assert decoder.pending_bytes == 22
    decoder.end_of_stream()
    assert decoder.lines() == [b'{"id":"1","reload":{}}']
    decoder.end_of_stream()
    assert decoder.lines() == []


def test_line_decoder_oversized_line_raises_before_its_newline() -> None:
    decoder = LineDecoder(max_line=10)
    decoder.feed(b"ok\n0123456789")  # exactly at the limit: fine so far
    assert decoder.lines() == [b"ok"]
    with pytest.raises(RemoteProtocolError, match="exceeds the 10-byte limit") as caught:
        decoder.feed(b"A")
    for call in (lambda: decoder.feed(b"\n"), decoder.end_of_stream):
        with pytest.raises(ProtocolError) as again:
            call()
        assert again.value is caught.value
    assert decoder.pending_bytes == 0


def test_line_decoder_oversized_complete_line() -> None:
    decoder = LineDecoder(max_line=4)
    with pytest.raises(
        RemoteProtocolError, match="control line of 5 bytes exceeds the 4-byte limit"
    ):
        decoder.feed(b"abcd\nabcde\n")
    assert decoder.lines() == [b"abcd"]


def test_line_decoder_many_lines_in_one_chunk() -> None:
    decoder = LineDecoder()
    decoder.feed(b"".join(encode_request(REQUESTS[0]) for _ in range(1000)))
    assert len(decoder.lines()) == 1000
