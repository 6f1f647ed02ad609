"""The session machine: everything that decides what a session may do next lives here.

One module-level table (``TRANSITIONS``) holds every legal move as data. The live daemon
fires triggers through one shared ``transitions.Machine``; replay verifies stored events
against ``LEGAL``, a lookup derived from the same table, because re-firing a million
stored triggers through the library would be far too slow. The README's state table
and diagram are generated from ``TRANSITIONS`` too.

Pure: no I/O, no clock reads. Time is always an argument (``at``), supplied by the caller.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Any, Final

from transitions import Machine, MachineError


class State(enum.Enum):
    """Session states; the names are part of the public interface."""

    DISCONNECTED = "no transport; initial state"
    CONNECTING = "transport, protocol handshake and authentication in progress"
    AUTHENTICATED = "authenticated; subscriptions being set up"
    STREAMING = "data or heartbeats arriving within stale_after"
    STALE = "connected, but nothing arrived for stale_after; forced reconnect after dead_after"
    BACKOFF = "waiting before the next attempt"
    CIRCUIT_OPEN = "too many consecutive failures; no attempts until the cool-down ends"
    PAUSED = "stopped by an operator; no attempts until resumed"


class Trigger(enum.StrEnum):
    """What happened. The values are what the event log stores in ``trigger``."""

    START = "start"
    CONNECTED = "connected"
    AUTHENTICATED = "authenticated"
    AUTH_REJECTED = "auth_rejected"
    DATA = "data"
    STABLE = "stable"
    STALE = "stale"
    DEAD = "dead"
    LOST = "lost"
    THROTTLED = "throttled"
    RETRY = "retry"
    TRIP = "trip"
    PROBE = "probe"
    PAUSE = "pause"
    RESUME = "resume"
    RECONNECT = "reconnect"
    FAILBACK = "failback"
    SHUTDOWN = "shutdown"
    RECOVER = "recover"
    REMOVE = "remove"
    FAULT = "fault"


D = State.DISCONNECTED
C = State.CONNECTING
A = State.AUTHENTICATED
S = State.STREAMING
T = State.STALE
B = State.BACKOFF
O = State.CIRCUIT_OPEN  # noqa: E741 - one letter per state keeps the table readable
P = State.PAUSED

#: States in which a transport exists (or is being set up).
LIVE: Final = frozenset({C, A, S, T})
#: States in which the link carries the venue's stream (consumers see it flowing).
FLOWING: Final = frozenset({S, T})
#: States that wait out a deadline before the next attempt.
WAITING: Final = frozenset({B, O})
#: Every state but PAUSED.
NOT_PAUSED: Final = frozenset(State) - {P}


@dataclass(frozen=True, slots=True)
class Edge:
    """One row of the table: ``trigger`` moves a session from any of ``sources`` to ``dest``."""

    trigger: Trigger
    sources: frozenset[State]
    dest: State
    doc: str


def _edge(trigger: Trigger, sources: Iterable[State], dest: State, doc: str) -> Edge:
    return Edge(trigger, frozenset(sources), dest, doc)


TRANSITIONS: Final[tuple[Edge, ...]] = (
    _edge(Trigger.START, [D], C, "begin an attempt (a connect token was available)"),
    _edge(Trigger.CONNECTED, [C], C, "transport and protocol handshake are up; auth follows"),
    _edge(Trigger.AUTHENTICATED, [C], A, "the venue accepted the credentials"),
    _edge(Trigger.AUTH_REJECTED, [C], B, "the venue rejected the credentials"),
    _edge(
        Trigger.DATA, [A, T], S, "first message after subscribing, or data resumed after silence"
    ),
    _edge(Trigger.STABLE, [S], S, "streamed for backoff.reset_after: failure counts reset"),
    _edge(Trigger.STALE, [S], T, "nothing arrived for stale_after"),
    _edge(Trigger.DEAD, [T], B, "still nothing after dead_after: the link is dropped"),
    _edge(Trigger.LOST, [C, A, S, T], B, "connection lost, refused, timed out or failed"),
    _edge(Trigger.THROTTLED, [D, B], B, "no connect token for the host: waiting for one"),
    _edge(Trigger.THROTTLED, [O], O, "cool-down over, but no connect token for the probe yet"),
    _edge(Trigger.RETRY, [B], C, "backoff elapsed (a connect token was available)"),
    _edge(Trigger.TRIP, [D, C, A, S, T, B], O, "a failure reached the breaker's threshold"),
    _edge(Trigger.PROBE, [O], C, "cool-down over: one half-open probe"),
    _edge(Trigger.PAUSE, NOT_PAUSED, P, "an operator paused the session"),
    _edge(Trigger.RESUME, [P], D, "an operator resumed the session"),
    _edge(Trigger.RECONNECT, [C, A, S, T, B, O], D, "an operator asked for a fresh connection"),
    _edge(
        Trigger.FAILBACK,
        [A, S, T],
        D,
        "the primary endpoint is healthy again: leave the fallback",
    ),
    _edge(Trigger.SHUTDOWN, LIVE, D, "the daemon is stopping cleanly"),
    _edge(Trigger.RECOVER, LIVE, D, "the daemon restarted after the session was left live"),
    _edge(Trigger.REMOVE, State, D, "the session was removed from the configuration"),
    _edge(Trigger.FAULT, [D, B], B, "an internal error (a bug): counted as a failure, retried"),
    _edge(Trigger.FAULT, [O], O, "an internal error while the circuit is open: cool-down again"),
    _edge(Trigger.FAULT, [P], P, "an internal error while paused: it stays paused"),
)


def _legal_table(edges: Iterable[Edge]) -> Mapping[tuple[str, str], str]:
    table: dict[tuple[str, str], str] = {}
    for edge in edges:
        for source in edge.sources:
            key = (source.name, edge.trigger.value)
            if key in table:
                raise ValueError(f"two edges leave {source.name} on {edge.trigger.value}")
            table[key] = edge.dest.name
    return MappingProxyType(table)


#: ``(source name, trigger) -> dest name``: the table as replay reads it.
LEGAL: Final[Mapping[tuple[str, str], str]] = _legal_table(TRANSITIONS)


def begins_stay(trigger: str, source: str, dest: str) -> bool:
    """Does this event enter its state, rather than loop in it?

    ``since`` (status, ``replay --at``, consumer notices) is when the session entered
    its state: self-loops (``connected``, ``stable``, ``throttled`` in CIRCUIT_OPEN, ...)
    do not move it. ``remove`` always begins a stay: the session was gone after it.
    """
    return source != dest or trigger == Trigger.REMOVE


class IllegalTransition(Exception):
    """A trigger that the table does not allow in the session's current state."""

    def __init__(self, session: str, state: State, trigger: str) -> None:
        super().__init__(f"session {session!r}: trigger {trigger!r} is not allowed in {state.name}")
        self.session = session
        self.state = state
        self.trigger = trigger


@dataclass(frozen=True, slots=True)
class TransitionRecord:
    """A transition as the event log stores it. ``version`` counts per session from 1."""

    session: str
    version: int
    at: datetime
    trigger: str
    source: str
    dest: str
    reason: str
    detail: Mapping[str, Any] = field(default_factory=dict)


class SessionModel:
    """The per-session model registered on the shared machine. Small on purpose.

    ``since`` is when the session entered ``state`` (see :func:`begins_stay`). The model
    moves before the event's COMMIT: observers read what the runner publishes after it.
    """

    __slots__ = ("name", "since", "state", "version")

    def __init__(
        self, name: str, state: State = D, version: int = 0, since: datetime | None = None
    ):
        self.name = name
        self.state = state
        self.version = version
        self.since = since

    def __repr__(self) -> str:
        return f"SessionModel({self.name!r}, {self.state.name}, v{self.version})"


class _Models(list[Any]):
    """The machine's model list with identity membership and removal in O(1).

    ``Machine.add_model`` checks ``mod not in self.models`` before each registration,
    which is a linear scan by equality: registering n models costs O(n^2), and so does
    removing them one by one with ``list.remove``. Here each model's index is kept;
    removal moves the last model into the gap (the order of models means nothing).
    """

    def __init__(self) -> None:
        super().__init__()
        self._index: dict[int, int] = {}

    def __contains__(self, item: object) -> bool:
        return id(item) in self._index

    def append(self, item: Any) -> None:
        self._index[id(item)] = len(self)
        super().append(item)

    def remove(self, item: Any) -> None:
        index = self._index.pop(id(item), None)
        if index is None:
            raise ValueError(f"{item!r} is not registered")
        last = super().pop()
        if last is not item:
            self[index] = last
            self._index[id(last)] = index


class _SharedMachine(Machine):
    """A plain ``Machine`` that binds nothing onto its models.

    By default the library adds one bound trigger, ``may_`` check and ``is_`` test per
    trigger and state to every model (about 8.5 KB each). Here triggers are fired
    through :meth:`SessionMachine.fire`, so a model is just its few slots.
    """

    def _checked_assignment(self, model: Any, name: str, func: Any) -> None:
        return

    def _add_trigger_to_model(self, trigger: str, model: Any) -> None:
        return

    def _add_model_to_state(self, state: Any, model: Any) -> None:
        return


class SessionMachine:
    """One machine definition shared by every session of a daemon."""

    def __init__(self) -> None:
        self._machine = _SharedMachine(
            model=None,
            states=State,
            initial=D,
            transitions=[
                {
                    "trigger": e.trigger.value,
                    "source": sorted(s.name for s in e.sources),
                    "dest": e.dest,
                }
                for e in TRANSITIONS
            ],
            auto_transitions=False,
            ignore_invalid_triggers=False,
            send_event=True,
            queued=False,
        )
        self._machine.models = _Models()
        self._events = self._machine.events

    def __len__(self) -> int:
        return len(self._machine.models)

    def register(self, model: SessionModel) -> SessionModel:
        """Add a model, keeping the state (and version) it already has."""
        self._machine.add_model(model, initial=model.state)
        return model

    def unregister(self, model: SessionModel) -> None:
        self._machine.remove_model(model)

    def may(self, model: SessionModel, trigger: Trigger | str) -> bool:
        return (model.state.name, str(trigger)) in LEGAL

    def fire(
        self,
        model: SessionModel,
        trigger: Trigger | str,
        *,
        at: datetime,
        reason: str,
        detail: Mapping[str, Any] | None = None,
    ) -> TransitionRecord:
        """Fire ``trigger`` and return the record of the transition.

        Raises :class:`IllegalTransition` and leaves the model unchanged when the
        table has no edge for the model's state and this trigger.
        """
        name = str(trigger)
        source = model.state
        try:
            self._events[name].trigger(model)
        except (MachineError, KeyError):
            raise IllegalTransition(model.name, source, name) from None
        model.version += 1
        if model.since is None or begins_stay(name, source.name, model.state.name):
            model.since = at
        return TransitionRecord(
            session=model.name,
            version=model.version,
            at=at,
            trigger=name,
            source=source.name,
            dest=model.state.name,
            reason=reason,
            detail=dict(detail or {}),
        )

    def revert(self, model: SessionModel, record: TransitionRecord, since: datetime | None) -> None:
        """``record`` never became durable (its append failed): put ``model`` back where
        it was, so that the next event follows the last one the log holds."""
        model.state = State[record.source]
        model.version = record.version - 1
        model.since = since


def edges() -> Iterator[tuple[State, Trigger, State]]:
    """Every legal (source, trigger, dest), in table order."""
    for edge in TRANSITIONS:
        for source in sorted(edge.sources, key=lambda s: list(State).index(s)):
            yield source, edge.trigger, edge.dest
