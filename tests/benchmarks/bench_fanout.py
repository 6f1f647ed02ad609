"""Fan-out of one protobuf session to Unix-socket consumers, with baselines from the same run.

    python tests/benchmarks/bench_fanout.py [--json] [--quick] [--seconds 3] [--rounds 3]
                                            [--fanouts 1,10,100] [--rate 5000] [--no-pin]

Three kinds of process, so that nobody borrows the hub's core:

- the bundled venue (this file with ``--venue``): fast mode (as fast as it can, 256
  quotes per write) for throughput, or paced at ``--rate`` for latency (by 1 ms clock
  ticks: each write carries the quotes due, stamped as it is sent; see stream_ticks);
- the hub (this process): a real SessionRunner (the ProtobufAdapter, the session driver,
  an in-memory event sink) publishing to a real ConsumerHub and its Unix socket;
- the consumers (this file with ``--consumers``): plain blocking sockets in one selector
  loop, the protocol's framing to count what arrives, ConsumerFrame + venue Envelope +
  QuoteEvent decoding where latency is measured.

With two CPUs or more the hub is pinned to the first half and the venue and consumers to
the other half (``--no-pin``: the kernel places them).

Figures (each the median of ``--rounds`` rounds; rounds of different kinds interleaved):

- ``fanout_total_msgs_per_s_N``: Data frames delivered per second to N consumers
  together, venue in fast mode; ``fanout_per_consumer_msgs_per_s_N`` the median
  consumer's rate, ``fanout_min_consumer_msgs_per_s_N`` the slowest one's;
  ``upstream_msgs_per_s_N`` what the session received meanwhile (the hub's count);
  ``hub_cpu_us_per_delivered_msg_N`` the hub process's CPU time per delivered message;
  ``fanout_dropped_N`` messages the hub dropped for consumers that did not keep up (the
  most in a round). When consumers fall behind, what they read in a window includes
  backlog from before it: a consumer's rate can then exceed the upstream rate.
- ``added_latency_p50_ms_N`` / ``_p99_ms_N``: venue send (the quote's ``venue_time_ns``)
  to consumer receive, through wirekeep, with the venue paced at ``--rate`` messages/s;
  measured on every message of up to 3 consumers spread over the N (the others only
  count: decoding everything would make the consumer process the bottleneck).
  ``hub_latency_*_N``: from the session's receipt (the Data frame's ``received_at_ns``)
  to the consumer's: what the hub and the consumer socket add. Baseline, same run:
  ``direct_latency_*``, a client of the venue reading it directly (venue send to client
  receive, same decoding). ``added_latency_p50_ms`` / ``_p99_ms`` are the 10-consumer
  figures.
- ``slow_consumer_other_ratio``: one consumer reading at full speed while another one is
  subscribed and never reads (its queue overflows, wirekeep drops its oldest messages),
  divided by the same consumer's rate with no stalled consumer: the median over
  ``--pairs`` pairs of windows run back to back (order alternating). Also in hub CPU per
  delivered message, which the machine's swings do not move.

Every figure here comes from a two-CPU machine shared with whatever else runs:
``load_average_before`` / ``_after`` say how busy it was.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import logging
import os
import random
import resource
import selectors
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
import trio

THIS = os.path.abspath(__file__)

# -- the venue in its own process -------------------------------------------------------


class VenueProcess:
    """The bundled venue, protobuf only, in a child process; a context manager."""

    def __init__(self, cpus: set[int] | None, **config: object) -> None:
        argument = json.dumps({"cpus": sorted(cpus) if cpus else None, "venue": config})
        self.proc = subprocess.Popen(
            [sys.executable, THIS, "--venue", argument],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.close()
            raise RuntimeError("the venue process did not start")
        self.port: int = json.loads(line)["pb"][0]

    def __enter__(self) -> VenueProcess:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                self.proc.wait(timeout=10)


def venue_main(argument: str) -> int:
    settings = json.loads(argument)
    if settings["cpus"]:
        os.sched_setaffinity(0, settings["cpus"])
    quiet_logs()
    from daemon.venue import VenueConfig, run_venue

    tick = settings["venue"].pop("tick", None)
    config = VenueConfig(ws_ports=(), control_port=None, heartbeat_interval=None,
                         **settings["venue"])  # fmt: skip
    if tick:
        from daemon.venue import protobuf

        protobuf.stream_data = functools.partial(stream_ticks, tick=tick)  # type: ignore[assignment]

    async def serve() -> None:
        async with trio.open_nursery() as nursery:
            venue = await nursery.start(run_venue, config)
            print(json.dumps({"pb": venue.pb_ports}), flush=True)
            stdin = trio.lowlevel.FdStream(os.dup(0))
            while await stdin.receive_some(4096):
                pass
            nursery.cancel_scope.cancel()

    trio.run(serve)
    return 0


async def stream_ticks(hub: Any, conn: Any, emit: Any, *, tick: float) -> None:
    """The venue's pacing, by clock ticks: every ``tick`` seconds, the messages due.

    The bundled venue wakes once per message; at 5,000 messages/s on a busy two-CPU
    machine it falls behind its rate. This keeps the rate exact: each write carries the
    messages due since the last one (5 per millisecond at 5,000/s), each stamped with
    the moment it is sent, so the latency measured from ``venue_time_ns`` is real.
    """
    rate = float(hub.config.rate)
    with conn.ends_on_link_error():
        start, sent, k = trio.current_time(), 0, 0
        while True:
            k += 1
            await trio.sleep_until(start + k * tick)
            due = int((trio.current_time() - start) * rate) - sent
            if due > 0:
                await emit(due)
                sent += due


# -- the consumers in their own process ----------------------------------------------------

_LENGTH = struct.Struct(">I")
_DATA_TAG = 0x0A  # ConsumerFrame field 1 (data), length-delimited: the first byte of Data
#: How every Data frame of session "pb" begins: Data.session (field 1, "pb"), then the tag
#: of Data.seq (field 2, varint). Counting it with ``bytes.count`` (C speed) is what lets
#: one consumer process keep up with 100 sockets. A Gap of "pb" begins the same way
#: (session, then first_missing = field 2): gaps are counted by their cause text and
#: taken off. Inside a payload (a venue Envelope) the five bytes do not occur.
_DATA_START = b"\x0a\x02pb\x10"
_CAUSES = (b"consumer too slow", b"upstream reconnect")


@dataclass
class Reader:
    """One consumer connection as the consumer process sees it.

    Untracked readers count Data frames by their opening bytes; tracked ones walk the
    frames and decode each one for its latency.
    """

    sock: socket.socket
    tracked: bool
    tail: bytes = b""
    data: int = 0
    gaps: int = 0
    errors: list[str] = field(default_factory=list)
    added: list[int] = field(default_factory=list)  # ns: venue send -> receive
    hub: list[int] = field(default_factory=list)  # ns: wirekeep receipt -> receive

    def feed(self, chunk: bytes, now_ns: int, measuring: bool) -> None:
        if self.tracked:
            self._walk(chunk, now_ns, measuring)
            return
        # A pattern may be cut by the read: count over the last bytes of the previous
        # read too, and take off what lies wholly inside them (counted last time).
        view = self.tail + chunk
        data = view.count(_DATA_START) - self.tail.count(_DATA_START)
        gaps = sum(view.count(c) - self.tail.count(c) for c in _CAUSES)
        self.tail = view[-(len(_CAUSES[1]) - 1) :]
        if measuring:
            self.data += data - gaps
            self.gaps += gaps

    def _walk(self, chunk: bytes, now_ns: int, measuring: bool) -> None:
        view = self.tail + chunk if self.tail else chunk
        end = len(view)
        pos = 0
        unpack = _LENGTH.unpack_from
        data = 0
        while end - pos >= 4:
            (length,) = unpack(view, pos)
            stop = pos + 4 + length
            if stop > end:
                break
            if view[pos + 4] == _DATA_TAG:
                data += 1
                if measuring:
                    self._latency(view[pos + 4 : stop], now_ns)
            else:
                self._other(view[pos + 4 : stop], measuring)
            pos = stop
        self.tail = view[pos:]
        if measuring:
            self.data += data

    def _latency(self, frame: bytes, now_ns: int) -> None:
        from protocol.consumer_pb2 import ConsumerFrame
        from protocol.venue_pb2 import Envelope, QuoteEvent

        d = ConsumerFrame.FromString(frame).data
        quote = QuoteEvent.FromString(Envelope.FromString(d.payload).payload)
        self.added.append(now_ns - quote.venue_time_ns)
        self.hub.append(now_ns - d.received_at_ns)

    def _other(self, frame: bytes, measuring: bool) -> None:
        from protocol.consumer_pb2 import ConsumerFrame

        parsed = ConsumerFrame.FromString(frame)
        which = parsed.WhichOneof("frame")
        if which == "gap" and measuring:
            self.gaps += 1
        elif which == "error":
            self.errors.append(parsed.error.message)


def consumers_main(argument: str) -> int:
    """Connect, subscribe, wait for data on every reader, measure, print one JSON line."""
    settings = json.loads(argument)
    if settings["cpus"]:
        os.sched_setaffinity(0, settings["cpus"])
    from protocol.consumer_codec import encode_request
    from protocol.consumer_pb2 import ConsumerRequest, Subscribe

    request = encode_request(ConsumerRequest(subscribe=Subscribe(sessions=["pb"])))
    n, stalled, track = settings["consumers"], settings["stalled"], settings["track"]
    tracked = set(range(0, n, max(1, n // track))) if track else set()
    stalled_socks = []
    for _ in range(stalled):  # subscribed, never read
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(settings["path"])
        s.sendall(request)
        stalled_socks.append(s)
    readers = []
    selector = selectors.DefaultSelector()
    for i in range(n):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(settings["path"])
        s.sendall(request)
        s.setblocking(False)
        reader = Reader(s, i in tracked)
        readers.append(reader)
        selector.register(s, selectors.EVENT_READ, reader)

    def pump(until: float, measuring: bool) -> None:
        while time.monotonic() < until:
            for key, _ in selector.select(timeout=0.05):
                reader: Reader = key.data
                try:
                    chunk = reader.sock.recv(1 << 20)
                except BlockingIOError:
                    continue
                if not chunk:
                    raise RuntimeError(f"the hub closed a consumer: {reader.errors}")
                reader.feed(chunk, time.time_ns(), measuring)

    # Warm up until every reader has data flowing, then measure.
    pump(time.monotonic() + settings["warmup"], measuring=False)
    for reader in readers:
        reader.data = 0
    print("measuring", flush=True)
    started = time.monotonic()
    pump(started + settings["seconds"], measuring=True)
    seconds = time.monotonic() - started
    print("done", flush=True)
    rates = sorted(r.data / seconds for r in readers)
    added = [x for r in readers for x in r.added]
    hub = [x for r in readers for x in r.hub]
    print(json.dumps({
        "seconds": seconds,
        "rates": rates,
        "gaps": sum(r.gaps for r in readers),
        "errors": [e for r in readers for e in r.errors],
        "added": percentiles(added),
        "hub": percentiles(hub),
        "samples": len(added),
    }), flush=True)  # fmt: skip
    for s in stalled_socks:
        s.close()
    return 0


def direct_main(argument: str) -> int:
    """The latency baseline: one client of the paced venue, no wirekeep in between."""
    settings = json.loads(argument)
    if settings["cpus"]:
        os.sched_setaffinity(0, settings["cpus"])
    from protocol.framing import FrameDecoder
    from protocol.venue_codec import encode
    from protocol.venue_pb2 import QUOTE_EVENT, SUBSCRIBE_REQ, Envelope, QuoteEvent, SubscribeReq

    with socket.create_connection(("127.0.0.1", settings["port"])) as sock:
        sock.sendall(encode(SUBSCRIBE_REQ, SubscribeReq(symbols=["EURUSD"])))
        decoder = FrameDecoder(1 << 20)
        latencies: list[int] = []
        warm_until = time.monotonic() + settings["warmup"]
        end = warm_until + settings["seconds"]
        count = 0
        while (now := time.monotonic()) < end:
            chunk = sock.recv(1 << 20)
            now_ns = time.time_ns()
            decoder.feed(chunk)
            for frame in decoder.frames():
                envelope = Envelope.FromString(frame)
                if envelope.payload_type != QUOTE_EVENT or now < warm_until:
                    continue
                count += 1
                quote = QuoteEvent.FromString(envelope.payload)
                latencies.append(now_ns - quote.venue_time_ns)
    print(json.dumps({"latency": percentiles(latencies), "rate": count / settings["seconds"]}))
    return 0


def percentiles(samples_ns: list[int]) -> dict[str, float]:
    if not samples_ns:
        return {"p50_ms": float("nan"), "p99_ms": float("nan")}
    ordered = sorted(samples_ns)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1e6

    return {"p50_ms": at(0.50), "p99_ms": at(0.99)}


# -- the hub: this process --------------------------------------------------------------------


def quiet_logs() -> None:
    """Transition and connection logs would go to stdout: keep --json output clean."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))


def cpu_now() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class MemorySink:
    """The event log, in memory: the session fires only a handful of transitions."""

    async def append(self, record: object) -> None:
        await trio.lowlevel.checkpoint()


@dataclass
class Round:
    rates: list[float]
    seconds: float
    upstream: float
    hub_cpu_us_per_msg: float
    dropped: int  # by the hub, for any consumer, during the measured window
    added: dict[str, float]
    hub: dict[str, float]
    errors: list[str]


async def run_round(
    venue_port: int,
    consumers: int,
    *,
    seconds: float,
    warmup: float,
    stalled: int = 0,
    track: int = 0,
    cpus: set[int] | None,
) -> Round:
    """One hub with one session to the venue, and one consumer process reading it."""
    from daemon.adapters.net import adapter_for
    from daemon.config import parse_config
    from daemon.consumers import ConsumerHub
    from daemon.session import CommandKind, SessionClocks, SessionRunner
    from statemachines.policy import ConnectRateLimiter
    from statemachines.session import SessionMachine

    (session,) = parse_config(
        f"""
[[sessions]]
name = "pb"
kind = "protobuf"
url = "tcp://127.0.0.1:{venue_port}"
auth = {{ client_id = "bench", client_secret = "s", account_id = 1, access_token = "t" }}
subscribe = ["EURUSD"]
stale_after = 30.0
dead_after = 60.0
heartbeat_interval = 30.0
""".encode(),
        "bench.toml",
    ).sessions
    limiter = ConnectRateLimiter(session.connect_rate)
    hub = ConsumerHub(["pb"], queue_limit=10_000, max_lag=120.0)
    runner = SessionRunner(
        session,
        machine=SessionMachine(),
        sink=MemorySink(),
        adapter=adapter_for(session, {}),
        limiters=lambda _url: limiter,
        clocks=SessionClocks(
            wall=lambda: datetime.now(UTC), wall_ns=time.time_ns, uniform=random.random
        ),
        publisher=hub,
    )
    with tempfile.TemporaryDirectory(prefix="wk-fanout-") as tmp:
        path = str(Path(tmp) / "c.sock")
        argument = {
            "path": path, "consumers": consumers, "stalled": stalled, "track": track,
            "seconds": seconds, "warmup": warmup, "cpus": sorted(cpus) if cpus else None,
        }  # fmt: skip
        async with trio.open_nursery() as nursery:
            await nursery.start(hub.serve_unix, path)
            await nursery.start(runner.run)
            # As the daemon does once everything is started (daemon/app.py).
            gc.collect()
            gc.freeze()
            process = await trio.lowlevel.open_process(
                [sys.executable, THIS, "--consumers", json.dumps(argument)],
                stdout=subprocess.PIPE,
            )
            assert process.stdout is not None
            lines = _lines(process.stdout)
            assert await anext(lines) == "measuring"
            cpu0, messages0, t0 = cpu_now(), runner.messages, time.monotonic()
            dropped0 = hub.stats.messages_dropped
            assert await anext(lines) == "done"
            cpu1, messages1, t1 = cpu_now(), runner.messages, time.monotonic()
            dropped1 = hub.stats.messages_dropped
            result = json.loads(await anext(lines))
            await process.wait()
            with trio.move_on_after(5):
                await runner.command(CommandKind.SHUTDOWN, "benchmark over")
            nursery.cancel_scope.cancel()
    delivered = sum(result["rates"]) * result["seconds"]
    return Round(
        rates=result["rates"],
        seconds=result["seconds"],
        upstream=(messages1 - messages0) / (t1 - t0),
        hub_cpu_us_per_msg=(cpu1 - cpu0) / max(delivered, 1) * 1e6,
        dropped=dropped1 - dropped0,
        added=result["added"],
        hub=result["hub"],
        errors=result["errors"],
    )


async def _lines(stream: trio.abc.ReceiveStream):  # type: ignore[no-untyped-def]
    buffer = b""
    while True:
        while b"\n" not in buffer:
            chunk = await stream.receive_some(65536)
            if not chunk:
                raise RuntimeError("the consumer process ended early")
            buffer += chunk
        line, _, buffer = buffer.partition(b"\n")
        yield line.decode()


def direct_round(port: int, *, seconds: float, warmup: float, cpus: set[int] | None) -> dict:
    argument = {"port": port, "seconds": seconds, "warmup": warmup,
                "cpus": sorted(cpus) if cpus else None}  # fmt: skip
    out = subprocess.run(
        [sys.executable, THIS, "--direct", json.dumps(argument)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    result: dict = json.loads(out.stdout.splitlines()[-1])
    return result


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def split_cpus(pin: bool) -> tuple[set[int] | None, set[int] | None]:
    """(the hub's CPUs, everyone else's): halves, when there are two or more."""
    cpus = sorted(os.sched_getaffinity(0))
    if not pin or len(cpus) < 2:
        return None, None
    return set(cpus[: len(cpus) // 2]), set(cpus[len(cpus) // 2 :])


def bench_fanout(args: argparse.Namespace, cpus: set[int] | None) -> dict[str, object]:
    """Throughput and the slow-consumer ratio: the venue as fast as it can go."""
    fanouts = [int(x) for x in args.fanouts.split(",")]
    common = {"seconds": args.seconds, "warmup": args.warmup, "cpus": cpus}
    results: dict[str, object] = {}
    with VenueProcess(cpus, rate=None, batch_size=256) as venue:
        fan: dict[int, list[Round]] = {n: [] for n in fanouts}
        alone: list[float] = []
        beside: list[float] = []
        stalled_dropped: list[int] = []
        cpu_alone: list[float] = []
        cpu_beside: list[float] = []
        for round_number in range(args.rounds):
            if "fanout" in args.only:
                order = fanouts if round_number % 2 == 0 else fanouts[::-1]
                for n in order:
                    fan[n].append(trio.run(lambda n=n: run_round(venue.port, n, **common)))
        for pair_number in range(args.pairs if "slow" in args.only else 0):
            # Each pair back to back, in alternating order: the machine's drift cancels.
            pair = [False, True] if pair_number % 2 == 0 else [True, False]
            for stalled in pair:
                r = trio.run(lambda s=stalled: run_round(venue.port, 1, stalled=s, **common))
                (beside if stalled else alone).append(r.rates[0])
                (cpu_beside if stalled else cpu_alone).append(r.hub_cpu_us_per_msg)
                if stalled:
                    stalled_dropped.append(r.dropped)
    if "fanout" in args.only:
        for n, rounds in fan.items():
            results |= {
                f"fanout_total_msgs_per_s_{n}": round(median([sum(r.rates) for r in rounds])),
                f"fanout_per_consumer_msgs_per_s_{n}": round(
                    median([statistics.median(r.rates) for r in rounds])
                ),
                f"fanout_min_consumer_msgs_per_s_{n}": round(
                    median([min(r.rates) for r in rounds])
                ),
                f"upstream_msgs_per_s_{n}": round(median([r.upstream for r in rounds])),
                f"hub_cpu_us_per_delivered_msg_{n}": round(
                    median([r.hub_cpu_us_per_msg for r in rounds]), 3
                ),
                f"fanout_dropped_{n}": max(r.dropped for r in rounds),
            }
    if "slow" in args.only:
        ratios = [b / a for a, b in zip(alone, beside, strict=True)]
        results |= {
            "slow_consumer_alone_msgs_per_s": round(median(alone)),
            "slow_consumer_beside_stalled_msgs_per_s": round(median(beside)),
            # The median of the pairs' ratios: each pair ran back to back.
            "slow_consumer_other_ratio": round(median(ratios), 3),
            "slow_consumer_pair_ratios": [round(r, 3) for r in ratios],
            "slow_consumer_stalled_dropped_per_round": round(median(stalled_dropped)),
            # The same comparison in hub CPU per delivered message (immune to the
            # machine's swings): what serving the stalled consumer costs the hub.
            "slow_consumer_hub_cpu_us_per_msg_alone": round(median(cpu_alone), 3),
            "slow_consumer_hub_cpu_us_per_msg_beside_stalled": round(median(cpu_beside), 3),
        }
    return results


def bench_latency(args: argparse.Namespace, cpus: set[int] | None) -> dict[str, object]:
    """Latency: the venue paced at a fixed rate; a direct client of it as the baseline."""
    fanouts = [int(x) for x in args.fanouts.split(",")]
    common = {"seconds": args.seconds, "warmup": args.warmup, "cpus": cpus}
    results: dict[str, object] = {}
    with VenueProcess(cpus, rate=float(args.rate), tick=0.001) as venue:
        lat: dict[int, list[Round]] = {n: [] for n in fanouts}
        direct: list[dict] = []
        for round_number in range(args.rounds):
            direct.append(direct_round(venue.port, **common))
            for n in fanouts if round_number % 2 == 0 else fanouts[::-1]:
                run = functools.partial(run_round, venue.port, n, track=min(n, 3), **common)
                lat[n].append(trio.run(run))
    results["latency_rate_msgs_per_s"] = round(median([d["rate"] for d in direct]))
    for key in ("p50_ms", "p99_ms"):
        results[f"direct_latency_{key}"] = round(median([d["latency"][key] for d in direct]), 3)
    for n, rounds in lat.items():
        for key in ("p50_ms", "p99_ms"):
            results[f"added_latency_{key}_{n}"] = round(median([r.added[key] for r in rounds]), 3)
            results[f"hub_latency_{key}_{n}"] = round(median([r.hub[key] for r in rounds]), 3)
    headline = 10 if 10 in lat else fanouts[-1]
    results["added_latency_p50_ms"] = results[f"added_latency_p50_ms_{headline}"]
    results["added_latency_p99_ms"] = results[f"added_latency_p99_ms_{headline}"]
    return results


def load_average() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true", help="1 round of 1.5 s")
    parser.add_argument("--seconds", type=float, default=3.0, help="measured seconds per round")
    parser.add_argument("--warmup", type=float, default=0.5, help="seconds before measuring")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=7, help="stalled/not-stalled pairs")
    parser.add_argument("--fanouts", default="1,10,100")
    parser.add_argument("--rate", type=int, default=5000, help="messages/s for the latency")
    parser.add_argument("--no-pin", action="store_true", help="let the kernel place processes")
    parser.add_argument(
        "--only", default="fanout,slow,latency", help="which parts (default: all three)"
    )
    parser.add_argument("--venue", help=argparse.SUPPRESS)
    parser.add_argument("--consumers", help=argparse.SUPPRESS)
    parser.add_argument("--direct", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.venue:
        return venue_main(args.venue)
    if args.consumers:
        return consumers_main(args.consumers)
    if args.direct:
        return direct_main(args.direct)
    if args.quick:
        args.rounds, args.pairs, args.seconds = 1, 1, 1.5
    quiet_logs()
    hub_cpus, other_cpus = split_cpus(not args.no_pin)
    if hub_cpus:
        os.sched_setaffinity(0, hub_cpus)
    results: dict[str, object] = {
        "machine": f"{os.cpu_count()} cpu, python {sys.version.split()[0]}",
        "pinned": bool(hub_cpus),
        "load_average_before": load_average(),
        "seconds_per_round": args.seconds,
        "rounds": args.rounds,
    }
    if "fanout" in args.only or "slow" in args.only:
        results |= bench_fanout(args, other_cpus)
    if "latency" in args.only:
        results |= bench_latency(args, other_cpus)
    results["load_average_after"] = load_average()
    if args.json:
        print(json.dumps(results))
    else:
        width = max(map(len, results))
        for key, value in results.items():
            print(f"{key:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
