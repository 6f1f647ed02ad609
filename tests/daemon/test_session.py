"""The session driver against the real adapters and venue, at exact virtual times.

Every test runs under MockClock(autojump_threshold=0): a 60 s cool-down takes no
real time, and ``trio.current_time()`` is asserted exactly.
"""

from __future__ import annotations

import json
import random
from datetime import timedelta
from types import SimpleNamespace

import pytest
import structlog
import structlog.testing
import trio
from sessionkit import PB_PORT, T0, Kit, MemoryLog, Net, session_toml, sessions_from, venue

from daemon import migrate
from daemon.app import state_summary
from daemon.consumers import ConsumerHub
from daemon.control import _static_part
from daemon.metrics import Metrics, Tally, health
from daemon.replay import state_at
from daemon.session import PRIMARY_PROBE_INTERVAL, CommandKind, SessionRunner
from daemon.store import EventStore
from protocol.consumer_codec import ConsumerFrameDecoder, encode_request
from protocol.consumer_pb2 import ConsumerRequest, Subscribe
from statemachines.session import State, TransitionRecord


@pytest.fixture
def autojump(autojump_clock: trio.testing.MockClock) -> trio.testing.MockClock:
    return autojump_clock


async def start(kit: Kit, nursery: trio.Nursery, toml: str):  # type: ignore[no-untyped-def]
    runners = [kit.runner(s) for s in sessions_from(toml)]
    for runner in runners:
        await nursery.start(runner.run)
    return runners[0] if len(runners) == 1 else runners


async def test_happy_path_to_streaming(autojump: object) -> None:
    async with trio.open_nursery() as nursery:
        kit = Kit(Net(nursery, {"venue": venue(rate=10.0)}), MemoryLog())
        runner = await start(kit, nursery, session_toml())
        await trio.sleep(1)
        assert kit.log.timeline("s") == [
            (0.0, "start", "CONNECTING"),
            (0.0, "connected", "CONNECTING"),
            (0.0, "authenticated", "AUTHENTICATED"),
            (0.1, "data", "STREAMING"),  # the first quote, 1/rate after subscribing
        ]
        assert runner.model.state is State.STREAMING
        assert runner.shown.dest == "STREAMING"
        assert runner.messages >= 9  # quotes at 0.1 ... 0.9 s, maybe the 1.0 s heartbeat
        assert kit.net.venues["venue"].open_connections("protobuf") == 1
        nursery.cancel_scope.cancel()
    kit.log.verify()


async def test_websocket_happy_path(autojump: object) -> None:
    async with trio.open_nursery() as nursery:
        kit = Kit(Net(nursery, {"venue": venue(rate=10.0)}), MemoryLog())
        toml = session_toml(
            kind="websocket",
            auth_message='\'{"op":"auth","key":"k"}\'',
            auth_expect="{ ok = true }",
            subscribe='[\'{"op":"subscribe","channel":"ticks"}\']',
        )
        await start(kit, nursery, toml)
        await trio.sleep(1)
        assert [d for _, _, d in kit.log.timeline("s")] == [
            "CONNECTING", "CONNECTING", "AUTHENTICATED", "STREAMING",
        ]  # fmt: skip
        nursery.cancel_scope.cancel()


async def test_stale_then_resumed(autojump: object) -> None:
    async with trio.open_nursery() as nursery:
        v = venue(rate=10.0)
        kit = Kit(Net(nursery, {"venue": v}), MemoryLog())
        await start(kit, nursery, session_toml(stale_after=5.0, dead_after=30.0))
        # Off the 0.1 s message grid: a fault set at exactly t=3.0 would race the
        # quote due at 3.0, and Trio orders same-deadline wake-ups at random.
        await trio.sleep(3.05)
        v.fault("silent", seconds=7.95)  # the last message went out at t=3.0
        await trio.sleep(10)
        events = kit.log.of("s")
        stale, resumed = events[-2], events[-1]
        assert ((stale.at - T0).total_seconds(), stale.dest) == (8.0, "STALE")
        assert stale.reason == "no data for 5.0 s"
        assert ((resumed.at - T0).total_seconds(), resumed.dest) == (11.0, "STREAMING")
        assert resumed.reason == "data resumed after 8.0 s of silence"
        assert resumed.detail["gap_s"] == 8.0
        nursery.cancel_scope.cancel()
    kit.log.verify()


async def test_stale_then_dead_then_reconnect(autojump: object) -> None:
    """A half-open link TCP never reports: caught by dead_after, then a reconnect."""
    async with trio.open_nursery() as nursery:
        v = venue(rate=10.0)
        kit = Kit(Net(nursery, {"venue": v}), MemoryLog())
        await start(kit, nursery, session_toml(stale_after=5.0, dead_after=30.0))
        await trio.sleep(2.05)
        v.fault("silent", seconds=45)  # the last quote went out at t=2.0; silent until 47.05
        await trio.sleep(60)
        timeline = [(round(t, 3), trig, dest) for t, trig, dest in kit.log.timeline("s")]
        assert timeline[4:] == [
            (7.0, "stale", "STALE"),
            (32.0, "dead", "BACKOFF"),  # dead_after from the last message: 2 + 30
            (32.5, "retry", "CONNECTING"),  # backoff.initial 0.5, no jitter
            (32.5, "connected", "CONNECTING"),
            (42.5, "lost", "BACKOFF"),  # still silent: no auth reply within auth_timeout
            (43.5, "retry", "CONNECTING"),  # attempt 2: 1.0 s
            (43.5, "connected", "CONNECTING"),
            (47.05, "authenticated", "AUTHENTICATED"),  # the silence ends
            (47.05, "data", "STREAMING"),
        ]
        events = kit.log.of("s")
        assert events[5].reason == "no data for 30.0 s: link presumed dead"
        assert events[5].detail["attempt"] == 1
        assert events[8].reason == "no authentication reply within 10.0 s"
        assert events[8].detail["attempt"] == 2
        nursery.cancel_scope.cancel()
    kit.log.verify()


async def test_connect_timeout_against_a_silent_peer(autojump: object) -> None:
    async with trio.open_nursery() as nursery:
        v = venue()
        kit = Kit(Net(nursery, {"venue": v}), MemoryLog())
        v.fault("silent", seconds=1000)  # the WebSocket upgrade is never answered
        await start(kit, nursery, session_toml(kind="websocket", connect_timeout=4.0))
        await trio.sleep(5)
        start_event, lost = kit.log.of("s")[:2]
        assert (lost.at - start_event.at).total_seconds() == 4.0
        assert (lost.trigger, lost.dest) == ("lost", "BACKOFF")
        assert lost.reason == f"connect to ws://venue:{2000}/feed timed out after 4.0 s"
        assert lost.detail["error_class"] == "ConnectTimeout"
        nursery.cancel_scope.cancel()


async def test_hung_tcp_connect_times_out(autojump: object) -> None:
    async with trio.open_nursery() as nursery:
        kit = Kit(Net(nursery, {"venue": venue()}, hang={"venue"}), MemoryLog())
        await start(kit, nursery, session_toml(connect_timeout=2.5))
        await trio.sleep(3)
        assert kit.log.timeline("s")[:2] == [(0.0, "start", "CONNECTING"), (2.5, "lost", "BACKOFF")]
        nursery.cancel_scope.cancel()


async def test_auth_rejection_counts_for_the_breaker(autojump: object) -> None:
    async with trio.open_nursery() as nursery:
        v = venue()
        kit = Kit(Net(nursery, {"venue": v}), MemoryLog())
        v.fault("reject_auth", seconds=1000)
        toml = session_toml(circuit="{ failures = 3, cooldown = 60.0 }")
        runner = await start(kit, nursery, toml)
        await trio.sleep(10)
        rejections = [e for e in kit.log.of("s") if e.trigger == "auth_rejected"]
        assert [(e.at - T0).total_seconds() for e in rejections] == [0.0, 0.5]
        assert rejections[0].reason.startswith("auth rejected: venue error CH_CLIENT_AUTH_FAILURE")
        trip = kit.log.of("s")[-1]
        assert ((trip.at - T0).total_seconds(), trip.trigger, trip.dest) == (
            1.5, "trip", "CIRCUIT_OPEN",
        )  # fmt: skip
        assert trip.detail["failures"] == 3
        assert trip.detail["deadline"] == "2026-11-21T14:01:01.500000+00:00"
        assert runner.model.state is State.CIRCUIT_OPEN
        assert "s3cret" not in repr(kit.log.records)
        nursery.cancel_scope.cancel()


async def test_breaker_probe_fails_then_succeeds(autojump: object) -> None:
    async with trio.open_nursery() as nursery:
        v = venue()
        kit = Kit(Net(nursery, {"venue": v}), MemoryLog())
        v.fault("reject_auth", seconds=100)
        await start(kit, nursery, session_toml(circuit="{ failures = 2, cooldown = 60.0 }"))
        await trio.sleep(200)
        opened = [
            (round((e.at - T0).total_seconds(), 3), e.trigger)
            for e in kit.log.of("s")
            if e.trigger in ("trip", "probe", "data", "stable")
        ]
        assert opened == [
            (0.5, "trip"),  # two rejections: t=0 and t=0.5
            (60.5, "probe"),  # cool-down over: one half-open probe ...
            (60.5, "trip"),  # ... rejected (the fault lasts until t=100): open again at once
            (120.5, "probe"),  # the next probe ...
            (120.6, "data"),  # ... streams: the circuit is closed again
            (150.6, "stable"),  # and after reset_after of streaming the counts are forgotten
        ]
        nursery.cancel_scope.cancel()
    kit.log.verify()


async def test_backoff_sequence_and_jitter_bounds(autojump: object) -> None:
    async with trio.open_nursery() as nursery:
        kit = Kit(Net(nursery, {}, down={"venue"}), MemoryLog())
        toml = session_toml(
            backoff="{ initial = 1.0, max = 8.0, multiplier = 2.0, jitter = 0.25 }",
            circuit="{ failures = 100, cooldown = 60.0 }",
        )
        await start(kit, nursery, toml)
        await trio.sleep(40)
        delays = [e.detail["delay"] for e in kit.log.of("s") if e.trigger == "lost"]
        assert delays[:6] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
        lost = kit.log.of("s")[1]
        assert lost.reason == "connection refused by venue:1000"
        nursery.cancel_scope.cancel()
    # With real jitter: every delay within ±25 % of its base, never above max.
    async with trio.open_nursery() as nursery:
        kit = Kit(Net(nursery, {}, down={"venue"}), MemoryLog())
        runner = kit.runner(sessions_from(toml)[0])
        runner.backoff.uniform = random.Random(3).random
        await nursery.start(runner.run)
        await trio.sleep(200)
        delays = [e.detail["delay"] for e in kit.log.of("s") if e.trigger == "lost"]
        assert len(delays) > 20
        for attempt, delay in enumerate(delays, start=1):
            base = min(8.0, 2.0 ** (attempt - 1))
            assert base * 0.75 <= delay <= min(8.0, base * 1.25)
        nursery.cancel_scope.cancel()


async def wait_for(runner, state: State) -> None:  # type: ignore[no-untyped-def]
    while runner.shown is None or runner.shown.dest != state.name:
        await runner.changed.wait()


async def test_backoff_resets_only_after_the_stability_window(autojump: object) -> None:
    async with trio.open_nursery() as nursery:
        v = venue(rate=10.0)
        kit = Kit(Net(nursery, {"venue": v}), MemoryLog())
        toml = session_toml(backoff="{ initial = 1.0, max = 60.0, reset_after = 30.0 }")
        runner = await start(kit, nursery, toml)
        attempts = []
        for streamed in (5, 5, 5, 35, 5):
            await wait_for(runner, State.STREAMING)
            await trio.sleep(streamed)
            v.fault("drop")
            await wait_for(runner, State.BACKOFF)
            lost = kit.log.of("s")[-1]
            attempts.append((lost.detail["attempt"], lost.detail["delay"]))
        # A peer that accepts, streams briefly and drops keeps growing the delay; only
        # 30 s of STREAMING resets it.
        assert attempts == [(1, 1.0), (2, 2.0), (3, 4.0), (1, 1.0), (2, 2.0)]
        nursery.cancel_scope.cancel()
    kit.log.verify()


async def test_connect_rate_never_exceeded_by_many_sessions(autojump: object) -> None:
    async with trio.open_nursery() as nursery:
        v = venue()
        kit = Kit(Net(nursery, {"venue": v}), MemoryLog())
        v.fault("reject_auth", seconds=1000)
        toml = "".join(
            session_toml(
                name=f"s{i}",
                connect_rate="{ per_host = 5, window = 10.0 }",
                backoff="{ initial = 0.1, max = 1.0 }",
                circuit="{ failures = 1000, cooldown = 1.0 }",
            )
            for i in range(20)
        )
        await start(kit, nursery, toml)
        await trio.sleep(120)
        attempts = sorted(
            (e.at - T0).total_seconds()
            for e in kit.log.records
            if e.trigger in ("start", "retry", "probe")
        )
        assert len(attempts) >= 5 * 11  # the budget is used ...
        for i in range(len(attempts) - 5):
            assert attempts[i] + 10.0 <= attempts[i + 5] + 1e-9  # ... and never exceeded
        throttled = [e for e in kit.log.records if e.trigger == "throttled"]
        assert throttled, "a delayed attempt must be visible"
        assert throttled[0].reason.startswith("connect rate limit for venue:1000 (5 per 10.0 s)")
        assert throttled[0].detail["throttled"] is True
        assert len(kit.net.opened) == len(attempts)  # the venue saw only budgeted connects
        nursery.cancel_scope.cancel()
    kit.log.verify()


async def test_failover_to_fallback_and_back(autojump: object) -> None:
    async with trio.open_nursery() as nursery:
        primary, backup = venue(rate=10.0), venue(rate=10.0)
        net = Net(nursery, {"primary": primary, "backup": backup}, down={"primary"})
        kit = Kit(net, MemoryLog())
        toml = (
            '[[sessions]]\nname = "s"\nkind = "protobuf"\n'
            f'url = "tcp://primary:{PB_PORT}"\nfallback_urls = ["tcp://backup:{PB_PORT}"]\n'
            'auth = { client_id = "c", client_secret = "x", account_id = 1, '
            'access_token = "y" }\n'
        )
        runner = await start(kit, nursery, toml)
        await trio.sleep(5)
        events = kit.log.of("s")
        assert (events[1].trigger, events[1].detail["endpoint"]) == (
            "lost",
            f"tcp://primary:{PB_PORT}",
        )
        assert events[2].detail["endpoint"] == f"tcp://backup:{PB_PORT}"
        assert runner.model.state is State.STREAMING
        assert runner.endpoint == f"tcp://backup:{PB_PORT}"
        net.down.clear()  # the primary is back
        await trio.sleep(PRIMARY_PROBE_INTERVAL + 1)
        failback = next(e for e in kit.log.of("s") if e.trigger == "failback")
        assert (failback.at - T0).total_seconds() == pytest.approx(
            0.5 + PRIMARY_PROBE_INTERVAL, abs=0.2
        )
        assert failback.reason.startswith(f"primary endpoint tcp://primary:{PB_PORT} healthy again")
        assert runner.endpoint == f"tcp://primary:{PB_PORT}"
        assert runner.model.state is State.STREAMING
        assert backup.open_connections("protobuf") == 0
        assert primary.open_connections("protobuf") == 1
        nursery.cancel_scope.cancel()
    kit.log.verify()


async def test_operator_commands_interrupt_any_phase(autojump: object) -> None:
    async with trio.open_nursery() as nursery:
        v = venue(rate=10.0)
        kit = Kit(Net(nursery, {"venue": v}), MemoryLog())
        runner = await start(kit, nursery, session_toml())
        await trio.sleep(1)
        assert await runner.command(CommandKind.PAUSE, "paused by uid 1000 (ops)") == "paused"
        assert runner.model.state is State.PAUSED
        assert v.open_connections("protobuf") == 0
        assert await runner.command(CommandKind.PAUSE, "again") == "already PAUSED"
        await trio.sleep(100)
        assert runner.model.state is State.PAUSED  # no attempts while paused
        assert await runner.command(CommandKind.RESUME, "resumed by uid 1000 (ops)") == "resumed"
        await trio.sleep(1)
        assert runner.model.state is State.STREAMING
        assert await runner.command(CommandKind.RECONNECT, "reconnect by uid 0") == "reconnecting"
        await trio.sleep(1)
        assert runner.model.state is State.STREAMING
        assert await runner.command(CommandKind.SHUTDOWN, "daemon shutting down") == "stopped"
        assert kit.log.of("s")[-1].trigger == "shutdown"
        assert runner.finished.is_set()
        path = [t for t, _ in kit.log.path("s")]
        assert path[4:7] == ["pause", "resume", "start"]
        assert "reconnect" in path
    kit.log.verify()


class SlotWatch(MemoryLog):
    """A MemoryLog that checks, at every event, who holds a handshake slot."""

    def __init__(self) -> None:
        super().__init__()
        self.runners: list[SessionRunner] = []
        self.peak = 0

    async def append(self, record: TransitionRecord) -> None:
        holding = [r for r in self.runners if r.handshake == "in progress"]
        self.peak = max(self.peak, len(holding))
        if record.trigger in ("connected", "authenticated"):
            # An attempt's network work happens only inside a slot.
            assert any(r.name == record.session for r in holding), record
        await super().append(record)


async def test_handshake_slots_queue_attempts_without_counting_the_wait(
    autojump: object,
) -> None:
    """One slot: a hung connect holds it; the other session queues, visibly, then streams.

    Its connect timeout (4 s) is shorter than its wait (4 s + the hung attempt's retry):
    the queue is not the venue's time.
    """
    async with trio.open_nursery() as nursery:
        watch = SlotWatch()
        kit = Kit(Net(nursery, {"venue": venue(rate=10.0)}, hang={"hung"}), watch)
        slots = trio.CapacityLimiter(1)
        toml = session_toml("a", connect_timeout=4.0).replace("tcp://venue", "tcp://hung")
        toml += session_toml("b", connect_timeout=4.0)
        a, b = watch.runners = [kit.runner(s, handshakes=slots) for s in sessions_from(toml)]
        await nursery.start(a.run)
        await nursery.start(b.run)
        await trio.sleep(1)
        assert (a.handshake, b.handshake) == ("in progress", "queued")
        assert slots.statistics().tasks_waiting == 1
        assert kit.log.timeline("b") == []  # still DISCONNECTED: no attempt has begun
        await trio.sleep(4)
        assert kit.log.timeline("a")[:2] == [(0.0, "start", "CONNECTING"), (4.0, "lost", "BACKOFF")]
        assert kit.log.timeline("b") == [
            (4.0, "start", "CONNECTING"),  # the slot a gave back
            (4.0, "connected", "CONNECTING"),
            (4.0, "authenticated", "AUTHENTICATED"),
            (4.1, "data", "STREAMING"),
        ]
        assert b.handshake == ""  # given back once subscribed
        await trio.sleep(10)
        assert b.model.state is State.STREAMING
        assert watch.peak == 1
        nursery.cancel_scope.cancel()
    kit.log.verify()


async def test_handshake_slots_with_throttling_and_many_sessions(autojump: object) -> None:
    """Throttled sessions give their slot back; all stream, never more than 3 at once."""
    async with trio.open_nursery() as nursery:
        watch = SlotWatch()
        kit = Kit(Net(nursery, {"venue": venue(rate=10.0)}), watch)
        slots = trio.CapacityLimiter(3)
        toml = "".join(
            session_toml(f"s{i}", connect_rate="{ per_host = 4, window = 10.0 }") for i in range(10)
        )
        runners = watch.runners = [kit.runner(s, handshakes=slots) for s in sessions_from(toml)]
        for runner in runners:
            await nursery.start(runner.run)
        await trio.sleep(40)
        assert all(r.model.state is State.STREAMING for r in runners)
        assert watch.peak == 3
        assert slots.borrowed_tokens == 0
        assert sum(1 for r in kit.log.records if r.trigger == "throttled") > 0
        starts = sorted(
            (r.at - T0).total_seconds() for r in kit.log.records if r.trigger in ("start", "retry")
        )
        assert starts == [0.0] * 4 + [10.0] * 4 + [20.0] * 2  # 4 per 10 s, none lost to the queue
        nursery.cancel_scope.cancel()
    kit.log.verify()


class NoSubscribeReply:
    """A protobuf server that authenticates anyone and never answers SubscribeReq."""

    def __init__(self) -> None:
        self.subscribe_requests = 0

    async def handle_protobuf_stream(self, stream: trio.abc.Stream, port: int) -> None:
        from protocol.venue_codec import Role, VenueDecoder, encode
        from protocol.venue_pb2 import (
            ACCOUNT_AUTH_RES,
            APPLICATION_AUTH_RES,
            AccountAuthReq,
            AccountAuthRes,
            ApplicationAuthReq,
            ApplicationAuthRes,
            SubscribeReq,
        )

        decoder = VenueDecoder(Role.SERVER)
        async with stream:
            while data := await stream.receive_some(65536):
                decoder.feed(data)
                for message in decoder.messages():
                    body, msg_id = message.message, message.client_msg_id
                    if isinstance(body, ApplicationAuthReq):
                        await stream.send_all(
                            encode(APPLICATION_AUTH_RES, ApplicationAuthRes(), msg_id)
                        )
                    elif isinstance(body, AccountAuthReq):
                        reply = AccountAuthRes(account_id=body.account_id)
                        await stream.send_all(encode(ACCOUNT_AUTH_RES, reply, msg_id))
                    elif isinstance(body, SubscribeReq):
                        self.subscribe_requests += 1


async def test_an_unanswered_subscription_times_out(autojump: object) -> None:
    async with trio.open_nursery() as nursery:
        server = NoSubscribeReply()
        kit = Kit(Net(nursery, {"venue": server}), MemoryLog())  # type: ignore[dict-item]
        slots = trio.CapacityLimiter(1)
        (session,) = sessions_from(session_toml(auth_timeout=3.0))
        runner = kit.runner(session, handshakes=slots)
        await nursery.start(runner.run)
        await trio.sleep(3.2)
        assert kit.log.timeline("s") == [
            (0.0, "start", "CONNECTING"),
            (0.0, "connected", "CONNECTING"),
            (0.0, "authenticated", "AUTHENTICATED"),
            (3.0, "lost", "BACKOFF"),
        ]
        lost = kit.log.of("s")[-1]
        assert lost.reason == "no subscription reply within 3.0 s"
        assert lost.detail["error_class"] == "SubscribeTimeout"
        assert slots.borrowed_tokens == 0  # the failed attempt gave its slot back
        assert server.subscribe_requests == 1
        nursery.cancel_scope.cancel()
    kit.log.verify()


class GatedLog(MemoryLog):
    """A MemoryLog whose COMMIT of the first ``start`` waits for ``gate``."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = trio.Event()
        self.waiting = trio.Event()

    async def append(self, record: TransitionRecord) -> None:
        if record.trigger == "start" and not self.gate.is_set():
            self.waiting.set()
            await self.gate.wait()
        await super().append(record)


async def test_a_pause_between_start_and_connect_gives_the_slot_back(autojump: object) -> None:
    """``start`` holds a slot for the connection that follows; a pause queued while the
    ``start`` event commits ends the attempt before it connects: the slot must go back."""
    async with trio.open_nursery() as nursery:
        log = GatedLog()
        kit = Kit(Net(nursery, {"venue": venue(rate=10.0)}), log)
        slots = trio.CapacityLimiter(1)
        (session,) = sessions_from(session_toml())
        runner = kit.runner(session, handshakes=slots)
        await nursery.start(runner.run)
        await log.waiting.wait()
        assert runner.handshake == "in progress"
        nursery.start_soon(runner.command, CommandKind.PAUSE, "operator")
        await trio.sleep(0.1)  # queued: the phase is cancelled, the COMMIT is shielded
        log.gate.set()
        await trio.sleep(1)
        assert [d for _, _, d in log.timeline("s")] == ["CONNECTING", "PAUSED"]
        assert kit.net.opened == []  # never connected
        assert (runner.handshake, slots.borrowed_tokens) == ("", 0)
        nursery.cancel_scope.cancel()
    log.verify()


# -- issue 9: decisions in the core, since, write-ahead for observers, contained bugs ----


async def test_resume_on_a_live_session_is_not_now_and_interrupts_nothing(
    autojump: object,
) -> None:
    """STREAMING, STALE, AUTHENTICATED: "not paused", and the link goes on untouched."""
    async with trio.open_nursery() as nursery:
        v = venue(rate=10.0)
        kit = Kit(Net(nursery, {"venue": v}), MemoryLog())
        runner = await start(kit, nursery, session_toml(stale_after=5.0, dead_after=30.0))
        await trio.sleep(1)
        assert await runner.command(CommandKind.RESUME, "r") == "not paused (it is STREAMING)"
        v.fault("silent", seconds=7.0)  # from t=1.0: STALE at 6.0, data again at 8.0
        await wait_for(runner, State.STALE)
        assert await runner.command(CommandKind.RESUME, "r") == "not paused (it is STALE)"
        await trio.sleep(3)
        assert [t for t, _ in kit.log.path("s")] == [
            "start", "connected", "authenticated", "data", "stale", "data",
        ]  # fmt: skip
        assert kit.net.opened == [("venue", PB_PORT)]  # the same link throughout
        assert runner.model.state is State.STREAMING
        nursery.cancel_scope.cancel()
    async with trio.open_nursery() as nursery:
        server = NoSubscribeReply()
        kit = Kit(Net(nursery, {"venue": server}), MemoryLog())  # type: ignore[dict-item]
        runner = await start(kit, nursery, session_toml(auth_timeout=3.0))
        await trio.sleep(1)
        answer = await runner.command(CommandKind.RESUME, "r")
        assert answer == "not paused (it is AUTHENTICATED)"
        await trio.sleep(2.5)
        # The subscription kept waiting: it timed out on its own schedule, after 3.0 s.
        (started, *_), (lost, trigger, _) = kit.log.timeline("s")[0], kit.log.timeline("s")[3]
        assert (round(lost - started, 3), trigger) == (3.0, "lost")
        assert server.subscribe_requests == 1
        nursery.cancel_scope.cancel()
    kit.log.verify()


async def test_failback_while_authenticated(autojump: object) -> None:
    """The fallback link subscribed but has carried no message when the primary answers
    the probe: the session leaves the fallback (no IllegalTransition, no crash)."""
    async with trio.open_nursery() as nursery:
        quiet = venue(rate=0.001, heartbeat_interval=1000.0)  # no message for 1000 s
        net = Net(nursery, {"primary": venue(rate=10.0), "backup": quiet}, down={"primary"})
        kit = Kit(net, MemoryLog())
        toml = (
            '[[sessions]]\nname = "s"\nkind = "protobuf"\n'
            f'url = "tcp://primary:{PB_PORT}"\nfallback_urls = ["tcp://backup:{PB_PORT}"]\n'
            'auth = { client_id = "c", client_secret = "x", account_id = 1, '
            'access_token = "y" }\nstale_after = 50.0\ndead_after = 100.0\n'
            "heartbeat_interval = 1000.0\n"
        )
        runner = await start(kit, nursery, toml)
        await wait_for(runner, State.AUTHENTICATED)
        net.down.clear()
        await trio.sleep(PRIMARY_PROBE_INTERVAL + 2)
        failback = next(r for r in kit.log.of("s") if r.trigger == "failback")
        assert (failback.source, failback.dest) == ("AUTHENTICATED", "DISCONNECTED")
        assert runner.model.state is State.STREAMING
        assert runner.endpoint == f"tcp://primary:{PB_PORT}"
        assert not runner.finished.is_set()
        nursery.cancel_scope.cancel()
    kit.log.verify()


async def test_since_is_when_the_state_was_entered(autojump: object, sqlite_url: str) -> None:
    """After a ``stable`` self-loop, status, ``replay --at`` and a consumer's first notice
    all say STREAMING since the ``data`` that entered it, not since the self-loop."""
    async with trio.open_nursery() as nursery:
        hub = ConsumerHub(["s"])
        sock = sqlite_url.removeprefix("sqlite:///").replace("events.db", "c.sock")
        await nursery.start(hub.serve_unix, sock)
        kit = Kit(Net(nursery, {"venue": venue(rate=10.0)}, down={"venue"}), MemoryLog())
        (session,) = sessions_from(session_toml(backoff="{ initial = 0.5, reset_after = 30.0 }"))
        runner = kit.runner(session, publisher=hub)
        await nursery.start(runner.run)
        await trio.sleep(0.1)
        kit.net.down.clear()  # the first attempt failed: stable has counts to reset
        await trio.sleep(40)
        assert kit.log.timeline("s")[-2:] == [
            (0.6, "data", "STREAMING"), (30.6, "stable", "STREAMING"),
        ]  # fmt: skip
        entered = kit.log.of("s")[-2].at

        status = json.loads(_static_part(runner) + "}")
        assert (status["state"], status["since"]) == ("STREAMING", entered.isoformat())
        assert runner.durable.since == entered

        store = EventStore(sqlite_url)
        migrate.upgrade(store.engine)
        store.append(kit.log.records)
        view = state_at(store, T0 + timedelta(seconds=35))["s"]
        store.close()
        assert (view.state, view.since, view.trigger) == ("STREAMING", entered, "stable")

        with trio.fail_after(5):
            client = await trio.open_unix_socket(sock)
            await client.send_all(
                encode_request(ConsumerRequest(subscribe=Subscribe(sessions=["s"])))
            )
            decoder, notices = ConsumerFrameDecoder(), []
            while not notices:
                decoder.feed(await client.receive_some(65536))
                notices = [f for f in decoder.messages() if f.HasField("state_notice")]
        notice = notices[0].state_notice
        assert (notice.state, notice.trigger) == ("STREAMING", "stable")
        assert notice.at_ns == round(entered.timestamp() * 1e6) * 1000
        await client.aclose()
        nursery.cancel_scope.cancel()


class RecordingPublisher:
    """Records what the consumer hub would be told."""

    def __init__(self) -> None:
        self.transitions: list[TransitionRecord] = []

    def data(self, session: str, batch: object, received_at_ns: int) -> None:
        return

    def transition(self, record: TransitionRecord) -> None:
        self.transitions.append(record)


class HeldLog(MemoryLog):
    """A MemoryLog whose COMMIT of the first record with ``trigger`` waits for ``gate``."""

    def __init__(self, trigger: str) -> None:
        super().__init__()
        self.trigger = trigger
        self.gate = trio.Event()
        self.waiting = trio.Event()

    async def append(self, record: TransitionRecord) -> None:
        if record.trigger == self.trigger and not self.gate.is_set():
            self.waiting.set()
            await self.gate.wait()
        await super().append(record)


async def test_observers_see_a_transition_only_after_its_commit(autojump: object) -> None:
    """While the ``pause`` COMMIT is blocked, the machine is PAUSED but status, metrics,
    /health, STATUS= and consumers all still show STREAMING; then all show PAUSED."""
    async with trio.open_nursery() as nursery:
        log = HeldLog("pause")
        publisher = RecordingPublisher()
        kit = Kit(Net(nursery, {"venue": venue(rate=10.0)}), log)
        (session,) = sessions_from(session_toml())
        runner = kit.runner(session, publisher=publisher)
        await nursery.start(runner.run)
        await trio.sleep(1)
        entered = log.of("s")[-1].at
        metrics = Metrics(
            SimpleNamespace(
                config=SimpleNamespace(config_hash="h"), sessions={"s": runner}, writer=None,
                started_at=None, stopping=False, handshakes=trio.CapacityLimiter(1),
            ),  # type: ignore[arg-type]
            Tally(),
            version="test",
        )  # fmt: skip

        def observed() -> tuple[object, ...]:
            text = metrics.render()
            status = json.loads(_static_part(runner) + "}")
            return (
                status["state"],
                status["since"],
                health({"s": runner})[1]["not_streaming"],
                state_summary({"s": runner}),
                'wirekeep_session_state{session="s",state="PAUSED"} 1' in text,
                publisher.transitions[-1].dest,
            )

        streaming = (
            "STREAMING", entered.isoformat(), {}, "1 session: 1 STREAMING", False, "STREAMING",
        )  # fmt: skip
        assert observed() == streaming
        nursery.start_soon(runner.command, CommandKind.PAUSE, "operator")
        await log.waiting.wait()
        await trio.sleep(1)
        assert runner.model.state is State.PAUSED  # the machine moved ...
        assert observed() == streaming  # ... but nothing durable says so yet
        log.gate.set()
        await runner.changed.wait()
        paused_at = log.of("s")[-1].at.isoformat()
        assert observed() == (
            "PAUSED", paused_at, {}, "1 session: 1 PAUSED", True, "PAUSED",
        )  # fmt: skip
        nursery.cancel_scope.cancel()
    log.verify()


class Bug:
    """Makes ``receive_batch`` of one session's links raise, from ``after`` on, ``times``
    times: a bug in the daemon's own code, not a network failure."""

    def __init__(self, runner: SessionRunner, *, after: float, times: int) -> None:
        self.inner, self.after, self.times = runner._adapter, after, times
        runner._adapter = self  # type: ignore[assignment]

    async def connect(self, nursery: trio.Nursery, url: str):  # type: ignore[no-untyped-def]
        conn = await self.inner.connect(nursery, url)
        bug = self

        class Buggy:
            def __getattr__(self, name: str) -> object:
                return getattr(conn, name)

            async def receive_batch(self):  # type: ignore[no-untyped-def]
                if bug.times and trio.current_time() >= bug.after:
                    bug.times -= 1
                    raise RuntimeError("bug in the batch parser")
                return await conn.receive_batch()

        return Buggy()


async def test_a_bug_in_one_session_leaves_the_others_streaming(autojump: object) -> None:
    async with trio.open_nursery() as nursery:
        kit = Kit(Net(nursery, {"venue": venue(rate=10.0)}), MemoryLog())
        toml = "".join(session_toml(name) for name in ("a", "b", "c"))
        a, b, c = [kit.runner(s) for s in sessions_from(toml)]
        Bug(b, after=5.0, times=1)
        with structlog.testing.capture_logs() as logs:
            for runner in (a, b, c):
                await nursery.start(runner.run)
            await trio.sleep(5)
            before = {r.name: r.messages for r in (a, c)}
            await trio.sleep(10)
        happy = ["CONNECTING", "CONNECTING", "AUTHENTICATED", "STREAMING"]
        for neighbour in (a, c):
            assert [d for _, _, d in kit.log.timeline(neighbour.name)] == happy
            assert neighbour.messages > before[neighbour.name] + 50  # never noticed
        assert [(round(t, 3), trig, d) for t, trig, d in kit.log.timeline("b")[4:]] == [
            (5.0, "lost", "BACKOFF"),
            (5.5, "retry", "CONNECTING"),  # through the backoff, like any failure
            (5.5, "connected", "CONNECTING"),
            (5.5, "authenticated", "AUTHENTICATED"),
            (5.6, "data", "STREAMING"),
        ]
        fault = kit.log.of("b")[4]
        assert fault.reason == "internal error: RuntimeError: bug in the batch parser"
        assert (fault.detail["error_class"], fault.detail["attempt"]) == ("internal", 1)
        (logged,) = [e for e in logs if e["event"] == "session_fault"]
        assert (logged["session"], logged["log_level"], logged["exc_info"]) == ("b", "error", True)
        assert b.durable.state is State.STREAMING
        nursery.cancel_scope.cancel()
    kit.log.verify()


async def test_a_bug_that_repeats_at_once_is_paced_by_backoff_and_breaker(
    autojump: object,
) -> None:
    async with trio.open_nursery() as nursery:
        kit = Kit(Net(nursery, {"venue": venue(rate=10.0)}), MemoryLog())
        (session,) = sessions_from(session_toml(circuit="{ failures = 4, cooldown = 60.0 }"))
        runner = kit.runner(session)
        Bug(runner, after=0.0, times=10**6)
        with structlog.testing.capture_logs():  # no console tracebacks: they take seconds
            await nursery.start(runner.run)
            await trio.sleep(70)
        failures = [
            (round(t, 3), trig) for t, trig, d in kit.log.timeline("s") if trig in ("lost", "trip")
        ]
        # Each attempt gets as far as its first read, then the bug: 0.5, 1, 2 s apart,
        # then the breaker opens for 60 s; the probe hits the bug and opens it again.
        assert failures == [(0.0, "lost"), (0.5, "lost"), (1.5, "lost"), (3.5, "trip"),
                            (63.5, "trip")]  # fmt: skip
        assert len(kit.log.of("s")) < 30
        nursery.cancel_scope.cancel()
    kit.log.verify()


async def test_a_bug_before_any_link_is_a_fault_to_backoff(autojump: object) -> None:
    """A bug outside a connection (here: in the connect-rate lookup) is a ``fault``."""
    async with trio.open_nursery() as nursery:
        kit = Kit(Net(nursery, {"venue": venue(rate=10.0)}), MemoryLog())
        (session,) = sessions_from(session_toml())
        runner = kit.runner(session)
        limiter, calls = runner._limiters, []

        def broken_once(url: str):  # type: ignore[no-untyped-def]
            calls.append(url)
            if len(calls) == 1:
                raise KeyError(url)
            return limiter(url)

        runner._limiters = broken_once
        await nursery.start(runner.run)
        await trio.sleep(2)
        assert kit.log.timeline("s") == [
            (0.0, "fault", "BACKOFF"),
            (0.5, "retry", "CONNECTING"),
            (0.5, "connected", "CONNECTING"),
            (0.5, "authenticated", "AUTHENTICATED"),
            (0.6, "data", "STREAMING"),
        ]
        fault = kit.log.of("s")[0]
        assert fault.reason == f"internal error: KeyError: 'tcp://venue:{PB_PORT}'"
        assert fault.detail["error_class"] == "internal"
        nursery.cancel_scope.cancel()
    kit.log.verify()
