"""``wirekeep tail``: a consumer for a person at a terminal.

The command runs as it does from the command line (argparse, ``register(add)``, the
blocking socket client) in a worker thread, against the hub's real Unix socket; the
test drives the hub from the Trio side. Real clock here: a thread is involved.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog
import trio
from sessionkit import T0, Kit, MemoryLog, Net, session_toml, sessions_from, venue

from daemon.adapters.base import Batch
from daemon.cli import CliError
from daemon.cli_consumers import format_frame, register
from daemon.consumers import ConsumerHub
from protocol.consumer_pb2 import ConsumerFrame, Data, Error, Gap, StateNotice, Subscribed
from protocol.venue_codec import encode
from protocol.venue_pb2 import QUOTE_EVENT, QuoteEvent
from statemachines.session import TransitionRecord

NS = int((T0 + timedelta(seconds=1.5)).timestamp()) * 10**9 + 123_456_000


@pytest.fixture(autouse=True)
def _quiet_logs() -> Iterator[None]:
    """The hub's log lines would land in the captured stdout beside tail's."""
    with structlog.testing.capture_logs():
        yield


@pytest.fixture
def sock_path(tmp_path: Path) -> Iterator[str]:
    path = str(tmp_path / "c.sock")
    if len(path) < 100:
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="wk-") as short:
        yield os.path.join(short, "c.sock")


def parse(*argv: str) -> argparse.Namespace:
    """The arguments as ``wirekeep`` would parse them once ``register(add)`` is wired in."""
    parser = argparse.ArgumentParser(prog="wirekeep")
    parser.add_argument("--config")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, handler: Any, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.set_defaults(handler=handler)
        return p

    register(add)
    return parser.parse_args(argv)


async def run_tail(*argv: str) -> int:
    args = parse("tail", *argv)
    return int(await trio.to_thread.run_sync(args.handler, args))


async def subscribed(hub: ConsumerHub, session: str, n: int = 1) -> None:
    with trio.fail_after(5):
        # Polled: the hub has no event for "subscribed" (and needs none).
        while hub.status()["sessions"][session]["subscribers"] != n:  # type: ignore[index]  # noqa: ASYNC110
            await trio.sleep(0.005)


# -- lines ------------------------------------------------------------------------------


def test_one_line_per_frame() -> None:
    quote = QuoteEvent(symbol="EURUSD", bid=1.1, ask=1.1002, seq=7)
    envelope, text = encode(QUOTE_EVENT, quote)[4:], b'{"p":1}'
    frames = [
        ConsumerFrame(data=Data(session="a", seq=41, received_at_ns=NS, payload=text, text=True)),
        ConsumerFrame(data=Data(session="b", seq=42, received_at_ns=NS, payload=envelope)),
        ConsumerFrame(data=Data(session="b", seq=43, received_at_ns=NS, payload=b"\x0f\x01")),
        ConsumerFrame(state_notice=StateNotice(
            session="a", state="STALE", previous="STREAMING", trigger="stale",
            reason="no data for 5.0 s", at_ns=NS,
        )),
        ConsumerFrame(gap=Gap(
            session="a", first_missing=10, last_missing=19, missing=10, interrupted_s=0.25,
            cause="consumer too slow",
        )),
        ConsumerFrame(gap=Gap(
            session="a", first_missing=20, last_missing=19, missing=0, interrupted_s=12.5,
            cause="upstream reconnect",
        )),
        ConsumerFrame(subscribed=Subscribed(sessions=["a", "b"])),
        ConsumerFrame(error=Error(message="unknown session 'x'")),
    ]  # fmt: skip
    assert [format_frame(f) for f in frames] == [
        '14:00:01.123456 a #41 {"p":1}',
        '14:00:01.123456 b #42 QUOTE_EVENT symbol: "EURUSD" bid: 1.1 ask: 1.1002 seq: 7',
        "14:00:01.123456 b #43 (2 bytes that are not a venue envelope) 0f01",
        "14:00:01.123456 a == STALE (was STREAMING, stale): no data for 5.0 s",
        "                a !! gap: wirekeep sequence 10 to 19 missing from this consumer "
        "(10 messages over 0.250 s; consumer too slow)",
        "                a !! gap: resumed after 12.5 s (upstream reconnect); no wirekeep "
        "sequence number is missing, but what the venue sent meanwhile never arrived; "
        "next is 20",
        "                following a, b",
        "                error: unknown session 'x'",
    ]


# -- against the hub --------------------------------------------------------------------------


async def test_tail_prints_data_notices_and_gaps(
    sock_path: str, capsys: pytest.CaptureFixture[str]
) -> None:
    hub = ConsumerHub(["s"])
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.serve_unix, sock_path)
        done = trio.Event()
        status: list[int] = []

        async def command() -> None:
            status.append(await run_tail("s", "--socket", sock_path, "--count", "3"))
            done.set()

        nursery.start_soon(command)
        await subscribed(hub, "s")
        hub.transition(TransitionRecord("s", 4, T0, "data", "AUTHENTICATED", "STREAMING", "first"))
        hub.data("s", Batch([b'{"n":1}', b'{"n":2}'], text=True), NS)
        # A reconnect: the link drops and streams again 2 s later.
        hub.transition(TransitionRecord("s", 5, T0, "lost", "STREAMING", "BACKOFF", "reset"))
        back = T0 + timedelta(seconds=2)
        hub.transition(TransitionRecord("s", 6, back, "data", "AUTHENTICATED", "STREAMING", "up"))
        hub.data("s", Batch([b'{"n":3}', b'{"n":4}'], text=True), NS)
        with trio.fail_after(5):
            await done.wait()
        nursery.cancel_scope.cancel()
    assert status == [0]
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        "14:00:00.000000 s == STREAMING (was AUTHENTICATED, data): first",
        '14:00:01.123456 s #1 {"n":1}',
        '14:00:01.123456 s #2 {"n":2}',
        "14:00:00.000000 s == BACKOFF (was STREAMING, lost): reset",
        "14:00:02.000000 s == STREAMING (was AUTHENTICATED, data): up",
        "                s !! gap: resumed after 2.0 s (upstream reconnect); no wirekeep "
        "sequence number is missing, but what the venue sent meanwhile never arrived; "
        "next is 3",
        '14:00:01.123456 s #3 {"n":3}',
    ]
    assert err == "wirekeep: following s\n"


async def test_tail_follows_a_live_session_as_json(
    sock_path: str, capsys: pytest.CaptureFixture[str]
) -> None:
    async with trio.open_nursery() as nursery:
        v = venue(rate=100.0)
        kit = Kit(Net(nursery, {"venue": v}), MemoryLog())
        hub = ConsumerHub(["s"])
        await nursery.start(hub.serve_unix, sock_path)
        (config,) = sessions_from(session_toml())
        await nursery.start(kit.runner(config, publisher=hub).run)
        with trio.fail_after(10):
            status = await run_tail("--all", "--json", "--socket", sock_path, "--count", "5")
        assert v.open_connections("protobuf") == 1
        nursery.cancel_scope.cancel()
    assert status == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[0] == {"type": "subscribed", "sessions": ["s"]}
    assert {line["type"] for line in lines[1:]} <= {"state_notice", "data"}
    data = [line for line in lines if line["type"] == "data"]
    assert len(data) == 5
    assert [d["seq"] for d in data] == list(range(data[0]["seq"], data[0]["seq"] + 5))


async def test_an_unknown_session_ends_tail_with_the_daemons_reason(
    sock_path: str, capsys: pytest.CaptureFixture[str]
) -> None:
    hub = ConsumerHub(["venue-a"])
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.serve_unix, sock_path)
        with trio.fail_after(10):
            status = await run_tail("venue-b", "--socket", sock_path)
        nursery.cancel_scope.cancel()
    assert status == 1
    assert capsys.readouterr().err == (
        "wirekeep: the daemon ended the stream: unknown session 'venue-b'; "
        "this daemon has: venue-a\n"
    )


async def test_tail_when_the_daemon_goes_away(
    sock_path: str, capsys: pytest.CaptureFixture[str]
) -> None:
    hub = ConsumerHub(["s"])
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.serve_unix, sock_path)
        result: list[int] = []
        finished = trio.Event()

        async def command() -> None:
            result.append(await run_tail("s", "--socket", sock_path))
            finished.set()

        nursery.start_soon(command)
        await subscribed(hub, "s")
        await hub.stop()
        with trio.fail_after(5):
            await finished.wait()
        nursery.cancel_scope.cancel()
    assert result == [1]
    assert capsys.readouterr().err.splitlines()[-1] == (
        "wirekeep: the daemon ended the stream: daemon stopping"
    )


def test_usage_and_unreachable_daemon(tmp_path: Path) -> None:
    args = parse("tail")
    with pytest.raises(CliError, match="name at least one session, or give --all") as usage:
        args.handler(args)
    assert usage.value.code == 2
    args = parse("tail", "s", "--socket", str(tmp_path / "nothing.sock"))
    with pytest.raises(CliError, match="cannot reach the daemon's consumer socket") as down:
        args.handler(args)
    assert down.value.code == 3
    config = tmp_path / "wirekeep.toml"
    config.write_text(f'[daemon]\ncontrol_socket = "{tmp_path}/control.sock"\n')
    args = parse("--config", str(config), "tail", "s")
    with pytest.raises(CliError, match=f"{tmp_path}/consumers.sock") as default:
        args.handler(args)
    assert default.value.code == 3
