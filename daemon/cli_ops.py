"""The operator's commands over the control socket: status, pause, resume, reconnect, reload.

``register(add)`` adds them to the ``wirekeep`` parser (``add`` is the parser's own
helper: ``add(name, handler, help) -> ArgumentParser``).

The socket is ``--socket``, else ``$WIREKEEP_CONTROL_SOCKET``, else ``daemon.control_socket``
read straight from the configuration file (a file with errors elsewhere still names the
socket: ``wirekeep reload`` must reach the daemon to be told what the errors are), else
``/run/wirekeep/control.sock``.

Exit codes: 0 ok, 1 refused (not permitted, bad configuration on reload, shutting down),
2 usage (also: an unknown session name), 3 daemon unreachable (the message names the
socket path).

This side speaks the wire form (newline-delimited JSON in protobuf's JSON mapping, see
``protocol/control.proto``) with the json module alone: importing protobuf would cost more
than the whole status round trip. tests/daemon/test_control.py checks every request this
module writes against ``protocol.control_codec.decode_request``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, NoReturn

Add = Callable[..., argparse.ArgumentParser]

SOCKET_ENV_VAR = "WIREKEEP_CONTROL_SOCKET"
DEFAULT_SOCKET = "/run/wirekeep/control.sock"
#: ControlResponse.code -> exit status (protocol/control_codec.py ErrorCode).
_USAGE_CODES = frozenset({64})


def register(add: Add) -> None:
    """Add status, pause, resume, reconnect and reload to the command line."""
    status = add("status", cmd_status, "every session's state, and the daemon's (over the socket)")
    _socket_options(status)
    status.add_argument("--json", action="store_true", help="one JSON object (stable for scripts)")
    status.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    status.add_argument(
        "--interval", type=float, default=2.0, metavar="SECONDS", help="--watch refresh period"
    )
    for name, verb in (("pause", "pause"), ("resume", "resume"), ("reconnect", "reconnect")):
        p = add(name, cmd_action, f"{verb} sessions (persisted as an event naming you)")
        _socket_options(p)
        p.add_argument("sessions", nargs="*", metavar="NAME", help="session names")
        p.add_argument("--all", action="store_true", help="every running session")
        p.add_argument("--reason", default="", help="why, for the event log (one line)")
        p.add_argument("--json", action="store_true", help="print the result as JSON")
    reload = add(
        "reload", cmd_reload, "re-read the configuration; the daemon keeps it only if it is valid"
    )
    _socket_options(reload)
    reload.add_argument("--json", action="store_true", help="print the result as JSON")


def _socket_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--socket",
        metavar="PATH",
        help=f"control socket (default: ${SOCKET_ENV_VAR}, else daemon.control_socket)",
    )
    p.add_argument(
        "--timeout", type=float, default=None, metavar="SECONDS", help="how long to wait for"
    )


# --------------------------------------------------------------------------- plumbing


def _fail(message: str, code: int) -> NoReturn:
    from daemon.cli import CliError

    raise CliError(message, code)


def _codes() -> tuple[int, int, int, int]:
    from daemon.cli import EXIT_OK, EXIT_REFUSED, EXIT_UNREACHABLE, EXIT_USAGE

    return EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE


def socket_path(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> str:
    if getattr(args, "socket", None):
        return str(args.socket)
    if environ.get(SOCKET_ENV_VAR):
        return environ[SOCKET_ENV_VAR]
    import tomllib  # only here: ``--socket`` (or the variable) is the fast path

    # daemon.config's config_path, without importing daemon.config (35 ms).
    from daemon.cli import CONFIG_ENV_VAR, DEFAULT_CONFIG_PATH

    path = getattr(args, "config", None)
    if path is None:
        path = environ.get(CONFIG_ENV_VAR) or DEFAULT_CONFIG_PATH
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError):
        return DEFAULT_SOCKET
    daemon = raw.get("daemon")
    value = daemon.get("control_socket") if isinstance(daemon, dict) else None
    return value if isinstance(value, str) and value else DEFAULT_SOCKET


class Connection:
    """One connection to the control socket; requests are answered in order."""

    def __init__(self, path: str, timeout: float) -> None:
        self.path = path
        self._buffer = bytearray()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        unreachable = _codes()[3]
        try:
            self._sock.connect(path)
        except FileNotFoundError:
            self.close()
            _fail(
                f"cannot reach the daemon: {path} does not exist (is wirekeep running?)",
                unreachable,
            )
        except ConnectionRefusedError:
            self.close()
            _fail(f"cannot reach the daemon: nobody listens on {path}", unreachable)
        except PermissionError:
            self.close()
            _fail(
                f"cannot reach the daemon: permission denied on {path} "
                "(the socket is open to its group: ask to be added to it)",
                unreachable,
            )
        except OSError as exc:
            self.close()
            _fail(f"cannot reach the daemon on {path}: {exc.strerror or exc}", unreachable)

    def call(self, request: dict[str, Any]) -> dict[str, Any]:
        return self.decode(self.call_raw(request))

    def decode(self, line: bytes) -> dict[str, Any]:
        """A response line as an object; anything else means the socket is not ours."""
        try:
            response = json.loads(line)
        except ValueError:  # UnicodeDecodeError included: protobuf frames, say
            response = None
        if not isinstance(response, dict):
            _fail(
                f"{self.path} does not answer in the control protocol (is it another socket, "
                "such as the consumer socket?)",
                _codes()[3],
            )
        return response

    def call_raw(self, request: dict[str, Any]) -> bytes:
        """The response line, undecoded."""
        unreachable = _codes()[3]
        try:
            self._sock.sendall(json.dumps(request, separators=(",", ":")).encode() + b"\n")
            line = self._line()
        except TimeoutError:
            _fail(f"no answer from the daemon on {self.path} in time", unreachable)
        except OSError as exc:
            _fail(f"lost the daemon on {self.path}: {exc.strerror or exc}", unreachable)
        if line is None:
            _fail(f"the daemon on {self.path} closed the connection", unreachable)
        return line

    def status(self) -> bytes:
        """The StatusResult of every session as JSON text (checked, not re-encoded)."""
        line = self.call_raw(STATUS_REQUEST)
        envelope, status = split_status(line)
        if status is None:
            response = self.decode(line)
            _check(response)
            return json.dumps(response["status"], separators=(",", ":")).encode()
        _check(envelope)
        return status

    def _line(self) -> bytes | None:
        scanned = 0  # a status of 10,000 sessions is 3 MB: look at each byte once
        while True:
            end = self._buffer.find(b"\n", scanned)
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                return line
            scanned = len(self._buffer)
            chunk = self._sock.recv(1 << 20)
            if not chunk:
                return None
            self._buffer += chunk

    def close(self) -> None:
        self._sock.close()


STATUS_REQUEST = {"id": "status", "status": {"include_sessions": True}}
_STATUS_KEY = b',"status":'


def split_status(line: bytes) -> tuple[dict[str, Any], bytes | None]:
    """(the envelope, the StatusResult's JSON text) of a status response line.

    The daemon writes ``status`` as the last key (``daemon.control.status_line``). A JSON
    string never holds an unescaped quote, so the first ``,"status":`` is that key; the
    envelope before it is decoded and checked, and the StatusResult is passed on as it
    came: decoding and re-encoding 10,000 sessions would cost more than the request.
    Anything else: ``({}, None)``, and the caller decodes the whole line.
    """
    at = line.find(_STATUS_KEY)
    if at < 0 or not line.endswith(b"}"):
        return {}, None
    try:
        envelope = json.loads(line[:at] + b"}")
    except ValueError:
        return {}, None
    if not isinstance(envelope, dict) or envelope.get("ok") is not True:
        return {}, None
    return envelope, line[at + len(_STATUS_KEY) : -1]


def _call(args: argparse.Namespace, request: dict[str, Any], timeout: float) -> dict[str, Any]:
    conn = Connection(socket_path(args), args.timeout or timeout)
    try:
        response = conn.call(request)
    finally:
        conn.close()
    _check(response)
    return response


def _check(response: Mapping[str, Any]) -> None:
    if response.get("ok") is True:
        return
    _, refused, usage, _ = _codes()
    code = usage if response.get("code") in _USAGE_CODES else refused
    message = str(response.get("error") or "the daemon refused the request")
    errors = (response.get("reload") or {}).get("errors") or []
    if errors:
        message += "\n" + "\n".join(f"  {e}" for e in errors)
    _fail(message, code)


def _print_json(value: object) -> None:
    sys.stdout.write(json.dumps(value, separators=(",", ":"), ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------- status


def cmd_status(args: argparse.Namespace) -> int:
    conn = Connection(socket_path(args), args.timeout or 10.0)
    clear = args.watch and sys.stdout.isatty() and not args.json
    try:
        while True:
            status = conn.status()
            if args.json:
                sys.stdout.buffer.write(status + b"\n")
            else:
                text = render_status(json.loads(status))
                sys.stdout.write(("\x1b[H\x1b[2J" if clear else "") + text + "\n")
            sys.stdout.flush()
            if not args.watch:
                return _codes()[0]
            time.sleep(max(0.1, args.interval))
    except KeyboardInterrupt:
        if args.watch:
            return _codes()[0]  # how --watch ends
        raise
    finally:
        conn.close()


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def _since(iso: str, now: datetime) -> str:
    if not iso:
        return ""
    at = datetime.fromisoformat(iso)
    return f"{at.astimezone(UTC):%H:%M:%S} ({_age((now - at).total_seconds())})"


def render_status(status: Mapping[str, Any], now: datetime | None = None) -> str:
    """The daemon header and a table of sessions, for a person."""
    from daemon.render import table

    now = now or datetime.now(UTC)
    d = status.get("daemon", {})
    lines = [
        f"wirekeep {d.get('version', '?')}  pid {d.get('pid', '?')}  "
        f"up {_age(float(d.get('uptime_s', 0)))}  config {d.get('config_hash', '')} "
        f"({d.get('config_path', '')})",
        f"database {d.get('database', '')}  events written {int(d.get('events_written', 0)):,}  "
        f"writer lag {float(d.get('writer_lag_s', 0)):.3f} s",
    ]
    if d.get("writer_error"):
        lines.append(f"EVENT STORE FAILING: {d['writer_error']}")
    if d.get("handshakes_queued"):
        lines.append(
            f"handshakes {d.get('handshakes_in_flight', 0)} in progress (max "
            f"{d.get('max_handshakes', 0)}), {d['handshakes_queued']} sessions queued"
        )
    sessions = status.get("sessions", [])
    rows = []
    for s in sessions:
        silent = s.get("seconds_since_last_message")
        rows.append(
            (
                s.get("name", ""),
                s.get("state", "") + (" (queued)" if s.get("handshake") == "queued" else ""),
                _since(s.get("since", ""), now),
                s.get("attempt", 0),
                s.get("endpoint", ""),
                f"{float(s.get('msgs_per_s', 0)):.1f}",
                "" if silent is None else f"{float(silent):.1f}s",
                s.get("last_error", ""),
            )
        )
    columns = [
        "SESSION",
        "STATE",
        "SINCE",
        "ATTEMPT",
        "ENDPOINT",
        "MSG/S",
        "LAST MSG",
        "LAST ERROR",
    ]
    lines += ["", table(columns, rows, max_width=48)] if rows else ["", "no sessions running"]
    return "\n".join(lines)


# --------------------------------------------------------------------------- changes


def cmd_action(args: argparse.Namespace) -> int:
    command = args.command
    if bool(args.sessions) == bool(args.all):
        _fail(f"{command}: name the sessions, or give --all (not both)", _codes()[2])
    body: dict[str, Any] = {"sessions": args.sessions} if args.sessions else {"all": True}
    if args.reason:
        body["reason"] = args.reason
    response = _call(args, {"id": command, command: body}, 60.0)
    result = response.get("action", {})
    if args.json:
        _print_json(result)
        return _codes()[0]
    results = result.get("results", {})
    for name in args.sessions or list(results):
        print(f"{name}: {results.get(name, '?')}")
    if args.all:
        print(result.get("message", ""))
    return _codes()[0]


def cmd_reload(args: argparse.Namespace) -> int:
    # Removing or handing over many sessions waits for their transitions: allow time.
    response = _call(args, {"id": "reload", "reload": {}}, 120.0)
    result = response.get("reload", {})
    if args.json:
        _print_json(result)
        return _codes()[0]
    hashes = f"hash {result.get('previous_hash', '')} -> {result.get('config_hash', '')}"
    print(f"reloaded: {hashes}")
    for key in ("added", "removed", "changed"):
        if result.get(key):
            print(f"  {key}: {', '.join(result[key])}")
    print(f"  unchanged: {result.get('unchanged', 0)}")
    for note in result.get("notes", []):
        print(f"  note: {note}")
    return _codes()[0]
