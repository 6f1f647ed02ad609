"""The protocol layer's errors, split by who broke the rules (as in h11).

- :class:`RemoteProtocolError`: the peer sent something the protocol does not
  allow. The session disconnects, with the error's message as the reason.
- :class:`LocalProtocolError`: we were about to send something the protocol
  does not allow (a bug on our side, or a value out of range).

Every message is a human sentence that can go straight into an event's
``reason``; none of them contain secrets or whole payloads.
"""

from __future__ import annotations

__all__ = ["FrameTooLarge", "LocalProtocolError", "ProtocolError", "RemoteProtocolError"]


class ProtocolError(Exception):
    """Base class: something on the wire broke the protocol's rules."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the rules; the connection cannot continue."""


class LocalProtocolError(ProtocolError):
    """We were about to break the rules; nothing was sent."""


class FrameTooLarge(RemoteProtocolError):
    """A length prefix declared a frame larger than the configured limit.

    Raised as soon as the 4-byte header arrives, before any of the body.
    """

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"frame of {size} bytes exceeds the {limit}-byte limit")
        self.size = size
        self.limit = limit

    def __reduce__(self) -> tuple[type[FrameTooLarge], tuple[int, int]]:
        return (type(self), (self.size, self.limit))
