"""Fault descriptions, the board of faults in force, and a schedule that drives them.

A :class:`Fault` is a plain value (validated on construction) that can come from Python,
from a control-port JSON line (:meth:`Fault.from_dict`) or from a :class:`FaultSchedule`.
The :class:`FaultBoard` holds the *timed* faults currently in force and wakes every task
waiting on them when one is set, cleared or expires; the *instant* faults (drop, garbage,
oversized) never reach the board, the venue applies them to the connections open at that
moment.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Final, Literal, TypeAlias, cast, get_args

import trio

__all__ = [
    "INSTANT_FAULTS",
    "TIMED_FAULTS",
    "Fault",
    "FaultBoard",
    "FaultError",
    "FaultName",
    "FaultSchedule",
    "VenueKind",
]

VenueKind: TypeAlias = Literal["websocket", "protobuf"]
FaultName: TypeAlias = Literal[
    "drop", "silent", "refuse", "reject_auth", "garbage", "oversized", "slow_drip", "clear"
]

KINDS: Final[tuple[VenueKind, ...]] = get_args(VenueKind)
FAULT_NAMES: Final[tuple[FaultName, ...]] = get_args(FaultName)
#: In force for ``seconds`` (or until cleared), for connections old and new.
TIMED_FAULTS: Final = frozenset({"silent", "refuse", "reject_auth", "slow_drip"})
#: Done once, to the connections open at that moment.
INSTANT_FAULTS: Final = frozenset({"drop", "garbage", "oversized"})

_KEYS: Final = frozenset({"fault", "seconds", "kind", "port", "status", "delay"})


class FaultError(ValueError):
    """A fault description is malformed; the message says which field and why."""


def _check_number(name: str, value: object, *, allow_zero: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise FaultError(f"{name} must be a number, not {value!r}")
    number = float(value)
    if not math.isfinite(number) or number < 0 or (number == 0 and not allow_zero):
        raise FaultError(f"{name} must be a positive number, not {value!r}")
    return number


@dataclass(frozen=True, slots=True)
class Fault:
    """One fault: what, for how long, and where.

    ``seconds`` applies to timed faults (None: until cleared). ``kind`` and ``port``
    narrow the scope (None: every kind / every port). ``status`` is the HTTP status a
    refused WebSocket handshake gets; ``delay`` the pause between bytes of slow_drip.
    """

    name: FaultName
    seconds: float | None = None
    kind: VenueKind | None = None
    port: int | None = None
    status: int = 503
    delay: float = 0.001

    def __post_init__(self) -> None:
        if self.name not in FAULT_NAMES:
            raise FaultError(f"unknown fault {self.name!r}; known: {', '.join(FAULT_NAMES)}")
        if self.seconds is not None:
            _check_number("seconds", self.seconds, allow_zero=False)
            if self.name not in TIMED_FAULTS:
                raise FaultError(f"{self.name} happens at once; it takes no seconds")
        if self.kind is not None and self.kind not in KINDS:
            raise FaultError(f"kind must be one of {', '.join(KINDS)}, not {self.kind!r}")
        if self.port is not None and (
            isinstance(self.port, bool) or not isinstance(self.port, int) or self.port < 0
        ):
            raise FaultError(f"port must be a port number, not {self.port!r}")
        if isinstance(self.status, bool) or not isinstance(self.status, int):
            raise FaultError(f"status must be an HTTP status code, not {self.status!r}")
        if not 300 <= self.status <= 599:
            raise FaultError(f"status must be between 300 and 599, not {self.status}")
        _check_number("delay", self.delay, allow_zero=True)

    @classmethod
    def from_dict(cls, spec: Mapping[str, object]) -> Fault:
        """``{"fault": "silent", "seconds": 10, "kind": "websocket"}`` -> a Fault."""
        unknown = sorted(set(spec) - _KEYS)
        if unknown:
            raise FaultError(f"unknown key {unknown[0]!r}; known: {', '.join(sorted(_KEYS))}")
        name = spec.get("fault")
        if not isinstance(name, str):
            raise FaultError(f"'fault' must name a fault ({', '.join(FAULT_NAMES)})")
        # Types are checked by __post_init__, with messages naming the key.
        return cls(
            name=cast("FaultName", name),
            seconds=cast("float | None", spec.get("seconds")),
            kind=cast("VenueKind | None", spec.get("kind")),
            port=cast("int | None", spec.get("port")),
            status=cast("int", spec.get("status", 503)),
            delay=cast("float", spec.get("delay", 0.001)),
        )

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"fault": self.name}
        for key in ("seconds", "kind", "port"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.name == "refuse":
            out["status"] = self.status
        if self.name == "slow_drip":
            out["delay"] = self.delay
        return out

    def applies_to(self, kind: VenueKind, port: int) -> bool:
        return (self.kind is None or self.kind == kind) and (self.port is None or self.port == port)

    def covers(self, other: Fault) -> bool:
        """Is ``other``'s scope inside this one's (what a scoped ``clear`` removes)?"""
        return (self.kind is None or self.kind == other.kind) and (
            self.port is None or self.port == other.port
        )


@dataclass(slots=True)
class _InForce:
    fault: Fault
    until: float  # trio time; inf while it lasts until cleared


class FaultBoard:
    """The timed faults in force, with a wake-up for the tasks that wait on them."""

    def __init__(self) -> None:
        self._in_force: list[_InForce] = []
        self._changed = trio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def set(self, fault: Fault, now: float) -> None:
        """Put a timed fault in force; it replaces one of the same name and scope."""
        until = math.inf if fault.seconds is None else now + fault.seconds
        self._in_force = [
            entry
            for entry in self._in_force
            if (entry.fault.name, entry.fault.kind, entry.fault.port)
            != (fault.name, fault.kind, fault.port)
        ]
        self._in_force.append(_InForce(fault, until))
        self._notify()

    def clear(self, scope: Fault) -> int:
        """Remove the faults whose scope lies inside ``scope``'s; returns how many."""
        before = len(self._in_force)
        self._in_force = [entry for entry in self._in_force if not scope.covers(entry.fault)]
        self._notify()
        return before - len(self._in_force)

    def find(self, name: str, kind: VenueKind, port: int) -> tuple[Fault, float] | None:
        """The fault ``name`` in force for (kind, port) that lasts longest, and its end."""
        if not self._in_force:
            return None  # the usual case, on every write: keep it cheap
        now = trio.current_time()
        self._in_force = [entry for entry in self._in_force if entry.until > now]
        found: _InForce | None = None
        for entry in self._in_force:
            if (
                entry.fault.name == name
                and entry.fault.applies_to(kind, port)
                and (found is None or entry.until > found.until)
            ):
                found = entry
        return None if found is None else (found.fault, found.until)

    def active(self, name: str, kind: VenueKind, port: int) -> Fault | None:
        found = self.find(name, kind, port)
        return None if found is None else found[0]

    async def wait_while(self, name: str, kind: VenueKind, port: int) -> bool:
        """Block while ``name`` is in force for (kind, port); True if it blocked at all."""
        waited = False
        while (found := self.find(name, kind, port)) is not None:
            waited = True
            with trio.move_on_at(found[1]):
                await self._changed.wait()
        return waited

    def snapshot(self) -> list[dict[str, object]]:
        """The faults in force, each with ``remaining`` seconds (None: until cleared)."""
        now = trio.current_time()
        out: list[dict[str, object]] = []
        for entry in self._in_force:
            if entry.until > now:
                remaining = None if math.isinf(entry.until) else round(entry.until - now, 3)
                out.append({**entry.fault.to_dict(), "remaining": remaining})
        return out


def _as_fault(value: Fault | Mapping[str, object]) -> Fault:
    return value if isinstance(value, Fault) else Fault.from_dict(value)


@dataclass(frozen=True, slots=True)
class FaultSchedule:
    """Faults at fixed offsets from the start of :meth:`run` (for the demo).

    ``steps`` are ``(at_seconds, fault)`` pairs, a fault being a :class:`Fault` or its
    dict form; with ``repeat_every`` the whole schedule starts again every that many
    seconds (it must be longer than the last step).
    """

    steps: tuple[tuple[float, Fault], ...]
    repeat_every: float | None = None

    def __init__(
        self,
        steps: Iterable[tuple[float, Fault | Mapping[str, object]]],
        repeat_every: float | None = None,
    ) -> None:
        ordered = tuple(
            sorted(
                ((_check_number("at", at, allow_zero=True), _as_fault(f)) for at, f in steps),
                key=lambda step: step[0],
            )
        )
        if repeat_every is not None:
            _check_number("repeat_every", repeat_every, allow_zero=False)
            if ordered and ordered[-1][0] >= repeat_every:
                raise FaultError("repeat_every must be longer than the last step's offset")
        object.__setattr__(self, "steps", ordered)
        object.__setattr__(self, "repeat_every", repeat_every)

    async def run(self, apply: Callable[[Fault], object]) -> None:
        """Apply each fault at its time (``apply`` is e.g. ``venue.apply_fault``)."""
        start = trio.current_time()
        while True:
            for at, fault in self.steps:
                await trio.sleep_until(start + at)
                apply(fault)
            if self.repeat_every is None:
                return
            start += self.repeat_every
            await trio.sleep_until(start)
