"""Replay: fold stored events through the session machine's table.

Shared by restart recovery and the ``replay`` command. The fold checks every event
against ``statemachines.session.LEGAL`` (derived from the same transitions table the
live machine runs on): an event that does not follow from the state before it, or a
gap in a session's versions, is corruption, reported with the offending row.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextlib import closing
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from daemon.store import EventStore, Snapshot, StoredEvent
from statemachines.memory import CARRIED, Memory, carry_forward
from statemachines.session import LEGAL, State, begins_stay

__all__ = ["CARRIED", "CorruptLog", "SessionView", "fold", "recover", "state_at", "verify_rows"]

INITIAL = State.DISCONNECTED.name


class CorruptLog(Exception):
    """The log contains an event the machine could not have produced."""

    def __init__(self, message: str, row: Mapping[str, Any]) -> None:
        super().__init__(f"{message}: {dict(row)}")
        self.row = dict(row)


@dataclass
class SessionView:
    """What replay knows about one session after folding its events.

    ``since`` is when the session entered ``state`` (self-loops do not move it); ``at``,
    ``trigger``, ``reason`` and ``detail`` are those of its last event; ``carry`` holds
    the carried policy memory (:mod:`statemachines.memory`).
    """

    session: str
    state: str = INITIAL
    version: int = 0
    since: datetime | None = None
    trigger: str | None = None
    reason: str = ""
    detail: Mapping[str, Any] = field(default_factory=dict)
    carry: dict[str, Any] = field(default_factory=dict)
    at: datetime | None = None

    @property
    def memory(self) -> Memory:
        """The policy memory a runner starts from."""
        return Memory.recall(self.carry, self.detail)

    def apply(self, event: StoredEvent) -> None:
        check(
            self.session,
            self.state,
            self.version,
            (event.version, event.trigger, event.source, event.dest),
            event,
        )
        if self.since is None or begins_stay(event.trigger, event.source, event.dest):
            self.since = event.at
        self.state = event.dest
        self.version = event.version
        self.at = event.at
        self.trigger = event.trigger
        self.reason = event.reason
        self.detail = event.detail
        carry_forward(self.carry, event.detail)

    def snapshot(self) -> Snapshot:
        """The view as a row of ``session_snapshots``: ``at`` is ``since``; the last
        event's time is in the detail."""
        assert self.since is not None
        return Snapshot(
            self.session,
            self.version,
            self.since,
            self.state,
            {
                "trigger": self.trigger,
                "reason": self.reason,
                "detail": dict(self.detail),
                "carry": dict(self.carry),
                "at": (self.at or self.since).isoformat(),
            },
        )

    @classmethod
    def from_snapshot(cls, snap: Snapshot) -> SessionView:
        d = snap.detail
        return cls(
            snap.session,
            snap.state,
            snap.version,
            snap.at,
            d.get("trigger"),
            d.get("reason", ""),
            d.get("detail", {}),
            dict(d.get("carry", {})),
            datetime.fromisoformat(d["at"]) if "at" in d else snap.at,
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "session": self.session,
            "state": self.state,
            "version": self.version,
            "since": self.since.isoformat() if self.since else None,
            "trigger": self.trigger,
            "reason": self.reason,
            "detail": dict(self.detail),
        }


def check(
    session: str, state: str, version: int, event: tuple[int, str, str, str], row: Any
) -> None:
    """Raise CorruptLog unless ``event`` = (version, trigger, source, dest) may follow."""
    ev_version, trigger, source, dest = event
    if ev_version != version + 1:
        kind = "duplicate" if ev_version <= version else "gap"
        raise CorruptLog(
            f"session {session!r}: version {ev_version} follows {version} ({kind} in versions)",
            _row(row),
        )
    if source != state:
        raise CorruptLog(
            f"session {session!r} v{ev_version}: event leaves {source} "
            f"but the session was in {state}",
            _row(row),
        )
    if LEGAL.get((source, trigger)) != dest:
        raise CorruptLog(
            f"session {session!r} v{ev_version}: {source} --{trigger}--> {dest} "
            "is not a legal transition",
            _row(row),
        )


def _row(row: Any) -> Mapping[str, Any]:
    if isinstance(row, StoredEvent):
        return row.as_json()
    if isinstance(row, tuple):
        return dict(zip(("session", "version", "trigger", "source", "dest"), row, strict=False))
    return dict(row)


def verify_rows(
    rows: Iterable[tuple[str, int, str, str, str]], entered: dict[str, int] | None = None
) -> dict[str, tuple[str, int]]:
    """The fast fold: (session, version, trigger, source, dest) rows in log order.

    Returns each session's final (state, version); ``entered``, if given, is filled with
    the version of the event that entered each session's final state (its ``since``).
    This is the replay hot path, so it is one dict lookup per check and no objects per
    row.
    """
    legal = LEGAL
    states: dict[str, tuple[str, int]] = {}
    initial = (INITIAL, 0)
    for row in rows:
        session, version, trigger, source, dest = row
        state, last = states.get(session, initial)
        if version != last + 1 or source != state or legal.get((source, trigger)) != dest:
            check(session, state, last, (version, trigger, source, dest), row)
        states[session] = (dest, version)
        if entered is not None and (version == 1 or begins_stay(trigger, source, dest)):
            entered[session] = version
    return states


def verify_store(store: EventStore) -> dict[str, tuple[str, int]]:
    """Fold and verify the whole log from the beginning."""
    with closing(store.iter_fold_rows()) as rows:
        return verify_rows(rows)


def fold(
    events: Iterable[StoredEvent], start: Mapping[str, SessionView] | None = None
) -> dict[str, SessionView]:
    """Full views (reasons, details, carried policy memory) of every session."""
    views: dict[str, SessionView] = dict(start or {})
    for event in events:
        view = views.get(event.session)
        if view is None:
            view = views[event.session] = SessionView(event.session)
        view.apply(event)
    return views


def recover(store: EventStore) -> dict[str, SessionView]:
    """Every session's view for restart recovery: from the snapshots, then the events after."""
    views = {name: SessionView.from_snapshot(s) for name, s in store.snapshots().items()}
    for name, view in list(views.items()):
        with closing(store.iter_events(session=name, after_version=view.version)) as events:
            views[name] = fold(events, {name: view})[name]
    known = set(views)
    for name, last in store.last_events().items():
        if name not in known:
            with closing(store.iter_events(session=name)) as events:
                views[name] = fold(events)[name]
        elif views[name].version != last.version:
            raise CorruptLog(
                f"session {name!r}: replay ended at v{views[name].version}", last.as_json()
            )
    return views


def state_at(store: EventStore, at: datetime) -> dict[str, SessionView]:
    """The state of every session at instant ``at``, reconstructed (and verified) from the log.

    The whole history up to ``at`` is verified with the fast fold; the last event of
    each session is then read in full for its reason, and the event that entered its
    state for ``since``.
    """
    entered: dict[str, int] = {}
    with closing(store.iter_fold_rows(until=at)) as rows:
        finals = verify_rows(rows, entered)
    last = store.events_at({name: version for name, (_, version) in finals.items()})
    entries = store.events_at(entered)
    views = {}
    for name, event in last.items():
        view = SessionView(
            name, event.dest, event.version, entries[name].at, event.trigger, event.reason,
            event.detail, at=event.at,
        )  # fmt: skip
        views[name] = view
    return dict(sorted(views.items()))
