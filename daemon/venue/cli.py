"""``wirekeep venue``: the options, and entry points that load the venue only when run.

The command-line owner wires it in with one line::

    add_venue_arguments(add("venue", venue_command, "run the simulated venue"))

Importing this module is cheap (no Trio, no protobuf): the venue itself is imported
when the command runs (:mod:`daemon.venue.command`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = [
    "DEFAULT_CONTROL_PORT",
    "DEFAULT_PB_PORT",
    "DEFAULT_WS_PORT",
    "add_venue_arguments",
    "venue_command",
    "venue_main",
]

DEFAULT_WS_PORT = 8765
DEFAULT_PB_PORT = 8764
DEFAULT_CONTROL_PORT = 8767


def add_venue_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``wirekeep venue`` (ports are on 127.0.0.1; 0 picks a free one)."""
    add = parser.add_argument
    add("--ws-port", type=int, action="append", metavar="PORT",
        help=f"WebSocket port, repeatable (default {DEFAULT_WS_PORT})")  # fmt: skip
    add("--pb-port", type=int, action="append", metavar="PORT",
        help=f"protobuf port, repeatable (default {DEFAULT_PB_PORT})")  # fmt: skip
    add("--control-port", type=int, default=DEFAULT_CONTROL_PORT, metavar="PORT",
        help=f"JSON-lines control port (default {DEFAULT_CONTROL_PORT})")  # fmt: skip
    add("--rate", type=float, default=20.0,
        help="data messages per second per connection; 0 = as fast as possible")  # fmt: skip
    add("--count", type=int, default=None, help="stop the data after N messages per connection")
    add("--heartbeat-interval", type=float, default=5.0, help="seconds; 0 = no heartbeats")
    add("--symbols", default="EURUSD", help="comma-separated symbols (default EURUSD)")
    add("--require-auth", action="store_true", help="no data before a successful auth")
    add("--ws-key", default=None, help="the only WebSocket key accepted (default: any)")
    add("--client-secret", default=None, help="the only protobuf client_secret accepted")
    add("--access-token", default=None, help="the only protobuf access_token accepted")
    add("--tls-cert", type=Path, default=None, help="PEM certificate: serve TLS / wss")
    add("--tls-key", type=Path, default=None, help="PEM private key for --tls-cert")
    add("--schedule", type=Path, default=None,
        help='JSON fault schedule: {"steps": [[SECONDS, {"fault": ...}], ...],'
             ' "repeat_every": SECONDS}')  # fmt: skip


def venue_command(args: argparse.Namespace) -> int:
    """Run ``wirekeep venue`` until SIGINT/SIGTERM (blocking); returns the exit status."""
    from daemon.venue import command  # noqa: PLC0415 - loaded only when the command runs

    return command.venue_command(args)


async def venue_main(args: argparse.Namespace) -> int:
    """The same, for a caller already inside ``trio.run``."""
    from daemon.venue import command  # noqa: PLC0415 - loaded only when the command runs

    return await command.venue_main(args)
