"""The consumer hub: fan-out, bounded queues, gap markers, notices, both endpoints.

Sessions run against the real simulated venue over memory streams (sessionkit); the
consumers connect to the hub's real Unix socket in a temporary directory, read with the
protocol's decoder and, where timing matters, everything runs under
MockClock(autojump_threshold=0): Unix-socket I/O completes in the kernel at once, so the
virtual clock only jumps when every task really waits.
"""

from __future__ import annotations

import grp
import json
import os
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import structlog
import trio
import trio.testing
import trio_websocket
from sessionkit import T0, Kit, MemoryLog, Net, session_toml, sessions_from, venue

from daemon.adapters.base import Batch
from daemon.consumers import ConsumerHub, Disconnect, bind_unix_listener
from daemon.session import SessionRunner
from protocol.consumer_codec import (
    CAUSE_CONSUMER_TOO_SLOW,
    CAUSE_UPSTREAM_RECONNECT,
    ConsumerFrameDecoder,
    encode_request,
)
from protocol.consumer_pb2 import ConsumerFrame, ConsumerRequest, Subscribe
from protocol.framing import encode_frame
from protocol.venue_codec import decode_message
from statemachines.session import TransitionRecord


@pytest.fixture
def autojump(autojump_clock: trio.testing.MockClock) -> trio.testing.MockClock:
    return autojump_clock


@pytest.fixture
def sock_path(tmp_path: Path) -> Iterator[str]:
    """A socket path short enough for sun_path (108 bytes) whatever the test's name."""
    path = str(tmp_path / "c.sock")
    if len(path) < 100:
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="wk-") as short:
        yield os.path.join(short, "c.sock")


# -- a consumer, written as a user would: a socket and the protocol's decoder ----------

_OPEN: list[trio.SocketStream] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    """Close what the test left open (after its Trio run: no Trio calls here)."""
    yield
    while _OPEN:
        fd = _OPEN.pop().socket.detach()
        if fd >= 0:
            os.close(fd)


class Client:
    def __init__(self, stream: trio.SocketStream) -> None:
        _OPEN.append(stream)
        self.stream = stream
        self.decoder = ConsumerFrameDecoder()
        self.pending: list[ConsumerFrame] = []
        self.eof = False

    @classmethod
    async def connect(cls, path: str, *names: str, all: bool = False) -> Client:
        client = cls(await trio.open_unix_socket(path))
        if names or all:
            await client.subscribe(*names, all=all)
        return client

    async def subscribe(self, *names: str, all: bool = False) -> None:
        request = ConsumerRequest(subscribe=Subscribe(sessions=names, all=all))
        await self.stream.send_all(encode_request(request))

    async def _fill(self) -> bool:
        data = await self.stream.receive_some(65536)
        if not data:
            self.eof = True
            return False
        self.decoder.feed(data)
        self.pending += self.decoder.messages()
        return True

    async def frame(self) -> ConsumerFrame:
        while not self.pending:
            if not await self._fill():
                raise EOFError("the daemon closed the stream")
        return self.pending.pop(0)

    async def frames_until(self, done) -> list[ConsumerFrame]:  # type: ignore[no-untyped-def]
        out: list[ConsumerFrame] = []
        while True:
            frame = await self.frame()
            out.append(frame)
            if done(frame):
                return out

    async def rest(self) -> list[ConsumerFrame]:
        """Everything until the daemon closes the stream."""
        out = []
        while True:
            try:
                out.append(await self.frame())
            except EOFError:
                return out

    async def aclose(self) -> None:
        await self.stream.aclose()


def kind(frame: ConsumerFrame) -> str:
    return frame.WhichOneof("frame")  # type: ignore[return-value]


def seqs(frames: list[ConsumerFrame]) -> list[int]:
    return [f.data.seq for f in frames if kind(f) == "data"]


def notices(frames: list[ConsumerFrame]) -> list[str]:
    return [f.state_notice.state for f in frames if kind(f) == "state_notice"]


def upto(seq: int):  # type: ignore[no-untyped-def]
    return lambda f: kind(f) == "data" and f.data.seq >= seq


async def start_session(kit: Kit, nursery: trio.Nursery, hub: ConsumerHub, **keys: object):  # type: ignore[no-untyped-def]
    (config,) = sessions_from(session_toml(**keys))
    runner: SessionRunner = kit.runner(config, publisher=hub)
    hub.add_session(config.name)
    await nursery.start(runner.run)
    return runner


async def settled(hub: ConsumerHub, connected: int) -> None:
    """Until the hub has finished with every consumer beyond ``connected``."""
    for consumer in hub.consumers[connected:]:
        await consumer.done.wait()
    assert hub.stats.consumers_connected == connected


async def start_hub(nursery: trio.Nursery, path: str, **kwargs: object) -> ConsumerHub:
    hub = ConsumerHub(**kwargs)  # type: ignore[arg-type]
    await nursery.start(hub.serve_unix, path)
    return hub


# -- sharing -------------------------------------------------------------------------


async def test_two_consumers_receive_identical_sequences(autojump: object, sock_path: str) -> None:
    async with trio.open_nursery() as nursery:
        v = venue(rate=100.0)
        kit = Kit(Net(nursery, {"venue": v}), MemoryLog())
        hub = await start_hub(nursery, sock_path)
        hub.add_session("s")
        a = await Client.connect(sock_path, "s")
        b = await Client.connect(sock_path, "s")
        await trio.sleep(0.01)
        await start_session(kit, nursery, hub)
        got_a = await a.frames_until(upto(300))
        got_b = await b.frames_until(upto(300))
        assert trio.current_time() == pytest.approx(3.01, abs=0.02)  # 100 messages/s
        assert got_a == got_b
        assert kind(got_a[0]) == "subscribed"
        assert list(got_a[0].subscribed.sessions) == ["s"]
        assert seqs(got_a) == list(range(1, 301))
        assert notices(got_a) == ["CONNECTING", "CONNECTING", "AUTHENTICATED", "STREAMING"]
        data = got_a[-1].data
        assert (data.session, data.text) == ("s", False)
        quote = decode_message(data.payload).message
        assert quote.seq == 300  # the venue's own per-symbol counter: nothing lost
        assert data.received_at_ns == int((T0.timestamp() + trio.current_time()) * 1e9)
        nursery.cancel_scope.cancel()


async def test_the_upstream_connection_count_stays_one(autojump: object, sock_path: str) -> None:
    async with trio.open_nursery() as nursery:
        v = venue(rate=50.0)
        kit = Kit(Net(nursery, {"venue": v}), MemoryLog())
        hub = await start_hub(nursery, sock_path)
        await start_session(kit, nursery, hub)
        await trio.sleep(1)
        clients = [await Client.connect(sock_path, "s") for _ in range(20)]
        await trio.sleep(1)
        assert v.open_connections("protobuf") == 1
        assert v.counters("protobuf").accepted == 1
        assert hub.status()["sessions"]["s"]["subscribers"] == 20
        for client in clients:
            frames = await client.frames_until(upto(100))
            assert notices(frames) == ["STREAMING"]  # the state at subscription
            first = seqs(frames)[0]
            assert seqs(frames) == list(range(first, 101))
        nursery.cancel_scope.cancel()


async def test_json_sessions_are_relayed_as_text(autojump: object, sock_path: str) -> None:
    async with trio.open_nursery() as nursery:
        kit = Kit(Net(nursery, {"venue": venue(rate=10.0)}), MemoryLog())
        hub = await start_hub(nursery, sock_path)
        await start_session(
            kit, nursery, hub, kind="websocket",
            auth_message='\'{"op":"auth","key":"k"}\'', auth_expect="{ ok = true }",
            subscribe='[\'{"op":"subscribe","channel":"ticks"}\']',
        )  # fmt: skip
        client = await Client.connect(sock_path, "s")
        frames = await client.frames_until(upto(5))
        data = [f.data for f in frames if kind(f) == "data"]
        assert all(d.text for d in data)
        assert json.loads(data[-1].payload)["channel"] == "ticks"
        nursery.cancel_scope.cancel()


# -- slow consumers --------------------------------------------------------------------


async def test_a_stalled_consumer_gets_the_exact_gap_and_stalls_nobody(
    autojump: object, sock_path: str
) -> None:
    rate, stall = 1000.0, 5.0
    async with trio.open_nursery() as nursery:
        v = venue(rate=rate)
        kit = Kit(Net(nursery, {"venue": v}), MemoryLog())
        hub = await start_hub(nursery, sock_path, queue_limit=100, max_lag=60.0)
        hub.add_session("s")
        fast = await Client.connect(sock_path, "s")
        slow = await Client.connect(sock_path, "s")
        await trio.sleep(0.01)
        runner = await start_session(kit, nursery, hub)
        # The slow consumer takes nothing for 5 s; the fast one reads as it arrives.
        got_fast = await fast.frames_until(upto(int(rate * stall)))
        now = trio.current_time()
        assert now == pytest.approx(0.01 + stall, abs=0.01)  # full rate, in virtual time
        assert seqs(got_fast) == list(range(1, int(rate * stall) + 1))
        assert runner.messages >= rate * stall  # the session never waited either
        last = int(rate * stall)
        got_slow = await slow.frames_until(upto(last))
        gaps = [f.gap for f in got_slow if kind(f) == "gap"]
        assert gaps, "the slow consumer must be told what it missed"
        assert all(g.cause == CAUSE_CONSUMER_TOO_SLOW for g in gaps)
        received = seqs(got_slow)
        missing = [s for g in gaps for s in range(g.first_missing, g.last_missing + 1)]
        assert sorted(received + missing) == list(range(1, last + 1))  # exact, disjoint
        assert received == sorted(received)
        assert sum(g.missing for g in gaps) == len(missing)
        # Each gap stands exactly where the messages it names would have been.
        position = {id(f): i for i, f in enumerate(got_slow)}
        for g, frame in ((f.gap, f) for f in got_slow if kind(f) == "gap"):
            before = seqs(got_slow[: position[id(frame)]])
            after = seqs(got_slow[position[id(frame)] + 1 :])
            assert not before or before[-1] == g.first_missing - 1
            assert after[0] == g.last_missing + 1
        await trio.sleep(0.001)  # the writer counts once its write is done
        consumer = next(c for c in hub.consumers if c.dropped)
        assert consumer.dropped == len(missing)
        assert hub.stats.messages_dropped == len(missing)
        assert hub.stats.gaps_sent[CAUSE_CONSUMER_TOO_SLOW] == len(gaps)
        assert hub.stats.disconnects["too_slow"] == 0
        nursery.cancel_scope.cancel()


async def test_a_consumer_behind_for_too_long_is_disconnected_with_the_reason(
    autojump: object, sock_path: str
) -> None:
    async with trio.open_nursery() as nursery:
        v = venue(rate=1000.0)
        kit = Kit(Net(nursery, {"venue": v}), MemoryLog())
        hub = await start_hub(nursery, sock_path, queue_limit=50, max_lag=2.0)
        hub.add_session("s")
        fast = await Client.connect(sock_path, "s")
        slow = await Client.connect(sock_path, "s")
        await trio.sleep(0.01)
        got_fast: list[ConsumerFrame] = []

        async def read_fast() -> None:
            while True:
                got_fast.append(await fast.frame())

        nursery.start_soon(read_fast)
        await start_session(kit, nursery, hub)
        # The slow one reads 2 KiB every 50 ms: far below the ~60 KiB/s of the session.
        frames: list[ConsumerFrame] = []
        while True:
            await trio.sleep(0.05)
            data = await slow.stream.receive_some(2048)
            if not data:
                break
            slow.decoder.feed(data)
            frames += slow.decoder.messages()
        (error,) = [f.error.message for f in frames if kind(f) == "error"]
        assert error.startswith("too slow: behind for 2.0 s (the limit is 2.0 s); ")
        assert kind(frames[-1]) == "error"  # the last frame, and then the close
        assert any(kind(f) == "gap" for f in frames)
        await slow.aclose()
        await settled(hub, 1)
        assert hub.stats.disconnects["too_slow"] == 1
        # The fast consumer saw everything, from 1 on, and is still connected.
        assert seqs(got_fast) == list(range(1, v.counters("protobuf").messages_sent + 1))
        assert hub.stats.consumers_connected == 1
        nursery.cancel_scope.cancel()


async def test_a_consumer_that_takes_nothing_is_dropped_after_max_lag(
    autojump: object, sock_path: str
) -> None:
    async with trio.open_nursery() as nursery:
        kit = Kit(Net(nursery, {"venue": venue(rate=1000.0)}), MemoryLog())
        hub = await start_hub(nursery, sock_path, queue_limit=10, max_lag=5.0)
        await start_session(kit, nursery, hub)
        await trio.sleep(1)
        stalled = await Client.connect(sock_path, "s")
        await trio.sleep(0.001)
        (consumer,) = hub.consumers
        while consumer.behind_since is None:  # noqa: ASYNC110 - polled: no event for it
            await trio.sleep(0.001)
        behind_since = consumer.behind_since
        await consumer.done.wait()
        # Behind from the first overflow (or a little earlier: when the write it never
        # finished taking was queued); out max_lag later, after the final grace to write
        # the Error it never reads.
        assert trio.current_time() == pytest.approx(behind_since + 5.0 + 1.0, abs=0.05)
        assert hub.stats.disconnects["too_slow"] == 1
        assert hub.consumers == []
        await stalled.aclose()
        nursery.cancel_scope.cancel()


async def test_drops_cut_the_oldest_messages_and_gaps_keep_their_place() -> None:
    """Driven by hand: the writer cannot run between synchronous calls to the hub."""
    hub = ConsumerHub(["s", "t"], queue_limit=3)
    ours, theirs = trio.socket.socketpair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hub.serve_connection, trio.SocketStream(ours))
        client = Client(trio.SocketStream(theirs))
        await client.subscribe("s", "t")
        assert kind(await client.frame()) == "subscribed"
        at = T0

        def record(source: str, dest: str, trigger: str) -> TransitionRecord:
            return TransitionRecord("s", 9, at, trigger, source, dest, "why")

        batch = lambda n: Batch([b"m%d" % i for i in range(n)], text=False)  # noqa: E731
        hub.data("s", batch(5), 1)  # s 1..5: 2 dropped at once
        hub.transition(record("STREAMING", "STALE", "stale"))
        hub.data("t", batch(2), 2)  # t 1..2
        hub.data("s", batch(5), 3)  # s 6..10
        frames = await client.frames_until(upto(10))
        shown = [
            (kind(f), f.gap.session, f.gap.first_missing, f.gap.last_missing, f.gap.missing)
            if kind(f) == "gap"
            else (kind(f), f.data.session, f.data.seq)
            if kind(f) == "data"
            else (kind(f), f.state_notice.state)
            for f in frames
        ]
        assert shown == [
            ("gap", "s", 1, 5, 5),  # where s 1..5 were: before the notice
            ("state_notice", "STALE"),
            ("gap", "t", 1, 2, 2),
            ("gap", "s", 6, 7, 2),  # a chunk cut in the middle
            ("data", "s", 8),
            ("data", "s", 9),
            ("data", "s", 10),
        ]
        assert frames[0].gap.cause == CAUSE_CONSUMER_TOO_SLOW
        assert hub.status()["sessions"]["s"]["dropped"] == 7
        nursery.cancel_scope.cancel()


# -- state notices and reconnects -----------------------------------------------------


async def test_stale_and_back_produces_notices_in_order_with_the_data(
    autojump: object, sock_path: str
) -> None:
    async with trio.open_nursery() as nursery:
        v = venue(rate=10.0)
        kit = Kit(Net(nursery, {"venue": v}), MemoryLog())
        hub = await start_hub(nursery, sock_path)
        await start_session(kit, nursery, hub, stale_after=5.0, dead_after=30.0)
        await trio.sleep(1)
        client = await Client.connect(sock_path, "s")
        await trio.sleep(2.05)
        v.fault("silent", seconds=8)  # the last message went out at t=3.0
        await trio.sleep(10)
        frames = await client.frames_until(upto(100))
        kinds = [kind(f) if kind(f) != "state_notice" else f.state_notice.state for f in frames]
        stale, resumed = kinds.index("STALE"), kinds.index("STREAMING", 2)
        assert set(kinds[2:stale]) == {"data"}
        assert set(kinds[stale + 1 : resumed]) == set()  # nothing between the two notices
        assert set(kinds[resumed + 1 :]) == {"data"}
        notice = frames[stale].state_notice
        assert (notice.previous, notice.trigger, notice.reason) == (
            "STREAMING", "stale", "no data for 5.0 s",
        )  # fmt: skip
        assert notice.at_ns == int((T0 + timedelta(seconds=8)).timestamp() * 1e9)
        back = frames[resumed].state_notice
        assert back.reason.startswith("data resumed after 8.")  # silent 3.05 .. 11.05
        assert "gap" not in kinds  # the link stayed up: nothing went missing
        assert seqs(frames) == list(range(seqs(frames)[0], 101))
        before, after = frames[stale - 1].data, frames[resumed + 1].data
        us = 1000  # sessionkit's wall_ns goes through a float: sub-microsecond noise
        assert before.received_at_ns <= notice.at_ns + us
        assert notice.at_ns <= back.at_ns <= after.received_at_ns + us
        nursery.cancel_scope.cancel()


async def test_a_reconnect_produces_a_gap_marker(autojump: object, sock_path: str) -> None:
    async with trio.open_nursery() as nursery:
        v = venue(rate=10.0)
        kit = Kit(Net(nursery, {"venue": v}), MemoryLog())
        hub = await start_hub(nursery, sock_path)
        await start_session(kit, nursery, hub)
        await trio.sleep(1)
        client = await Client.connect(sock_path, "s")
        await trio.sleep(2.05)
        v.fault("drop")
        frames = await client.frames_until(lambda f: kind(f) == "gap")
        frames += await client.frames_until(lambda f: kind(f) == "data")
        tail = [kind(f) if kind(f) != "state_notice" else f.state_notice.state for f in frames]
        n = tail.index("BACKOFF")
        assert tail[n:] == [
            "BACKOFF", "CONNECTING", "CONNECTING", "AUTHENTICATED", "STREAMING", "gap", "data",
        ]  # fmt: skip
        lost, streaming = frames[n].state_notice, frames[n + 4].state_notice
        gap = frames[n + 5].gap
        assert gap.cause == CAUSE_UPSTREAM_RECONNECT
        assert gap.interrupted_s == pytest.approx((streaming.at_ns - lost.at_ns) / 1e9)
        assert gap.interrupted_s == pytest.approx(0.6)  # 0.5 s backoff + 1/rate to data
        last_before = seqs(frames[:n])[-1]
        assert (gap.first_missing, gap.last_missing, gap.missing) == (
            last_before + 1, last_before, 0,
        )  # fmt: skip
        assert frames[-1].data.seq == gap.first_missing  # the numbering just goes on
        await trio.sleep(0.001)
        assert hub.stats.gaps_sent[CAUSE_UPSTREAM_RECONNECT] == 1
        assert v.open_connections("protobuf") == 1
        nursery.cancel_scope.cancel()


async def test_subscribing_while_a_session_is_down_tells_its_state(sock_path: str) -> None:
    hub = ConsumerHub()
    at = T0
    hub.add_session("s", TransitionRecord("s", 7, at, "trip", "STREAMING", "CIRCUIT_OPEN", "x"))
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.serve_unix, sock_path)
        with trio.fail_after(5):
            client = await Client.connect(sock_path, "s")
            subscribed, notice = await client.frame(), await client.frame()
        assert list(subscribed.subscribed.sessions) == ["s"]
        assert notice.state_notice.state == "CIRCUIT_OPEN"
        assert notice.state_notice.version == 7
        nursery.cancel_scope.cancel()


async def test_subscribe_all_includes_sessions_added_later(sock_path: str) -> None:
    hub = ConsumerHub(["a"])
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.serve_unix, sock_path)
        with trio.fail_after(5):
            client = await Client.connect(sock_path, all=True)
            assert list((await client.frame()).subscribed.sessions) == ["a"]
            hub.add_session("b")
            assert list((await client.frame()).subscribed.sessions) == ["a", "b"]
            hub.data("b", Batch([b"x"], text=True), 5)
            frame = await client.frame()
            assert (frame.data.session, frame.data.seq, frame.data.payload) == ("b", 1, b"x")
            # Removed from the configuration, then back: the numbering goes on.
            hub.remove_session("b")
            assert list((await client.frame()).subscribed.sessions) == ["a"]
            hub.add_session("b")
            assert list((await client.frame()).subscribed.sessions) == ["a", "b"]
            hub.data("b", Batch([b"y"], text=True), 6)
            assert (await client.frame()).data.seq == 2
        nursery.cancel_scope.cancel()


# -- bad consumers -----------------------------------------------------------------------


async def test_an_unknown_session_is_a_clear_error(sock_path: str) -> None:
    hub = ConsumerHub(["venue-a", "venue-b"])
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.serve_unix, sock_path)
        with trio.fail_after(5):
            client = await Client.connect(sock_path, "venue-a", "venue-z")
            frames = await client.rest()
        assert [kind(f) for f in frames] == ["error"]
        assert frames[0].error.message == (
            "unknown session 'venue-z'; this daemon has: venue-a, venue-b"
        )
        await client.aclose()
        await settled(hub, 0)
        assert hub.stats.disconnects["unknown_session"] == 1
        assert hub.status()["sessions"]["venue-a"]["subscribers"] == 0
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("garbage", "error"),
    [
        (encode_frame(b"\xff\xff\xff"), "bad request: frame of 3 bytes is not a valid"),
        (b"\x7f\xff\xff\xff", "bad request: frame of 2147483647 bytes exceeds"),
        (encode_frame(b""), "bad request: ConsumerRequest with nothing in it"),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "bad request: frame of 1195725856 bytes"),
        (
            encode_request(ConsumerRequest(subscribe=Subscribe())),
            "subscribe names no session: give session names, or all",
        ),
    ],
)
async def test_garbage_gets_an_error_and_a_disconnect_never_a_crash(
    sock_path: str, garbage: bytes, error: str
) -> None:
    hub = ConsumerHub(["s"])
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.serve_unix, sock_path)
        with trio.fail_after(5):
            bystander = await Client.connect(sock_path, "s")
            assert kind(await bystander.frame()) == "subscribed"
            bad = await Client.connect(sock_path)
            await bad.stream.send_all(garbage)
            frames = await bad.rest()
            assert [kind(f) for f in frames] == ["error"]
            assert frames[0].error.message.startswith(error)
            await bad.aclose()
            await settled(hub, 1)
            # The endpoint and everyone else go on.
            hub.data("s", Batch([b"after"], text=False), 1)
            assert (await bystander.frame()).data.payload == b"after"
            late = await Client.connect(sock_path, "s")
            assert kind(await late.frame()) == "subscribed"
        assert hub.stats.disconnects["protocol_error"] == 1
        assert hub.stats.consumers_connected == 2
        nursery.cancel_scope.cancel()


async def test_a_consumer_that_vanishes_is_forgotten(sock_path: str) -> None:
    hub = ConsumerHub(["s"])
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.serve_unix, sock_path)
        with trio.fail_after(5):
            client = await Client.connect(sock_path, "s")
            await client.frame()
            await client.aclose()
            while hub.consumers:
                hub.data("s", Batch([b"x"], text=False), 1)
                await trio.sleep(0.01)
        assert hub.stats.disconnects["closed"] == 1
        assert hub.status()["sessions"]["s"]["subscribers"] == 0
        nursery.cancel_scope.cancel()


async def test_stop_flushes_then_says_why(sock_path: str) -> None:
    hub = ConsumerHub(["s"])
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.serve_unix, sock_path)
        with trio.fail_after(5):
            client = await Client.connect(sock_path, "s")
            await client.frame()
            hub.data("s", Batch([b"last words"], text=False), 1)
            async with trio.open_nursery() as stopping:
                stopping.start_soon(hub.stop)
                frames = await client.rest()
                await client.aclose()
        assert [kind(f) for f in frames] == ["data", "error"]
        assert frames[1].error.message == "daemon stopping"
        assert hub.stats.disconnects["stopping"] == 1
        nursery.cancel_scope.cancel()


async def test_a_fault_in_the_hub_never_reaches_the_session() -> None:
    hub = ConsumerHub(["s"])
    consumer = hub.connect("test", "nobody")
    hub.request(consumer, ConsumerRequest(subscribe=Subscribe(sessions=["s"])))

    def broken(item: object) -> None:
        raise RuntimeError("a bug in the hub")

    consumer.push = broken  # type: ignore[method-assign]
    record = TransitionRecord("s", 5, T0, "stale", "STREAMING", "STALE", "no data for 5.0 s")
    with structlog.testing.capture_logs() as logs:
        hub.data("s", Batch([b"x"], text=False), 1)  # the session task goes on
        hub.transition(record)
    assert consumer.final is not None
    assert consumer.final.reason == "internal error in wirekeep; reconnect"
    assert consumer.final.kind is Disconnect.INTERNAL_ERROR
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["consumer_hub_failed"]
    assert hub.status()["sessions"]["s"]["last_seq"] == 1


# -- the socket file ----------------------------------------------------------------------


async def test_socket_file_mode_group_stale_files_and_removal(sock_path: str) -> None:
    group = grp.getgrgid(os.getgid()).gr_name
    hub = ConsumerHub(["s"])
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.serve_unix, sock_path)
        st = os.stat(sock_path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o660
        with pytest.raises(OSError, match="another process is listening on"):
            bind_unix_listener(sock_path)
        nursery.cancel_scope.cancel()
    assert not os.path.exists(sock_path)  # noqa: ASYNC240 - removed when the endpoint stops
    # A socket file left behind by a crashed run is replaced; the group is applied.
    left = socket.socket(socket.AF_UNIX)
    left.bind(sock_path)
    left.close()
    listener = bind_unix_listener(sock_path, group=group)
    st = os.stat(sock_path)
    assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o660, os.getgid())
    await listener.aclose()
    os.unlink(sock_path)
    Path(sock_path).write_text("not a socket")  # noqa: ASYNC240 - a test's scratch file
    with pytest.raises(OSError, match="exists and is not a socket"):
        bind_unix_listener(sock_path)
    os.unlink(sock_path)
    with pytest.raises(OSError, match="no group named 'no-such-group-wk'"):
        bind_unix_listener(sock_path, group="no-such-group-wk")
    assert not os.path.exists(sock_path)  # noqa: ASYNC240 - a test's scratch file


async def test_bind_first_serve_later_as_the_daemon_does(sock_path: str) -> None:
    hub = ConsumerHub(["s"])
    serve = await hub.bind(sock_path, None, ("127.0.0.1", 0))
    async with trio.open_nursery() as nursery:
        unix_path = await nursery.start(serve[0])
        port = await nursery.start(serve[1])
        assert (unix_path, port > 0) == (sock_path, True)
        with trio.fail_after(5):
            client = await Client.connect(sock_path, "s")
            assert kind(await client.frame()) == "subscribed"
        nursery.cancel_scope.cancel()
    assert not os.path.exists(sock_path)  # noqa: ASYNC240 - removed when serving stops
    # A WebSocket address in use: nothing stays bound.
    busy = trio.socket.socket()
    await busy.bind(("127.0.0.1", 0))
    busy.listen()
    with pytest.raises(OSError, match="in use"):
        await hub.bind(sock_path, None, busy.getsockname())
    busy.close()
    assert not os.path.exists(sock_path)  # noqa: ASYNC240
    # Bound, never served (the daemon failed to start): unbind() cleans up.
    await hub.bind(sock_path)
    hub.unbind()
    assert not os.path.exists(sock_path)  # noqa: ASYNC240


# -- the WebSocket endpoint ------------------------------------------------------------------


async def test_websocket_endpoint_speaks_json() -> None:
    async with trio.open_nursery() as nursery:
        v = venue(rate=50.0)
        kit = Kit(Net(nursery, {"venue": v}), MemoryLog())
        hub = ConsumerHub()
        await start_session(kit, nursery, hub)
        port = await nursery.start(hub.serve_websocket, "127.0.0.1", 0)
        url = f"ws://127.0.0.1:{port}/"
        with trio.fail_after(10):
            async with trio_websocket.open_websocket_url(url) as ws:
                await ws.send_message('{"subscribe":{"sessions":["s"]}}')
                got = [json.loads(await ws.get_message()) for _ in range(5)]
            assert got[0] == {"type": "subscribed", "sessions": ["s"]}
            assert got[1]["type"] == "state_notice"
            data = [g for g in got if g["type"] == "data"]
            assert data
            assert (data[0]["session"], data[0]["text"]) == ("s", False)
            assert [d["seq"] for d in data] == list(range(data[0]["seq"], data[-1]["seq"] + 1))
            async with trio_websocket.open_websocket_url(url) as ws:
                await ws.send_message("this is not a request")
                error = json.loads(await ws.get_message())
                assert await closed_by_daemon(ws) == 1008
            assert error["type"] == "error"
            assert error["message"].startswith("bad request: ")
            async with trio_websocket.open_websocket_url(url) as ws:
                await ws.send_message('{"subscribe":{"sessions":["nope"]}}')
                assert json.loads(await ws.get_message())["message"].startswith(
                    "unknown session 'nope'"
                )
                assert await closed_by_daemon(ws) == 1008
            assert await handshake_status(port, "https://evil.example") == 403
            assert await handshake_status(port, "null") == 403
            async with trio_websocket.open_websocket_url(
                url, extra_headers=[(b"Origin", b"http://localhost:3000")]
            ) as ws:
                await ws.send_message('{"subscribe":{"all":true}}')
                assert json.loads(await ws.get_message())["type"] == "subscribed"
        assert v.open_connections("protobuf") == 1
        assert hub.stats.disconnects["protocol_error"] == 1
        assert hub.stats.disconnects["unknown_session"] == 1
        nursery.cancel_scope.cancel()


async def closed_by_daemon(ws: trio_websocket.WebSocketConnection) -> int:
    """Wait for the daemon to close the WebSocket; its close code.

    trio-websocket 0.12's client never closes its TCP socket when the server closed
    the WebSocket (its reader stops at end-of-stream, aclose() returns early): close it
    here, or it leaks.
    """
    with pytest.raises(trio_websocket.ConnectionClosed) as closed:
        await ws.get_message()
    await trio.aclose_forcefully(ws._stream)
    code: int = closed.value.reason.code
    return code


async def handshake_status(port: int, origin: str) -> int:
    """The HTTP status a WebSocket handshake from a page at ``origin`` gets."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(
            b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\nOrigin: " + origin.encode() + b"\r\n\r\n"
        )
        reply = b""
        while b"\r\n" not in reply:
            reply += await stream.receive_some(4096)
    return int(reply.split()[1])


# -- the README's example consumer -------------------------------------------------------


def readme_example() -> str:
    """The Python block of the README's section on consumers."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme[readme.index("## Sharing streams with local consumers") :]
    start = section.index("```python\n") + len("```python\n")
    return section[start : section.index("```", start)]


async def test_the_documented_example_consumer_works(sock_path: str) -> None:
    code = readme_example()
    assert 15 <= len(code.strip().splitlines()) <= 25
    code = code.replace("/run/wirekeep/consumers.sock", sock_path)
    async with trio.open_nursery() as nursery:
        kit = Kit(Net(nursery, {"venue": venue(rate=50.0)}), MemoryLog())
        hub = await start_hub(nursery, sock_path)
        await start_session(kit, nursery, hub, name="venue-b")
        process = await trio.lowlevel.open_process(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, env=child_env()
        )
        assert process.stdout is not None
        out = b""
        with trio.fail_after(20):
            while out.count(b"\n") < 4:
                out += await process.stdout.receive_some(4096)
        process.kill()
        await process.wait()
        await process.stdout.aclose()
        nursery.cancel_scope.cancel()
    lines = out.decode().splitlines()
    assert lines[0] == "state STREAMING first message after subscribing"
    seq, symbol, bid, ask = lines[1].split()
    assert (symbol, float(ask) > float(bid)) == ("EURUSD", True)
    assert [int(line.split()[0]) for line in lines[1:4]] == [int(seq), int(seq) + 1, int(seq) + 2]


def child_env() -> dict[str, str]:
    root = str(Path(__file__).parents[2])
    return {**os.environ, "PYTHONPATH": root, "PYTHONUNBUFFERED": "1"}


# -- status and metrics ---------------------------------------------------------------------


async def test_status_and_metrics_name_every_counter() -> None:
    hub = ConsumerHub(["s"], queue_limit=5, max_lag=3.0)
    status = hub.status()
    assert status["connected"] == 0
    assert status["disconnects"] == {
        "closed": 0, "too_slow": 0, "protocol_error": 0, "unknown_session": 0, "stopping": 0,
        "internal_error": 0,
    }  # fmt: skip
    names = {name for name, _, _ in hub.metric_samples()}
    assert names == {
        "wirekeep_consumers_connected",
        "wirekeep_consumers_accepted_total",
        "wirekeep_consumer_messages_delivered_total",
        "wirekeep_consumer_messages_dropped_total",
        "wirekeep_consumer_gaps_total",
        "wirekeep_consumer_disconnects_total",
        "wirekeep_consumer_subscribers",
    }
    hub.stats.messages_delivered = 12_345_678
    lines = hub.metric_lines()
    assert lines[:3] == [
        "# HELP wirekeep_consumers_connected Consumers connected now (both endpoints).",
        "# TYPE wirekeep_consumers_connected gauge",
        "wirekeep_consumers_connected 0",
    ]
    assert "wirekeep_consumer_messages_delivered_total 12345678" in lines
    assert "# TYPE wirekeep_consumer_disconnects_total counter" in lines
    assert 'wirekeep_consumer_disconnects_total{reason="too_slow"} 0' in lines
    assert 'wirekeep_consumer_messages_dropped_total{session="s"} 0' in lines
    with pytest.raises(ValueError, match="queue_limit"):
        ConsumerHub(queue_limit=0)
