"""The session's decisions: what a command, silence, a failure, the first message, a probe
result or a bug means in the state the session is in.

Everything that decides what a session does next lives here (the table of legal moves is
in :mod:`statemachines.session`; the backoff, breaker and rate-limit arithmetic in
:mod:`statemachines.policy`). The Trio runner in ``daemon/session.py`` only pumps bytes
and timers, tells a :class:`SessionPolicy` what happened, and fires the
:class:`Decision` it gets back. A command that does not apply gets a "not now" answer
(:attr:`Answer.decision` None): the operator is told, and the running phase goes on.

Pure: no I/O, no clock reads. ``now`` (seconds on any monotonic scale, for the policy
arithmetic) and ``wall`` (the wall-clock instant stored in events) are arguments.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final

from statemachines.memory import Memory
from statemachines.policy import (
    Backoff,
    BackoffSettings,
    CircuitBreaker,
    CircuitSettings,
    RateSettings,
)
from statemachines.session import LIVE, State, Trigger

#: ``error_class`` of an unexpected exception in the daemon's own code (a bug).
INTERNAL: Final = "internal"


class CommandKind(enum.Enum):
    """Operator commands (pause, resume, reconnect) and lifecycle ones (the rest)."""

    PAUSE = "pause"
    RESUME = "resume"
    RECONNECT = "reconnect"
    SHUTDOWN = "shutdown"
    REMOVE = "remove"
    #: Hand the session over to a runner with new settings: ``reconnect`` if it has a
    #: link or a pending attempt, nothing if it is paused or disconnected; then stop.
    RECONFIGURE = "reconfigure"


@dataclass(frozen=True, slots=True)
class Decision:
    """A transition to fire: the trigger, its reason sentence and detail, and what to
    wait for next (``wait`` seconds until the next attempt may begin, ending at the
    wall-clock ``deadline``; None: nothing to wait for)."""

    trigger: Trigger
    reason: str
    detail: Mapping[str, Any] = field(default_factory=dict)
    wait: float | None = None
    deadline: datetime | None = None


@dataclass(frozen=True, slots=True)
class Answer:
    """What a command does: ``result`` is what the operator is told. With neither a
    ``decision`` nor ``stop`` the command does not apply: nothing is interrupted."""

    result: str
    decision: Decision | None = None
    stop: bool = False

    @property
    def applies(self) -> bool:
        return self.decision is not None or self.stop


@dataclass(frozen=True, slots=True)
class Failure:
    """What ended a link or an attempt: ``trigger`` is LOST, AUTH_REJECTED or DEAD."""

    trigger: Trigger
    reason: str
    error_class: str


@dataclass(frozen=True, slots=True)
class Timing:
    """The session's liveness settings (seconds)."""

    stale_after: float
    dead_after: float


_ATTEMPT_TRIGGER: Final = {
    State.DISCONNECTED: (Trigger.START, "starting"),
    State.BACKOFF: (Trigger.RETRY, "backoff elapsed"),
    State.CIRCUIT_OPEN: (Trigger.PROBE, "cool-down over: half-open probe"),
}


def fmt_s(seconds: float) -> str:
    """Seconds as reasons state them: "5.0 s"."""
    if math.isinf(seconds):
        return "ever"
    return f"{seconds:.1f} s"


class SessionPolicy:
    """One session's decisions and the policy memory they need (backoff, breaker,
    endpoint). Only the session's own runner calls it, one event at a time."""

    __slots__ = ("_stable_noted", "backoff", "breaker", "endpoint_index", "endpoints", "timing")

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        backoff: BackoffSettings,
        circuit: CircuitSettings,
        timing: Timing,
        uniform: Callable[[], float],
        memory: Memory | None = None,
    ) -> None:
        memory = memory or Memory()
        self.endpoints = tuple(endpoints)
        self.timing = timing
        self.backoff = Backoff(backoff, uniform, memory.attempt)
        self.breaker = CircuitBreaker(circuit, memory.failures)
        self.endpoint_index = memory.endpoint_index % len(self.endpoints)
        self._stable_noted = False

    @property
    def endpoint(self) -> str:
        """The endpoint the current (or next) attempt uses."""
        return self.endpoints[self.endpoint_index]

    def memory(self, deadline: datetime | None = None) -> Memory:
        return Memory(self.backoff.attempt, self.breaker.failures, self.endpoint_index, deadline)

    def breaker_state(self) -> str:
        """ "closed", "open" or "half-open" (one probe let through after the cool-down)."""
        if self.breaker.half_open:
            return "half-open"
        return "open" if self.breaker.opened_at is not None else "closed"

    def restore_open(self, remaining: float, now: float) -> None:
        """Recovery: the circuit was open, with ``remaining`` seconds of cool-down left."""
        self.breaker.open_until(now + remaining)

    # -- commands ------------------------------------------------------------------------

    def refusal(self, state: State, kind: CommandKind) -> str | None:
        """Why ``kind`` does not apply in ``state`` now (None: it does). No side effects."""
        if kind is CommandKind.PAUSE and state is State.PAUSED:
            return "already PAUSED"
        if kind is CommandKind.RESUME and state is not State.PAUSED:
            return f"not paused (it is {state.name})"
        if kind is CommandKind.RECONNECT and state in (State.PAUSED, State.DISCONNECTED):
            return f"nothing to reconnect (it is {state.name})"
        return None

    def command(
        self, state: State, kind: CommandKind, reason: str, detail: Mapping[str, Any]
    ) -> Answer:
        """What ``kind`` does in ``state``; applies its effect on the policy memory."""
        refused = self.refusal(state, kind)
        if refused is not None:
            return Answer(refused)
        if kind is CommandKind.PAUSE:
            return Answer("paused", Decision(Trigger.PAUSE, reason, detail))
        if kind is CommandKind.RESUME:
            self.backoff.reset()
            self.breaker.reset()
            return Answer("resumed", Decision(Trigger.RESUME, reason, detail))
        if kind is CommandKind.RECONNECT:
            self.breaker.half_open = False
            return Answer("reconnecting", Decision(Trigger.RECONNECT, reason, detail))
        if kind is CommandKind.SHUTDOWN:
            if state not in LIVE:
                return Answer("stopped", stop=True)
            counts = {"attempt": self.backoff.attempt, "failures": self.breaker.failures}
            return Answer("stopped", Decision(Trigger.SHUTDOWN, reason, counts), stop=True)
        if kind is CommandKind.RECONFIGURE:
            if state in (State.PAUSED, State.DISCONNECTED):
                return Answer("reconfigured", stop=True)
            return Answer("reconfigured", Decision(Trigger.RECONNECT, reason, detail), stop=True)
        return Answer("removed", Decision(Trigger.REMOVE, reason, detail), stop=True)

    def recover(self, state: State) -> Decision | None:
        """At start: a session the previous run left live is disconnected, visibly."""
        if state not in LIVE:
            return None
        counts = {"attempt": self.backoff.attempt, "failures": self.breaker.failures}
        return Decision(Trigger.RECOVER, "daemon restarted", counts)

    # -- attempts ------------------------------------------------------------------------

    def attempt(
        self, state: State, *, wait: float, host: str, rate: RateSettings, wall: datetime
    ) -> Decision:
        """DISCONNECTED / BACKOFF / CIRCUIT_OPEN, the wait over and a handshake slot held:
        begin an attempt, or, with no connect slot for the host (``wait`` > 0), say so."""
        url = self.endpoint
        if wait > 0.0:
            until = wall + timedelta(seconds=wait)
            return Decision(
                Trigger.THROTTLED,
                f"connect rate limit for {host} ({rate.per_host} per {fmt_s(rate.window)}): "
                f"next slot in {fmt_s(wait)}",
                {
                    "throttled": True, "delay": round(wait, 3), "deadline": until.isoformat(),
                    "host": host, "attempt": self.backoff.attempt,
                    "failures": self.breaker.failures,
                },
                wait=wait,
                deadline=until,
            )  # fmt: skip
        trigger, why = _ATTEMPT_TRIGGER[state]
        if trigger is Trigger.PROBE:
            self.breaker.probe()
        return Decision(
            trigger,
            f"{why}: connecting to {url}",
            {"endpoint": url, "endpoint_index": self.endpoint_index},
        )

    # -- a link ----------------------------------------------------------------------------

    def link_up(self) -> None:
        """Subscribed on a new link: the stability window may be noted once on it."""
        self._stable_noted = False

    def silence_window(self, state: State) -> float:
        """How long the link may stay silent in ``state`` before :meth:`silence`."""
        return self.timing.stale_after if state is State.STREAMING else self.timing.dead_after

    def silence(self, state: State, silent_for: float) -> Decision | Failure:
        """Nothing arrived for ``silence_window(state)``: STALE, or the link is over."""
        if state is State.STREAMING:
            return Decision(
                Trigger.STALE, f"no data for {fmt_s(silent_for)}",
                {"silent_s": round(silent_for, 3)},
            )  # fmt: skip
        if state is State.STALE:
            return Failure(
                Trigger.DEAD, f"no data for {fmt_s(silent_for)}: link presumed dead", "Silence"
            )
        if state is State.AUTHENTICATED:
            return Failure(
                Trigger.LOST, f"no message within {fmt_s(silent_for)} of subscribing", "Silence"
            )
        raise ValueError(f"no link to be silent in {state.name}")

    def message(self, state: State, now: float, silent_for: float) -> Decision | None:
        """A message arrived after ``silent_for`` seconds of silence."""
        if state is State.AUTHENTICATED:
            self.breaker.on_streaming()
            self.backoff.on_streaming(now)
            return Decision(Trigger.DATA, "first message after subscribing")
        if state is State.STALE:
            return Decision(
                Trigger.DATA,
                f"data resumed after {fmt_s(silent_for)} of silence",
                {"gap_s": round(silent_for, 3)},
            )
        return None

    def stable(self, state: State, now: float) -> Decision | None:
        """Streamed for reset_after: forget the failures, and say so in the log (once per
        link, and only if there was something to forget), so that replay knows."""
        if self._stable_noted or not self.backoff.is_stable(now):
            return None
        self._stable_noted = True
        had = (self.backoff.attempt, self.breaker.failures)
        self.backoff.attempt = 0
        self.breaker.on_stable()
        if had == (0, 0) or state is not State.STREAMING:
            return None
        window = self.backoff.settings.reset_after
        return Decision(
            Trigger.STABLE, f"streaming for {fmt_s(window)}: failure counts reset",
            {"attempt": 0, "failures": 0},
        )  # fmt: skip

    def may_fail_back(self, state: State) -> bool:
        """The primary answered a probe: leave the fallback now? Yes on any link the
        table lets go (AUTHENTICATED included: a fallback that has not streamed yet has
        nothing to lose); "not now" otherwise, and the prober keeps probing."""
        return self.endpoint_index != 0 and state in (
            State.AUTHENTICATED, State.STREAMING, State.STALE,
        )  # fmt: skip

    def failback(self) -> Decision:
        """The link to the fallback is closed: go back to the primary."""
        fallback, self.endpoint_index = self.endpoint, 0
        return Decision(
            Trigger.FAILBACK,
            f"primary endpoint {self.endpoint} healthy again: leaving fallback {fallback}",
            {"endpoint": fallback, "endpoint_index": 0},
        )

    # -- failures ----------------------------------------------------------------------------

    def failure(self, failure: Failure, *, now: float, wall: datetime) -> Decision:
        """A link or an attempt failed: BACKOFF (the next endpoint, after the backoff),
        or CIRCUIT_OPEN when the breaker trips."""
        return self._failed(failure, now=now, wall=wall, rotate=True, trip=Trigger.TRIP)

    def fault(self, state: State, error: str, *, now: float, wall: datetime) -> Decision:
        """An unexpected exception (a bug) in the session's own code, in ``state``.

        It counts as a failure, so that a bug that repeats at once is paced by the
        backoff and, if it persists, the breaker: on a link it ends the link (``lost``
        or ``trip``); before one, ``fault`` to BACKOFF (or ``trip``); in CIRCUIT_OPEN the
        cool-down starts again; a paused session stays paused. The endpoint is kept: it
        did nothing wrong.
        """
        reason = f"internal error: {error}"
        if state is State.PAUSED:
            return Decision(Trigger.FAULT, reason, {"error": error, "error_class": INTERNAL})
        failure = Failure(Trigger.LOST if state in LIVE else Trigger.FAULT, reason, INTERNAL)
        # The breaker is open in CIRCUIT_OPEN, so the failure trips it again: a self-loop.
        trip = Trigger.FAULT if state is State.CIRCUIT_OPEN else Trigger.TRIP
        return self._failed(failure, now=now, wall=wall, rotate=False, trip=trip)

    def _failed(
        self, failure: Failure, *, now: float, wall: datetime, rotate: bool, trip: Trigger
    ) -> Decision:
        url = self.endpoint
        attempt, delay = self.backoff.on_failure(now)
        tripped = self.breaker.on_failure(now)
        if rotate:
            self.endpoint_index = (self.endpoint_index + 1) % len(self.endpoints)
        common: dict[str, Any] = {
            "error": failure.reason,
            "error_class": failure.error_class,
            "endpoint": url,
            "endpoint_index": self.endpoint_index,
            "attempt": attempt,
            "failures": self.breaker.failures,
        }
        if tripped:
            cooldown = self.breaker.settings.cooldown
            until = wall + timedelta(seconds=cooldown)
            return Decision(
                trip,
                f"{failure.reason}; circuit open for {fmt_s(cooldown)} after "
                f"{self.breaker.failures} consecutive failures",
                {**common, "cooldown": cooldown, "deadline": until.isoformat()},
                wait=cooldown,
                deadline=until,
            )
        until = wall + timedelta(seconds=delay)
        return Decision(
            failure.trigger,
            failure.reason,
            {**common, "delay": round(delay, 3), "deadline": until.isoformat()},
            wait=delay,
            deadline=until,
        )
