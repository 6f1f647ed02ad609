import heapq
import random

import pytest

from statemachines.policy import (
    Backoff,
    BackoffSettings,
    CircuitBreaker,
    CircuitSettings,
    ConnectRateLimiter,
    RateSettings,
)


def fixed(value: float):  # a uniform() that always returns value
    return lambda: value


SETTINGS = BackoffSettings(initial=0.5, max=30.0, multiplier=2.0, jitter=0.2, reset_after=30.0)


def test_backoff_sequence_without_jitter_effect() -> None:
    backoff = Backoff(SETTINGS, fixed(0.5))  # 2u - 1 == 0: no jitter
    delays = [backoff.on_failure(now=float(i))[1] for i in range(9)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert backoff.attempt == 9


def test_backoff_jitter_bounds() -> None:
    low = Backoff(SETTINGS, fixed(0.0))
    high = Backoff(SETTINGS, fixed(0.999999))
    assert low.on_failure(0.0) == (1, pytest.approx(0.4))
    assert high.on_failure(0.0) == (1, pytest.approx(0.6, abs=1e-5))
    rng = random.Random(7)
    backoff = Backoff(SETTINGS, rng.random)
    for attempt in range(1, 40):
        got_attempt, delay = backoff.on_failure(float(attempt))
        base = min(30.0, 0.5 * 2.0 ** (attempt - 1))
        assert got_attempt == attempt
        assert base * 0.8 <= delay <= min(30.0, base * 1.2)


def test_backoff_cap_holds_for_huge_attempt_counts() -> None:
    backoff = Backoff(SETTINGS, fixed(0.999), attempt=10_000)
    assert backoff.on_failure(0.0) == (10_001, 30.0)


def test_connect_alone_does_not_reset_backoff() -> None:
    # A peer that accepts, logs in, streams for a moment and drops: attempts keep growing.
    backoff = Backoff(SETTINGS, fixed(0.5))
    now = 0.0
    for expected in (1, 2, 3, 4):
        backoff.on_streaming(now)
        now += 29.0  # streamed, but for less than reset_after
        assert backoff.on_failure(now) == (expected, 0.5 * 2 ** (expected - 1))


def test_stability_window_resets_backoff() -> None:
    backoff = Backoff(SETTINGS, fixed(0.5), attempt=5)
    backoff.on_streaming(100.0)
    assert not backoff.is_stable(129.999)
    assert backoff.is_stable(130.0)
    assert backoff.on_failure(130.0) == (1, 0.5)


def test_streaming_window_starts_at_first_data_only() -> None:
    backoff = Backoff(SETTINGS, fixed(0.5), attempt=3)
    backoff.on_streaming(0.0)
    backoff.on_streaming(20.0)  # data resumed after STALE: same connection, same window
    assert backoff.is_stable(30.0)


def test_breaker_trips_at_threshold_and_probes() -> None:
    breaker = CircuitBreaker(CircuitSettings(failures=3, cooldown=60.0))
    assert [breaker.on_failure(t) for t in (1.0, 2.0)] == [False, False]
    assert breaker.on_failure(3.0) is True
    assert breaker.deadline == 63.0
    breaker.probe()
    assert breaker.half_open
    assert breaker.deadline is None
    # The half-open probe fails: open again at once, a fresh cool-down.
    assert breaker.on_failure(63.5) is True
    assert breaker.deadline == 123.5
    breaker.probe()
    breaker.on_streaming()  # the probe got through
    assert not breaker.half_open
    # Still no stability: the next failure trips again.
    assert breaker.on_failure(130.0) is True
    breaker.probe()
    breaker.on_streaming()
    breaker.on_stable()
    assert breaker.failures == 0
    assert breaker.on_failure(500.0) is False


def test_breaker_restored_open_until_deadline() -> None:
    breaker = CircuitBreaker(CircuitSettings(failures=5, cooldown=60.0))
    breaker.open_until(1000.0)
    assert breaker.deadline == 1000.0
    assert breaker.failures == 5


def test_rate_limiter_exact_waits() -> None:
    limiter = ConnectRateLimiter(RateSettings(per_host=3, window=10.0))
    assert [limiter.try_acquire(t) for t in (0.0, 1.0, 2.0)] == [0.0, 0.0, 0.0]
    assert limiter.try_acquire(2.5) == 7.5  # the slot of t=0 frees at t=10
    assert limiter.used(2.5) == 3  # a refused attempt takes nothing
    assert limiter.try_acquire(10.0) == 0.0
    assert limiter.try_acquire(10.0) == 1.0


@pytest.mark.parametrize(("per_host", "window", "sessions"), [(60, 60.0, 500), (5, 1.0, 40)])
def test_rate_limit_never_exceeded_by_many_sessions(per_host: int, window: float, sessions: int):
    """N sessions hammering one host: no window of length `window` holds more than per_host."""
    limiter = ConnectRateLimiter(RateSettings(per_host=per_host, window=window))
    rng = random.Random(1)
    wake = [(rng.uniform(0, window), i) for i in range(sessions)]
    heapq.heapify(wake)
    granted: list[float] = []
    while wake[0][0] < 10 * window:
        now, i = heapq.heappop(wake)
        wait = limiter.try_acquire(now)
        if wait == 0.0:
            granted.append(now)
            heapq.heappush(wake, (now + rng.uniform(0, window / 2), i))
        else:
            assert wait > 0.0
            heapq.heappush(wake, (now + wait, i))
    # Saturated: close to per_host per window, and never more.
    assert len(granted) >= per_host * 9
    for first in range(len(granted) - per_host):
        assert granted[first] + window <= granted[first + per_host]


def test_a_token_bucket_would_break_the_venue_rule() -> None:
    """Why the limiter is a sliding window: a bucket of C refilled at C/window admits 2C-1."""
    capacity, window = 60, 60.0
    tokens, last, admitted = float(capacity), 0.0, []
    for step in range(600):
        now = step * 0.1
        tokens = min(capacity, tokens + (now - last) * capacity / window)
        last = now
        if tokens >= 1:
            tokens -= 1
            admitted.append(now)
    in_first_window = sum(1 for t in admitted if t < window)
    assert in_first_window > capacity  # the bucket lets through more than the rule allows
