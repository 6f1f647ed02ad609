"""Configuration: a TOML file -> validated, frozen settings; secrets resolved late.

Loading (:func:`load_config`) reads the file once, checks everything it can without
touching secrets, and either returns a :class:`Config` or raises one :class:`ConfigError`
that lists *every* problem found, each naming the file, a dotted key path and what is
wrong. Secrets (``${env:NAME}``, ``${cred:NAME}``) are only checked for their form at
load time; :func:`resolve_secrets` looks their values up in a separate, later step, so a
config can be validated (``wirekeep check-config``) on a machine without the secrets.

Layers, lowest first: built-in defaults, then ``[defaults]``, then the ``[[sessions]]``
entry. The tables ``backoff``, ``circuit``, ``connect_rate`` and ``auth`` merge key by
key across the layers; every other value (lists, ``auth_expect``) replaces the lower one.
A ``[defaults]`` value for a kind-specific key (``auth_message``/``auth_expect`` for
websocket, ``auth`` for protobuf) applies only to sessions of that kind.

Where placeholders may appear, and how a value is encoded when it is filled in:

============================  ==========================================================
``auth_message``              JSON-string-escaped (the template is JSON text)
``auth`` table values         verbatim
``daemon.database``           percent-encoded; only in the user name, password or query
session URLs                  percent-encoded; only in the query string
============================  ==========================================================

``$${`` writes a literal ``${`` in those fields. Anywhere else, text that looks like a
placeholder is an error rather than being sent to a venue literally.

Pure apart from reading the config file and credential files: no Trio, no SQLAlchemy.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal, NamedTuple, TypeAlias, TypeVar, cast
from urllib.parse import quote, unquote, urlsplit

from statemachines.policy import BackoffSettings, CircuitSettings, RateSettings

__all__ = [
    "CONFIG_ENV_VAR",
    "CREDENTIALS_ENV_VAR",
    "DEFAULT_CONFIG_PATH",
    "EX_CONFIG",
    "Config",
    "ConfigError",
    "ConfigProblem",
    "DaemonConfig",
    "FrozenMap",
    "HostPort",
    "ProtobufAuth",
    "ProtobufCredentials",
    "Secrets",
    "SessionConfig",
    "config_path",
    "load_config",
    "parse_config",
    "parse_host_port",
    "redact_url",
    "resolve_secrets",
]

#: Exit status for a bad configuration (sysexits.h).
EX_CONFIG: Final = 78
DEFAULT_CONFIG_PATH: Final = "/etc/wirekeep/wirekeep.toml"
CONFIG_ENV_VAR: Final = "WIREKEEP_CONFIG"
CREDENTIALS_ENV_VAR: Final = "CREDENTIALS_DIRECTORY"

DEFAULT_DATABASE: Final = "sqlite:////var/lib/wirekeep/events.db"
DEFAULT_CONTROL_SOCKET: Final = "/run/wirekeep/control.sock"
CONSUMER_SOCKET_NAME: Final = "consumers.sock"
DEFAULT_MAX_FRAME: Final = 1 << 20
DEFAULT_MAX_HANDSHAKES: Final = 256
#: sun_path is 108 bytes on Linux, including the terminating NUL.
MAX_SOCKET_PATH: Final = 107

SessionKind: TypeAlias = Literal["websocket", "protobuf"]
LogFormat: TypeAlias = Literal["auto", "json", "console"]
#: A value in ``auth_expect``.
Scalar: TypeAlias = str | int | float | bool

SESSION_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_KINDS: Final[tuple[SessionKind, ...]] = ("websocket", "protobuf")
_LOG_FORMATS: Final[tuple[LogFormat, ...]] = ("auto", "json", "console")
_SCHEMES: Final[Mapping[str, tuple[str, ...]]] = {
    "websocket": ("ws", "wss"),
    "protobuf": ("tcp", "tls"),
}
_DEFAULT_PORTS: Final[Mapping[str, int]] = {"ws": 80, "wss": 443}

_TOP_KEYS: Final = ("daemon", "defaults", "sessions")
_DAEMON_KEYS: Final = (
    "database",
    "control_socket",
    "control_group",
    "admin_group",
    "metrics_listen",
    "consumer_socket",
    "consumer_websocket_listen",
    "log_format",
    "consumer_queue",
    "consumer_max_lag",
    "max_frame",
    "max_handshakes",
)
_SESSION_KEYS: Final = (
    "name",
    "kind",
    "url",
    "fallback_urls",
    "auth_message",
    "auth_expect",
    "auth",
    "subscribe",
    "connect_timeout",
    "auth_timeout",
    "heartbeat_interval",
    "stale_after",
    "dead_after",
    "backoff",
    "circuit",
    "connect_rate",
    "enabled",
    "max_frame",
)
_DEFAULTS_KEYS: Final = tuple(k for k in _SESSION_KEYS if k != "name")
#: Session tables that merge key by key over the lower layers.
_TABLE_KEYS: Final[Mapping[str, tuple[str, ...]]] = {
    "backoff": ("initial", "max", "multiplier", "jitter", "reset_after"),
    "circuit": ("failures", "cooldown"),
    "connect_rate": ("per_host", "window"),
    "auth": ("client_id", "client_secret", "account_id", "access_token"),
}
_ONLY_FOR_KIND: Final[Mapping[str, SessionKind]] = {
    "auth_message": "websocket",
    "auth_expect": "websocket",
    "auth": "protobuf",
}
_DURATION_DEFAULTS: Final[Mapping[str, float]] = {
    "connect_timeout": 10.0,
    "auth_timeout": 10.0,
    "heartbeat_interval": 10.0,
    "stale_after": 5.0,
    "dead_after": 30.0,
}
_BACKOFF_DEFAULTS: Final[Mapping[str, float]] = {
    "initial": 0.5,
    "max": 30.0,
    "multiplier": 2.0,
    "jitter": 0.2,
    "reset_after": 30.0,
}
_CIRCUIT_FAILURES: Final = 5
_CIRCUIT_COOLDOWN: Final = 60.0
_RATE_PER_HOST: Final = 60
_RATE_WINDOW: Final = 60.0


# --------------------------------------------------------------------------- errors


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """One thing wrong with a config file. ``key`` is a dotted path, or ``-`` for the file."""

    path: str
    key: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.key}: {self.reason}"


class ConfigError(Exception):
    """Every problem found in one config file; ``str()`` gives one line per problem."""

    def __init__(self, problems: Iterable[ConfigProblem]) -> None:
        self.problems: tuple[ConfigProblem, ...] = tuple(problems)
        super().__init__(self.problems)

    def __str__(self) -> str:
        return "\n".join(str(p) for p in self.problems)


# --------------------------------------------------------------------------- small types

_V = TypeVar("_V")


class FrozenMap(Mapping[str, _V]):
    """A read-only, hashable mapping (used for tables inside frozen settings)."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, _V] | None = None) -> None:
        self._data: dict[str, _V] = dict(data) if data is not None else {}

    def __getitem__(self, key: str) -> _V:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        return hash(frozenset(self._data.items()))

    def __repr__(self) -> str:
        return f"FrozenMap({self._data!r})"


class HostPort(NamedTuple):
    """A listen address; ``str()`` gives ``host:port`` (``[v6]:port`` for IPv6)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_host_port(value: str) -> HostPort:
    """Parse ``host:port`` or ``[v6addr]:port``; port 0..65535 (0 = any free port).

    Raises :class:`ValueError` with a human reason.
    """
    if value.startswith("["):
        host, closed, rest = value[1:].partition("]")
        if not closed or not rest.startswith(":"):
            raise ValueError("expected [address]:port for IPv6, e.g. [::1]:9464")
        port_text = rest[1:]
    else:
        host, colon, port_text = value.rpartition(":")
        if not colon:
            raise ValueError("expected host:port, e.g. 127.0.0.1:9464")
        if ":" in host:
            raise ValueError("an IPv6 address needs brackets, e.g. [::1]:9464")
    if not host:
        raise ValueError("the host is missing (127.0.0.1 for loopback only, 0.0.0.0 for all)")
    if any(ch.isspace() for ch in host):
        raise ValueError("the host must not contain whitespace")
    if not (port_text.isascii() and port_text.isdigit()):
        raise ValueError(f"the port must be a number, got {_clip(port_text)!r}")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"the port must be between 0 and 65535, got {port}")
    return HostPort(host, port)


def config_path(cli_value: str | None, environ: Mapping[str, str]) -> str:
    """``--config``, else ``$WIREKEEP_CONFIG`` (ignored when empty), else the default."""
    if cli_value is not None:
        return cli_value
    return environ.get(CONFIG_ENV_VAR) or DEFAULT_CONFIG_PATH


# --------------------------------------------------------------------------- placeholders

_ENV_NAME_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_CRED_NAME_RE: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_PLACEHOLDER_START_RE: Final = re.compile(r"\$\$\{|\$\{")
_LOOKS_LIKE_PLACEHOLDER_RE: Final = re.compile(r"\$\{(?:env|cred):")
_FORMS: Final = "expected ${env:NAME} or ${cred:NAME}"


class _Ref(NamedTuple):
    kind: str  # "env" | "cred"
    name: str

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.name}"


_Part: TypeAlias = str | _Ref


def _parse_template(text: str) -> tuple[list[_Part], list[str]]:
    """Split a template into literal text and placeholder references, plus form errors."""
    parts: list[_Part] = []
    errors: list[str] = []
    literal: list[str] = []

    def flush() -> None:
        if literal:
            parts.append("".join(literal))
            literal.clear()

    pos = 0
    while (m := _PLACEHOLDER_START_RE.search(text, pos)) is not None:
        literal.append(text[pos : m.start()])
        if m.group() == "$${":
            literal.append("${")
            pos = m.end()
            continue
        close = text.find("}", m.end())
        if close < 0:
            errors.append(f"unterminated placeholder {_clip(text[m.start() :])!r}: {_FORMS}")
            literal.append(text[m.start() :])
            pos = len(text)
            break
        body = text[m.end() : close]
        kind, colon, name = body.partition(":")
        if colon and kind == "env" and _ENV_NAME_RE.fullmatch(name):
            flush()
            parts.append(_Ref("env", name))
        elif colon and kind == "cred" and _CRED_NAME_RE.fullmatch(name):
            flush()
            parts.append(_Ref("cred", name))
        else:
            shown = _clip(text[m.start() : close + 1])
            if colon and kind == "env":
                hint = "; an environment variable name is letters, digits and '_'"
            elif colon and kind == "cred":
                hint = "; a credential name is letters, digits, '_', '.' and '-'"
            else:
                hint = "; write $${ for a literal ${"
            errors.append(f"malformed placeholder {shown!r}: {_FORMS}{hint}")
            literal.append(text[m.start() : close + 1])
        pos = close + 1
    literal.append(text[pos:])
    flush()
    return parts, errors


def _refs(template: str) -> list[_Ref]:
    return [p for p in _parse_template(template)[0] if isinstance(p, _Ref)]


def _render(template: str, secrets: Mapping[str, str], encode: Callable[[str], str]) -> str:
    out: list[str] = []
    for part in _parse_template(template)[0]:
        if isinstance(part, str):
            out.append(part)
            continue
        try:
            value = secrets[part.key]
        except KeyError:
            raise KeyError(f"secret {part.key} was not resolved (see resolve_secrets)") from None
        out.append(encode(value))
    return "".join(out)


def _verbatim(value: str) -> str:
    return value


def _url_encode(value: str) -> str:
    return quote(value, safe="")


def _json_escape(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)[1:-1]


class Secrets(FrozenMap[str]):
    """Resolved secrets: placeholder key (``"env:NAME"``, ``"cred:NAME"``) -> value.

    Its ``repr`` shows the keys only, never a value.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return f"Secrets(keys={sorted(self._data)!r})"


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True, slots=True)
class ProtobufCredentials:
    """The ``auth`` table of a protobuf session with every placeholder filled in."""

    client_id: str
    client_secret: str = field(repr=False)
    account_id: int
    access_token: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class ProtobufAuth:
    """The ``auth`` table of a protobuf session, as templates (placeholders unresolved).

    ``account_id`` is an ``int`` when written as a number (or as digits), else a template.
    """

    client_id: str
    client_secret: str = field(repr=False)
    account_id: int | str
    access_token: str = field(repr=False)

    def templates(self) -> Iterator[tuple[str, str]]:
        """(key, template) for every string-valued entry."""
        yield "client_id", self.client_id
        yield "client_secret", self.client_secret
        if isinstance(self.account_id, str):
            yield "account_id", self.account_id
        yield "access_token", self.access_token

    def resolved(self, secrets: Mapping[str, str]) -> ProtobufCredentials:
        account = self.account_id
        if isinstance(account, str):
            text = _render(account, secrets, _verbatim)
            if not (text.isascii() and text.isdigit()):
                raise ValueError("auth.account_id does not resolve to an integer")
            account = int(text)
        return ProtobufCredentials(
            client_id=_render(self.client_id, secrets, _verbatim),
            client_secret=_render(self.client_secret, secrets, _verbatim),
            account_id=account,
            access_token=_render(self.access_token, secrets, _verbatim),
        )


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """One ``[[sessions]]`` entry with every layer merged and every value checked.

    String fields that allow placeholders hold the *templates*; use the ``resolved_*``
    methods with the :class:`Secrets` from :func:`resolve_secrets` to fill them in.
    """

    name: str
    kind: SessionKind
    url: str
    fallback_urls: tuple[str, ...] = ()
    auth_message: str | None = None
    auth_expect: FrozenMap[Scalar] = field(default_factory=FrozenMap)
    auth: ProtobufAuth | None = None
    subscribe: tuple[str, ...] = ()
    connect_timeout: float = 10.0
    auth_timeout: float = 10.0
    heartbeat_interval: float = 10.0
    stale_after: float = 5.0
    dead_after: float = 30.0
    backoff: BackoffSettings = field(default_factory=BackoffSettings)
    circuit: CircuitSettings = field(default_factory=CircuitSettings)
    connect_rate: RateSettings = field(default_factory=RateSettings)
    enabled: bool = True
    max_frame: int = DEFAULT_MAX_FRAME

    @property
    def endpoints(self) -> tuple[str, ...]:
        """The primary URL, then the fallbacks, in order (templates)."""
        return (self.url, *self.fallback_urls)

    def host_key(self, url: str | None = None) -> str:
        """``host:port`` of ``url`` (default: the primary URL), for the shared connect budget.

        The host is lower-cased; ws/wss URLs without a port get 80/443.
        """
        parts = urlsplit(self.url if url is None else url)
        port = parts.port if parts.port is not None else _DEFAULT_PORTS.get(parts.scheme, 0)
        return str(HostPort(parts.hostname or "", port))

    def fingerprint(self) -> str:
        """A stable hash of every setting (templates, not secret values): 16 hex chars.

        Equal fingerprints mean a reload can leave the running session alone.
        """
        canonical = json.dumps(
            _canonical(self), sort_keys=True, separators=(",", ":"), allow_nan=False
        )
        return hashlib.sha256(f"session-v1:{canonical}".encode()).hexdigest()[:16]

    def secret_refs(self) -> Iterator[tuple[str, str]]:
        """(key path, placeholder key) for every placeholder this session uses."""
        label = f"sessions[{self.name}]"
        yield from ((f"{label}.url", r.key) for r in _refs(self.url))
        for i, url in enumerate(self.fallback_urls):
            yield from ((f"{label}.fallback_urls[{i}]", r.key) for r in _refs(url))
        if self.auth_message is not None:
            yield from ((f"{label}.auth_message", r.key) for r in _refs(self.auth_message))
        if self.auth is not None:
            for key, template in self.auth.templates():
                yield from ((f"{label}.auth.{key}", r.key) for r in _refs(template))

    def resolved_url(self, url: str, secrets: Mapping[str, str]) -> str:
        """One endpoint with its query-string placeholders filled in (percent-encoded)."""
        return _render(url, secrets, _url_encode)

    def resolved_endpoints(self, secrets: Mapping[str, str]) -> tuple[str, ...]:
        return tuple(self.resolved_url(url, secrets) for url in self.endpoints)

    def resolved_auth_message(self, secrets: Mapping[str, str]) -> str | None:
        """The auth message to send, values JSON-string-escaped; None when not configured."""
        if self.auth_message is None:
            return None
        return _render(self.auth_message, secrets, _json_escape)

    def resolved_auth(self, secrets: Mapping[str, str]) -> ProtobufCredentials | None:
        return None if self.auth is None else self.auth.resolved(secrets)


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    """The ``[daemon]`` table. ``database`` is a template (see :meth:`resolved_database`)."""

    database: str = DEFAULT_DATABASE
    control_socket: str = DEFAULT_CONTROL_SOCKET
    control_group: str | None = None
    admin_group: str | None = None
    metrics_listen: HostPort | None = None
    consumer_socket: str = f"/run/wirekeep/{CONSUMER_SOCKET_NAME}"
    consumer_websocket_listen: HostPort | None = None
    log_format: LogFormat = "auto"
    consumer_queue: int = 10_000
    consumer_max_lag: float = 30.0
    max_frame: int = DEFAULT_MAX_FRAME
    #: Connection attempts (connect + authenticate + subscribe) in progress at once,
    #: across all sessions; the rest queue in order. Keeps a start-up or a mass
    #: reconnect from starving every handshake of CPU until they all time out.
    max_handshakes: int = DEFAULT_MAX_HANDSHAKES

    def resolved_database(self, secrets: Mapping[str, str]) -> str:
        """The SQLAlchemy URL with placeholders filled in (percent-encoded).

        Show it only through :func:`redact_url`.
        """
        return _render(self.database, secrets, _url_encode)

    def secret_refs(self) -> Iterator[tuple[str, str]]:
        yield from (("daemon.database", r.key) for r in _refs(self.database))


@dataclass(frozen=True, slots=True)
class Config:
    """A loaded configuration file."""

    path: str
    #: First 16 hex chars of the SHA-256 of the raw file bytes.
    config_hash: str
    daemon: DaemonConfig
    #: In file order.
    sessions: tuple[SessionConfig, ...]

    def session(self, name: str) -> SessionConfig:
        for session in self.sessions:
            if session.name == name:
                return session
        raise KeyError(f"no session named {name!r} in {self.path}")

    @property
    def session_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.sessions)

    def secret_refs(self, *, include_disabled: bool = True) -> tuple[tuple[str, str], ...]:
        """(key path, placeholder key) for every placeholder in the file, in file order."""
        refs = list(self.daemon.secret_refs())
        for session in self.sessions:
            if session.enabled or include_disabled:
                refs.extend(session.secret_refs())
        return tuple(refs)

    def secret_values(self, secrets: Mapping[str, str]) -> tuple[str, ...]:
        """Every string the logging layer must redact, longest first, no empty strings.

        Each resolved secret in the raw, percent-encoded and JSON-escaped forms it can
        take, plus the literal database password and the rendered ``client_secret`` /
        ``access_token`` of every protobuf session whose secrets are resolved.
        """
        found: set[str] = set()
        for _, key in self.secret_refs():
            value = secrets.get(key)
            if value:
                found.update((value, _url_encode(value), _json_escape(value)))
        password = _url_password(self.daemon.database)
        if password is not None and all(r.key in secrets for r in _refs(password)):
            rendered = _render(password, secrets, _url_encode)
            found.update((rendered, unquote(rendered)))
        for session in self.sessions:
            if session.auth is None:
                continue
            for template in (session.auth.client_secret, session.auth.access_token):
                if all(r.key in secrets for r in _refs(template)):
                    found.add(_render(template, secrets, _verbatim))
        # An account id is no secret, and a value this short cannot be masked without
        # mangling ordinary text; secret-bearing fields refuse such values (resolve_secrets).
        found = {v for v in found if len(v) >= MIN_SECRET_LENGTH}
        return tuple(sorted(found, key=lambda v: (-len(v), v)))


def _canonical(obj: object) -> object:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _canonical(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): _canonical(v) for k, v in obj.items()}
    if isinstance(obj, tuple | list):
        return [_canonical(v) for v in obj]
    return obj


# --------------------------------------------------------------------------- URLs

# user:password@ after the scheme; the password runs to the first "@", as in SQLAlchemy.
_URL_PASSWORD_RE: Final = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://[^:/?#@]*:)([^@]*)@")
_SENSITIVE_PARAM_RE: Final = re.compile(r"pass|pwd|secret|token|key|sig|auth|cred", re.IGNORECASE)
_REDACTED: Final = "***"


def _url_password(url: str) -> str | None:
    m = _URL_PASSWORD_RE.match(url)
    return m.group(2) if m and m.group(2) else None


def redact_url(url: str) -> str:
    """``url`` for display: the password and secret-looking query values become ``***``.

    A query value is secret-looking when its name contains pass, pwd, secret, token, key,
    sig, auth or cred. Placeholders are not secrets and show either way.
    """
    out = _URL_PASSWORD_RE.sub(lambda m: f"{m.group(1)}{_REDACTED}@" if m.group(2) else m[0], url)
    query_at = out.find("?")
    if query_at < 0:
        return out
    fragment_at = out.find("#", query_at)
    end = len(out) if fragment_at < 0 else fragment_at
    params = []
    for param in out[query_at + 1 : end].split("&"):
        name, eq, value = param.partition("=")
        secret = eq and value and _SENSITIVE_PARAM_RE.search(name)
        params.append(f"{name}={_REDACTED}" if secret else param)
    return f"{out[: query_at + 1]}{'&'.join(params)}{out[end:]}"


# --------------------------------------------------------------------------- validation


@dataclass(frozen=True, slots=True)
class _Val:
    """A raw TOML value and the dotted key path where it was written."""

    value: object
    key: str


def _clip(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def _describe(value: object) -> str:
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"float {value!r}"
    if isinstance(value, str):
        return f"string {_clip(value)!r}"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"


def _fmt(number: float) -> str:
    return repr(number)


class _Checker:
    """Collects problems (deduplicated, in order) and reads typed values."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.problems: list[ConfigProblem] = []
        self._seen: set[ConfigProblem] = set()
        #: Problems found so far, including ones already reported (from [defaults]):
        #: a reader compares it before and after to know whether its value is usable.
        self.count = 0

    def add(self, key: str, reason: str) -> None:
        self.count += 1  # counts duplicates too: see ``count``
        problem = ConfigProblem(self.path, key, reason)
        if problem not in self._seen:
            self._seen.add(problem)
            self.problems.append(problem)

    def unknown_keys(
        self, table: Mapping[str, object], prefix: str, known: Sequence[str], what: str = "key"
    ) -> None:
        for key in table:
            if key in known:
                continue
            match = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {match[0]!r}?" if match else f"known: {', '.join(known)}"
            self.add(_join(prefix, key), f"unknown {what} ({hint})")

    def string(self, v: _Val, *, allow_empty: bool = False) -> str | None:
        if not isinstance(v.value, str):
            self.add(v.key, f"must be a string, got {_describe(v.value)}")
            return None
        if not v.value and not allow_empty:
            self.add(v.key, "must not be empty")
            return None
        return v.value

    def plain_string(self, v: _Val) -> str | None:
        """A string in which placeholders are not resolved, so must not appear."""
        text = self.string(v)
        if text is not None and _LOOKS_LIKE_PLACEHOLDER_RE.search(text):
            self.add(v.key, f"placeholders are not resolved here ({_PLACEHOLDER_FIELDS})")
            return None
        return text

    def template(self, v: _Val) -> str | None:
        text = self.string(v)
        if text is None:
            return None
        errors = _parse_template(text)[1]
        for error in errors:
            self.add(v.key, error)
        return None if errors else text

    def boolean(self, v: _Val) -> bool | None:
        if not isinstance(v.value, bool):
            self.add(v.key, f"must be true or false, got {_describe(v.value)}")
            return None
        return v.value

    def number(self, v: _Val) -> float | None:
        """A finite float; a TOML integer is accepted, a boolean never."""
        x = v.value
        if isinstance(x, bool) or not isinstance(x, int | float):
            self.add(v.key, f"must be a number, got {_describe(x)}")
            return None
        result = float(x)
        if not math.isfinite(result):
            self.add(v.key, f"must be a finite number, got {result!r}")
            return None
        return result

    def positive(self, v: _Val) -> float | None:
        x = self.number(v)
        if x is not None and x <= 0:
            self.add(v.key, f"must be greater than 0, got {_fmt(x)}")
            return None
        return x

    def integer(self, v: _Val, *, minimum: int = 1) -> int | None:
        x = v.value
        if isinstance(x, bool) or not isinstance(x, int):
            self.add(v.key, f"must be an integer, got {_describe(x)}")
            return None
        if x < minimum:
            self.add(v.key, f"must be at least {minimum}, got {x}")
            return None
        return x

    def table(self, v: _Val) -> dict[str, object] | None:
        if not isinstance(v.value, dict):
            self.add(v.key, f"must be a table, got {_describe(v.value)}")
            return None
        return cast("dict[str, object]", v.value)

    def array(self, v: _Val) -> list[_Val] | None:
        if not isinstance(v.value, list):
            self.add(v.key, f"must be an array, got {_describe(v.value)}")
            return None
        return [_Val(item, f"{v.key}[{i}]") for i, item in enumerate(v.value)]

    def listen(self, v: _Val) -> HostPort | None:
        text = self.plain_string(v)
        if text is None:
            return None
        try:
            return parse_host_port(text)
        except ValueError as exc:
            self.add(v.key, f"must be host:port: {exc}")
            return None

    def socket_path(self, v: _Val) -> str | None:
        text = self.plain_string(v)
        if text is None:
            return None
        size = len(os.fsencode(text))
        if "\0" in text:
            self.add(v.key, "must not contain a NUL character")
            return None
        if size > MAX_SOCKET_PATH:
            self.add(
                v.key, f"is {size} bytes long; a Unix socket path has at most {MAX_SOCKET_PATH}"
            )
            return None
        return text


_PLACEHOLDER_FIELDS: Final = (
    "placeholders work in auth_message, auth, daemon.database and URL query strings"
)
_URL_SENTINEL: Final = "wirekeepplaceholder"


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _mask(parts: Sequence[_Part]) -> str:
    """The template with each placeholder replaced by a marker that survives urlsplit."""
    return "".join(p if isinstance(p, str) else _URL_SENTINEL for p in parts)


def _url_shape(c: _Checker, v: _Val, text: str) -> tuple[str, list[_Part]] | None:
    """Common URL checks; returns (masked url, parts) or None after reporting."""
    if any(ch.isspace() or ord(ch) < 32 for ch in text):
        c.add(v.key, "must not contain whitespace or control characters")
        return None
    parts, errors = _parse_template(text)
    for error in errors:
        c.add(v.key, error)
    if errors:
        return None
    return _mask(parts), parts


def _endpoint(c: _Checker, v: _Val, kind: SessionKind | None) -> str | None:
    """A session URL: ws(s)://host[:port]/path?query, or tcp|tls://host:port."""
    text = c.string(v)
    if text is None:
        return None
    shape = _url_shape(c, v, text)
    if shape is None:
        return None
    masked = shape[0]
    schemes = _SCHEMES[kind] if kind is not None else ("ws", "wss", "tcp", "tls")
    example = "tcp://host:port or tls://host:port" if kind == "protobuf" else "wss://host/path"
    scheme, sep, _ = masked.partition("://")
    if not sep:
        c.add(v.key, f"must be an absolute URL like {example}")
        return None
    problems_before = c.count
    if scheme not in schemes:
        wanted = " or ".join(f"{s}://" for s in schemes)
        c.add(v.key, f"must start with {wanted} for a {kind or 'session'} URL, got {scheme!r}")
    try:
        parts = urlsplit(masked)
        port = parts.port
    except ValueError as exc:
        c.add(v.key, f"is not a valid URL ({exc})")
        return None
    if "@" in parts.netloc:
        c.add(
            v.key, "must not contain a user name or password; use auth, auth_message or the query"
        )
    if not parts.hostname:
        c.add(v.key, f"the host is missing (expected {example})")
    if port == 0:
        c.add(v.key, "the port must be between 1 and 65535, got 0")
    if "#" in masked:
        c.add(v.key, "must not have a #fragment")
    if scheme in ("tcp", "tls"):
        if port is None:
            c.add(v.key, f"needs a port ({scheme}://host:port)")
        if parts.path not in ("", "/") or parts.query:
            c.add(v.key, f"takes only a host and a port ({scheme}://host:port)")
    if _URL_SENTINEL in parts.netloc or _URL_SENTINEL in parts.path:
        c.add(v.key, "placeholders are allowed only in the query string")
    return text if c.count == problems_before else None


def _database(c: _Checker, v: _Val) -> str | None:
    text = c.string(v)
    if text is None:
        return None
    shape = _url_shape(c, v, text)
    if shape is None:
        return None
    masked = shape[0]
    problems_before = c.count
    if text.startswith("postgresql://"):
        text = "postgresql+psycopg://" + text.removeprefix("postgresql://")
        masked = "postgresql+psycopg://" + masked.removeprefix("postgresql://")
    if masked.startswith("sqlite:///"):
        path, _, _ = masked.removeprefix("sqlite:///").partition("?")
        if not path or path == ":memory:":
            c.add(
                v.key,
                "needs a database file (sqlite:////absolute/path.db); an in-memory SQLite "
                "database is private to one thread",
            )
        if _URL_SENTINEL in path:
            c.add(v.key, "placeholders are allowed only in the query string of an sqlite URL")
    elif masked.startswith("postgresql+psycopg://"):
        try:
            parts = urlsplit(masked)
            _ = parts.port
        except ValueError as exc:
            c.add(v.key, f"is not a valid URL ({exc})")
            return None
        hostinfo = parts.netloc.rpartition("@")[2]
        if _URL_SENTINEL in hostinfo or _URL_SENTINEL in parts.path:
            c.add(v.key, "placeholders are allowed only in the user name, password and query")
    else:
        scheme, sep, _ = text.partition("://")
        got = f", got {_clip(scheme)!r}" if sep else ""
        c.add(v.key, f"must start with sqlite:///, postgresql+psycopg:// or postgresql://{got}")
    return text if c.count == problems_before else None


def _json_template(c: _Checker, v: _Val, text: str) -> None:
    """Check that ``text`` (a template) is JSON once its placeholders are filled in."""
    parts = _parse_template(text)[0]
    filled = "".join(p if isinstance(p, str) else "0" for p in parts)
    try:
        json.loads(filled)
    except json.JSONDecodeError as exc:
        c.add(v.key, f"must be JSON text: {exc.msg} at character {exc.pos}")


def _layer(
    vals: dict[str, _Val],
    tables: dict[str, dict[str, _Val]],
    raw: Mapping[str, object],
    prefix: str,
    kind: str | None,
    *,
    is_defaults: bool,
) -> None:
    """Lay one layer's known keys over ``vals`` / ``tables``."""
    for key, value in raw.items():
        if key not in _SESSION_KEYS or (is_defaults and key == "name"):
            continue
        if is_defaults and kind is not None and _ONLY_FOR_KIND.get(key, kind) != kind:
            continue
        vals[key] = _Val(value, f"{prefix}.{key}")
        if key in _TABLE_KEYS and isinstance(value, dict):
            merged = tables.setdefault(key, {})
            for sub, sub_value in value.items():
                if sub in _TABLE_KEYS[key]:
                    merged[sub] = _Val(sub_value, f"{prefix}.{key}.{sub}")


def _layered_key(label: str, key: str, *vals: _Val) -> str:
    """Where to report a problem between several values: under [defaults] when all came
    from there (so it is reported once), else under the session."""
    if vals and all(v.key.startswith("defaults.") for v in vals):
        return vals[0].key
    return f"{label}.{key}"


class _SessionReader:
    """Reads one session's merged values (or the [defaults] layer alone, ``partial``)."""

    def __init__(
        self,
        c: _Checker,
        vals: Mapping[str, _Val],
        tables: Mapping[str, Mapping[str, _Val]],
        label: str,
        *,
        partial: bool,
    ) -> None:
        self.c = c
        self.vals = vals
        self.tables = tables
        self.label = label
        self.partial = partial

    def required(self, key: str) -> _Val | None:
        v = self.vals.get(key)
        if v is None and not self.partial:
            self.c.add(f"{self.label}.{key}", "required key is missing")
        return v

    def duration(self, key: str) -> tuple[float | None, _Val | None]:
        v = self.vals.get(key)
        if v is None:
            return _DURATION_DEFAULTS[key], None
        return self.c.positive(v), v

    def kind(self) -> SessionKind | None:
        v = self.required("kind")
        if v is None:
            return None
        text = self.c.string(v)
        if text is None:
            return None
        for kind in _KINDS:
            if text == kind:
                return kind
        self.c.add(v.key, f'must be "websocket" or "protobuf", got {text!r}')
        return None

    def wrong_kind(self, key: str, kind: SessionKind | None) -> bool:
        """A kind-specific key set on a session of the other kind (reported)."""
        v = self.vals.get(key)
        wanted = _ONLY_FOR_KIND[key]
        if v is None or self.partial or kind is None or kind == wanted:
            return False
        self.c.add(v.key, f'only applies to kind = "{wanted}" sessions (this one is "{kind}")')
        return True

    def sub(self, table: str) -> Mapping[str, _Val] | None:
        """The merged sub-table, or None when absent or not a table (reported)."""
        v = self.vals.get(table)
        if v is None:
            return {}
        if self.c.table(v) is None:
            return None
        return self.tables.get(table, {})

    def read(self, name: str, max_frame_default: int) -> SessionConfig | None:
        c = self.c
        before = c.count
        kind = self.kind()

        url: str | None = None
        if (v := self.required("url")) is not None:
            url = _endpoint(c, v, kind)

        fallbacks: list[str] = []
        if (v := self.vals.get("fallback_urls")) is not None and (items := c.array(v)) is not None:
            for item in items:
                if (checked := _endpoint(c, item, kind)) is not None:
                    fallbacks.append(checked)

        auth_message: str | None = None
        if (v := self.vals.get("auth_message")) is not None and not self.wrong_kind(
            "auth_message", kind
        ):
            auth_message = c.template(v)
            if auth_message is not None:
                _json_template(c, v, auth_message)

        auth_expect: dict[str, Scalar] = {}
        if (v := self.vals.get("auth_expect")) is not None and not self.wrong_kind(
            "auth_expect", kind
        ):
            table = c.table(v)
            for key, value in (table or {}).items():
                if isinstance(value, str | int | float | bool):
                    auth_expect[key] = value
                else:
                    c.add(
                        f"{v.key}.{key}",
                        f"must be a string, number or boolean, got {_describe(value)}",
                    )

        auth = self.read_auth(kind)

        subscribe: list[str] = []
        if (v := self.vals.get("subscribe")) is not None and (items := c.array(v)) is not None:
            for item in items:
                text = c.plain_string(item)
                if text is None:
                    continue
                if kind == "websocket":
                    _json_template(c, item, text)
                subscribe.append(text)

        durations = {key: self.duration(key) for key in _DURATION_DEFAULTS}
        stale, stale_v = durations["stale_after"]
        dead, dead_v = durations["dead_after"]
        if not self.partial and stale is not None and dead is not None and stale >= dead:
            at = _layered_key(self.label, "stale_after", *(x for x in (stale_v, dead_v) if x))
            c.add(at, f"must be less than dead_after ({_fmt(dead)}), got {_fmt(stale)}")

        backoff = self.read_backoff()
        circuit = self.read_circuit()
        rate = self.read_rate()

        enabled: bool | None = True
        if (v := self.vals.get("enabled")) is not None:
            enabled = c.boolean(v)
        max_frame: int | None = max_frame_default
        if (v := self.vals.get("max_frame")) is not None:
            max_frame = c.integer(v)

        if self.partial or c.count != before:
            return None
        # No new problem means every value below was read successfully.
        assert kind is not None
        assert url is not None
        assert enabled is not None
        assert backoff is not None
        assert circuit is not None
        assert rate is not None
        assert max_frame is not None
        return SessionConfig(
            name=name,
            kind=kind,
            url=url,
            fallback_urls=tuple(fallbacks),
            auth_message=auth_message,
            auth_expect=FrozenMap(auth_expect),
            auth=auth,
            subscribe=tuple(subscribe),
            connect_timeout=cast("float", durations["connect_timeout"][0]),
            auth_timeout=cast("float", durations["auth_timeout"][0]),
            heartbeat_interval=cast("float", durations["heartbeat_interval"][0]),
            stale_after=cast("float", stale),
            dead_after=cast("float", dead),
            backoff=backoff,
            circuit=circuit,
            connect_rate=rate,
            enabled=enabled,
            max_frame=max_frame,
        )

    def read_auth(self, kind: SessionKind | None) -> ProtobufAuth | None:
        c = self.c
        if "auth" not in self.vals or self.wrong_kind("auth", kind):
            return None
        table = self.sub("auth")
        if table is None:
            return None
        values: dict[str, str | int] = {}
        for key in _TABLE_KEYS["auth"]:
            v = table.get(key)
            if v is None:
                if not self.partial:
                    c.add(f"{self.label}.auth.{key}", "required key is missing from auth")
                continue
            if key == "account_id" and isinstance(v.value, int) and not isinstance(v.value, bool):
                if v.value < 0:
                    c.add(v.key, f"must not be negative, got {v.value}")
                else:
                    values[key] = v.value
                continue
            text = c.template(v)
            if text is None:
                continue
            if key == "account_id" and not _refs(text):
                if not (text.isascii() and text.isdigit()):
                    c.add(v.key, f"must be an integer or a placeholder, got {_describe(text)}")
                    continue
                values[key] = int(text)
                continue
            values[key] = text
        if len(values) != len(_TABLE_KEYS["auth"]):
            return None
        return ProtobufAuth(
            client_id=str(values["client_id"]),
            client_secret=str(values["client_secret"]),
            account_id=values["account_id"],
            access_token=str(values["access_token"]),
        )

    def read_backoff(self) -> BackoffSettings | None:
        c = self.c
        table = self.sub("backoff")
        if table is None:
            return None
        got: dict[str, float | None] = {}
        for key, default in _BACKOFF_DEFAULTS.items():
            v = table.get(key)
            if v is None:
                got[key] = default
            elif key in ("initial", "max", "reset_after"):
                got[key] = c.positive(v)
            elif key == "multiplier":
                x = c.number(v)
                if x is not None and x < 1:
                    c.add(v.key, f"must be at least 1, got {_fmt(x)}")
                    x = None
                got[key] = x
            else:  # jitter
                x = c.number(v)
                if x is not None and not 0 <= x < 1:
                    c.add(v.key, f"must be at least 0 and less than 1, got {_fmt(x)}")
                    x = None
                got[key] = x
        initial, maximum = got["initial"], got["max"]
        if not self.partial and initial is not None and maximum is not None and initial > maximum:
            used = [x for x in (table.get("initial"), table.get("max")) if x is not None]
            at = _layered_key(self.label, "backoff.initial", *used)
            c.add(
                at, f"must not be greater than backoff.max ({_fmt(maximum)}), got {_fmt(initial)}"
            )
            return None
        if any(x is None for x in got.values()):
            return None
        return BackoffSettings(
            initial=cast("float", initial),
            max=cast("float", maximum),
            multiplier=cast("float", got["multiplier"]),
            jitter=cast("float", got["jitter"]),
            reset_after=cast("float", got["reset_after"]),
        )

    def read_circuit(self) -> CircuitSettings | None:
        table = self.sub("circuit")
        if table is None:
            return None
        failures: int | None = _CIRCUIT_FAILURES
        cooldown: float | None = _CIRCUIT_COOLDOWN
        if (v := table.get("failures")) is not None:
            failures = self.c.integer(v)
        if (v := table.get("cooldown")) is not None:
            cooldown = self.c.positive(v)
        if failures is None or cooldown is None:
            return None
        return CircuitSettings(failures=failures, cooldown=cooldown)

    def read_rate(self) -> RateSettings | None:
        table = self.sub("connect_rate")
        if table is None:
            return None
        per_host: int | None = _RATE_PER_HOST
        window: float | None = _RATE_WINDOW
        if (v := table.get("per_host")) is not None:
            per_host = self.c.integer(v)
        if (v := table.get("window")) is not None:
            window = self.c.positive(v)
        if per_host is None or window is None:
            return None
        return RateSettings(per_host=per_host, window=window)


def _check_session_keys(c: _Checker, raw: Mapping[str, object], prefix: str) -> None:
    is_defaults = prefix == "defaults"
    for key, value in raw.items():
        if is_defaults and key == "name":
            c.add("defaults.name", "a session name cannot be given under [defaults]")
        elif key not in _SESSION_KEYS:
            c.unknown_keys({key: value}, prefix, _DEFAULTS_KEYS if is_defaults else _SESSION_KEYS)
        elif key in _TABLE_KEYS and isinstance(value, dict):
            c.unknown_keys(value, f"{prefix}.{key}", _TABLE_KEYS[key])


def _read_daemon(c: _Checker, raw: Mapping[str, object]) -> DaemonConfig | None:
    before = c.count
    c.unknown_keys(raw, "daemon", _DAEMON_KEYS)

    def val(key: str) -> _Val | None:
        return _Val(raw[key], f"daemon.{key}") if key in raw else None

    database: str | None = DEFAULT_DATABASE
    if (v := val("database")) is not None:
        database = _database(c, v)
    control: str | None = DEFAULT_CONTROL_SOCKET
    if (v := val("control_socket")) is not None:
        control = c.socket_path(v)
    consumer: str | None = None
    if (v := val("consumer_socket")) is not None:
        consumer = c.socket_path(v)
    elif control is not None:
        consumer = os.path.join(os.path.dirname(control), CONSUMER_SOCKET_NAME)
        if len(os.fsencode(consumer)) > MAX_SOCKET_PATH:
            c.add(
                "daemon.consumer_socket",
                f"the default beside control_socket is longer than {MAX_SOCKET_PATH} bytes; "
                "set consumer_socket",
            )
    groups: dict[str, str | None] = {"control_group": None, "admin_group": None}
    for key in groups:
        if (v := val(key)) is not None:
            text = c.plain_string(v)
            if text is not None and any(ch.isspace() or ch in ":/" for ch in text):
                c.add(v.key, f"must be a group name, got {_clip(text)!r}")
            groups[key] = text
    listens: dict[str, HostPort | None] = {
        "metrics_listen": None,
        "consumer_websocket_listen": None,
    }
    for key in listens:
        if (v := val(key)) is not None:
            listens[key] = c.listen(v)
    log_format: LogFormat | None = "auto"
    if (v := val("log_format")) is not None:
        text = c.string(v)
        log_format = next((f for f in _LOG_FORMATS if f == text), None)
        if text is not None and log_format is None:
            c.add(v.key, f'must be "auto", "json" or "console", got {text!r}')
    queue: int | None = 10_000
    if (v := val("consumer_queue")) is not None:
        queue = c.integer(v)
    lag: float | None = 30.0
    if (v := val("consumer_max_lag")) is not None:
        lag = c.positive(v)
    max_frame: int | None = DEFAULT_MAX_FRAME
    if (v := val("max_frame")) is not None:
        max_frame = c.integer(v)
    handshakes: int | None = DEFAULT_MAX_HANDSHAKES
    if (v := val("max_handshakes")) is not None:
        handshakes = c.integer(v)

    if consumer is not None and control is not None and consumer == control:
        c.add("daemon.consumer_socket", "must differ from control_socket")
    metrics, websocket = listens["metrics_listen"], listens["consumer_websocket_listen"]
    if metrics is not None and websocket is not None and metrics == websocket and metrics.port:
        c.add("daemon.consumer_websocket_listen", f"must differ from metrics_listen ({metrics})")

    if c.count != before:
        return None
    assert database is not None
    assert control is not None
    assert consumer is not None
    assert log_format is not None
    assert queue is not None
    assert lag is not None
    assert max_frame is not None
    assert handshakes is not None
    return DaemonConfig(
        database=database,
        control_socket=control,
        control_group=groups["control_group"],
        admin_group=groups["admin_group"],
        metrics_listen=metrics,
        consumer_socket=consumer,
        consumer_websocket_listen=websocket,
        log_format=log_format,
        consumer_queue=queue,
        consumer_max_lag=lag,
        max_frame=max_frame,
        max_handshakes=handshakes,
    )


def _toml_problem(path: str, text: str, exc: tomllib.TOMLDecodeError) -> ConfigProblem:
    message = str(exc)
    if "(at end of document)" in message:
        lines = text.rstrip().count("\n") + 1
        message = message.replace("(at end of document)", f"(at end of document, line {lines})")
    if message.startswith(("Cannot overwrite a value", "Cannot declare")):
        message += "; a key or table is defined twice"
    elif message.startswith("Cannot mutate immutable namespace"):
        message += "; an inline table cannot be extended after it is written"
    return ConfigProblem(path, "-", f"invalid TOML: {message}")


def parse_config(data: bytes, path: str = "<config>") -> Config:
    """Validate the bytes of a config file; ``path`` is only used in messages."""
    config_hash = hashlib.sha256(data).hexdigest()[:16]
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            [ConfigProblem(path, "-", f"not UTF-8 text (byte {exc.start})")]
        ) from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([_toml_problem(path, text, exc)]) from None

    c = _Checker(path)
    c.unknown_keys(doc, "", _TOP_KEYS, what="section")

    daemon_raw: Mapping[str, object] = {}
    if "daemon" in doc:
        daemon_raw = c.table(_Val(doc["daemon"], "daemon")) or {}
    daemon = _read_daemon(c, daemon_raw)
    max_frame_default = daemon.max_frame if daemon is not None else DEFAULT_MAX_FRAME

    defaults: Mapping[str, object] = {}
    if "defaults" in doc:
        defaults = c.table(_Val(doc["defaults"], "defaults")) or {}
    _check_session_keys(c, defaults, "defaults")
    kind_default = defaults.get("kind")
    defaults_kind = kind_default if isinstance(kind_default, str) else None
    # The [defaults] layer on its own: every single-value problem is reported there once.
    vals: dict[str, _Val] = {}
    tables: dict[str, dict[str, _Val]] = {}
    _layer(vals, tables, defaults, "defaults", None, is_defaults=True)
    _SessionReader(c, vals, tables, "defaults", partial=True).read("", max_frame_default)

    raw_sessions: list[object] = []
    if "sessions" in doc:
        if isinstance(doc["sessions"], list):
            raw_sessions = doc["sessions"]
        else:
            c.add("sessions", "must be an array of tables: write each session as [[sessions]]")

    sessions: list[SessionConfig] = []
    first_index: dict[str, int] = {}
    for index, raw in enumerate(raw_sessions):
        label = f"sessions[{index}]"
        if not isinstance(raw, dict):
            c.add(label, f"must be a table, got {_describe(raw)}")
            continue
        name = _session_name(c, raw, label, first_index, index)
        if name is not None:
            label = f"sessions[{name}]"
        _check_session_keys(c, raw, label)
        own_kind = raw.get("kind")
        kind = own_kind if isinstance(own_kind, str) else defaults_kind
        vals, tables = {}, {}
        _layer(vals, tables, defaults, "defaults", kind, is_defaults=True)
        _layer(vals, tables, raw, label, kind, is_defaults=False)
        session = _SessionReader(c, vals, tables, label, partial=False).read(
            name or "", max_frame_default
        )
        if session is not None and name is not None:
            sessions.append(session)

    if c.problems:
        raise ConfigError(c.problems)
    assert daemon is not None
    return Config(path=path, config_hash=config_hash, daemon=daemon, sessions=tuple(sessions))


def _session_name(
    c: _Checker, raw: Mapping[str, object], label: str, first_index: dict[str, int], index: int
) -> str | None:
    """The session's name when it is valid and not taken (problems reported)."""
    if "name" not in raw:
        c.add(f"{label}.name", "required key is missing")
        return None
    name = c.string(_Val(raw["name"], f"{label}.name"))
    if name is None:
        return None
    if not SESSION_NAME_RE.fullmatch(name):
        c.add(
            f"{label}.name",
            "must be 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit, "
            f"got {_clip(name)!r}",
        )
        return None
    if name in first_index:
        c.add(f"{label}.name", f"duplicate session name {name!r} (sessions[{first_index[name]}])")
        return None
    first_index[name] = index
    return name


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a config file; raises :class:`ConfigError` naming the file."""
    shown = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ConfigError([ConfigProblem(shown, "-", "file not found")]) from None
    except IsADirectoryError:
        raise ConfigError([ConfigProblem(shown, "-", "is a directory, not a file")]) from None
    except OSError as exc:
        reason = f"cannot read the file: {exc.strerror or exc}"
        raise ConfigError([ConfigProblem(shown, "-", reason)]) from None
    return parse_config(data, shown)


# --------------------------------------------------------------------------- secrets


def _read_credential(directory: str | None, name: str) -> tuple[str | None, str | None]:
    """(value, None) or (None, reason). The reason never contains the value."""
    if not directory:
        return None, (
            f"credential {name!r} needs a credentials directory, and $CREDENTIALS_DIRECTORY "
            "is not set (LoadCredential= in the unit sets it)"
        )
    path = os.path.join(directory, name)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None, f"credential {name!r} not found in {directory}"
    except OSError as exc:
        return None, f"credential {name!r}: cannot read {path}: {exc.strerror or exc}"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None, f"credential {name!r} in {directory} is not UTF-8 text"
    if text.endswith("\r\n"):
        text = text[:-2]
    elif text.endswith("\n"):
        text = text[:-1]
    return text, None


#: Every secret is masked as *** in every log line; a shorter one would mangle ordinary
#: words there ("s" would turn "session" into "***ession").
MIN_SECRET_LENGTH: Final = 6


def _too_short(what: str, length: int) -> str:
    return (
        f"{what} is {length} characters long; secrets need at least {MIN_SECRET_LENGTH} "
        "so that masking them in logs cannot mangle other text"
    )


def resolve_secrets(
    config: Config, environ: Mapping[str, str], credentials_dir: str | None = None
) -> Secrets:
    """Look up every placeholder of the enabled sessions and the database.

    ``credentials_dir`` defaults to ``environ["CREDENTIALS_DIRECTORY"]``. A credential
    file loses one trailing newline. A missing or empty secret is a :class:`ConfigError`
    that names the secret and where it is used, never a value; all are reported at once.
    """
    if credentials_dir is None:
        credentials_dir = environ.get(CREDENTIALS_ENV_VAR) or None
    c = _Checker(config.path)
    values: dict[str, str] = {}
    done: set[str] = set()
    for used_at, key in config.secret_refs(include_disabled=False):
        if key in done:
            continue
        done.add(key)
        kind, _, name = key.partition(":")
        if kind == "env":
            value = environ.get(name)
            if value is None:
                c.add(used_at, f"secret ${{{key}}}: environment variable {name} is not set")
                continue
        else:
            value, reason = _read_credential(credentials_dir, name)
            if value is None:
                c.add(used_at, f"secret ${{{key}}}: {reason}")
                continue
        if not value:
            c.add(used_at, f"secret ${{{key}}} is empty")
            continue
        if len(value) < MIN_SECRET_LENGTH and not used_at.endswith(".auth.account_id"):
            c.add(used_at, _too_short(f"secret ${{{key}}}", len(value)))
            continue
        values[key] = value
    password = _url_password(config.daemon.database)
    if password is not None and not _refs(password) and len(unquote(password)) < MIN_SECRET_LENGTH:
        c.add("daemon.database", _too_short("the database password", len(unquote(password))))
    for session in config.sessions:
        if not session.enabled or session.auth is None:
            continue
        for field_name in ("client_secret", "access_token"):
            template = getattr(session.auth, field_name)
            if not _refs(template) and 0 < len(template) < MIN_SECRET_LENGTH:
                c.add(
                    f"sessions[{session.name}].auth.{field_name}",
                    _too_short("this secret", len(template)),
                )
        account = session.auth.account_id
        if isinstance(account, str) and all(r.key in values for r in _refs(account)):
            text = _render(account, values, _verbatim)
            if not (text.isascii() and text.isdigit()):
                used = ", ".join(f"${{{r.key}}}" for r in _refs(account))
                c.add(
                    f"sessions[{session.name}].auth.account_id",
                    f"must resolve to an integer (from {used})",
                )
    if c.problems:
        raise ConfigError(c.problems)
    return Secrets(values)
