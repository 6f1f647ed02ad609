"""/metrics and /health (daemon/metrics.py), served by the in-process daemon."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import trio
from controlkit import Running, running_daemon, wait_until

from daemon.metrics import BatchHistogram, Tally
from daemon.writer import WriterStats
from statemachines.session import TransitionRecord

LOOPBACK = {"metrics_listen": "127.0.0.1:0"}
SERIES = re.compile(r'^([a-z_]+)(\{[a-z_]+="[^"]*"(?:,[a-z_]+="[^"]*")*\})? (\S+)$')


async def get(r: Running, target: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    assert r.daemon.metrics is not None
    address = r.daemon.metrics.addresses[0]
    stream = await trio.open_tcp_stream(address.host, address.port)
    async with stream:
        await stream.send_all(f"{method} {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        return parse_response(await read_all(stream))


async def raw(r: Running, data: bytes) -> bytes:
    assert r.daemon.metrics is not None
    address = r.daemon.metrics.addresses[0]
    stream = await trio.open_tcp_stream(address.host, address.port)
    async with stream:
        await stream.send_all(data)
        return await read_all(stream)


async def read_all(stream: trio.abc.ReceiveStream) -> bytes:
    data = b""
    with trio.fail_after(10):
        while chunk := await stream.receive_some(65536):
            data += chunk
    return data


def parse_response(data: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = dict(line.split(": ", 1) for line in lines[1:])
    assert int(headers["Content-Length"]) == len(body) or not body
    return status, headers, body


def samples(text: str) -> dict[str, float]:
    """Every sample line -> value; checks the text format and that no series repeats."""
    out: dict[str, float] = {}
    types: dict[str, str] = {}
    for line in text.splitlines():
        if not line:
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            types[name] = kind
            continue
        if line.startswith("# HELP "):
            continue
        match = SERIES.match(line)
        assert match, f"not a sample line: {line!r}"
        key = match[1] + (match[2] or "")
        assert key not in out, f"series twice: {key}"
        family = re.sub(r"_(bucket|sum|count)$", "", match[1])
        assert family in types or match[1] in types, f"no TYPE for {key}"
        out[key] = float(match[3])
    return out


def by_label(values: Mapping[str, float], name: str) -> dict[str, float]:
    return {k: v for k, v in values.items() if k.startswith(name + "{")}


async def test_metrics_text(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, ["a", "b"], daemon_keys=LOOPBACK) as r:
        await r.streaming()
        await r.call({"id": "1", "pause": {"sessions": ["b"]}})
        await r.call({"id": "2", "status": {}})
        await trio.sleep(0.3)
        status, headers, body = await get(r, "/metrics")
        assert status == 200
        assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        values = samples(body.decode())
        again = samples((await get(r, "/metrics"))[2].decode())
    assert set(values) == set(again)  # bounded: the same series, scrape after scrape
    version = r.daemon.control.version if r.daemon.control else ""
    assert any(k.startswith(f'wirekeep_build_info{{version="{version}"') for k in values)
    assert values['wirekeep_sessions{state="STREAMING"}'] == 1
    assert values['wirekeep_sessions{state="PAUSED"}'] == 1
    assert values['wirekeep_sessions{state="BACKOFF"}'] == 0
    # Both streaming or paused: no attempt holds or waits for a handshake slot.
    assert values["wirekeep_handshakes_in_flight"] == 0
    assert values["wirekeep_handshakes_queued"] == 0
    assert values["wirekeep_handshakes_max"] == 256
    assert values['wirekeep_session_state{session="a",state="STREAMING"}'] == 1
    assert values['wirekeep_session_state{session="a",state="PAUSED"}'] == 0
    assert values['wirekeep_session_state{session="b",state="PAUSED"}'] == 1
    assert len(by_label(values, "wirekeep_session_state")) == 2 * 8
    assert values['wirekeep_transitions_total{source="DISCONNECTED",dest="CONNECTING"}'] == 2
    assert values['wirekeep_transitions_total{source="STREAMING",dest="PAUSED"}'] == 1
    assert values['wirekeep_session_attempts_total{session="a"}'] == 1
    assert values['wirekeep_session_throttled_total{session="a"}'] == 0
    assert values['wirekeep_session_breaker{session="a",state="closed"}'] == 1
    assert values['wirekeep_session_messages_total{session="a"}'] > 0
    assert 0 <= values['wirekeep_session_seconds_since_last_message{session="a"}'] < 2
    written = values["wirekeep_writer_events_written_total"]
    assert written >= 9
    assert values["wirekeep_writer_batch_size_sum"] == written
    assert (
        values['wirekeep_writer_batch_size_bucket{le="+Inf"}']
        == values["wirekeep_writer_batch_size_count"]
    )
    assert values["wirekeep_writer_commit_seconds_count"] >= 1
    assert values['wirekeep_control_requests_total{command="pause",outcome="ok"}'] == 1
    assert not any("EURUSD" in k for k in values)  # nothing is labelled per message


async def test_health(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, ["a", "b"], daemon_keys=LOOPBACK) as r:
        await r.streaming()
        status, headers, body = await get(r, "/health")
        assert (status, headers["Content-Type"]) == (200, "application/json")
        assert json.loads(body) == {
            "status": "ok", "sessions": 2, "streaming": 2, "paused": [], "not_streaming": {},
        }  # fmt: skip

        # A paused session is not expected to be live: the daemon stays healthy.
        await r.call({"id": "1", "pause": {"sessions": ["b"]}})
        status, _, body = await get(r, "/health")
        assert status == 200
        assert json.loads(body)["paused"] == ["b"]
        status, _, body = await get(r, "/health?session=b")
        assert status == 503
        assert json.loads(body)["state"] == "PAUSED"
        status, _, body = await get(r, "/health?session=a")
        assert (status, json.loads(body)["state"]) == (200, "STREAMING")
        assert (await get(r, "/health?session=nosuch"))[0] == 404

        # A session that cannot stream makes the daemon unhealthy, by name.
        r.venue.fault("reject_auth", seconds=30)
        await r.call({"id": "2", "reconnect": {"sessions": ["a"]}})
        await wait_until(lambda: r.states()["a"] != "STREAMING", "a to leave STREAMING")
        status, _, body = await get(r, "/health")
        assert status == 503
        report = json.loads(body)
        assert report["status"] == "unhealthy"
        assert set(report["not_streaming"]) == {"a"}

        status, _, body = await get(r, "/health", "HEAD")
        assert (status, body) == (503, b"")


async def test_http_edges(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, ["a"], daemon_keys=LOOPBACK) as r:
        assert (await get(r, "/nosuch"))[0] == 404
        assert (await get(r, "/metrics", "POST"))[0] == 405
        assert parse_response(await raw(r, b"garbage\r\n\r\n"))[0] == 400
        assert parse_response(await raw(r, b"GET /" + b"x" * 10000))[0] == 431
        assert (await get(r, "/metrics"))[0] == 200  # still serving
        assert r.daemon.metrics is not None
        assert str(r.daemon.metrics.addresses[0]).startswith("127.0.0.1:")


def test_batch_histogram_reads_only_new_batches() -> None:
    stats = WriterStats()
    hist = BatchHistogram(buckets=(1, 10, 100))
    for size in (1, 5, 50, 500):
        stats.batches += 1
        stats.batch_sizes.append(size)
    hist.update(stats)
    hist.update(stats)  # nothing new
    assert (hist.counts, hist.count, hist.sum) == ([1, 2, 3], 4, 556)


def test_tally() -> None:
    from datetime import UTC, datetime

    tally = Tally()
    at = datetime.now(UTC)
    for trigger, source, dest in [
        ("start", "DISCONNECTED", "CONNECTING"),
        ("lost", "CONNECTING", "BACKOFF"),
        ("throttled", "BACKOFF", "BACKOFF"),
        ("retry", "BACKOFF", "CONNECTING"),
    ]:
        tally.count(TransitionRecord("s", 1, at, trigger, source, dest, ""))
    assert tally.attempts["s"] == 2
    assert tally.throttled["s"] == 1
    assert tally.transitions["BACKOFF", "BACKOFF"] == 1
