"""What the session driver needs from a venue adapter, and what an adapter may raise.

An adapter is the thin Trio shell around one ``protocol/`` codec: it opens the
transport, runs the protocol handshake, authenticates, subscribes, sends heartbeats,
and hands received messages over in batches. It never touches the session machine:
the driver (``daemon.session``) turns what happens here into triggers.

Timeouts (connect, auth) are the driver's cancel scopes around these calls; an adapter
only enforces what only it can see (a pong deadline, a maximum frame size).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import trio


@dataclass(slots=True)
class Batch:
    """What one read from a venue brought.

    One object per read, not per message: at 100,000+ messages/s a Python object per
    message would cost as much as decoding it.
    """

    #: Data and venue-error messages in arrival order, each exactly as the venue sent it
    #: (JSON text as UTF-8, or the serialized protobuf envelope): what consumers receive.
    messages: list[bytes]
    #: True when the messages are JSON text frames.
    text: bool
    #: Heartbeats that arrived as well: they prove the link alive; nobody is sent them.
    heartbeats: int = 0
    #: The venue's error texts, for the messages among ``messages`` that are errors.
    errors: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        """Every message that arrived, heartbeats included."""
        return len(self.messages) + self.heartbeats


class AdapterError(Exception):
    """A failure of the link; ``reason`` is the human sentence that goes into the event."""

    def __init__(self, reason: str, *, error_class: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.error_class = error_class or type(self).__name__


class ConnectFailed(AdapterError):
    """The transport or the protocol handshake did not come up (refused, 503, 429, TLS)."""


class AuthRejected(AdapterError):
    """The venue answered the credentials with a no; ``reason`` carries its error text."""


class ConnectionLost(AdapterError):
    """An established link ended: closed, reset, garbage, oversized frame, missed pong."""


class Connection(Protocol):
    """One established transport to one endpoint."""

    @property
    def endpoint(self) -> str: ...

    async def authenticate(self) -> None:
        """Send the credentials and wait for the verdict (AuthRejected, ConnectionLost)."""

    async def subscribe(self) -> None:
        """Send the configured subscriptions (again after every reconnect)."""

    async def receive_batch(self) -> Batch:
        """Wait for at least one message; return every message already decoded.

        Reads large chunks and decodes every frame in them, so the per-message cost is
        small. Raises ConnectionLost when the link ends for any reason.
        """

    async def heartbeat(self) -> None:
        """One application/protocol heartbeat; for WebSocket a ping that waits for its pong."""

    async def aclose(self) -> None:
        """Close the link (best effort, never raises)."""


#: Opens a byte stream to (host, port); tests pass one that returns memory streams.
StreamOpener = Callable[[str, int], Awaitable[trio.abc.Stream]]


class Adapter(Protocol):
    """Connects one session kind to a venue."""

    async def connect(self, nursery: trio.Nursery, url: str) -> Connection:
        """Transport and protocol handshake; background tasks go in ``nursery``.

        Raises ConnectFailed.
        """
        ...
