"""The control socket: a Unix socket that speaks newline-delimited JSON (control.proto).

One request per line, one response line per request, in order; ``socat`` works::

    $ echo '{"id":"1","status":{"include_sessions":true}}' \
        | socat - UNIX-CONNECT:/run/wirekeep/control.sock

Who may do what. The socket is created mode 0660 (the umask is set around ``bind()``,
so it never exists with a wider mode) and handed to ``daemon.control_group`` before
``listen()``, so nobody can connect in between. On every connection the daemon reads
the peer's uid, gid and groups from the kernel (``SO_PEERCRED``, ``SO_PEERGROUPS``):

- ``status`` is open to every peer that can connect (the socket's group);
- ``pause``, ``resume``, ``reconnect`` and ``reload`` need the daemon's own uid, root,
  or membership in ``daemon.admin_group``; others get ``ok: false``, code 77.

Each change is persisted as an event whose reason names the operator:
"paused by uid 1000 (alice): maintenance window" (detail: uid, user, operator_reason).

Robustness: a request line is at most ``MAX_LINE`` bytes (longer: an error reply and the
connection is closed); a line that does not parse gets an error reply and the connection
stays usable; a connection idle for ``idle_timeout`` is closed; a peer that half-closes
still gets its replies; past ``max_connections`` a new peer gets one error line. Nothing
a peer sends can raise out of its connection handler.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import json
import os
import pwd
import socket
import stat
import struct
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import structlog
import trio

from daemon.config import Config, redact_url
from daemon.peer_errors import report_peer_error
from daemon.session import CommandKind, SessionClocks, SessionRunner
from daemon.writer import EventWriter
from protocol import control_pb2 as pb
from protocol.control_codec import (
    MAX_LINE,
    ErrorCode,
    LineDecoder,
    decode_request,
    encode_response,
    error_response,
)
from protocol.errors import ProtocolError

log = structlog.get_logger("wirekeep.control")

SOCKET_MODE = 0o660
IDLE_TIMEOUT = 30.0
SEND_TIMEOUT = 10.0
MAX_CONNECTIONS = 128
#: Longest operator --reason text accepted.
MAX_REASON = 500
#: Seconds between message-count samples for msgs/s (the rate covers 1-2 windows).
RATE_WINDOW = 5.0
_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux 4.13+
_RECEIVE = 65536

#: Commands every peer may run; everything else changes something.
READ_ONLY = frozenset({"status"})
#: What each action did when it did something (other results mean "left alone").
_ACTED = {
    CommandKind.PAUSE: frozenset({"paused"}),
    CommandKind.RESUME: frozenset({"resumed"}),
    CommandKind.RECONNECT: frozenset({"reconnecting"}),
}
_VERB = {
    CommandKind.PAUSE: "paused",
    CommandKind.RESUME: "resumed",
    CommandKind.RECONNECT: "reconnect requested",
}


class ControlSocketError(Exception):
    """The control socket cannot be set up (path in use, not a socket, unknown group)."""


# --------------------------------------------------------------------------- peers


@dataclass(frozen=True, slots=True)
class Peer:
    """Who is on the other end of a connection, as the kernel reports it."""

    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...] = ()

    @property
    def user(self) -> str:
        return user_name(self.uid)

    def describe(self) -> str:
        name = self.user
        return f"uid {self.uid} ({name})" if name else f"uid {self.uid}"


def user_name(uid: int) -> str:
    """The passwd name of ``uid``, or "" (cached: NSS lookups are not free)."""
    name = _USER_NAMES.get(uid)
    if name is None:
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = ""
        _USER_NAMES[uid] = name
    return name


_USER_NAMES: dict[int, str] = {}


def peer_of(sock: Any) -> Peer:
    """``SO_PEERCRED`` (+ ``SO_PEERGROUPS``) of a connected Unix socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    groups: tuple[int, ...] = ()
    with contextlib.suppress(OSError):  # ERANGE past 256 groups, or an old kernel
        data = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, 1024)
        groups = struct.unpack(f"{len(data) // 4}I", data[: len(data) // 4 * 4])
    return Peer(pid, uid, gid, groups)


def group_id(name: str | None) -> int | None:
    if not name:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


@dataclass(frozen=True, slots=True)
class Permissions:
    """Who may change things: the daemon's uid, root, or members of the admin group."""

    daemon_uid: int
    admin_group: str | None = None

    def admin_gid(self) -> int | None:
        return group_id(self.admin_group)

    def may_change(self, peer: Peer) -> bool:
        if peer.uid in (0, self.daemon_uid):
            return True
        gid = self.admin_gid()
        return gid is not None and (peer.gid == gid or gid in peer.groups)

    def refusal(self, peer: Peer, command: str) -> str:
        who = user_name(self.daemon_uid)
        daemon_user = f"uid {self.daemon_uid} ({who})" if who else f"uid {self.daemon_uid}"
        if self.admin_group:
            admins = f"or a member of group {self.admin_group!r}"
        else:
            admins = "or an admin group (daemon.admin_group is not set)"
        return (
            f"{command} refused: {peer.describe()} may read status only; changes need "
            f"{daemon_user}, root, {admins}"
        )


# --------------------------------------------------------------------------- the socket


def bind_control_socket(path: str, *, group: str | None, backlog: int = 128) -> socket.socket:
    """A listening Unix socket at ``path``: mode 0660 from the start, in ``group``.

    A stale socket file (nobody listening) is replaced; a live one means another daemon
    runs, and a path that is not a socket is left alone: both raise ControlSocketError.
    """
    gid = None
    if group:
        gid = group_id(group)
        if gid is None:
            raise ControlSocketError(f"daemon.control_group: no group named {group!r}")
    _clear_stale(path)
    parent = os.path.dirname(path) or "."
    os.makedirs(parent, mode=0o755, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        # The umask is process-wide: set it only around bind(), which does not block.
        old = os.umask(0o777 & ~SOCKET_MODE)
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        if gid is not None:
            os.chown(path, -1, gid)
        sock.listen(backlog)  # connections are possible only from here on
    except OSError as exc:
        sock.close()
        raise ControlSocketError(f"cannot listen on {path}: {exc.strerror or exc}") from None
    return sock


def _clear_stale(path: str) -> None:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise ControlSocketError(f"{path} exists and is not a socket; not touching it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise ControlSocketError(f"{path}: {exc.strerror or exc}") from None
    else:
        raise ControlSocketError(f"another daemon is listening on {path}")
    finally:
        probe.close()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


# --------------------------------------------------------------------------- what it controls


@dataclass
class ReloadOutcome:
    """What a reload did (``ok``) or why it kept the old configuration."""

    ok: bool
    path: str
    config_hash: str
    previous_hash: str
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    unchanged: int = 0
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class ControlTarget(Protocol):
    """What the control server reads and drives: the daemon (``daemon.app.Daemon``)."""

    @property
    def config(self) -> Config: ...
    @property
    def sessions(self) -> Mapping[str, SessionRunner]: ...
    @property
    def started_at(self) -> datetime | None: ...
    @property
    def writer(self) -> EventWriter | None: ...
    @property
    def database_url(self) -> str: ...
    @property
    def clocks(self) -> SessionClocks: ...
    @property
    def stopping(self) -> bool: ...
    @property
    def handshakes(self) -> trio.CapacityLimiter: ...

    async def reload(self, operator: Peer | None) -> ReloadOutcome: ...


# --------------------------------------------------------------------------- status


class RateMeter:
    """msgs/s per session over the last one to two ``window``s (no per-message work)."""

    def __init__(self, window: float = RATE_WINDOW) -> None:
        self.window = window
        self._older: tuple[float, dict[str, int]] | None = None
        self._newer: tuple[float, dict[str, int]] | None = None

    def sample(self, sessions: Mapping[str, SessionRunner], now: float) -> None:
        self._older = self._newer
        self._newer = (now, {name: r.messages for name, r in sessions.items()})

    def base(self) -> tuple[float, dict[str, int]] | None:
        return self._older or self._newer

    async def run(self, sessions: Callable[[], Mapping[str, SessionRunner]]) -> None:
        while True:
            self.sample(sessions(), trio.current_time())
            await trio.sleep(self.window)


def _iso(at: datetime | None) -> str:
    return at.isoformat() if at is not None else ""


def _uint64(value: int) -> int | str:
    """protobuf's JSON mapping writes 64-bit integers as numbers only while exact."""
    return value if value < 2**53 else str(value)


_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


class StatusEntries:
    """SessionStatus objects in protobuf's JSON mapping, as JSON text, built for speed.

    Through SessionStatus messages and json_format a status costs ~100 µs per session
    (a second for 10,000). Here each session's slow-changing fields are encoded once and
    kept until one of them changes; only the counters are formatted per request (a few
    µs per session). tests/daemon/test_control.py checks the result against the schema.
    """

    def __init__(self) -> None:
        self._cache: dict[str, tuple[SessionRunner, tuple[Any, ...], str]] = {}

    def encode(self, sessions: Sequence[SessionRunner], rates: RateMeter, now: float) -> str:
        """The JSON array of every session's status."""
        base = rates.base()
        since_t, counts = base if base is not None else (now, {})
        elapsed = now - since_t
        cache = self._cache
        parts = []
        for r in sessions:
            key = (r.durable, r.endpoint, r.last_venue_error, r.handshake)
            cached = cache.get(r.name)
            if cached is None or cached[0] is not r or cached[1] != key:
                cached = cache[r.name] = (r, key, _static_part(r))
            rate = 0.0
            if elapsed >= 1.0:  # shorter: too noisy to mean anything
                rate = max(0, r.messages - counts.get(r.name, 0)) / elapsed
            silent = r.seconds_since_last_message()
            tail = "" if silent is None else f',"seconds_since_last_message":{silent:.3f}'
            # f"{x:.2f}": round(x, 2) costs ten times as much.
            parts.append(
                f'{cached[2]},"msgs_per_s":{rate:.2f},"messages":{_uint64_text(r.messages)}{tail}}}'
            )
        if len(cache) > 2 * len(sessions) + 100:  # removed sessions: forget them
            names = {r.name for r in sessions}
            self._cache = {n: c for n, c in cache.items() if n in names}
        return "[" + ",".join(parts) + "]"


def _static_part(r: SessionRunner) -> str:
    """The fields that change only with a transition or an error, without the closing }."""
    # What is durable: the machine moves first, the runner publishes after the COMMIT.
    durable = r.durable
    last = durable.record
    entry = {
        "name": r.name,
        "state": durable.state.name,
        "since": _iso(durable.since),  # when the state was entered
        "attempt": durable.memory.attempt,
        "endpoint": r.endpoint or "",
        "last_error": durable.last_error or "",
        "kind": r.config.kind,
        "throttled_until": _iso(durable.throttled_until),
        "consumers": 0,  # the consumer hub fills these in
        "dropped": 0,
        "reason": last.reason if last is not None else "",
        "wait_until": _iso(durable.wait_until),
        "breaker": durable.breaker,
        "last_venue_error": r.last_venue_error or "",
        "handshake": r.handshake,
    }
    return _dumps(entry)[:-1]


def _uint64_text(value: int) -> str:
    return str(value) if value < 2**53 else f'"{value}"'


def daemon_entry(target: ControlTarget, version: str) -> dict[str, Any]:
    writer = target.writer
    started = target.started_at
    now = target.clocks.wall()
    return {
        "pid": os.getpid(),
        "uptime_s": round((now - started).total_seconds(), 3) if started else 0.0,
        "version": version,
        "database": redact_url(target.database_url),
        "events_written": _uint64(writer.stats.events_written if writer else 0),
        "writer_lag_s": round(writer.lag(), 6) if writer else 0.0,
        "started_at": _iso(started),
        "config_hash": target.config.config_hash,
        "config_path": target.config.path,
        "writer_error": (writer.last_error or "") if writer and writer.failing_since else "",
        "handshakes_in_flight": target.handshakes.borrowed_tokens,
        "handshakes_queued": target.handshakes.statistics().tasks_waiting,
        "max_handshakes": int(target.handshakes.total_tokens),
    }


def status_line(request_id: str, daemon: dict[str, Any], sessions: str) -> bytes:
    """A ControlResponse carrying a StatusResult, as one JSON line.

    ``status`` is the last key, so a client can cut the StatusResult out of the line
    without decoding and re-encoding it (``daemon.cli_ops.split_status``).
    """
    head = f'{{"id":{_dumps(request_id)},"ok":true,"error":"","code":0,"status":'
    body = f'{{"daemon":{_dumps(daemon)},"sessions":{sessions}}}}}\n'
    return (head + body).encode()


# --------------------------------------------------------------------------- the server


class ControlServer:
    """Serves one listening socket; every command runs in the peer's connection task."""

    def __init__(
        self,
        target: ControlTarget,
        *,
        version: str,
        permissions: Permissions | None = None,
        max_line: int = MAX_LINE,
        idle_timeout: float = IDLE_TIMEOUT,
        send_timeout: float = SEND_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.target = target
        self.version = version
        self._permissions = permissions
        self.max_line = max_line
        self.idle_timeout = idle_timeout
        self.send_timeout = send_timeout
        self.max_connections = max_connections
        self.rates = RateMeter()
        self.entries = StatusEntries()
        self.active = 0
        self.connections = 0
        #: (command, outcome) -> count, for the metrics: outcome is ok, refused or error.
        self.requests: Counter[tuple[str, str]] = Counter()
        self.path: str | None = None
        self._inode: tuple[int, int] | None = None

    @property
    def permissions(self) -> Permissions:
        # admin_group is read from the configuration in force: a reload changes it.
        if self._permissions is not None:
            return self._permissions
        return Permissions(os.getuid(), self.target.config.daemon.admin_group)

    # -- lifecycle ---------------------------------------------------------------

    def bind(self, path: str, group: str | None) -> trio.SocketListener:
        sock = bind_control_socket(path, group=group)
        info = os.stat(path)
        self.path, self._inode = path, (info.st_dev, info.st_ino)
        log.info("control_listening", path=path, mode=oct(SOCKET_MODE), group=group)
        return trio.SocketListener(trio.socket.from_stdlib_socket(sock))

    async def serve(
        self,
        listener: trio.SocketListener,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.rates.run, lambda: self.target.sessions)
                await nursery.start(trio.serve_listeners, self._connection, [listener])
                task_status.started()
        finally:
            self.unlink()

    def unlink(self) -> None:
        """Remove the socket file, unless another daemon has replaced it meanwhile."""
        if self.path is None:
            return
        with contextlib.suppress(OSError):
            info = os.stat(self.path)
            if (info.st_dev, info.st_ino) == self._inode:
                os.unlink(self.path)
        self.path = None

    # -- one connection ----------------------------------------------------------

    async def _connection(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        self.active += 1
        try:
            if self.active > self.max_connections:
                await self._send(
                    stream,
                    encode_response(
                        error_response(
                            "", "too many control connections; try again", ErrorCode.UNAVAILABLE
                        )
                    ),
                )
                return
            await self._converse(stream, peer_of(stream.socket))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the peer went away: nothing to answer
        except Exception as exc:  # noqa: BLE001 - one connection's bug ends that connection only
            report_peer_error(log, "control_peer_error", exc)
        finally:
            self.active -= 1
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _converse(self, stream: trio.SocketStream, peer: Peer) -> None:
        decoder = LineDecoder(self.max_line)
        while True:
            with trio.move_on_after(self.idle_timeout) as idle:
                data = await stream.receive_some(_RECEIVE)
            if idle.cancelled_caught:
                return
            try:
                if data:
                    decoder.feed(data)
                else:
                    decoder.end_of_stream()
            except ProtocolError as exc:
                # Answer the complete lines that came before, then the error; fail-stop.
                for line in decoder.lines():
                    await self._send(stream, await self.respond(line, peer))
                await self._send(stream, encode_response(error_response("", str(exc))))
                return
            for line in decoder.lines():
                await self._send(stream, await self.respond(line, peer))
            if not data:
                return  # half-closed: every request has its answer

    async def _send(self, stream: trio.SocketStream, line: bytes) -> None:
        with trio.move_on_after(self.send_timeout) as slow:
            await stream.send_all(line)
        if slow.cancelled_caught:
            raise trio.BrokenResourceError("the peer does not read its replies")

    # -- requests ----------------------------------------------------------------

    async def respond(self, line: bytes, peer: Peer) -> bytes:
        """One request line -> one response line. Never raises for what a peer sent.

        A line that does not parse is BAD_REQUEST; anything else that goes wrong, a bug
        in a command or a reply that cannot be encoded, is INTERNAL: the connection and
        the daemon go on.
        """
        try:
            request = decode_request(line, self.max_line)
        except ProtocolError as exc:
            self.requests["invalid", "error"] += 1
            return encode_response(error_response(_salvage_id(line), str(exc)))
        except Exception as exc:  # noqa: BLE001 - a decoder bug is still a reply
            return self._internal_error(exc, "invalid", _salvage_id(line))
        command = request.WhichOneof("command") or ""
        try:
            if command not in READ_ONLY and not self.permissions.may_change(peer):
                self.requests[command, "refused"] += 1
                log.warning("control_refused", command=command, uid=peer.uid, pid=peer.pid)
                return encode_response(
                    error_response(
                        request.id, self.permissions.refusal(peer, command), ErrorCode.PERMISSION
                    )
                )
            if command != "status" and self.target.stopping:
                self.requests[command, "error"] += 1
                return encode_response(
                    error_response(request.id, "the daemon is shutting down", ErrorCode.UNAVAILABLE)
                )
            if command == "status":
                reply = self.status(request.id, include_sessions=request.status.include_sessions)
                self.requests[command, "ok"] += 1
                return reply
            response = await self._change(command, request, peer)
            reply = encode_response(response)
        except Exception as exc:  # noqa: BLE001 - a bug answers INTERNAL; the daemon stays up
            return self._internal_error(exc, command, request.id)
        self.requests[command, "ok" if response.ok else "error"] += 1
        return reply

    def _internal_error(self, exc: Exception, command: str, request_id: str) -> bytes:
        report_peer_error(log, "control_command_failed", exc, command=command)
        self.requests[command, "error"] += 1
        return encode_response(
            error_response(request_id, f"internal error in {command}", ErrorCode.INTERNAL)
        )

    async def _change(
        self, command: str, request: pb.ControlRequest, peer: Peer
    ) -> pb.ControlResponse:
        if command == "reload":
            return await self.reload(request.id, peer)
        kind = CommandKind(command)
        target = getattr(request, command)
        return await self.act(
            request.id, kind, names=list(target.sessions), all_sessions=target.all,
            text=target.reason, peer=peer,
        )  # fmt: skip

    def status(self, request_id: str, *, include_sessions: bool) -> bytes:
        sessions = list(self.target.sessions.values()) if include_sessions else []
        entries = self.entries.encode(sessions, self.rates, trio.current_time())
        return status_line(request_id, daemon_entry(self.target, self.version), entries)

    async def act(
        self,
        request_id: str,
        kind: CommandKind,
        *,
        names: list[str],
        all_sessions: bool,
        text: str,
        peer: Peer,
    ) -> pb.ControlResponse:
        sessions = self.target.sessions
        if all_sessions:
            names = list(sessions)
        names = list(dict.fromkeys(names))
        unknown = [n for n in names if n not in sessions]
        if unknown:
            known = ", ".join(list(sessions)[:20]) + (", ..." if len(sessions) > 20 else "")
            return error_response(
                request_id,
                f"unknown session{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                f"(running: {known or 'none'})",
                ErrorCode.USAGE,
            )
        text = " ".join(text.split())  # one line: no newlines or control characters
        if len(text) > MAX_REASON:
            return error_response(
                request_id, f"--reason is longer than {MAX_REASON} characters", ErrorCode.USAGE
            )
        user = peer.user
        reason = f"{_VERB[kind]} by {peer.describe()}" + (f": {text}" if text else "")
        detail: dict[str, Any] = {"uid": peer.uid, "user": user}
        if text:
            detail["operator_reason"] = text
        results: dict[str, str] = {}

        async def one(runner: SessionRunner) -> None:
            results[runner.name] = await runner.command(kind, reason, **detail)

        async with trio.open_nursery() as nursery:
            for name in names:
                nursery.start_soon(one, sessions[name])
        acted = [n for n in names if results[n] in _ACTED[kind]]
        skipped = [n for n in names if n not in set(acted)]
        log.info(
            "operator_command", command=kind.value, uid=peer.uid, user=user, acted=len(acted),
            skipped=len(skipped), operator_reason=text or None,
        )  # fmt: skip
        if len(names) == 1:
            message = f"{names[0]}: {results[names[0]]}"
        else:
            message = f"{_VERB[kind]}: {len(acted)} of {len(names)} sessions"
        return pb.ControlResponse(
            id=request_id,
            ok=True,
            action=pb.ActionResult(
                sessions=acted, skipped=skipped, message=message, results=results
            ),
        )

    async def reload(self, request_id: str, peer: Peer) -> pb.ControlResponse:
        outcome = await self.target.reload(peer)
        result = pb.ReloadResult(
            added=outcome.added,
            removed=outcome.removed,
            changed=outcome.changed,
            config_hash=outcome.config_hash,
            errors=outcome.errors,
            unchanged=outcome.unchanged,
            previous_hash=outcome.previous_hash,
            notes=outcome.notes,
        )
        if outcome.ok:
            return pb.ControlResponse(id=request_id, ok=True, reload=result)
        response = error_response(
            request_id,
            f"{outcome.path}: the configuration has errors; the running one "
            f"(hash {outcome.previous_hash}) stays in force",
            ErrorCode.CONFIG,
        )
        response.reload.CopyFrom(result)
        return response


def _salvage_id(line: bytes) -> str:
    """The request's id, if the line is JSON enough to have one (to echo in the error).

    The id may hold a lone surrogate: error_response makes it encodable.
    """
    try:
        obj = json.loads(line.decode("utf-8"))  # strict: bytes would let json guess UTF-16
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return ""
    value = obj.get("id") if isinstance(obj, dict) else None
    return value[:100] if isinstance(value, str) else ""
