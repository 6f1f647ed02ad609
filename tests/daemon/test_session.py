"""The session driver against the real adapters and venue, at exact virtual times.

Every test runs under MockClock(autojump_threshold=0): a 60 s cool-down takes no
real time, and ``trio.current_time()`` is asserted exactly.
"""

from __future__ import annotations

import random

import pytest
import trio
from sessionkit import PB_PORT, T0, Kit, MemoryLog, Net, session_toml, sessions_from, venue

from daemon.session import PRIMARY_PROBE_INTERVAL, CommandKind, SessionRunner
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
