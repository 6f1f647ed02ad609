"""The decision core (statemachines/decide.py): every answer is legal in the state it is
given, commands that do not apply are "not now", and a bug is paced like a failure."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from statemachines.decide import INTERNAL, CommandKind, Decision, Failure, SessionPolicy, Timing
from statemachines.memory import Memory
from statemachines.policy import BackoffSettings, CircuitSettings, RateSettings
from statemachines.session import LEGAL, LIVE, State, Trigger

WALL = datetime(2026, 11, 21, 14, 0, tzinfo=UTC)
ENDPOINTS = ("tcp://primary:1", "tcp://backup:1")


def policy(failures: int = 3, memory: Memory | None = None) -> SessionPolicy:
    return SessionPolicy(
        ENDPOINTS,
        backoff=BackoffSettings(initial=1.0, max=8.0, jitter=0.0),
        circuit=CircuitSettings(failures=failures, cooldown=60.0),
        timing=Timing(stale_after=5.0, dead_after=30.0),
        uniform=lambda: 0.5,
        memory=memory,
    )


def legal(state: State, decision: Decision) -> bool:
    return (state.name, decision.trigger.value) in LEGAL


@pytest.mark.parametrize("state", [State.AUTHENTICATED, State.STREAMING, State.STALE])
def test_resume_on_a_live_session_is_not_now(state: State) -> None:
    answer = policy().command(state, CommandKind.RESUME, "resumed by uid 0", {})
    assert (answer.result, answer.decision, answer.applies) == (
        f"not paused (it is {state.name})", None, False,
    )  # fmt: skip


@pytest.mark.parametrize("state", list(State))
@pytest.mark.parametrize("kind", list(CommandKind))
def test_every_command_answer_is_legal(state: State, kind: CommandKind) -> None:
    answer = policy().command(state, kind, "why", {"uid": 0})
    assert answer.result
    if answer.decision is not None:
        assert legal(state, answer.decision)
    refused = policy().refusal(state, kind)
    assert (refused is None) == answer.applies
    if refused is not None:
        assert answer.result == refused


@pytest.mark.parametrize("state", list(State))
def test_a_fault_is_legal_in_every_state_and_paced(state: State) -> None:
    p = policy(failures=100)
    decision = p.fault(state, "RuntimeError: boom", now=10.0, wall=WALL)
    assert legal(state, decision)
    assert decision.reason == "internal error: RuntimeError: boom"
    assert decision.detail["error_class"] == INTERNAL
    if state is State.PAUSED:
        assert (decision.trigger, decision.wait) == (Trigger.FAULT, None)
        assert p.backoff.attempt == 0  # an operator's pause is not a failure
    else:
        expected = Trigger.LOST if state in LIVE else Trigger.FAULT
        if state is State.CIRCUIT_OPEN:
            p = policy(memory=Memory(failures=3))
            p.breaker.opened_at = 0.0
            decision = p.fault(state, "RuntimeError: boom", now=10.0, wall=WALL)
            assert decision.wait == 60.0  # the cool-down starts again
        else:
            assert decision.wait == 1.0  # the backoff paces a bug that repeats at once
        assert decision.trigger is expected
        assert decision.detail["endpoint_index"] == 0  # the endpoint did nothing wrong


@pytest.mark.parametrize("state", [State.DISCONNECTED, State.BACKOFF])
def test_a_repeating_bug_outside_a_link_grows_the_delay_then_trips(state: State) -> None:
    p = policy(failures=3)
    decisions = [p.fault(state, "boom", now=float(i), wall=WALL) for i in range(3)]
    assert [d.trigger for d in decisions] == [Trigger.FAULT, Trigger.FAULT, Trigger.TRIP]
    assert [d.wait for d in decisions] == [1.0, 2.0, 60.0]
    assert all(legal(state, d) for d in decisions)


def test_failures_rotate_endpoints_and_trip_the_breaker() -> None:
    p = policy(failures=2)
    lost = p.failure(Failure(Trigger.LOST, "reset", "ConnectFailed"), now=0.0, wall=WALL)
    assert (lost.trigger, lost.wait, lost.detail["endpoint_index"]) == (Trigger.LOST, 1.0, 1)
    assert lost.detail["deadline"] == "2026-11-21T14:00:01+00:00"
    trip = p.failure(Failure(Trigger.AUTH_REJECTED, "no", "AuthRejected"), now=1.0, wall=WALL)
    assert (trip.trigger, trip.wait, trip.detail["failures"]) == (Trigger.TRIP, 60.0, 2)


def test_silence_means_what_the_state_says() -> None:
    p = policy()
    assert p.silence_window(State.STREAMING) == 5.0
    assert p.silence_window(State.STALE) == 30.0
    stale = p.silence(State.STREAMING, 5.0)
    assert isinstance(stale, Decision)
    assert (stale.trigger, stale.reason) == (Trigger.STALE, "no data for 5.0 s")
    dead = p.silence(State.STALE, 30.0)
    assert dead == Failure(Trigger.DEAD, "no data for 30.0 s: link presumed dead", "Silence")
    quiet = p.silence(State.AUTHENTICATED, 30.0)
    assert isinstance(quiet, Failure)
    assert quiet.trigger is Trigger.LOST
    with pytest.raises(ValueError, match="PAUSED"):
        p.silence(State.PAUSED, 1.0)


def test_attempts_by_state_and_a_throttled_one() -> None:
    p = policy()
    rate = RateSettings(per_host=2, window=10.0)
    for state, trigger in [
        (State.DISCONNECTED, Trigger.START),
        (State.BACKOFF, Trigger.RETRY),
        (State.CIRCUIT_OPEN, Trigger.PROBE),
    ]:
        decision = p.attempt(state, wait=0.0, host="primary:1", rate=rate, wall=WALL)
        assert decision.trigger is trigger
        assert legal(state, decision)
    throttled = p.attempt(State.CIRCUIT_OPEN, wait=2.5, host="primary:1", rate=rate, wall=WALL)
    assert throttled.trigger is Trigger.THROTTLED
    assert throttled.reason == "connect rate limit for primary:1 (2 per 10.0 s): next slot in 2.5 s"
    assert (throttled.wait, throttled.detail["throttled"]) == (2.5, True)


def test_failback_from_a_link_that_has_not_streamed_yet() -> None:
    """The primary answering while the fallback link is AUTHENTICATED leaves the fallback:
    that link has carried nothing yet, so there is nothing to lose."""
    p = policy(memory=Memory(endpoint_index=1))
    assert p.may_fail_back(State.AUTHENTICATED)
    assert p.may_fail_back(State.STREAMING)
    assert not p.may_fail_back(State.BACKOFF)  # not now: no link to leave
    decision = p.failback()
    assert legal(State.AUTHENTICATED, decision)
    assert decision.detail == {"endpoint": ENDPOINTS[1], "endpoint_index": 0}
    assert not p.may_fail_back(State.STREAMING)  # on the primary already


def test_first_message_and_the_stability_window() -> None:
    p = policy(memory=Memory(attempt=3, failures=2))
    p.link_up()
    first = p.message(State.AUTHENTICATED, 100.0, 0.1)
    assert first is not None
    assert (first.trigger, first.reason) == (Trigger.DATA, "first message after subscribing")
    assert p.message(State.STREAMING, 101.0, 0.1) is None
    assert p.stable(State.STREAMING, 129.0) is None
    stable = p.stable(State.STREAMING, 130.0)
    assert stable is not None
    assert (stable.trigger, dict(stable.detail)) == (Trigger.STABLE, {"attempt": 0, "failures": 0})
    assert p.stable(State.STREAMING, 200.0) is None  # once per link
    assert p.memory() == Memory(0, 0, 0)


def test_memory_recall_and_carried_keys() -> None:
    memory = Memory.recall(
        {"attempt": 4, "failures": 2, "endpoint_index": 1},
        {"deadline": "2026-11-21T14:00:05+00:00", "uid": 1000},
    )
    assert memory == Memory(4, 2, 1, datetime(2026, 11, 21, 14, 0, 5, tzinfo=UTC), 1000)
    assert memory.carried() == {"attempt": 4, "failures": 2, "endpoint_index": 1}
    assert Memory.recall({"attempt": True}, {"deadline": "soon", "uid": "x"}) == Memory()
