"""The control socket's wire form: newline-delimited JSON (control.proto).

One JSON object per line, in protobuf's JSON mapping with the .proto field
names, so ``socat`` and shell scripts can speak it::

    $ echo '{"id":"1","status":{"include_sessions":true}}' | socat - UNIX-CONNECT:control.sock
    {"id": "1", "ok": true, "status": {"daemon": {...}, "sessions": [...]}, "error": "", "code": 0}

Responses print every field, defaults included (``"ok": false`` rather than
nothing), and 64-bit integers as JSON numbers where a double holds them
exactly; the parser accepts numbers or strings for them, either field-name
spelling, and rejects unknown fields, wrong types and duplicate keys.

A request line is at most :data:`MAX_LINE` bytes; a response may be larger
(the status of many sessions), up to :data:`MAX_RESPONSE_LINE`.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import NoReturn, Protocol

from google.protobuf import json_format

from protocol.control_pb2 import ControlRequest, ControlResponse
from protocol.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from protocol.peer_json import first_line, json_type_name, parse_object, valid_unicode

__all__ = [
    "COMMANDS",
    "MAX_LINE",
    "MAX_RESPONSE_LINE",
    "ErrorCode",
    "LineDecoder",
    "decode_request",
    "decode_response",
    "encode_request",
    "encode_response",
    "error_response",
]

MAX_LINE = 64 * 1024
MAX_RESPONSE_LINE = 16 * 1024 * 1024

COMMANDS = ("status", "pause", "resume", "reconnect", "reload")
_TARGETED = ("pause", "resume", "reconnect")


class ErrorCode(enum.IntEnum):
    """Values for ``ControlResponse.code``: sysexits(3) numbers, so the command
    line can exit with the code it was given."""

    OK = 0
    USAGE = 64  # EX_USAGE: e.g. an unknown session name
    BAD_REQUEST = 65  # EX_DATAERR: the request line did not parse
    UNAVAILABLE = 69  # EX_UNAVAILABLE: e.g. shutting down, or too many connections
    INTERNAL = 70  # EX_SOFTWARE: a bug in the daemon
    PERMISSION = 77  # EX_NOPERM: the peer may read status but not change anything
    CONFIG = 78  # EX_CONFIG: reload found the configuration invalid


def _to_line(message: ControlRequest | ControlResponse, limit: int) -> bytes:
    text: str = json_format.MessageToJson(
        message,
        preserving_proto_field_name=True,
        indent=None,
        always_print_fields_with_no_presence=True,
        unquote_int64_if_possible=True,
    )
    line = text.encode("utf-8")
    if len(line) > limit:
        raise LocalProtocolError(
            f"control line of {len(line)} bytes exceeds the {limit}-byte limit"
        )
    return line + b"\n"


def _from_line(
    line: bytes | str, message: ControlRequest | ControlResponse, limit: int, what: str
) -> None:
    if isinstance(line, str):
        line = line.rstrip("\r\n")
        size = len(line.encode("utf-8", "surrogatepass"))
    else:
        line = line.rstrip(b"\r\n")
        size = len(line)
    if size > limit:
        raise RemoteProtocolError(f"control {what} of {size} bytes exceeds the {limit}-byte limit")
    if not line.strip():
        raise RemoteProtocolError(f"control {what} is empty")
    # json_format.Parse, in steps for clearer messages about the JSON itself.
    obj = parse_object(line, f"control {what} is ")
    problem = _shape_problem(obj, message.DESCRIPTOR)
    if problem is not None:
        raise RemoteProtocolError(f"bad control {what}: {problem}")
    try:
        json_format.ParseDict(obj, message, ignore_unknown_fields=False)
    except (json_format.ParseError, ValueError, TypeError, RecursionError) as exc:
        raise RemoteProtocolError(f"bad control {what}: {first_line(exc)}") from None


class _Field(Protocol):
    """What _shape_problem reads of a field descriptor (pure-Python or upb)."""

    @property
    def name(self) -> str: ...
    @property
    def json_name(self) -> str: ...
    @property
    def is_repeated(self) -> bool: ...
    @property
    def message_type(self) -> _Descriptor | None: ...


class _Options(Protocol):
    @property
    def map_entry(self) -> bool: ...


class _Descriptor(Protocol):
    @property
    def fields(self) -> Sequence[_Field]: ...

    def GetOptions(self) -> _Options: ...  # protobuf's spelling


def _shape_problem(obj: dict[str, object], descriptor: _Descriptor, path: str = "") -> str | None:
    """Objects where the schema has messages or maps, arrays where it has repeated fields.

    json_format alone takes ``"status": []`` for an empty Status and reads
    ``"status": "x"`` as a field named "x"; everything else (unknown fields,
    scalar types, ranges, map values) is left to it.
    """
    by_name = {field.name: field for field in descriptor.fields}
    by_name.update({field.json_name: field for field in descriptor.fields})
    for key, value in obj.items():
        field = by_name.get(key)
        if field is None or value is None:
            continue
        entry = field.message_type
        if entry is not None and entry.GetOptions().map_entry:
            if not isinstance(value, dict):
                return f"{path}{key} must be an object, not {_json_type(value)}"
            continue
        if field.is_repeated:
            if not isinstance(value, list):
                return f"{path}{key} must be an array, not {_json_type(value)}"
            values: list[object] = value
        else:
            values = [value]
        if field.message_type is not None:
            for item in values:
                if not isinstance(item, dict):
                    return f"{path}{key} must be an object, not {_json_type(item)}"
                problem = _shape_problem(item, field.message_type, f"{path}{key}.")
                if problem is not None:
                    return problem
    return None


def _json_type(value: object) -> str:
    name = json_type_name(value)
    return f"an {name}" if name[0] in "aeiou" else f"a {name}"


def _check_request(request: ControlRequest) -> str | None:
    """What is wrong with a request, or None."""
    command: str | None = request.WhichOneof("command")
    if command is None:
        return "request has no command (expected one of " + ", ".join(COMMANDS) + ")"
    if command in _TARGETED:
        target = getattr(request, command)
        if target.all and target.sessions:
            return f"{command} names sessions and also says all"
        if not target.all and not target.sessions:
            return f"{command} names no sessions (give sessions, or all)"
    return None


def encode_request(request: ControlRequest) -> bytes:
    """One request line, newline included."""
    problem = _check_request(request)
    if problem is not None:
        raise LocalProtocolError(problem)
    return _to_line(request, MAX_LINE)


def decode_request(line: bytes | str, max_line: int = MAX_LINE) -> ControlRequest:
    """Parse one request line (trailing newline optional).

    Raises :class:`RemoteProtocolError` for an oversized line, bad UTF-8, bad
    JSON, unknown fields, wrong types, or a request that asks for nothing.
    """
    request = ControlRequest()
    _from_line(line, request, max_line, "request")
    problem = _check_request(request)
    if problem is not None:
        raise RemoteProtocolError(problem)
    return request


def encode_response(response: ControlResponse, max_line: int = MAX_RESPONSE_LINE) -> bytes:
    """One response line, newline included."""
    return _to_line(response, max_line)


def decode_response(line: bytes | str, max_line: int = MAX_RESPONSE_LINE) -> ControlResponse:
    """Parse one response line (trailing newline optional)."""
    response = ControlResponse()
    _from_line(line, response, max_line, "response")
    return response


def error_response(
    request_id: str, message: str, code: int = ErrorCode.BAD_REQUEST
) -> ControlResponse:
    """A failed response: ``ok`` false, a sentence, and a non-zero code.

    The id and the sentence may echo what a peer sent: a lone surrogate in them becomes
    U+FFFD, so that the error can always be encoded and sent.
    """
    if code == 0:
        raise LocalProtocolError("an error response needs a non-zero code")
    return ControlResponse(
        id=valid_unicode(request_id), ok=False, error=valid_unicode(message), code=code
    )


class LineDecoder:
    """Bytes in, complete lines out (without their newline or a trailing CR).

    Blank lines are skipped (someone pressing Enter in socat).

    A line longer than ``max_line`` raises :class:`RemoteProtocolError` as soon
    as that many bytes have arrived without a newline; after that every call
    raises the same error (fail-stop).
    """

    __slots__ = ("_buffer", "_error", "_lines", "_max_line", "_scanned")

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self._max_line = max_line
        self._buffer = bytearray()
        self._scanned = 0  # bytes of the buffer known to hold no newline
        self._lines: list[bytes] = []
        self._error: ProtocolError | None = None

    @property
    def pending_bytes(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._error is not None:
            raise self._error
        buffer = self._buffer
        buffer += data
        start = 0
        newline = buffer.find(b"\n", self._scanned)
        while newline >= 0:
            line = bytes(buffer[start:newline]).rstrip(b"\r")
            if len(line) > self._max_line:
                self._fail(
                    f"control line of {len(line)} bytes exceeds the {self._max_line}-byte limit"
                )
            if line.strip():
                self._lines.append(line)
            start = newline + 1
            newline = buffer.find(b"\n", start)
        del buffer[:start]
        self._scanned = len(buffer)
        if len(buffer) > self._max_line:
            self._fail(
                f"control line exceeds the {self._max_line}-byte limit"
                f" ({len(buffer)} bytes and no newline yet)"
            )

    def _fail(self, message: str) -> NoReturn:
        self._error = RemoteProtocolError(message)
        self._buffer = bytearray()
        raise self._error

    def lines(self) -> list[bytes]:
        """Every complete non-blank line so far; clears them."""
        out = self._lines
        self._lines = []
        return out

    def end_of_stream(self) -> None:
        """The peer closed: a last line without a newline still counts."""
        if self._error is not None:
            raise self._error
        last = bytes(self._buffer).rstrip(b"\r")
        self._buffer = bytearray()
        self._scanned = 0
        if last.strip():
            self._lines.append(last)
