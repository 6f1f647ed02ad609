"""``wirekeep tail NAME...``: the live stream of sessions, for a person at a terminal.

A plain consumer of the daemon's consumer socket (``daemon.consumer_socket``): it
subscribes, then prints one line per frame until interrupted:

    14:03:01.123456 venue-a #1234 {"channel":"ticks","symbol":"EURUSD",...}
    14:03:01.124002 venue-b #88 QUOTE_EVENT symbol: "EURUSD" bid: 1.1 ask: 1.1002 ...
    14:03:06.000000 venue-a == STALE (was STREAMING, stale): no data for 5.0 s
    14:03:21.400000 venue-a !! gap: resumed after 12.5 s (upstream reconnect); ...

Times are UTC: when wirekeep received the message, or when the transition happened.
``--json`` prints the WebSocket endpoint's JSON form instead, one object per line.

The command line owner wires it in with one line in ``build_parser``:
``register(add)``. Importing this module is cheap: the protocol code is loaded when the
command runs.
"""

from __future__ import annotations

import argparse
import socket
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from protocol.consumer_pb2 import ConsumerFrame

__all__ = ["format_frame", "register", "tail", "tail_command"]

Add = Callable[..., argparse.ArgumentParser]


def register(add: Add) -> None:
    """Add ``tail`` through the parser's ``add(name, handler, help)``."""
    p = add(
        "tail",
        tail_command,
        "print the live stream of sessions, with state notices and gap markers",
    )
    p.add_argument("names", nargs="*", metavar="NAME", help="session to follow (repeatable)")
    p.add_argument("--all", action="store_true", help="every session, including ones added later")
    p.add_argument(
        "--socket",
        metavar="PATH",
        help="the consumer socket (default: daemon.consumer_socket of the configuration)",
    )
    p.add_argument(
        "--json", action="store_true", help="one JSON object per frame (the WebSocket form)"
    )
    p.add_argument("--count", type=int, metavar="N", help="stop after N data messages")


def tail_command(args: argparse.Namespace) -> int:
    from daemon import cli  # the command line is loaded already: no cycle at import

    if not args.names and not args.all:
        raise cli.CliError("name at least one session, or give --all", cli.EXIT_USAGE)
    if args.count is not None and args.count < 1:
        raise cli.CliError("--count must be at least 1", cli.EXIT_USAGE)
    path = args.socket or cli.load_config(args).daemon.consumer_socket
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError as exc:
        sock.close()
        raise cli.CliError(
            f"cannot reach the daemon's consumer socket {path}: {exc.strerror or exc}",
            cli.EXIT_UNREACHABLE,
        ) from None
    with sock:
        return tail(
            sock,
            args.names,
            everything=args.all,
            as_json=args.json,
            count=args.count,
            out=sys.stdout,
            err=sys.stderr,
        )


def tail(
    sock: socket.socket,
    names: list[str],
    *,
    everything: bool = False,
    as_json: bool = False,
    count: int | None = None,
    out: IO[str],
    err: IO[str],
) -> int:
    """Subscribe on a connected socket and print the stream; returns the exit status.

    0 after ``count`` data messages; 1 when the daemon ends the stream (its Error is
    printed to ``err``) or the socket fails. A closed ``out`` (``| head``) raises
    BrokenPipeError for the command line to handle, as for every command.
    """
    from protocol.consumer_codec import ConsumerFrameDecoder, encode_json, encode_request
    from protocol.consumer_pb2 import ConsumerRequest, Subscribe
    from protocol.errors import RemoteProtocolError

    request = ConsumerRequest(subscribe=Subscribe(sessions=names, all=everything))
    decoder = ConsumerFrameDecoder()
    seen = 0
    try:
        sock.sendall(encode_request(request))
    except OSError as exc:
        print(f"wirekeep: lost the daemon's consumer socket: {exc.strerror or exc}", file=err)
        return 1
    while True:
        try:
            data = sock.recv(1 << 20)
        except OSError as exc:
            print(f"wirekeep: lost the daemon's consumer socket: {exc.strerror or exc}", file=err)
            return 1
        if not data:
            print("wirekeep: the daemon closed the stream", file=err)
            return 1
        try:
            decoder.feed(data)
            frames = decoder.messages()
        except RemoteProtocolError as exc:
            print(f"wirekeep: unreadable stream from the daemon: {exc}", file=err)
            return 1
        lines: list[str] = []
        for frame in frames:
            which = frame.WhichOneof("frame")
            if which == "error":
                out.write("".join(lines))
                out.flush()
                print(f"wirekeep: the daemon ended the stream: {frame.error.message}", file=err)
                return 1
            if which == "subscribed" and not as_json:
                following = ", ".join(frame.subscribed.sessions) or "nothing"
                print(f"wirekeep: following {following}", file=err)
                continue
            lines.append((encode_json(frame) if as_json else format_frame(frame)) + "\n")
            if which == "data":
                seen += 1
                if count is not None and seen >= count:
                    out.write("".join(lines))
                    out.flush()
                    return 0
        out.write("".join(lines))
        out.flush()


# -- one line per frame ----------------------------------------------------------------


def _clock(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, UTC).strftime("%H:%M:%S.%f")


def format_frame(frame: ConsumerFrame) -> str:
    """A frame as one line for a person."""
    from protocol.consumer_codec import gap_sentence

    which = frame.WhichOneof("frame")
    if which == "data":
        d = frame.data
        return f"{_clock(d.received_at_ns)} {d.session} #{d.seq} {_payload(d.payload, d.text)}"
    if which == "state_notice":
        n = frame.state_notice
        was = f"was {n.previous}, {n.trigger}" if n.trigger else f"was {n.previous}"
        return f"{_clock(n.at_ns)} {n.session} == {n.state} ({was}): {n.reason}"
    if which == "gap":
        g = frame.gap
        return f"{' ' * 15} {g.session} !! gap: {gap_sentence(g)}"
    if which == "subscribed":
        return f"{' ' * 15} following {', '.join(frame.subscribed.sessions) or 'nothing'}"
    if which == "error":
        return f"{' ' * 15} error: {frame.error.message}"
    return f"{' ' * 15} (an empty frame)"


def _payload(payload: bytes, text: bool) -> str:
    if text:
        return payload.decode("utf-8", errors="replace")
    from google.protobuf import text_format

    from protocol.errors import RemoteProtocolError
    from protocol.venue_codec import decode_message, payload_type_name

    try:
        message = decode_message(payload)
    except RemoteProtocolError:
        return f"({len(payload)} bytes that are not a venue envelope) {payload[:64].hex()}"
    body: Any = message.message
    shown = text_format.MessageToString(body, as_one_line=True)
    return f"{payload_type_name(message.payload_type)} {shown}".rstrip()
