"""The policy memory a session carries in its event details: one schema for everyone.

The live runner writes it into events, replay folds it back out of them, and recovery
(a restart, or a reload that hands a session over to a new runner) starts from it. It
is typed here, once, so that the three cannot disagree about a key's name or meaning.

Two kinds of key:

- *carried* keys (``attempt``, ``failures``, ``endpoint_index``) hold from the event
  that stated them until a later event states them again: a ``retry`` says nothing
  about the attempt count, which is still the one the ``lost`` before it stated;
- *per-event* keys (``deadline``, ``uid``) belong to the last event alone: the deadline
  of a BACKOFF wait means nothing once the session has left it.

Pure: no I/O, no clock reads.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

#: Detail keys that carry from event to event (replay folds them into ``carry``).
CARRIED: Final = ("attempt", "failures", "endpoint_index")


@dataclass(frozen=True, slots=True)
class Memory:
    """What a session remembers between events.

    ``attempt``: consecutive failed attempts (the backoff's exponent); ``failures``: the
    breaker's consecutive failures; ``endpoint_index``: the endpoint the next attempt
    uses; ``deadline``: when the current BACKOFF / CIRCUIT_OPEN wait ends (wall clock);
    ``uid``: the operator whose command made the last event, if one did.
    """

    attempt: int = 0
    failures: int = 0
    endpoint_index: int = 0
    deadline: datetime | None = None
    uid: int | None = None

    @classmethod
    def recall(cls, carry: Mapping[str, Any], last_detail: Mapping[str, Any]) -> Memory:
        """The memory replay left: the folded ``carry`` and the last event's detail."""
        uid = last_detail.get("uid")
        return cls(
            attempt=_int(carry.get("attempt")),
            failures=_int(carry.get("failures")),
            endpoint_index=_int(carry.get("endpoint_index")),
            deadline=_instant(last_detail.get("deadline")),
            uid=uid if isinstance(uid, int) and not isinstance(uid, bool) else None,
        )

    def carried(self) -> dict[str, int]:
        """The carried keys, as an event's detail states them."""
        return {
            "attempt": self.attempt,
            "failures": self.failures,
            "endpoint_index": self.endpoint_index,
        }


def carry_forward(carry: dict[str, Any], detail: Mapping[str, Any]) -> None:
    """Fold one event's detail into ``carry`` (in place: replay's hot path)."""
    for key in CARRIED:
        if key in detail:
            carry[key] = detail[key]


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _instant(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None
