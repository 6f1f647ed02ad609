from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ControlRequest(_message.Message):
    __slots__ = ("id", "status", "pause", "resume", "reconnect", "reload")
    ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    PAUSE_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    RECONNECT_FIELD_NUMBER: _ClassVar[int]
    RELOAD_FIELD_NUMBER: _ClassVar[int]
    id: str
    status: Status
    pause: Pause
    resume: Resume
    reconnect: Reconnect
    reload: Reload
    def __init__(self, id: _Optional[str] = ..., status: _Optional[_Union[Status, _Mapping]] = ..., pause: _Optional[_Union[Pause, _Mapping]] = ..., resume: _Optional[_Union[Resume, _Mapping]] = ..., reconnect: _Optional[_Union[Reconnect, _Mapping]] = ..., reload: _Optional[_Union[Reload, _Mapping]] = ...) -> None: ...

class Status(_message.Message):
    __slots__ = ("include_sessions",)
    INCLUDE_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    include_sessions: bool
    def __init__(self, include_sessions: _Optional[bool] = ...) -> None: ...

class Pause(_message.Message):
    __slots__ = ("sessions", "all", "reason")
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    ALL_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    sessions: _containers.RepeatedScalarFieldContainer[str]
    all: bool
    reason: str
    def __init__(self, sessions: _Optional[_Iterable[str]] = ..., all: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class Resume(_message.Message):
    __slots__ = ("sessions", "all", "reason")
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    ALL_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    sessions: _containers.RepeatedScalarFieldContainer[str]
    all: bool
    reason: str
    def __init__(self, sessions: _Optional[_Iterable[str]] = ..., all: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class Reconnect(_message.Message):
    __slots__ = ("sessions", "all", "reason")
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    ALL_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    sessions: _containers.RepeatedScalarFieldContainer[str]
    all: bool
    reason: str
    def __init__(self, sessions: _Optional[_Iterable[str]] = ..., all: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class Reload(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ControlResponse(_message.Message):
    __slots__ = ("id", "ok", "error", "code", "status", "action", "reload")
    ID_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    RELOAD_FIELD_NUMBER: _ClassVar[int]
    id: str
    ok: bool
    error: str
    code: int
    status: StatusResult
    action: ActionResult
    reload: ReloadResult
    def __init__(self, id: _Optional[str] = ..., ok: _Optional[bool] = ..., error: _Optional[str] = ..., code: _Optional[int] = ..., status: _Optional[_Union[StatusResult, _Mapping]] = ..., action: _Optional[_Union[ActionResult, _Mapping]] = ..., reload: _Optional[_Union[ReloadResult, _Mapping]] = ...) -> None: ...

class StatusResult(_message.Message):
    __slots__ = ("daemon", "sessions")
    DAEMON_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    daemon: DaemonInfo
    sessions: _containers.RepeatedCompositeFieldContainer[SessionStatus]
    def __init__(self, daemon: _Optional[_Union[DaemonInfo, _Mapping]] = ..., sessions: _Optional[_Iterable[_Union[SessionStatus, _Mapping]]] = ...) -> None: ...

class DaemonInfo(_message.Message):
    __slots__ = ("pid", "uptime_s", "version", "database", "events_written", "writer_lag_s", "started_at", "config_hash", "config_path", "writer_error", "handshakes_in_flight", "handshakes_queued", "max_handshakes")
    PID_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DATABASE_FIELD_NUMBER: _ClassVar[int]
    EVENTS_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    WRITER_LAG_S_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    CONFIG_HASH_FIELD_NUMBER: _ClassVar[int]
    CONFIG_PATH_FIELD_NUMBER: _ClassVar[int]
    WRITER_ERROR_FIELD_NUMBER: _ClassVar[int]
    HANDSHAKES_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    HANDSHAKES_QUEUED_FIELD_NUMBER: _ClassVar[int]
    MAX_HANDSHAKES_FIELD_NUMBER: _ClassVar[int]
    pid: int
    uptime_s: float
    version: str
    database: str
    events_written: int
    writer_lag_s: float
    started_at: str
    config_hash: str
    config_path: str
    writer_error: str
    handshakes_in_flight: int
    handshakes_queued: int
    max_handshakes: int
    def __init__(self, pid: _Optional[int] = ..., uptime_s: _Optional[float] = ..., version: _Optional[str] = ..., database: _Optional[str] = ..., events_written: _Optional[int] = ..., writer_lag_s: _Optional[float] = ..., started_at: _Optional[str] = ..., config_hash: _Optional[str] = ..., config_path: _Optional[str] = ..., writer_error: _Optional[str] = ..., handshakes_in_flight: _Optional[int] = ..., handshakes_queued: _Optional[int] = ..., max_handshakes: _Optional[int] = ...) -> None: ...

class SessionStatus(_message.Message):
    __slots__ = ("name", "state", "since", "attempt", "endpoint", "last_error", "msgs_per_s", "seconds_since_last_message", "kind", "throttled_until", "consumers", "dropped", "reason", "wait_until", "messages", "breaker", "last_venue_error", "handshake")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    MSGS_PER_S_FIELD_NUMBER: _ClassVar[int]
    SECONDS_SINCE_LAST_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    THROTTLED_UNTIL_FIELD_NUMBER: _ClassVar[int]
    CONSUMERS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    WAIT_UNTIL_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    BREAKER_FIELD_NUMBER: _ClassVar[int]
    LAST_VENUE_ERROR_FIELD_NUMBER: _ClassVar[int]
    HANDSHAKE_FIELD_NUMBER: _ClassVar[int]
    name: str
    state: str
    since: str
    attempt: int
    endpoint: str
    last_error: str
    msgs_per_s: float
    seconds_since_last_message: float
    kind: str
    throttled_until: str
    consumers: int
    dropped: int
    reason: str
    wait_until: str
    messages: int
    breaker: str
    last_venue_error: str
    handshake: str
    def __init__(self, name: _Optional[str] = ..., state: _Optional[str] = ..., since: _Optional[str] = ..., attempt: _Optional[int] = ..., endpoint: _Optional[str] = ..., last_error: _Optional[str] = ..., msgs_per_s: _Optional[float] = ..., seconds_since_last_message: _Optional[float] = ..., kind: _Optional[str] = ..., throttled_until: _Optional[str] = ..., consumers: _Optional[int] = ..., dropped: _Optional[int] = ..., reason: _Optional[str] = ..., wait_until: _Optional[str] = ..., messages: _Optional[int] = ..., breaker: _Optional[str] = ..., last_venue_error: _Optional[str] = ..., handshake: _Optional[str] = ...) -> None: ...

class ActionResult(_message.Message):
    __slots__ = ("sessions", "skipped", "message", "results")
    class ResultsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    sessions: _containers.RepeatedScalarFieldContainer[str]
    skipped: _containers.RepeatedScalarFieldContainer[str]
    message: str
    results: _containers.ScalarMap[str, str]
    def __init__(self, sessions: _Optional[_Iterable[str]] = ..., skipped: _Optional[_Iterable[str]] = ..., message: _Optional[str] = ..., results: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ReloadResult(_message.Message):
    __slots__ = ("added", "removed", "changed", "config_hash", "errors", "unchanged", "previous_hash", "notes")
    ADDED_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    CONFIG_HASH_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    UNCHANGED_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_HASH_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    added: _containers.RepeatedScalarFieldContainer[str]
    removed: _containers.RepeatedScalarFieldContainer[str]
    changed: _containers.RepeatedScalarFieldContainer[str]
    config_hash: str
    errors: _containers.RepeatedScalarFieldContainer[str]
    unchanged: int
    previous_hash: str
    notes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, added: _Optional[_Iterable[str]] = ..., removed: _Optional[_Iterable[str]] = ..., changed: _Optional[_Iterable[str]] = ..., config_hash: _Optional[str] = ..., errors: _Optional[_Iterable[str]] = ..., unchanged: _Optional[int] = ..., previous_hash: _Optional[str] = ..., notes: _Optional[_Iterable[str]] = ...) -> None: ...
