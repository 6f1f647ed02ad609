from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ConsumerFrame(_message.Message):
    __slots__ = ("data", "state_notice", "gap", "error", "subscribed")
    DATA_FIELD_NUMBER: _ClassVar[int]
    STATE_NOTICE_FIELD_NUMBER: _ClassVar[int]
    GAP_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SUBSCRIBED_FIELD_NUMBER: _ClassVar[int]
    data: Data
    state_notice: StateNotice
    gap: Gap
    error: Error
    subscribed: Subscribed
    def __init__(self, data: _Optional[_Union[Data, _Mapping]] = ..., state_notice: _Optional[_Union[StateNotice, _Mapping]] = ..., gap: _Optional[_Union[Gap, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., subscribed: _Optional[_Union[Subscribed, _Mapping]] = ...) -> None: ...

class Data(_message.Message):
    __slots__ = ("session", "seq", "received_at_ns", "payload", "text")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_AT_NS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    session: str
    seq: int
    received_at_ns: int
    payload: bytes
    text: bool
    def __init__(self, session: _Optional[str] = ..., seq: _Optional[int] = ..., received_at_ns: _Optional[int] = ..., payload: _Optional[bytes] = ..., text: _Optional[bool] = ...) -> None: ...

class StateNotice(_message.Message):
    __slots__ = ("session", "state", "previous", "reason", "at_ns", "version", "trigger")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    AT_NS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TRIGGER_FIELD_NUMBER: _ClassVar[int]
    session: str
    state: str
    previous: str
    reason: str
    at_ns: int
    version: int
    trigger: str
    def __init__(self, session: _Optional[str] = ..., state: _Optional[str] = ..., previous: _Optional[str] = ..., reason: _Optional[str] = ..., at_ns: _Optional[int] = ..., version: _Optional[int] = ..., trigger: _Optional[str] = ...) -> None: ...

class Gap(_message.Message):
    __slots__ = ("session", "first_missing", "last_missing", "interrupted_s", "cause", "missing")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    FIRST_MISSING_FIELD_NUMBER: _ClassVar[int]
    LAST_MISSING_FIELD_NUMBER: _ClassVar[int]
    INTERRUPTED_S_FIELD_NUMBER: _ClassVar[int]
    CAUSE_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    session: str
    first_missing: int
    last_missing: int
    interrupted_s: float
    cause: str
    missing: int
    def __init__(self, session: _Optional[str] = ..., first_missing: _Optional[int] = ..., last_missing: _Optional[int] = ..., interrupted_s: _Optional[float] = ..., cause: _Optional[str] = ..., missing: _Optional[int] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("message",)
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    message: str
    def __init__(self, message: _Optional[str] = ...) -> None: ...

class Subscribed(_message.Message):
    __slots__ = ("sessions",)
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    sessions: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, sessions: _Optional[_Iterable[str]] = ...) -> None: ...

class ConsumerRequest(_message.Message):
    __slots__ = ("subscribe",)
    SUBSCRIBE_FIELD_NUMBER: _ClassVar[int]
    subscribe: Subscribe
    def __init__(self, subscribe: _Optional[_Union[Subscribe, _Mapping]] = ...) -> None: ...

class Subscribe(_message.Message):
    __slots__ = ("sessions", "all")
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    ALL_FIELD_NUMBER: _ClassVar[int]
    sessions: _containers.RepeatedScalarFieldContainer[str]
    all: bool
    def __init__(self, sessions: _Optional[_Iterable[str]] = ..., all: _Optional[bool] = ...) -> None: ...
