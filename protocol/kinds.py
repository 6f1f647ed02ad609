"""What an upstream message means to the session, whatever the venue kind."""

from __future__ import annotations

import enum

__all__ = ["MessageKind"]


class MessageKind(enum.StrEnum):
    """The one fact about an upstream message the session needs on the hot path.

    DATA is relayed to consumers; HEARTBEAT only proves the connection is alive;
    ERROR is the venue reporting a problem (the session decides whether it is
    fatal). All three count as "something arrived" for staleness.
    """

    DATA = "data"
    HEARTBEAT = "heartbeat"
    ERROR = "error"
