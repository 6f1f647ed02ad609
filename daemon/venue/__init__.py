"""The bundled simulated venue: both session kinds on loopback, with scripted faults.

Used by ``wirekeep demo``, the tests and the benchmarks. One :class:`SimulatedVenue`
serves

- **protobuf** sessions (length-prefixed envelopes, ``protocol/venue.proto``, plain TCP
  or TLS): ApplicationAuthReq -> ApplicationAuthRes, AccountAuthReq -> AccountAuthRes,
  SubscribeReq -> SubscribeRes and a stream of QuoteEvents; rejected credentials get an
  ErrorRes (``CH_CLIENT_AUTH_FAILURE`` / ``CH_ACCESS_TOKEN_INVALID``) and a close;
- **websocket** sessions (JSON text, path ``/feed``): an auth message, subscriptions,
  tick messages; a rejected key gets ``{"op":"auth","ok":false,...}`` and close code 4001;

with a HeartbeatEvent / ``{"type":"heartbeat"}`` every ``heartbeat_interval`` and data
at ``rate`` messages per second per connection (or as fast as possible, coalesced).

Fault model
-----------
A fault is applied through :meth:`SimulatedVenue.fault` / :meth:`~SimulatedVenue.apply_fault`,
a line on the control port (``{"fault": "silent", "seconds": 10}``) or a
:class:`FaultSchedule`. ``kind`` and ``port`` narrow it to one session kind or one
listening port; without them it hits everything.

*Instant* faults act once on the connections open at that moment:

``drop``       close abruptly: TCP RST on sockets (SO_LINGER 0), no WebSocket close
               handshake; over memory streams the peer simply sees end-of-stream.
``garbage``    protobuf: a well-framed payload that is not an envelope; WebSocket: a
               binary message of random bytes, then a text message that is not JSON.
``oversized``  protobuf: a header declaring a 64 MiB frame and 64 KiB of it, then the
               connection is closed (anything more would be read as that frame's body);
               WebSocket: a 2 MiB text message.

*Timed* faults hold for ``seconds`` (or until ``clear``), for old and new connections:

``silent``       nothing is written - no data, heartbeats, replies or WebSocket pongs -
                 but sockets stay open and requests are still read: the half-open link
                 a client must detect by staleness. Pacing restarts when it ends; held
                 messages are sent then, missed ones are not made up.
``refuse``       new handshakes fail: WebSocket upgrades get HTTP ``status`` (503 by
                 default, e.g. 429), protobuf connections are closed before any reply.
``reject_auth``  every credential is answered with a rejection.
``slow_drip``    every write goes out one byte at a time, ``delay`` seconds apart.

``clear`` removes the timed faults whose scope lies within its own (no scope: all).
``silent`` and ``slow_drip`` act in :class:`~daemon.venue.hub.FaultStream`, below the
protocol, so they hold everything a broken path would.

All pacing uses Trio time, so a venue on ``trio.testing.memory_stream_pair()`` runs under
``MockClock(autojump_threshold=0)``; wall-clock time only stamps messages::

    venue = SimulatedVenue(VenueConfig(rate=10.0))
    client, server = trio.testing.memory_stream_pair()
    nursery.start_soon(venue.handle_protobuf_stream, server)   # or handle_websocket_stream

On sockets: ``venue = await nursery.start(run_venue, VenueConfig(...))``, then
``venue.ws_url``, ``venue.pb_port``, ``venue.control_port``.

Importing this package is cheap: its names are loaded on first use, so the command line
can build its parser (:func:`add_venue_arguments`) without importing Trio.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from daemon.venue.cli import add_venue_arguments, venue_command, venue_main
    from daemon.venue.faults import (
        Fault,
        FaultBoard,
        FaultError,
        FaultName,
        FaultSchedule,
        VenueKind,
    )
    from daemon.venue.hub import KindCounters, VenueConfig
    from daemon.venue.protobuf import BAD_ACCESS_TOKEN, BAD_CLIENT, OVERSIZED_LENGTH
    from daemon.venue.server import SimulatedVenue, run_venue
    from daemon.venue.websocket import (
        AUTH_CLOSE_CODE,
        AUTH_OK,
        HEARTBEAT_TEXT,
        OVERSIZED_MESSAGE_SIZE,
    )

# Loaded on first use, so that ``from daemon.venue.cli import add_venue_arguments`` (the
# command line building its parser) does not import Trio, trio-websocket and protobuf.
_WHERE = {
    "add_venue_arguments": "cli",
    "venue_command": "cli",
    "venue_main": "cli",
    "Fault": "faults",
    "FaultBoard": "faults",
    "FaultError": "faults",
    "FaultName": "faults",
    "FaultSchedule": "faults",
    "VenueKind": "faults",
    "KindCounters": "hub",
    "VenueConfig": "hub",
    "BAD_ACCESS_TOKEN": "protobuf",
    "BAD_CLIENT": "protobuf",
    "OVERSIZED_LENGTH": "protobuf",
    "SimulatedVenue": "server",
    "run_venue": "server",
    "AUTH_CLOSE_CODE": "websocket",
    "AUTH_OK": "websocket",
    "HEARTBEAT_TEXT": "websocket",
    "OVERSIZED_MESSAGE_SIZE": "websocket",
}
__all__ = [
    "AUTH_CLOSE_CODE",
    "AUTH_OK",
    "BAD_ACCESS_TOKEN",
    "BAD_CLIENT",
    "HEARTBEAT_TEXT",
    "OVERSIZED_LENGTH",
    "OVERSIZED_MESSAGE_SIZE",
    "Fault",
    "FaultBoard",
    "FaultError",
    "FaultName",
    "FaultSchedule",
    "KindCounters",
    "SimulatedVenue",
    "VenueConfig",
    "VenueKind",
    "add_venue_arguments",
    "run_venue",
    "venue_command",
    "venue_main",
]


def __getattr__(name: str) -> object:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
