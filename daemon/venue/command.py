"""``wirekeep venue`` at run time: options -> VenueConfig, serve until a signal."""

from __future__ import annotations

import argparse
import json
import signal
import ssl
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TextIO

import trio

from daemon.venue.cli import DEFAULT_PB_PORT, DEFAULT_WS_PORT
from daemon.venue.faults import FaultError, FaultSchedule
from daemon.venue.hub import VenueConfig
from daemon.venue.server import SimulatedVenue, run_venue

__all__ = [
    "config_from_args",
    "load_schedule",
    "print_addresses",
    "run_until",
    "venue_command",
    "venue_main",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def _ssl_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    if args.tls_cert is None:
        if args.tls_key is not None:
            raise ValueError("--tls-key needs --tls-cert")
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(args.tls_cert, args.tls_key)
    return context


def config_from_args(args: argparse.Namespace) -> VenueConfig:
    """Raises ValueError (or OSError for the TLS files) naming what is wrong."""
    symbols = tuple(s.strip() for s in args.symbols.split(",") if s.strip())
    return VenueConfig(
        ws_ports=tuple(args.ws_port or [DEFAULT_WS_PORT]),
        pb_ports=tuple(args.pb_port or [DEFAULT_PB_PORT]),
        control_port=args.control_port,
        ssl_context=_ssl_context(args),
        rate=args.rate or None,
        count=args.count,
        heartbeat_interval=args.heartbeat_interval or None,
        symbols=symbols,
        require_auth=args.require_auth,
        ws_key=args.ws_key,
        client_secret=args.client_secret,
        access_token=args.access_token,
    )


def load_schedule(path: Path | None) -> FaultSchedule | None:
    """Read a schedule file: an object with ``steps`` (and ``repeat_every``) or a list."""
    if path is None:
        return None
    document = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(document, list):
        document = {"steps": document}
    if not isinstance(document, dict) or not isinstance(document.get("steps"), list):
        raise FaultError(f"{path}: expected {{'steps': [[SECONDS, FAULT], ...]}}")
    steps = []
    for step in document["steps"]:
        if not (isinstance(step, list) and len(step) == 2 and isinstance(step[1], dict)):
            raise FaultError(f"{path}: each step is [SECONDS, {{'fault': ...}}], not {step!r}")
        steps.append((step[0], step[1]))
    return FaultSchedule(steps, document.get("repeat_every"))


def print_addresses(venue: SimulatedVenue, out: TextIO) -> None:
    host = venue.config.host
    tls = venue.config.ssl_context is not None
    lines = [f"websocket  {'wss' if tls else 'ws'}://{host}:{port}{venue.config.ws_path or '/'}"
             for port in venue.ws_ports]  # fmt: skip
    lines += [f"protobuf   {'tls' if tls else 'tcp'}://{host}:{port}" for port in venue.pb_ports]
    if venue.control_port is not None:
        lines.append(
            f"control    {host}:{venue.control_port}  (JSON lines, e.g."
            f' socat - TCP:{host}:{venue.control_port}, then {{"status":true}})'
        )
    out.write("\n".join(lines) + "\n")
    out.flush()


async def _until_signal() -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            return


async def run_until(
    config: VenueConfig,
    schedule: FaultSchedule | None,
    stop: Callable[[], Awaitable[None]],
    out: TextIO,
    err: TextIO,
) -> int:
    """Serve, print the addresses, return when ``stop()`` returns (exit status)."""
    async with trio.open_nursery() as nursery:
        try:
            venue: SimulatedVenue = await nursery.start(run_venue, config, schedule)
        except OSError as exc:
            err.write(f"wirekeep venue: cannot listen: {exc}\n")
            return EXIT_FAILED
        print_addresses(venue, out)
        await stop()
        nursery.cancel_scope.cancel()
    return EXIT_OK


async def venue_main(args: argparse.Namespace) -> int:
    """``wirekeep venue``: serve until SIGINT/SIGTERM; 0 on a clean stop."""
    try:
        config = config_from_args(args)
        schedule = load_schedule(args.schedule)
    except (ValueError, OSError) as exc:  # FaultError and JSON errors are ValueErrors
        sys.stderr.write(f"wirekeep venue: {exc}\n")
        return EXIT_USAGE
    return await run_until(config, schedule, _until_signal, sys.stdout, sys.stderr)


def venue_command(args: argparse.Namespace) -> int:
    """The synchronous entry point: ``trio.run(venue_main, args)``."""
    return trio.run(venue_main, args)
