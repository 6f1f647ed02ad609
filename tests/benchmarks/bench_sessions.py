"""Many sessions on one in-process daemon: start-up time, memory and idle CPU per session.

    python tests/benchmarks/bench_sessions.py [--json] [--quick] [--sessions 10000]
        [--ports 20] [--per-host 500] [--window 1.0] [--rate 0.1] [--venue-heartbeat 10]
        [--timeout 10] [--idle-seconds 10] [--no-baseline] [-v]

One :class:`~daemon.app.Daemon` (the real one: config, SQLite file in a temporary
directory, the threaded group-commit writer, one task per session, logs rendered as JSON
into /dev/null) runs ``--sessions`` protobuf sessions against the bundled venue in a
separate process (``bench_relay.VenueProcess``, pinned to another CPU than the daemon),
spread over ``--ports`` loopback ports: the connect budget is per host:port
(``connect_rate = {per_host, window}`` in [defaults]), so 20 ports at 500 per 1 s let
10,000 sessions connect in the first second. RLIMIT_NOFILE is raised to the hard limit in
every process; below 2 x sessions the benchmark reports an error instead of running.

The venue sends ``--rate`` quotes per second per connection and a heartbeat every
``--venue-heartbeat`` seconds: 0.1 and 10 s by default (2,000 messages/s for 10,000
sessions). At 0.2 and 5 s the venue process needs most of a core for 10,000 connections on
this machine and falls behind (sessions go STALE), which measures the venue, not us.

- ``all_streaming_s``: from ``Daemon.run`` starting to every session in STREAMING. A
  session is STREAMING at its first message after subscribing, which the venue sends up
  to min(1/rate, heartbeat) later: ``all_subscribed_s`` (every session AUTHENTICATED or
  further) is the daemon's part. ``startup_cpu_to_subscribed_s`` and
  ``venue_cpu_to_subscribed_s``: CPU time each process spent until then.
- ``rss_per_session_kb``: (VmRSS with every session streaming, after the idle window
  - VmRSS of the same process before the daemon starts) / sessions. The baseline is
  taken after migrating a scratch database, so what the daemon imports lazily (Alembic,
  its scripts, the SQLite dialect) does not count as per-session memory.
- ``idle_cpu_percent``: user+system CPU time of this process (getrusage) over
  ``--idle-seconds`` of steady streaming (one venue period: arrivals come in waves), in
  percent of one core.
- ``events_written``, ``transitions_per_session``: what the writer had committed 2 s
  after every session streamed (4 each: start, connected, authenticated, data; more when
  sessions were throttled or failed); ``events_written_total`` adds the shutdown.
- Baseline, same run, after the daemon stopped (``bare_*``): as many plain Trio readers
  of the same venue in a process of their own on the daemon's CPU (``open_tcp_stream``,
  a SubscribeReq, ``receive_some`` + ``FrameDecoder``, a heartbeat task each): their idle
  CPU and memory per connection. ``idle_cpu_ratio_bare_to_ours`` = bare / ours.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import trio
from bench_relay import VenueProcess, cpu_now, raise_nofile, split_cpus

from daemon import logs, migrate
from daemon.adapters.net import adapter_for
from daemon.app import Daemon
from daemon.config import Config, parse_config
from daemon.session import SessionRunner
from daemon.store import EventStore
from statemachines.session import State

SUBSCRIBED = frozenset({State.AUTHENTICATED, State.STREAMING, State.STALE})


@dataclass(frozen=True)
class Settings:
    sessions: int
    ports: int
    per_host: int
    window: float
    rate: float
    venue_heartbeat: float
    timeout: float
    idle_seconds: float
    give_up_s: float
    verbose: bool


def vm_rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def build_config(settings: Settings, ports: list[int], directory: Path) -> Config:
    lines = [
        "[daemon]",
        f'database = "sqlite:///{directory / "events.db"}"',
        f'control_socket = "{directory / "control.sock"}"',
        "",
        "[defaults]",
        'kind = "protobuf"',
        'auth = { client_id = "bench", client_secret = "s", account_id = 1, access_token = "t" }',
        'subscribe = ["EURUSD"]',
        "heartbeat_interval = 10.0",
        f"connect_timeout = {settings.timeout}",
        f"auth_timeout = {settings.timeout}",
        # The longest silence is min(1/rate, the venue's heartbeat interval): no STALE.
        f"stale_after = {3 * settings.venue_heartbeat}",
        f"dead_after = {12 * settings.venue_heartbeat}",
        f"connect_rate = {{ per_host = {settings.per_host}, window = {settings.window} }}",
        "",
    ]
    for i in range(settings.sessions):
        port = ports[i % len(ports)]
        lines += ["[[sessions]]", f'name = "s{i:05d}"', f'url = "tcp://127.0.0.1:{port}"', ""]
    return parse_config("\n".join(lines).encode(), str(directory / "bench.toml"))


def warm_up(directory: Path) -> None:
    """Load what the daemon imports lazily (Alembic, its scripts, the SQLite dialect)."""
    store = EventStore(f"sqlite:///{directory / 'warmup.db'}")
    migrate.upgrade(store.engine)
    store.close()


def state_counts(runners: list[SessionRunner]) -> dict[str, int]:
    return dict(Counter(runner.model.state.name for runner in runners).most_common())


class Phase:
    """Wall and CPU time (this process and the venue's) since the phase began."""

    def __init__(self, venue: VenueProcess) -> None:
        self.venue = venue
        self.wall, self.cpu, self.venue_cpu = time.perf_counter(), cpu_now(), venue.cpu_seconds()

    def elapsed(self) -> tuple[float, float, float]:
        return (
            time.perf_counter() - self.wall,
            cpu_now() - self.cpu,
            self.venue.cpu_seconds() - self.venue_cpu,
        )


async def run_daemon(
    daemon: Daemon, settings: Settings, venue: VenueProcess, out: dict[str, object]
) -> None:
    async with trio.open_nursery() as nursery:
        phase = Phase(venue)
        started = trio.Event()

        async def start() -> None:
            await nursery.start(daemon.run)
            out["all_tasks_started_s"] = round(phase.elapsed()[0], 2)
            started.set()

        nursery.start_soon(start)
        subscribed: tuple[float, float, float] | None = None
        next_report = 0.0
        while True:
            runners = list(daemon.sessions.values())
            states = [runner.model.state for runner in runners]
            if (
                started.is_set()
                and subscribed is None
                and all(state in SUBSCRIBED for state in states)
            ):
                subscribed = phase.elapsed()
            if started.is_set() and all(state is State.STREAMING for state in states):
                break
            wall, cpu, venue_cpu = phase.elapsed()
            if settings.verbose and wall >= next_report:
                next_report = wall + 2.0
                print(f"{wall:6.1f} s  cpu {cpu:5.1f} s  venue cpu {venue_cpu:5.1f} s  "
                      f"{state_counts(runners)}", file=sys.stderr)  # fmt: skip
            if wall > settings.give_up_s:
                out["error"] = (
                    f"not every session streaming after {settings.give_up_s:.0f} s: "
                    f"{state_counts(runners)}"
                )
                break
            await trio.sleep(0.1)
        wall, cpu, venue_cpu = phase.elapsed()
        out["all_streaming_s"] = round(wall, 2)
        out["all_subscribed_s"] = round(subscribed[0], 2) if subscribed else None
        out["startup_cpu_s"] = round(cpu, 2)
        out["venue_startup_cpu_s"] = round(venue_cpu, 2)
        if subscribed:
            out["startup_cpu_to_subscribed_s"] = round(subscribed[1], 2)
            out["venue_cpu_to_subscribed_s"] = round(subscribed[2], 2)
        out["rss_at_all_streaming_kb"] = vm_rss_kb()
        # The last DATA transitions are shown (model state) before their COMMIT returns:
        # let the writer catch up, and the start-up burst settle.
        await trio.sleep(2.0)
        assert daemon.writer is not None
        stats = daemon.writer.stats
        out["events_written"] = stats.events_written
        out["writer_commits"] = stats.batches
        out["writer_mean_commit_ms"] = round(
            stats.commit_seconds_total / max(1, stats.batches) * 1000, 1
        )
        if "error" not in out:
            messages = sum(runner.messages for runner in runners)
            idle = Phase(venue)
            await trio.sleep(settings.idle_seconds)
            wall, cpu, venue_cpu = idle.elapsed()
            messages = sum(runner.messages for runner in runners) - messages
            out["idle_cpu_percent"] = round(cpu / wall * 100, 1)
            out["idle_messages_per_s"] = round(messages / wall)
            out["idle_cpu_us_per_message"] = round(cpu / max(1, messages) * 1e6, 1)
            out["venue_idle_cpu_percent"] = round(venue_cpu / wall * 100, 1)
            out["not_streaming_after_idle"] = sum(
                1 for runner in runners if runner.model.state is not State.STREAMING
            )
        out["rss_after_idle_kb"] = vm_rss_kb()
        stop = time.perf_counter()
        daemon.stop()
    out["shutdown_s"] = round(time.perf_counter() - stop, 2)
    out["events_written_total"] = daemon.writer.stats.events_written


# -- the baseline: bare Trio readers on as many connections, in a process of their own ---


def bare_child(argument: str) -> int:
    """``--bare-child``: N plain Trio readers of the same venue; prints one JSON line.

    Each connection: ``open_tcp_stream``, a SubscribeReq, then ``receive_some(65536)`` +
    ``FrameDecoder``, and a sibling task sending a heartbeat every ``heartbeat`` seconds,
    as a session does (no auth, no machine, no event log, no logs).
    """
    from protocol.framing import FrameDecoder
    from protocol.venue_codec import HEARTBEAT_FRAME, encode
    from protocol.venue_pb2 import SUBSCRIBE_REQ, SubscribeReq

    settings = json.loads(argument)
    if settings["cpus"]:
        os.sched_setaffinity(0, settings["cpus"])
    raise_nofile()
    n, ports = settings["sessions"], settings["ports"]
    subscribe = encode(SUBSCRIBE_REQ, SubscribeReq(symbols=["EURUSD"]), "bare")
    receiving = [0]
    received = [0]
    all_receiving = trio.Event()
    gc.collect()
    rss_before = vm_rss_kb()

    async def heartbeats(stream: trio.SocketStream) -> None:
        while True:
            await trio.sleep(settings["heartbeat"])
            await stream.send_all(HEARTBEAT_FRAME)

    async def connection(port: int, limiter: trio.CapacityLimiter) -> None:
        async with limiter:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(subscribe)
        decoder = FrameDecoder()
        frames = 0
        async with stream, trio.open_nursery() as nursery:
            nursery.start_soon(heartbeats, stream)
            while data := await stream.receive_some(65536):
                decoder.feed(data)
                new = len(decoder.frames())
                received[0] += new
                frames += new
                if frames >= 2 and frames - new < 2:  # the SubscribeRes, then data
                    receiving[0] += 1
                    if receiving[0] == n:
                        all_receiving.set()
            nursery.cancel_scope.cancel()

    async def run() -> dict[str, float]:
        async with trio.open_nursery() as nursery:
            limiter = trio.CapacityLimiter(200)
            start = time.perf_counter()
            for i in range(n):
                nursery.start_soon(connection, ports[i % len(ports)], limiter)
            await all_receiving.wait()
            receiving_s = time.perf_counter() - start
            gc.collect()
            gc.freeze()
            await trio.sleep(2.0)
            messages, cpu, wall = received[0], cpu_now(), time.perf_counter()
            await trio.sleep(settings["idle_seconds"])
            cpu, wall = cpu_now() - cpu, time.perf_counter() - wall
            result = {
                "all_receiving_s": receiving_s,
                "idle_cpu_percent": cpu / wall * 100,
                "idle_messages_per_s": (received[0] - messages) / wall,
                "rss_per_connection_kb": (vm_rss_kb() - rss_before) / n,
            }
            nursery.cancel_scope.cancel()
        return result

    print(json.dumps(trio.run(run)), flush=True)
    return 0


def run_bare(settings: Settings, venue: VenueProcess, cpus: set[int] | None) -> dict[str, float]:
    argument = {
        "cpus": sorted(cpus) if cpus else None,
        "sessions": settings.sessions,
        "ports": venue.pb_ports,
        "heartbeat": 10.0,
        "idle_seconds": settings.idle_seconds,
    }
    done = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--bare-child", json.dumps(argument)],
        capture_output=True,
        text=True,
        check=True,
        timeout=settings.give_up_s + 60,
    )
    result: dict[str, float] = json.loads(done.stdout)
    return result


def measure(
    settings: Settings, venue: VenueProcess, directory: Path, log_stream: TextIO
) -> dict[str, object]:
    logs.configure("json", stream=log_stream)
    warm_up(directory)
    gc.collect()
    rss_before = vm_rss_kb()
    start = time.perf_counter()
    config = build_config(settings, venue.pb_ports, directory)
    config_s = time.perf_counter() - start
    rss_config = vm_rss_kb()
    daemon = Daemon(
        config=config,
        secrets={},
        database_url=config.daemon.database,
        adapter_factory=adapter_for,
    )
    out: dict[str, object] = {}
    trio.run(run_daemon, daemon, settings, venue, out)
    n = settings.sessions
    rss_streaming = int(str(out.pop("rss_after_idle_kb")))
    rss_at_streaming = int(str(out.pop("rss_at_all_streaming_kb")))
    events = int(str(out["events_written"]))
    head = {
        key: out.pop(key) for key in ("error", "all_streaming_s", "all_subscribed_s") if key in out
    }
    return {
        **head,
        "rss_per_session_kb": round((rss_streaming - rss_before) / n, 1),
        "rss_per_session_kb_at_all_streaming": round((rss_at_streaming - rss_before) / n, 1),
        "rss_config_per_session_kb": round((rss_config - rss_before) / n, 1),
        "rss_before_mb": round(rss_before / 1024, 1),
        "rss_streaming_mb": round(rss_streaming / 1024, 1),
        "idle_cpu_percent": out.pop("idle_cpu_percent", None),
        "events_written": events,
        "transitions_per_session": round(events / n, 2),
        "config_parse_s": round(config_s, 2),
        **out,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true", help="1,000 sessions")
    parser.add_argument("--sessions", type=int, default=None)
    parser.add_argument("--ports", type=int, default=20, help="venue protobuf ports")
    parser.add_argument("--per-host", type=int, default=500, help="connect_rate.per_host")
    parser.add_argument("--window", type=float, default=1.0, help="connect_rate.window (s)")
    parser.add_argument("--rate", type=float, default=0.1, help="venue msgs/s per connection")
    parser.add_argument("--venue-heartbeat", type=float, default=10.0, help="seconds")
    parser.add_argument(
        "--timeout", type=float, default=10.0, help="connect_timeout and auth_timeout (s)"
    )
    parser.add_argument("--idle-seconds", type=float, default=None)
    parser.add_argument("--give-up", type=float, default=300.0, help="seconds to all streaming")
    parser.add_argument("--no-pin", action="store_true", help="do not split the CPUs")
    parser.add_argument("--log", type=Path, default=None, help="daemon log file (/dev/null)")
    parser.add_argument("-v", "--verbose", action="store_true", help="progress on stderr")
    parser.add_argument("--no-baseline", action="store_true", help="skip the bare readers")
    parser.add_argument("--bare-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_child:
        return bare_child(args.bare_child)
    settings = Settings(
        sessions=args.sessions or (1000 if args.quick else 10_000),
        ports=args.ports,
        per_host=args.per_host,
        window=args.window,
        rate=args.rate,
        venue_heartbeat=args.venue_heartbeat,
        timeout=args.timeout,
        idle_seconds=args.idle_seconds or 10.0,
        give_up_s=args.give_up,
        verbose=args.verbose,
    )
    results: dict[str, object] = {
        "machine": f"{os.cpu_count()} cpu, python {sys.version.split()[0]}",
        "sessions": settings.sessions,
        "loadavg_before": os.getloadavg()[0],
    }
    soft, hard = raise_nofile()
    results["nofile"] = soft
    needed = 2 * settings.sessions
    if soft < needed:
        results["error"] = (
            f"RLIMIT_NOFILE hard limit {hard} is below 2 x sessions ({needed}): raise it "
            "(ulimit -Hn, LimitNOFILE=) or run fewer --sessions"
        )
    ours_cpus, venue_cpus = split_cpus(not args.no_pin)
    if ours_cpus:
        os.sched_setaffinity(0, ours_cpus)
    results["cpus"] = {"daemon": sorted(ours_cpus or []), "venue": sorted(venue_cpus or [])}

    if "error" not in results:
        with (
            VenueProcess(
                venue_cpus, pb_ports=[0] * settings.ports, ws_ports=[], control_port=None,
                rate=settings.rate, heartbeat_interval=settings.venue_heartbeat,
            ) as venue,
            tempfile.TemporaryDirectory(prefix="wirekeep-bench-") as tmp,
            open(args.log or os.devnull, "w") as log_stream,
        ):  # fmt: skip
            if venue.nofile < needed:
                results["error"] = f"the venue's RLIMIT_NOFILE {venue.nofile} < {needed}"
            else:
                results.update(measure(settings, venue, Path(tmp), log_stream))
                if not args.no_baseline and "error" not in results:
                    bare = run_bare(settings, venue, ours_cpus)
                    results["bare_all_receiving_s"] = round(bare["all_receiving_s"], 2)
                    results["bare_idle_cpu_percent"] = round(bare["idle_cpu_percent"], 1)
                    results["bare_idle_messages_per_s"] = round(bare["idle_messages_per_s"])
                    results["bare_rss_per_connection_kb"] = round(bare["rss_per_connection_kb"], 1)
                    idle = results.get("idle_cpu_percent")
                    if isinstance(idle, float) and idle > 0:
                        results["idle_cpu_ratio_bare_to_ours"] = round(
                            bare["idle_cpu_percent"] / idle, 3
                        )
        results["venue"] = {
            "ports": settings.ports,
            "rate_per_connection": settings.rate,
            "heartbeat_interval": settings.venue_heartbeat,
        }
        results["session_settings"] = {
            "connect_rate": {"per_host": settings.per_host, "window": settings.window},
            "connect_timeout": settings.timeout,
            "auth_timeout": settings.timeout,
            "stale_after": 3 * settings.venue_heartbeat,
        }
    results["loadavg_after"] = os.getloadavg()[0]

    if args.json:
        print(json.dumps(results))
    else:
        width = max(map(len, results))
        for key, value in results.items():
            print(f"{key:<{width}}  {value}")
    return 1 if "error" in results else 0


if __name__ == "__main__":
    sys.exit(main())
