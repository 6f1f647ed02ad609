"""Reconnect policy arithmetic: backoff, circuit breaker, connect-rate limit.

Pure: every method takes the current time (seconds on any monotonic scale) as an
argument, and randomness comes from an injected ``uniform() -> [0, 1)`` function.
The objects hold just enough state to answer "may I try now, and if not, when?".
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BackoffSettings:
    initial: float = 0.5
    max: float = 30.0
    multiplier: float = 2.0
    jitter: float = 0.2
    #: The attempt count resets only after this long in STREAMING without a failure.
    reset_after: float = 30.0


class Backoff:
    """Exponential backoff with proportional jitter, a cap, and a stability window.

    A TCP connect, or even a successful login, does not reset the attempt count:
    a peer that accepts and then drops would otherwise get hammered at the initial
    delay forever. Only ``reset_after`` seconds of STREAMING do.
    """

    __slots__ = ("attempt", "settings", "streaming_since", "uniform")

    def __init__(
        self, settings: BackoffSettings, uniform: Callable[[], float], attempt: int = 0
    ) -> None:
        self.settings = settings
        self.uniform = uniform
        self.attempt = attempt
        self.streaming_since: float | None = None

    def base_delay(self, attempt: int) -> float:
        """The un-jittered delay before attempt number ``attempt + 1``."""
        s = self.settings
        # Stop multiplying once past the cap, so huge attempt counts cannot overflow.
        delay = s.initial
        for _ in range(attempt - 1):
            delay *= s.multiplier
            if delay >= s.max:
                return s.max
        return min(delay, s.max)

    def on_streaming(self, now: float) -> None:
        """The session reached STREAMING (first data on a connection)."""
        if self.streaming_since is None:
            self.streaming_since = now

    def is_stable(self, now: float) -> bool:
        return self.streaming_since is not None and now - self.streaming_since >= (
            self.settings.reset_after
        )

    def on_failure(self, now: float) -> tuple[int, float]:
        """A connection ended or an attempt failed: returns (attempt number, delay)."""
        if self.is_stable(now):
            self.attempt = 0
        self.streaming_since = None
        self.attempt += 1
        base = self.base_delay(self.attempt)
        spread = self.settings.jitter * (2.0 * self.uniform() - 1.0)
        return self.attempt, min(self.settings.max, max(0.0, base * (1.0 + spread)))

    def reset(self) -> None:
        self.attempt = 0
        self.streaming_since = None


@dataclass(frozen=True, slots=True)
class CircuitSettings:
    failures: int = 5
    cooldown: float = 60.0


class CircuitBreaker:
    """Consecutive-failure breaker with a cool-down and one half-open probe.

    Auth rejections count as failures. After the cool-down one probe is let
    through; if it fails the circuit opens again at once. Consecutive failures are
    forgotten only once the session has streamed stably (see :class:`Backoff`).
    """

    __slots__ = ("failures", "half_open", "opened_at", "settings")

    def __init__(self, settings: CircuitSettings, failures: int = 0) -> None:
        self.settings = settings
        self.failures = failures
        self.opened_at: float | None = None
        self.half_open = False

    @property
    def deadline(self) -> float | None:
        return None if self.opened_at is None else self.opened_at + self.settings.cooldown

    def on_failure(self, now: float) -> bool:
        """Count a failure; True when it trips the breaker (the circuit opens at ``now``)."""
        self.failures += 1
        if self.half_open or self.failures >= self.settings.failures:
            self.opened_at = now
            self.half_open = False
            return True
        return False

    def open_until(self, deadline: float) -> None:
        """Restore an open circuit (recovery after a restart)."""
        self.opened_at = deadline - self.settings.cooldown
        self.failures = max(self.failures, self.settings.failures)

    def probe(self) -> None:
        """The cool-down is over: let one attempt through."""
        self.opened_at = None
        self.half_open = True

    def on_streaming(self) -> None:
        """The probe (or any attempt) got as far as data: the circuit is closed again."""
        self.half_open = False

    def on_stable(self) -> None:
        self.failures = 0

    def reset(self) -> None:
        self.failures = 0
        self.opened_at = None
        self.half_open = False


@dataclass(frozen=True, slots=True)
class RateSettings:
    per_host: int = 60
    window: float = 60.0


class ConnectRateLimiter:
    """At most ``per_host`` connection attempts to one host in any ``window`` seconds.

    A classic token bucket of capacity C refilled at C/window lets through a full
    bucket at once and then C more as it refills: up to 2C - 1 attempts inside one
    window, which breaks exactly the venue rule ("60 connects per 60 s") this
    guards. A sliding log of the last C attempt times enforces the rule as written,
    in O(1) amortised per attempt and O(C) memory per host.
    """

    __slots__ = ("_times", "settings")

    def __init__(self, settings: RateSettings) -> None:
        self.settings = settings
        self._times: deque[float] = deque()

    def _expire(self, now: float) -> None:
        # The same expression as the wait below, so "expired" and "wait <= 0" agree
        # exactly under floating point.
        window = self.settings.window
        times = self._times
        while times and times[0] + window <= now:
            times.popleft()

    def wait_time(self, now: float) -> float:
        """Seconds until an attempt would be allowed (0.0 when one is allowed now)."""
        self._expire(now)
        if len(self._times) < self.settings.per_host:
            return 0.0
        return self._times[0] + self.settings.window - now  # > 0: the oldest has not expired

    def try_acquire(self, now: float) -> float:
        """Take a slot if one is free (returns 0.0); else return the wait, taking nothing."""
        wait = self.wait_time(now)
        if wait == 0.0:
            self._times.append(now)
        return wait

    def used(self, now: float) -> int:
        self._expire(now)
        return len(self._times)
