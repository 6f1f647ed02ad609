"""Relay throughput and half-open detection, each against a raw baseline in the same run.

    python tests/benchmarks/bench_relay.py [--json] [--quick] [--rounds 5]
        [--pb-messages 1000000] [--ws-messages 100000] [--pb-capacity-messages 2000000]
        [--ws-capacity-messages 100000] [--half-open-reps 3] [--only KIND] [--no-pin]

The bundled venue runs in a separate process (this file with ``--child``,
:class:`VenueProcess`), pinned to the other half of the CPUs (``--no-pin``: let the kernel
place both), so it never shares the relay's core. Rounds are interleaved (the order of
the clients rotates from round to round) and each figure is the median of its rounds
(``*_spread``: min and max); every round opens a new connection and the venue sends it
``count`` messages as fast as it can (``rate=None``), 256 per write.

- ``protobuf_relay_*``: a real :class:`~daemon.session.SessionRunner` (ProtobufAdapter,
  the session driver, a counting Publisher, an in-memory sink for its handful of
  transitions: not the threaded writer, which sees transitions only and is not on the data
  path). Messages handed to the publisher per second, from the first data batch to the
  last of ``--pb-messages``. Baseline (``protobuf_bare_*``): a bare Trio reader of the same
  venue (``open_tcp_stream``, a SubscribeReq, then ``receive_some(65536)`` +
  ``FrameDecoder`` feed/frames, counting frames).
- ``websocket_relay_*``: the same with a websocket SessionRunner (trio-websocket under the
  adapter). Baselines: a bare trio-websocket client (``open_websocket_url`` +
  ``get_message``), and ``websocket_wsproto_*``: a minimal wsproto client on a Trio stream
  (64 KiB reads, every event of a read drained, each text message classified and encoded
  as the adapter does).
- ``*_cpu_us_per_msg``: CPU time of this process per message over the same span (the
  venue's is in its own process); ``*_venue_cpu_percent_*``: the venue's CPU meanwhile.
  The bundled venue builds every message as it sends it, so it is often the bottleneck
  (near 100 %): the ratio then says little about our overhead, the CPU figures do.
- ``*_capacity_*``: the same clients against a replay sender in the venue process (the
  venue's handshake, then the venue's own encoding of the same messages, built once and
  written in 64 KiB chunks): what each client can read when the sender is not the limit.
- ``half_open_*``: a protobuf session (stale_after 1 s, dead_after 3 s) streaming from
  the venue (50 msg/s, heartbeat 0.5 s), then the venue goes ``silent`` (control port
  ``{"fault":"silent","seconds":120}``); the time from the last message received to the
  ``retry`` transition: STREAMING -> STALE at stale_after, -> BACKOFF (``dead``) at
  dead_after since the last message, -> CONNECTING (``retry``) after the backoff delay
  (initial 0.5 s, jitter 20 %). Target: dead_after + 1 s.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog
import trio
import trio_websocket
import wsproto
import wsproto.events as wse

from daemon.adapters.base import Batch
from daemon.adapters.net import adapter_for
from daemon.app import real_clocks
from daemon.config import SessionConfig, parse_config
from daemon.session import CommandKind, SessionRunner
from protocol.framing import FrameDecoder
from protocol.venue_codec import encode
from protocol.venue_pb2 import SUBSCRIBE_REQ, SubscribeReq
from statemachines.policy import ConnectRateLimiter
from statemachines.session import SessionMachine, TransitionRecord

# -- the venue in its own process ------------------------------------------------------


class VenueProcess:
    """The bundled venue in a child process (this file with ``--child``); a context manager.

    ``venue``: VenueConfig fields (None: no venue); ``blast``: also serve the replay
    senders (``{"count": N}``, see :func:`blast_protobuf`); ``cpus``: the child's affinity.
    """

    def __init__(
        self,
        cpus: set[int] | None = None,
        *,
        blast: dict[str, object] | None = None,
        **venue: object,
    ) -> None:
        argument = {"cpus": sorted(cpus) if cpus else None, "venue": venue, "blast": blast}
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--child", json.dumps(argument)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.close()
            raise RuntimeError("the venue process did not start")
        info = json.loads(line)
        self.pb_ports: list[int] = info["pb"]
        self.ws_ports: list[int] = info["ws"]
        self.control_port: int | None = info["control"]
        self.blast_pb: int | None = info["blast_pb"]
        self.blast_ws: int | None = info["blast_ws"]
        self.nofile: int = info["nofile"]

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

    def cpu_seconds(self) -> float:
        """User + system CPU time of the venue process so far."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def control(self, request: dict[str, object]) -> dict[str, object]:
        """One line on the control port (blocking; a fraction of a millisecond)."""
        assert self.control_port is not None
        with socket.create_connection(("127.0.0.1", self.control_port), timeout=5) as sock:
            sock.sendall(json.dumps(request).encode() + b"\n")
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                reply += chunk
        result: dict[str, object] = json.loads(reply)
        return result


def raise_nofile() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard limit; returns (soft, hard) now in force."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def child_main(argument: str) -> int:
    """The venue process: serve, print the ports as one JSON line, stop when stdin closes."""
    settings = json.loads(argument)
    if settings["cpus"]:
        os.sched_setaffinity(0, settings["cpus"])
    _soft, hard = raise_nofile()
    quiet_logs()
    from daemon.venue import VenueConfig, run_venue

    venue_settings = settings["venue"]
    for key in ("ws_ports", "pb_ports"):
        if key in venue_settings:
            venue_settings[key] = tuple(venue_settings[key])
    blast = settings["blast"]

    async def serve() -> None:
        async with trio.open_nursery() as nursery:
            venue = await nursery.start(run_venue, VenueConfig(**venue_settings))
            info = {"pb": venue.pb_ports, "ws": venue.ws_ports, "control": venue.control_port,
                    "blast_pb": None, "blast_ws": None, "nofile": hard}  # fmt: skip
            if blast is not None:
                for key, handler in (("blast_pb", blast_protobuf), ("blast_ws", blast_websocket)):
                    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
                    info[key] = listener.socket.getsockname()[1]
                    serve_one = functools.partial(handler, count=blast["count"])
                    nursery.start_soon(trio.serve_listeners, serve_one, [listener])
            print(json.dumps(info), flush=True)
            stdin = trio.lowlevel.FdStream(os.dup(0))
            while await stdin.receive_some(4096):
                pass
            nursery.cancel_scope.cancel()

    trio.run(serve)
    return 0


# -- replay senders: the venue's bytes, pre-encoded, sent in 64 KiB writes -----------------
#
# The bundled venue builds every message as it sends it, which caps it below what a relay
# may read. These send the same bytes (the venue's encoding of the same quotes and ticks),
# built once, so the readers' own ceilings show.

BLAST_BATCH = 256


def protobuf_chunk() -> bytes:
    """BLAST_BATCH QuoteEvent frames, encoded as the venue's ``emit`` encodes them."""
    from daemon.venue.pacing import quote_prices
    from protocol.framing import encode_frames
    from protocol.venue_pb2 import QUOTE_EVENT, Envelope, QuoteEvent

    now_ns = time.time_ns()
    frames = []
    for seq in range(1, BLAST_BATCH + 1):
        bid, ask = quote_prices(0, seq)
        quote = QuoteEvent(symbol="EURUSD", bid=bid, ask=ask, venue_time_ns=now_ns, seq=seq)
        envelope = Envelope(payload_type=QUOTE_EVENT, payload=quote.SerializeToString())
        frames.append(envelope.SerializeToString())
    return encode_frames(frames)


async def _blast(stream: trio.abc.Stream, chunk: bytes, per_chunk: int, count: int) -> None:
    data = chunk * max(1, 65536 // len(chunk))
    per_write = per_chunk * (len(data) // len(chunk))
    sent = 0
    while sent < count:
        await stream.send_all(data)
        sent += per_write


async def blast_protobuf(stream: trio.abc.Stream, *, count: int) -> None:
    """Answer the handshake like the venue, then send ``count`` quotes (or a few more)."""
    from protocol.venue_codec import Role, VenueDecoder
    from protocol.venue_pb2 import (
        ACCOUNT_AUTH_RES,
        APPLICATION_AUTH_RES,
        SUBSCRIBE_RES,
        AccountAuthReq,
        AccountAuthRes,
        ApplicationAuthReq,
        ApplicationAuthRes,
        SubscribeRes,
    )

    decoder = VenueDecoder(Role.SERVER)
    async with stream:
        try:
            subscribed = False
            while not subscribed and (data := await stream.receive_some(65536)):
                decoder.feed(data)
                for message in decoder.messages():
                    body, msg_id = message.message, message.client_msg_id
                    if isinstance(body, ApplicationAuthReq):
                        reply = encode(APPLICATION_AUTH_RES, ApplicationAuthRes(), msg_id)
                    elif isinstance(body, AccountAuthReq):
                        account = AccountAuthRes(account_id=body.account_id)
                        reply = encode(ACCOUNT_AUTH_RES, account, msg_id)
                    elif isinstance(body, SubscribeReq):
                        symbols = SubscribeRes(symbols=list(body.symbols))
                        reply = encode(SUBSCRIBE_RES, symbols, msg_id)
                        subscribed = True
                    else:
                        continue
                    await stream.send_all(reply)
            if subscribed:
                await _blast(stream, protobuf_chunk(), BLAST_BATCH, count)
                while await stream.receive_some(65536):
                    pass
        except trio.BrokenResourceError:
            pass


async def blast_websocket(stream: trio.abc.Stream, *, count: int) -> None:
    """The WebSocket upgrade and the subscribe reply, then ``count`` ticks (or a few more)."""
    from daemon.venue.pacing import quote_prices

    ws = wsproto.WSConnection(wsproto.ConnectionType.SERVER)
    async with stream:
        try:
            subscribed = False
            while not subscribed and (data := await stream.receive_some(65536)):
                ws.receive_data(bytes_of(data))
                for event in ws.events():
                    if isinstance(event, wse.Request):
                        await stream.send_all(ws.send(wse.AcceptConnection()))
                    elif isinstance(event, wse.TextMessage):
                        reply = '{"op":"subscribed","channel":"ticks"}'
                        await stream.send_all(ws.send(wse.TextMessage(reply)))
                        subscribed = True
            if not subscribed:
                return
            now_ns = time.time_ns()
            chunk = bytearray()
            for seq in range(1, BLAST_BATCH + 1):
                bid, ask = quote_prices(0, seq)
                tick = (f'{{"channel":"ticks","symbol":"EURUSD","bid":{bid},"ask":{ask},'
                        f'"seq":{seq},"ts":{now_ns}}}')  # fmt: skip
                chunk += ws.send(wse.TextMessage(tick))
            await _blast(stream, bytes(chunk), BLAST_BATCH, count)
            # Pings sent during the blast are answered late, the close handshake in time.
            while data := await stream.receive_some(65536):
                ws.receive_data(bytes_of(data))
                for event in ws.events():
                    if isinstance(event, wse.Ping | wse.CloseConnection):
                        await stream.send_all(ws.send(event.response()))
                    if isinstance(event, wse.CloseConnection):
                        return
        except trio.BrokenResourceError:
            pass


def bytes_of(data: bytes | bytearray) -> bytes:
    """What wsproto's annotations want; Trio's SocketStream already returns bytes."""
    return data if isinstance(data, bytes) else bytes(data)


def split_cpus(pin: bool) -> tuple[set[int] | None, set[int] | None]:
    """(this process's CPUs, the venue's): one core each when there are two or more."""
    cpus = sorted(os.sched_getaffinity(0))
    if not pin or len(cpus) < 2:
        return None, None
    return set(cpus[: len(cpus) // 2]), set(cpus[len(cpus) // 2 :])


def quiet_logs() -> None:
    """The daemon's transition logs would go to stdout: keep --json output clean."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


def cpu_now() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- one measured span ---------------------------------------------------------------


@dataclass
class Span:
    """From the first data to the target count: this process's and the venue's CPU too."""

    target: int
    venue: VenueProcess
    count: int = 0
    first_count: int = 0
    started: float | None = None
    ended: float | None = None
    batches: int = 0
    cpu: list[float] = field(default_factory=list)
    venue_cpu: list[float] = field(default_factory=list)

    def add(self, n: int) -> bool:
        """Count ``n`` messages; True once the target is reached."""
        if self.started is None:
            self.started = time.perf_counter()
            self.cpu.append(cpu_now())
            self.venue_cpu.append(self.venue.cpu_seconds())
            self.first_count = n
        self.count += n
        self.batches += 1
        if self.count >= self.target and self.ended is None:
            self.ended = time.perf_counter()
            self.cpu.append(cpu_now())
            self.venue_cpu.append(self.venue.cpu_seconds())
            return True
        return self.ended is not None

    def result(self) -> dict[str, float]:
        assert self.started is not None
        assert self.ended is not None, f"only {self.count} of {self.target} messages arrived"
        messages = self.count - self.first_count
        seconds = self.ended - self.started
        return {
            "msgs_per_s": messages / seconds,
            "cpu_us_per_msg": (self.cpu[1] - self.cpu[0]) / messages * 1e6,
            "venue_cpu_percent": (self.venue_cpu[1] - self.venue_cpu[0]) / seconds * 100,
            "seconds": seconds,
            "msgs_per_batch": self.count / self.batches,
        }


class CountingPublisher:
    """The consumer side of a session, reduced to counting what it is handed."""

    def __init__(self, span: Span) -> None:
        self.span = span
        self.done = trio.Event()

    def data(self, session: str, batch: Batch, received_at_ns: int) -> None:
        if self.span.add(len(batch.messages)):
            self.done.set()

    def transition(self, record: TransitionRecord) -> None:
        return


class MemorySink:
    """The event log, in memory: the relay benchmark's session fires only a handful.

    ``at`` holds the Trio time each transition was appended (i.e. fired), by trigger.
    """

    def __init__(self) -> None:
        self.records: list[TransitionRecord] = []
        self.at: dict[str, float] = {}
        self.changed = trio.Event()

    async def append(self, record: TransitionRecord) -> None:
        self.records.append(record)
        self.at.setdefault(record.trigger, trio.current_time())
        self.changed.set()
        self.changed = trio.Event()
        await trio.lowlevel.checkpoint()


def session_config(toml: str) -> SessionConfig:
    (session,) = parse_config(toml.encode(), "bench.toml").sessions
    return session


def protobuf_session(port: int, **keys: object) -> SessionConfig:
    extra = "".join(f"{k} = {v}\n" for k, v in keys.items())
    return session_config(
        f"""
[[sessions]]
name = "pb"
kind = "protobuf"
url = "tcp://127.0.0.1:{port}"
auth = {{ client_id = "bench", client_secret = "s", account_id = 1, access_token = "t" }}
subscribe = ["EURUSD"]
{extra}"""
    )


def websocket_session(port: int, **keys: object) -> SessionConfig:
    extra = "".join(f"{k} = {v}\n" for k, v in keys.items())
    return session_config(
        f"""
[[sessions]]
name = "ws"
kind = "websocket"
url = "ws://127.0.0.1:{port}/feed"
subscribe = ['{SUBSCRIBE_WS}']
{extra}"""
    )


SUBSCRIBE_WS = '{"op":"subscribe","channel":"ticks"}'


def runner_for(session: SessionConfig, sink: MemorySink, publisher: object) -> SessionRunner:
    limiter = ConnectRateLimiter(session.connect_rate)
    return SessionRunner(
        session,
        machine=SessionMachine(),
        sink=sink,
        adapter=adapter_for(session, {}),
        limiters=lambda _url: limiter,
        clocks=real_clocks(),
        publisher=publisher,  # type: ignore[arg-type]
    )


async def _stop(runner: SessionRunner, nursery: trio.Nursery) -> None:
    with trio.move_on_after(5):
        await runner.command(CommandKind.SHUTDOWN, "benchmark over")
    nursery.cancel_scope.cancel()


# -- the relays and their baselines -----------------------------------------------------


async def relay_runner(session: SessionConfig, span: Span) -> None:
    publisher = CountingPublisher(span)
    runner = runner_for(session, MemorySink(), publisher)
    async with trio.open_nursery() as nursery:
        await nursery.start(runner.run)
        await publisher.done.wait()
        await _stop(runner, nursery)


async def bare_protobuf(port: int, span: Span) -> None:
    """The least Trio code that reads the same frames: subscribe, read, split, count."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(encode(SUBSCRIBE_REQ, SubscribeReq(symbols=["EURUSD"]), "bench"))
        decoder = FrameDecoder()
        while data := await stream.receive_some(65536):
            decoder.feed(data)
            frames = decoder.frames()
            if frames and span.add(len(frames)):
                return


async def bare_trio_websocket(port: int, span: Span) -> None:
    async with trio_websocket.open_websocket_url(f"ws://127.0.0.1:{port}/feed") as ws:
        await ws.send_message(SUBSCRIBE_WS)
        while True:
            await ws.get_message()
            if span.add(1):
                return


async def bare_wsproto(port: int, span: Span) -> None:
    """A minimal WebSocket client on wsproto: 64 KiB reads, every event of a read drained.

    Each text message is also classified and encoded, as the adapter does for a Batch,
    so the figure is what an adapter built this way would cost.
    """
    from protocol.ws_codec import classify

    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        await stream.send_all(ws.send(wse.Request(host=f"127.0.0.1:{port}", target="/feed")))
        accepted = False
        while not accepted:
            data = await stream.receive_some(65536)
            if not data:
                raise RuntimeError("the venue closed during the handshake")
            ws.receive_data(bytes_of(data))
            for event in ws.events():
                if isinstance(event, wse.AcceptConnection):
                    accepted = True
                elif isinstance(event, wse.RejectConnection):
                    raise RuntimeError("handshake rejected")
        await stream.send_all(ws.send(wse.TextMessage(SUBSCRIBE_WS)))
        parts: list[str] = []
        while data := await stream.receive_some(65536):
            ws.receive_data(bytes_of(data))
            messages: list[bytes] = []
            for event in ws.events():
                if type(event) is wse.TextMessage:
                    if not event.message_finished:
                        parts.append(event.data)
                        continue
                    text = "".join((*parts, event.data)) if parts else event.data
                    parts.clear()
                    classify(text)
                    messages.append(text.encode())
                elif isinstance(event, wse.Ping):
                    await stream.send_all(ws.send(event.response()))
                elif isinstance(event, wse.CloseConnection):
                    return
            if messages and span.add(len(messages)):
                return


Client = Callable[[Span], Awaitable[None]]


def interleaved(
    clients: dict[str, Client], venue: VenueProcess, target: int, rounds: int
) -> dict[str, list[dict[str, float]]]:
    """Each client once per round, the order rotated from round to round (each goes first
    as often as the others, give or take one round)."""
    names = list(clients)
    results: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            span = Span(target, venue)
            trio.run(clients[name], span)
            results[name].append(span.result())
    return results


def median(runs: list[dict[str, float]], key: str) -> float:
    return statistics.median(run[key] for run in runs)


def spread(runs: list[dict[str, float]], key: str) -> list[float]:
    values = [run[key] for run in runs]
    return [round(min(values)), round(max(values))]


def ratios(ours: list[dict[str, float]], base: list[dict[str, float]]) -> list[float]:
    return [o["msgs_per_s"] / b["msgs_per_s"] for o, b in zip(ours, base, strict=True)]


def cpu_ratios(ours: list[dict[str, float]], base: list[dict[str, float]]) -> list[float]:
    """Baseline CPU per message / ours: the cost ratio, whoever is the bottleneck."""
    return [b["cpu_us_per_msg"] / o["cpu_us_per_msg"] for o, b in zip(ours, base, strict=True)]


def summary(prefix: str, values: list[float]) -> dict[str, object]:
    return {
        prefix: round(statistics.median(values), 3),
        f"{prefix}_spread": [round(min(values), 3), round(max(values), 3)],
    }


def bench_protobuf(
    rounds: int, messages: int, blast_messages: int, cpus: set[int] | None
) -> dict[str, object]:
    with VenueProcess(
        cpus, blast={"count": blast_messages}, rate=None, count=messages, batch_size=256,
        heartbeat_interval=None, ws_ports=[], control_port=None,
    ) as venue:  # fmt: skip
        port, blast_port = venue.pb_ports[0], venue.blast_pb
        assert blast_port is not None
        session, blast_session = protobuf_session(port), protobuf_session(blast_port)
        runs = interleaved(
            {
                "ours": lambda span: relay_runner(session, span),
                # The bare reader also counts the SubscribeRes: one more frame.
                "bare": lambda span: bare_protobuf(port, plus_one(span)),
            },
            venue,
            messages,
            rounds,
        )
        capacity = interleaved(
            {
                "ours": lambda span: relay_runner(blast_session, span),
                "bare": lambda span: bare_protobuf(blast_port, plus_one(span)),
            },
            venue,
            blast_messages,
            rounds,
        )
    ours, bare = runs["ours"], runs["bare"]
    cap_ours, cap_bare = capacity["ours"], capacity["bare"]
    return {
        "protobuf_relay_msgs_per_s": round(median(ours, "msgs_per_s")),
        "protobuf_relay_msgs_per_s_spread": spread(ours, "msgs_per_s"),
        "protobuf_bare_msgs_per_s": round(median(bare, "msgs_per_s")),
        **summary("protobuf_relay_ratio", ratios(ours, bare)),
        "protobuf_relay_cpu_us_per_msg": round(median(ours, "cpu_us_per_msg"), 2),
        "protobuf_bare_cpu_us_per_msg": round(median(bare, "cpu_us_per_msg"), 2),
        "protobuf_relay_msgs_per_batch": round(median(ours, "msgs_per_batch")),
        "protobuf_venue_cpu_percent_during_relay": round(median(ours, "venue_cpu_percent")),
        "protobuf_venue_cpu_percent_during_bare": round(median(bare, "venue_cpu_percent")),
        "protobuf_relay_seconds_per_round": round(median(ours, "seconds"), 2),
        "protobuf_messages_per_round": messages,
        # The same readers against the replay sender (not venue-bound).
        "protobuf_capacity_relay_msgs_per_s": round(median(cap_ours, "msgs_per_s")),
        "protobuf_capacity_bare_msgs_per_s": round(median(cap_bare, "msgs_per_s")),
        **summary("protobuf_capacity_ratio", ratios(cap_ours, cap_bare)),
        "protobuf_capacity_relay_cpu_us_per_msg": round(median(cap_ours, "cpu_us_per_msg"), 2),
        "protobuf_capacity_bare_cpu_us_per_msg": round(median(cap_bare, "cpu_us_per_msg"), 2),
        "protobuf_capacity_messages_per_round": blast_messages,
    }


def plus_one(span: Span) -> Span:
    span.target += 1
    return span


def bench_websocket(
    rounds: int, messages: int, blast_messages: int, cpus: set[int] | None
) -> dict[str, object]:
    with VenueProcess(
        cpus, blast={"count": blast_messages}, rate=None, count=messages, batch_size=256,
        heartbeat_interval=None, pb_ports=[], control_port=None,
    ) as venue:  # fmt: skip
        port, blast_port = venue.ws_ports[0], venue.blast_ws
        assert blast_port is not None
        session, blast_session = websocket_session(port), websocket_session(blast_port)
        # Every client also receives the {"op":"subscribed"} reply: one more message.
        runs = interleaved(
            {
                "ours": lambda span: relay_runner(session, plus_one(span)),
                "trio_websocket": lambda span: bare_trio_websocket(port, plus_one(span)),
                "wsproto": lambda span: bare_wsproto(port, plus_one(span)),
            },
            venue,
            messages,
            rounds,
        )
        capacity = interleaved(
            {
                "ours": lambda span: relay_runner(blast_session, plus_one(span)),
                "trio_websocket": lambda span: bare_trio_websocket(blast_port, plus_one(span)),
                "wsproto": lambda span: bare_wsproto(blast_port, plus_one(span)),
            },
            venue,
            blast_messages,
            rounds,
        )
    ours, bare, alt = runs["ours"], runs["trio_websocket"], runs["wsproto"]
    cap_ours, cap_bare, cap_alt = capacity["ours"], capacity["trio_websocket"], capacity["wsproto"]
    return {
        "websocket_relay_msgs_per_s": round(median(ours, "msgs_per_s")),
        "websocket_relay_msgs_per_s_spread": spread(ours, "msgs_per_s"),
        "websocket_bare_msgs_per_s": round(median(bare, "msgs_per_s")),
        **summary("websocket_relay_ratio", ratios(ours, bare)),
        "websocket_wsproto_msgs_per_s": round(median(alt, "msgs_per_s")),
        "websocket_relay_cpu_us_per_msg": round(median(ours, "cpu_us_per_msg"), 2),
        "websocket_bare_cpu_us_per_msg": round(median(bare, "cpu_us_per_msg"), 2),
        "websocket_wsproto_cpu_us_per_msg": round(median(alt, "cpu_us_per_msg"), 2),
        **summary("websocket_relay_cpu_ratio", cpu_ratios(ours, bare)),
        "websocket_relay_msgs_per_batch": round(median(ours, "msgs_per_batch"), 1),
        "websocket_venue_cpu_percent_during_relay": round(median(ours, "venue_cpu_percent")),
        "websocket_venue_cpu_percent_during_bare": round(median(bare, "venue_cpu_percent")),
        "websocket_venue_cpu_percent_during_wsproto": round(median(alt, "venue_cpu_percent")),
        "websocket_messages_per_round": messages,
        # The same clients against the replay sender (not venue-bound).
        "websocket_capacity_relay_msgs_per_s": round(median(cap_ours, "msgs_per_s")),
        "websocket_capacity_bare_msgs_per_s": round(median(cap_bare, "msgs_per_s")),
        "websocket_capacity_wsproto_msgs_per_s": round(median(cap_alt, "msgs_per_s")),
        **summary("websocket_capacity_ratio", ratios(cap_ours, cap_bare)),
        "websocket_capacity_relay_cpu_us_per_msg": round(median(cap_ours, "cpu_us_per_msg"), 2),
        "websocket_capacity_bare_cpu_us_per_msg": round(median(cap_bare, "cpu_us_per_msg"), 2),
        "websocket_capacity_wsproto_cpu_us_per_msg": round(median(cap_alt, "cpu_us_per_msg"), 2),
        "websocket_capacity_relay_msgs_per_batch": round(median(cap_ours, "msgs_per_batch"), 1),
        "websocket_capacity_messages_per_round": blast_messages,
    }


# -- half-open detection -------------------------------------------------------------


class LastMessage:
    """A publisher that only keeps the session streaming: nothing to count."""

    def data(self, session: str, batch: Batch, received_at_ns: int) -> None:
        return

    def transition(self, record: TransitionRecord) -> None:
        return


async def half_open_once(
    session: SessionConfig, venue: VenueProcess, warmup: float
) -> dict[str, float]:
    sink = MemorySink()
    runner = runner_for(session, sink, LastMessage())
    async with trio.open_nursery() as nursery:
        await nursery.start(runner.run)
        while "data" not in sink.at:
            await sink.changed.wait()
        await trio.sleep(warmup)
        reply = await trio.to_thread.run_sync(venue.control, {"fault": "silent", "seconds": 120})
        assert reply.get("ok"), reply
        silenced = trio.current_time()
        with trio.fail_after(session.dead_after + 30):
            while "retry" not in sink.at:
                await sink.changed.wait()
        last = runner.last_message_at
        assert last is not None
        await _stop(runner, nursery)
    clear: dict[str, object] = {"fault": "clear"}
    reply = await trio.to_thread.run_sync(venue.control, clear)
    assert reply.get("ok"), reply
    at = sink.at
    return {
        "detection_s": at["retry"] - last,
        "stale_s": at["stale"] - last,
        "dead_s": at["dead"] - last,
        "silenced_after_last_s": silenced - last,
    }


def bench_half_open(reps: int, cpus: set[int] | None) -> dict[str, object]:
    stale_after, dead_after = 1.0, 3.0
    with VenueProcess(cpus, rate=50.0, heartbeat_interval=0.5, ws_ports=[]) as venue:
        session = protobuf_session(
            venue.pb_ports[0], stale_after=stale_after, dead_after=dead_after,
            heartbeat_interval=1.0,
        )  # fmt: skip
        runs = [trio.run(half_open_once, session, venue, 1.0) for _ in range(reps)]
    detection = [r["detection_s"] for r in runs]
    return {
        "half_open_detection_s": round(statistics.median(detection), 2),
        "half_open_detection_spread_s": [round(min(detection), 2), round(max(detection), 2)],
        "half_open_stale_s": round(median(runs, "stale_s"), 2),
        "half_open_dead_s": round(median(runs, "dead_s"), 2),
        "half_open_backoff_s": round(median(runs, "detection_s") - median(runs, "dead_s"), 2),
        "stale_after": stale_after,
        "dead_after": dead_after,
        "half_open_target_s": dead_after + 1,
        "half_open_reps": reps,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true", help="small sizes, 3 rounds")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (median)")
    parser.add_argument("--pb-messages", type=int, default=None)
    parser.add_argument("--ws-messages", type=int, default=None)
    parser.add_argument("--half-open-reps", type=int, default=None)
    parser.add_argument("--no-pin", action="store_true", help="do not split the CPUs")
    parser.add_argument(
        "--only", choices=["protobuf", "websocket", "half_open"], action="append", default=None
    )
    parser.add_argument("--pb-capacity-messages", type=int, default=None)
    parser.add_argument("--ws-capacity-messages", type=int, default=None)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child_main(args.child)
    rounds = args.rounds or (3 if args.quick else 5)
    pb_messages = args.pb_messages or (200_000 if args.quick else 1_000_000)
    ws_messages = args.ws_messages or (20_000 if args.quick else 100_000)
    pb_capacity = args.pb_capacity_messages or (400_000 if args.quick else 2_000_000)
    ws_capacity = args.ws_capacity_messages or (20_000 if args.quick else 100_000)
    reps = args.half_open_reps or (2 if args.quick else 3)
    only = set(args.only or ["protobuf", "websocket", "half_open"])

    quiet_logs()
    ours_cpus, venue_cpus = split_cpus(not args.no_pin)
    if ours_cpus:
        os.sched_setaffinity(0, ours_cpus)
    results: dict[str, object] = {
        "machine": f"{os.cpu_count()} cpu, python {sys.version.split()[0]}",
        "cpus": {"relay": sorted(ours_cpus or []), "venue": sorted(venue_cpus or [])},
        "rounds": rounds,
        "loadavg_before": os.getloadavg()[0],
    }
    if "protobuf" in only:
        results.update(bench_protobuf(rounds, pb_messages, pb_capacity, venue_cpus))
    if "websocket" in only:
        results.update(bench_websocket(rounds, ws_messages, ws_capacity, venue_cpus))
    if "half_open" in only:
        results.update(bench_half_open(reps, venue_cpus))
    results["loadavg_after"] = os.getloadavg()[0]
    if args.json:
        print(json.dumps(results))
    else:
        width = max(map(len, results))
        for key, value in results.items():
            print(f"{key:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
