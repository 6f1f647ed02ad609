"""What both venue adapters share: endpoints, opening a transport, naming failures.

- :func:`parse_endpoint`: a session URL -> :class:`Endpoint` (scheme, host, port, resource)
  with the default ports of ``ws``/``wss``; ``tcp``/``tls`` need an explicit port.
- :func:`open_transport`: the opener (TCP, or the memory streams of a test), then TLS with
  an explicit handshake, so a certificate problem is a :class:`ConnectFailed` that says so,
  not a hang or a broken stream later.
- :func:`enable_keepalive` / :func:`default_opener`: TCP keepalive on real sockets, so a
  link whose peer vanished without a FIN or RST ends even while we have nothing to send.
- :func:`describe_connect_error` / :func:`describe_transport_error` /
  :func:`describe_tls_error`: library exceptions -> the human ``reason`` of an event
  ("connection refused by 127.0.0.1:8765", "connection reset by peer").
- :class:`Redactor`: removes the session's secret values from every reason an adapter
  raises, in case a venue echoes a key back in an error.
- :func:`adapter_for`: the adapter for a configured session.

Timeouts are the caller's: nothing here waits on a clock.
"""

from __future__ import annotations

import errno
import json
import socket
import ssl
from collections.abc import Iterable, Mapping
from typing import Final, NamedTuple
from urllib.parse import quote, urlsplit

import trio

from daemon.adapters.base import Adapter, ConnectFailed, StreamOpener
from daemon.config import SessionConfig, redact_url

__all__ = [
    "DEFAULT_PORTS",
    "KEEPALIVE_COUNT",
    "KEEPALIVE_IDLE",
    "KEEPALIVE_INTERVAL",
    "Endpoint",
    "Redactor",
    "adapter_for",
    "default_opener",
    "describe_connect_error",
    "describe_tls_error",
    "describe_transport_error",
    "enable_keepalive",
    "format_host_port",
    "open_transport",
    "parse_endpoint",
    "socket_of",
]

#: Ports used when a ws:// or wss:// URL does not name one.
DEFAULT_PORTS: Final[Mapping[str, int]] = {"ws": 80, "wss": 443}
#: TCP keepalive: first probe after this many idle seconds, then every INTERVAL seconds;
#: the kernel declares the link dead after COUNT unanswered probes (about 60 s in all).
KEEPALIVE_IDLE: Final = 30
KEEPALIVE_INTERVAL: Final = 10
KEEPALIVE_COUNT: Final = 3


# --------------------------------------------------------------------------- endpoints


class Endpoint(NamedTuple):
    """One parsed session URL."""

    scheme: str  # ws, wss, tcp or tls
    host: str  # lower case; an IPv6 address without brackets
    port: int
    resource: str  # the HTTP request target (path and query) for ws/wss; "" for tcp/tls

    @property
    def tls(self) -> bool:
        return self.scheme in ("wss", "tls")

    @property
    def host_port(self) -> str:
        """``host:port`` (``[v6]:port``), as it appears in reasons."""
        return format_host_port(self.host, self.port)

    @property
    def host_header(self) -> str:
        """The HTTP ``Host`` header: the port only when it is not the scheme's default."""
        if DEFAULT_PORTS.get(self.scheme) == self.port:
            return f"[{self.host}]" if ":" in self.host else self.host
        return self.host_port


def format_host_port(host: str, port: int) -> str:
    """``host:port``, with brackets around an IPv6 address."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_endpoint(url: str, schemes: tuple[str, ...]) -> Endpoint:
    """Split a session URL; raises ConnectFailed (with the URL redacted) when it is unusable.

    The configuration has checked the URLs already; this guards the adapters' own use.
    """
    shown = redact_url(url)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConnectFailed(f"invalid URL {shown}: {exc}") from None
    if parts.scheme not in schemes:
        wanted = " or ".join(f"{s}://" for s in schemes)
        raise ConnectFailed(f"invalid URL {shown}: expected {wanted}")
    host = parts.hostname
    if not host:
        raise ConnectFailed(f"invalid URL {shown}: the host is missing")
    if port is None:
        if parts.scheme not in DEFAULT_PORTS:
            raise ConnectFailed(f"invalid URL {shown}: the port is missing")
        port = DEFAULT_PORTS[parts.scheme]
    resource = ""
    if parts.scheme in DEFAULT_PORTS:
        # RFC 7230 5.3.1: an empty path is sent as "/".
        resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Endpoint(parts.scheme, host, port, resource)


# --------------------------------------------------------------------------- sockets


def socket_of(stream: trio.abc.Stream) -> trio.socket.SocketType | None:
    """The socket under a SocketStream, through any SSLStream layers; None for others."""
    while isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    return stream.socket if isinstance(stream, trio.SocketStream) else None


def enable_keepalive(
    sock: trio.socket.SocketType | socket.socket,
    *,
    idle: int = KEEPALIVE_IDLE,
    interval: int = KEEPALIVE_INTERVAL,
    count: int = KEEPALIVE_COUNT,
) -> None:
    """SO_KEEPALIVE, and the probe timing where the platform has the options (Linux does).

    Raises OSError if the socket refuses SO_KEEPALIVE itself (it is not a TCP socket).
    """
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (
        ("TCP_KEEPIDLE", idle),
        ("TCP_KEEPINTVL", interval),
        ("TCP_KEEPCNT", count),
    ):
        option = getattr(socket, name, None)
        if option is not None:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)


async def default_opener(host: str, port: int) -> trio.abc.Stream:
    """The production :data:`StreamOpener`: ``trio.open_tcp_stream`` plus TCP keepalive.

    (Trio already sets TCP_NODELAY on the streams it opens.)
    """
    stream = await trio.open_tcp_stream(host, port)
    try:
        enable_keepalive(stream.socket)
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream


async def open_transport(
    opener: StreamOpener, endpoint: Endpoint, tls: ssl.SSLContext | None
) -> trio.abc.Stream:
    """Open the byte stream to ``endpoint`` and, with ``tls``, complete the TLS handshake.

    Raises ConnectFailed with a reason naming host and port, never the URL.
    """
    try:
        stream = await opener(endpoint.host, endpoint.port)
    except OSError as exc:
        raise ConnectFailed(describe_connect_error(exc, endpoint.host, endpoint.port)) from None
    if tls is None:
        return stream
    # https_compatible: a venue that drops TCP without a TLS close_notify is an ordinary
    # end of stream (the framing layers above detect a truncated message themselves).
    ssl_stream = trio.SSLStream(stream, tls, server_hostname=endpoint.host, https_compatible=True)
    try:
        await ssl_stream.do_handshake()
    except trio.BrokenResourceError as exc:
        await trio.aclose_forcefully(stream)
        raise ConnectFailed(describe_tls_error(exc, endpoint.host_port)) from None
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return ssl_stream


# --------------------------------------------------------------------------- reasons


def _leaf_errors(exc: BaseException) -> list[BaseException]:
    """The OSErrors behind ``exc``: trio.open_tcp_stream raises one OSError saying "all
    attempts failed" caused by a group holding the error of each address it tried."""
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup):
        leaves: list[BaseException] = []
        for sub in cause.exceptions:
            leaves.extend(_leaf_errors(sub) if isinstance(sub, BaseExceptionGroup) else [sub])
        return leaves or [exc]
    return [exc]


def _strerror(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror[0].lower() + exc.strerror[1:]
    return str(exc) or type(exc).__name__


def describe_connect_error(exc: OSError, host: str, port: int) -> str:
    """Why opening a TCP connection to ``host:port`` failed, as a short sentence."""
    where = format_host_port(host, port)
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve {host}: {_strerror(exc)}"
    leaves = _leaf_errors(exc)
    first = leaves[0]
    if all(isinstance(e, ConnectionRefusedError) for e in leaves):
        return f"connection refused by {where}"
    if all(isinstance(e, TimeoutError) for e in leaves):
        return f"connection to {where} timed out"
    if isinstance(first, OSError) and first.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return f"{where} is unreachable ({_strerror(first)})"
    return f"cannot connect to {where}: {_strerror(first)}"


def describe_transport_error(exc: BaseException) -> str:
    """Why an established stream broke (``exc`` is usually a trio.BrokenResourceError,
    whose cause is the OSError or SSLError underneath)."""
    if isinstance(exc, trio.ClosedResourceError):
        return "connection closed locally"
    cause: BaseException | None = exc
    if isinstance(exc, trio.BrokenResourceError):
        cause = exc.__cause__ or exc.__context__
    if isinstance(cause, ConnectionResetError):
        return "connection reset by peer"
    if isinstance(cause, BrokenPipeError):
        return "connection broken (the venue stopped reading)"
    if isinstance(cause, TimeoutError):
        return "connection timed out (no TCP acknowledgement or keepalive answer)"
    if isinstance(cause, ssl.SSLError):
        return f"TLS error: {_ssl_text(cause)}"
    if isinstance(cause, OSError):
        return f"connection lost: {_strerror(cause)}"
    return "connection lost"


def _ssl_text(exc: ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"certificate verify failed ({exc.verify_message})"
    if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError):
        return "the venue closed the connection"
    reason = exc.reason or exc.strerror or str(exc)
    return str(reason).replace("_", " ").lower()


def describe_tls_error(exc: BaseException, where: str) -> str:
    """Why the TLS handshake with ``where`` (host:port) failed."""
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, ssl.SSLError):
        detail = _ssl_text(cause)
    elif isinstance(cause, ConnectionResetError):
        detail = "connection reset by peer"
    elif cause is None:
        detail = "the venue closed the connection"
    else:
        detail = _strerror(cause)
    return f"TLS handshake with {where} failed: {detail}"


# --------------------------------------------------------------------------- secrets

_REDACTED: Final = "***"


class Redactor:
    """Replaces secret values in a text by ``***``.

    Each value is also matched in the encoded forms it takes in this codebase: URL
    percent-encoded (session URLs) and JSON-string-escaped (``auth_message``).
    """

    __slots__ = ("_needles",)

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        needles: set[str] = set()
        for value in secrets:
            if value:
                needles.update((value, quote(value, safe=""), json.dumps(value)[1:-1]))
                needles.add(json.dumps(value, ensure_ascii=False)[1:-1])
        needles.discard("")
        self._needles = tuple(sorted(needles, key=lambda n: (-len(n), n)))

    def __bool__(self) -> bool:
        return bool(self._needles)

    def __call__(self, text: str) -> str:
        for needle in self._needles:
            if needle in text:
                text = text.replace(needle, _REDACTED)
        return text

    def __repr__(self) -> str:
        return f"Redactor({len(self._needles)} needles)"


# --------------------------------------------------------------------------- factory


def adapter_for(
    session: SessionConfig,
    secrets: Mapping[str, str],
    *,
    opener: StreamOpener | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> Adapter:
    """The adapter for one configured session, with its secrets filled in.

    ``secrets`` is the mapping from :func:`daemon.config.resolve_secrets`. The adapter
    holds the rendered auth message or credentials, and redacts every secret value of the
    session from the reasons it raises. ``opener`` replaces TCP (tests pass memory
    streams); ``ssl_context`` replaces the default context for wss:// and tls://.
    """
    # Imported here: both adapter modules import this one for the helpers above.
    from daemon.adapters.protobuf import ProtobufAdapter  # noqa: PLC0415
    from daemon.adapters.websocket import WebSocketAdapter  # noqa: PLC0415

    # Every secret value the session uses: its placeholders' values, and the protobuf
    # client_secret / access_token (which may also be written literally).
    values = [secrets[key] for _, key in session.secret_refs() if key in secrets]
    credentials = session.resolved_auth(secrets)
    if credentials is not None:
        values += [credentials.client_secret, credentials.access_token]
    redactor = Redactor(values)
    if session.kind == "websocket":
        return WebSocketAdapter(
            auth_message=session.resolved_auth_message(secrets),
            auth_expect=session.auth_expect,
            subscribe=session.subscribe,
            max_frame=session.max_frame,
            pong_timeout=session.heartbeat_interval,
            opener=opener,
            ssl_context=ssl_context,
            redactor=redactor,
        )
    return ProtobufAdapter(
        credentials=credentials,
        symbols=session.subscribe,
        max_frame=session.max_frame,
        opener=opener,
        ssl_context=ssl_context,
        redactor=redactor,
    )
