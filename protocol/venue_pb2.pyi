from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class PayloadType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PAYLOAD_TYPE_UNSPECIFIED: _ClassVar[PayloadType]
    ERROR_RES: _ClassVar[PayloadType]
    HEARTBEAT_EVENT: _ClassVar[PayloadType]
    APPLICATION_AUTH_REQ: _ClassVar[PayloadType]
    APPLICATION_AUTH_RES: _ClassVar[PayloadType]
    ACCOUNT_AUTH_REQ: _ClassVar[PayloadType]
    ACCOUNT_AUTH_RES: _ClassVar[PayloadType]
    SUBSCRIBE_REQ: _ClassVar[PayloadType]
    SUBSCRIBE_RES: _ClassVar[PayloadType]
    QUOTE_EVENT: _ClassVar[PayloadType]
    TICK_EVENT: _ClassVar[PayloadType]
PAYLOAD_TYPE_UNSPECIFIED: PayloadType
ERROR_RES: PayloadType
HEARTBEAT_EVENT: PayloadType
APPLICATION_AUTH_REQ: PayloadType
APPLICATION_AUTH_RES: PayloadType
ACCOUNT_AUTH_REQ: PayloadType
ACCOUNT_AUTH_RES: PayloadType
SUBSCRIBE_REQ: PayloadType
SUBSCRIBE_RES: PayloadType
QUOTE_EVENT: PayloadType
TICK_EVENT: PayloadType

class Envelope(_message.Message):
    __slots__ = ("payload_type", "payload", "client_msg_id")
    PAYLOAD_TYPE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    CLIENT_MSG_ID_FIELD_NUMBER: _ClassVar[int]
    payload_type: int
    payload: bytes
    client_msg_id: str
    def __init__(self, payload_type: _Optional[int] = ..., payload: _Optional[bytes] = ..., client_msg_id: _Optional[str] = ...) -> None: ...

class ApplicationAuthReq(_message.Message):
    __slots__ = ("client_id", "client_secret")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_SECRET_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    client_secret: str
    def __init__(self, client_id: _Optional[str] = ..., client_secret: _Optional[str] = ...) -> None: ...

class ApplicationAuthRes(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AccountAuthReq(_message.Message):
    __slots__ = ("account_id", "access_token")
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    ACCESS_TOKEN_FIELD_NUMBER: _ClassVar[int]
    account_id: int
    access_token: str
    def __init__(self, account_id: _Optional[int] = ..., access_token: _Optional[str] = ...) -> None: ...

class AccountAuthRes(_message.Message):
    __slots__ = ("account_id",)
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    account_id: int
    def __init__(self, account_id: _Optional[int] = ...) -> None: ...

class SubscribeReq(_message.Message):
    __slots__ = ("symbols",)
    SYMBOLS_FIELD_NUMBER: _ClassVar[int]
    symbols: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, symbols: _Optional[_Iterable[str]] = ...) -> None: ...

class SubscribeRes(_message.Message):
    __slots__ = ("symbols",)
    SYMBOLS_FIELD_NUMBER: _ClassVar[int]
    symbols: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, symbols: _Optional[_Iterable[str]] = ...) -> None: ...

class HeartbeatEvent(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class QuoteEvent(_message.Message):
    __slots__ = ("symbol", "bid", "ask", "venue_time_ns", "seq")
    SYMBOL_FIELD_NUMBER: _ClassVar[int]
    BID_FIELD_NUMBER: _ClassVar[int]
    ASK_FIELD_NUMBER: _ClassVar[int]
    VENUE_TIME_NS_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    symbol: str
    bid: float
    ask: float
    venue_time_ns: int
    seq: int
    def __init__(self, symbol: _Optional[str] = ..., bid: _Optional[float] = ..., ask: _Optional[float] = ..., venue_time_ns: _Optional[int] = ..., seq: _Optional[int] = ...) -> None: ...

class TickEvent(_message.Message):
    __slots__ = ("symbol", "price", "size", "venue_time_ns", "seq")
    SYMBOL_FIELD_NUMBER: _ClassVar[int]
    PRICE_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    VENUE_TIME_NS_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    symbol: str
    price: float
    size: float
    venue_time_ns: int
    seq: int
    def __init__(self, symbol: _Optional[str] = ..., price: _Optional[float] = ..., size: _Optional[float] = ..., venue_time_ns: _Optional[int] = ..., seq: _Optional[int] = ...) -> None: ...

class ErrorRes(_message.Message):
    __slots__ = ("error_code", "description")
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    error_code: str
    description: str
    def __init__(self, error_code: _Optional[str] = ..., description: _Optional[str] = ...) -> None: ...
