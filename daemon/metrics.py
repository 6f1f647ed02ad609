"""Prometheus text and ``/health``, served by a small HTTP/1.1 handler on the Trio loop.

``GET /metrics`` answers the Prometheus text format (0.0.4); ``GET /health`` answers
200 when every session that should be live (every session not PAUSED by an operator)
is STREAMING and 503 otherwise, with a small JSON body naming the sessions that are
not; ``GET /health?session=NAME`` judges one session (PAUSED counts as not streaming
there; an unknown name is 404). One request per connection; ``HEAD`` works too.

No prometheus_client: its ``start_http_server`` binds in a thread on 0.0.0.0. The text
is rendered here, where the values live. Labels are bounded: session names come from
the configuration, states and triggers from the machine's table; nothing is labelled
per message. Every session's state is one 0/1 series per state, the usual enum shape.
"""

from __future__ import annotations

import json
import platform
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol
from urllib.parse import parse_qs, urlsplit

import structlog
import trio

from daemon.config import Config, HostPort
from daemon.session import SessionRunner
from daemon.writer import EventSink, EventWriter, WriterStats
from statemachines.session import State, TransitionRecord, Trigger

log = structlog.get_logger("wirekeep.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_REQUEST = 8192
REQUEST_TIMEOUT = 10.0
MAX_CONNECTIONS = 64
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000)
_ATTEMPTS = frozenset({Trigger.START.value, Trigger.RETRY.value, Trigger.PROBE.value})
_STATES = tuple(s.name for s in State)
_BREAKER = ("closed", "open", "half-open")


# --------------------------------------------------------------------------- counting


@dataclass
class Tally:
    """Counts of durable transitions, fed by :class:`CountingSink`."""

    transitions: Counter[tuple[str, str]] = field(default_factory=Counter)
    attempts: Counter[str] = field(default_factory=Counter)
    throttled: Counter[str] = field(default_factory=Counter)

    def count(self, record: TransitionRecord) -> None:
        self.transitions[record.source, record.dest] += 1
        if record.trigger in _ATTEMPTS:
            self.attempts[record.session] += 1
        elif record.trigger == Trigger.THROTTLED.value:
            self.throttled[record.session] += 1


class CountingSink:
    """The sessions' event sink with a tally of what became durable (a dict update each)."""

    def __init__(self, sink: EventSink, tally: Tally) -> None:
        self._sink = sink
        self.tally = tally

    async def append(self, record: TransitionRecord) -> None:
        await self._sink.append(record)
        self.tally.count(record)


class BatchHistogram:
    """A cumulative histogram of commit batch sizes, read off ``WriterStats``.

    The writer keeps the sizes of its recent batches; this takes the ones it has not
    seen yet (polled every second and at each scrape).
    """

    def __init__(self, buckets: Iterable[int] = BATCH_BUCKETS) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.count = 0
        self.sum = 0
        self._seen = 0

    def update(self, stats: WriterStats) -> None:
        new = stats.batches - self._seen
        if new <= 0:
            return
        self._seen = stats.batches
        for size in stats.batch_sizes[-new:]:
            self.count += 1
            self.sum += size
            for i, bound in enumerate(self.buckets):
                if size <= bound:
                    self.counts[i] += 1


# --------------------------------------------------------------------------- the text


class MetricsTarget(Protocol):
    """What the metrics read: the daemon (``daemon.app.Daemon``)."""

    @property
    def config(self) -> Config: ...
    @property
    def sessions(self) -> Mapping[str, SessionRunner]: ...
    @property
    def writer(self) -> EventWriter | None: ...
    @property
    def started_at(self) -> datetime | None: ...
    @property
    def stopping(self) -> bool: ...
    @property
    def handshakes(self) -> trio.CapacityLimiter: ...


def _label(value: str) -> str:
    return value.replace("\\", r"\\").replace('"', r"\"").replace("\n", r"\n")


def _num(value: float) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)


class Metrics:
    """Renders the Prometheus text for one daemon."""

    def __init__(
        self,
        target: MetricsTarget,
        tally: Tally,
        *,
        version: str,
        control_requests: Callable[[], Mapping[tuple[str, str], int]] | None = None,
        extra: Callable[[], Iterable[str]] | None = None,
    ) -> None:
        self.target = target
        self.tally = tally
        self.version = version
        self.batches = BatchHistogram()
        self._control_requests = control_requests
        #: More lines from optional servers (e.g. the consumer hub), already formatted.
        self._extra = extra

    def render(self) -> str:
        out: list[str] = []
        add = out.append

        def head(name: str, kind: str, text: str) -> None:
            add(f"# HELP wirekeep_{name} {text}")
            add(f"# TYPE wirekeep_{name} {kind}")

        target = self.target
        head("build_info", "gauge", "Version of the running daemon (always 1).")
        add(
            f'wirekeep_build_info{{version="{_label(self.version)}",'
            f'python="{platform.python_version()}"}} 1'
        )
        head("config_info", "gauge", "Hash of the configuration in force (always 1).")
        add(f'wirekeep_config_info{{config_hash="{_label(target.config.config_hash)}"}} 1')
        if target.started_at is not None:
            head("start_time_seconds", "gauge", "When the daemon started (Unix time).")
            add(f"wirekeep_start_time_seconds {target.started_at.timestamp():.3f}")

        runners = list(target.sessions.values())
        # Durable states only: a transition shows once its COMMIT has returned.
        by_state = Counter(r.durable.state.name for r in runners)
        head("sessions", "gauge", "Running sessions by state.")
        out.extend(f'wirekeep_sessions{{state="{s}"}} {by_state.get(s, 0)}' for s in _STATES)

        head("session_state", "gauge", "1 for the state each session is in, 0 for the others.")
        for r in runners:
            current = r.durable.state.name
            prefix = f'wirekeep_session_state{{session="{r.name}",state="'
            out.extend(f'{prefix}{s}"}} {1 if s == current else 0}' for s in _STATES)

        head("transitions_total", "counter", "Durable transitions by source and destination.")
        for (source, dest), n in sorted(self.tally.transitions.items()):
            add(f'wirekeep_transitions_total{{source="{source}",dest="{dest}"}} {n}')

        head("session_attempts_total", "counter", "Connection attempts (start, retry, probe).")
        out.extend(
            f'wirekeep_session_attempts_total{{session="{r.name}"}} {self.tally.attempts[r.name]}'
            for r in runners
        )
        head("session_throttled_total", "counter", "Attempts held back by the connect rate.")
        out.extend(
            f'wirekeep_session_throttled_total{{session="{r.name}"}} {self.tally.throttled[r.name]}'
            for r in runners
        )
        head("session_attempt", "gauge", "Consecutive failed attempts (0 once streaming).")
        out.extend(
            f'wirekeep_session_attempt{{session="{r.name}"}} {r.durable.memory.attempt}'
            for r in runners
        )
        head("session_breaker", "gauge", "1 for the circuit breaker's state, 0 for the others.")
        for r in runners:
            current = r.durable.breaker
            prefix = f'wirekeep_session_breaker{{session="{r.name}",state="'
            out.extend(f'{prefix}{s}"}} {1 if s == current else 0}' for s in _BREAKER)
        head("session_breaker_failures", "gauge", "Consecutive failures the breaker counts.")
        out.extend(
            f'wirekeep_session_breaker_failures{{session="{r.name}"}} {r.durable.memory.failures}'
            for r in runners
        )
        head(
            "session_seconds_since_last_message",
            "gauge",
            "Seconds since the session last received anything (absent: nothing yet).",
        )
        for r in runners:
            silent = r.seconds_since_last_message()
            if silent is not None:
                add(
                    f'wirekeep_session_seconds_since_last_message{{session="{r.name}"}} '
                    f"{silent:.3f}"
                )
        head("session_messages_total", "counter", "Messages received (heartbeats included).")
        out.extend(
            f'wirekeep_session_messages_total{{session="{r.name}"}} {r.messages}' for r in runners
        )

        slots = target.handshakes
        head("handshakes_in_flight", "gauge", "Connection attempts holding a handshake slot.")
        add(f"wirekeep_handshakes_in_flight {slots.borrowed_tokens}")
        head("handshakes_queued", "gauge", "Sessions waiting for a handshake slot.")
        add(f"wirekeep_handshakes_queued {slots.statistics().tasks_waiting}")
        head("handshakes_max", "gauge", "daemon.max_handshakes.")
        add(f"wirekeep_handshakes_max {int(slots.total_tokens)}")

        writer = target.writer
        if writer is not None:
            self._writer(writer, head, add)
        if self._control_requests is not None:
            head("control_requests_total", "counter", "Control socket requests by outcome.")
            for (command, outcome), n in sorted(self._control_requests().items()):
                add(
                    f'wirekeep_control_requests_total{{command="{_label(command)}",'
                    f'outcome="{outcome}"}} {n}'
                )
        if self._extra is not None:
            out.extend(self._extra())
        add("")
        return "\n".join(out)

    def _writer(
        self, writer: EventWriter, head: Callable[[str, str, str], None], add: Callable[[str], None]
    ) -> None:
        stats = writer.stats
        self.batches.update(stats)
        head("writer_events_written_total", "counter", "Events committed to the event store.")
        add(f"wirekeep_writer_events_written_total {stats.events_written}")
        head("writer_batch_size", "histogram", "Events per COMMIT.")
        # counts are cumulative already: a batch counts in every bucket it fits.
        for bound, n in zip(self.batches.buckets, self.batches.counts, strict=True):
            add(f'wirekeep_writer_batch_size_bucket{{le="{bound}"}} {n}')
        add(f'wirekeep_writer_batch_size_bucket{{le="+Inf"}} {self.batches.count}')
        add(f"wirekeep_writer_batch_size_sum {self.batches.sum}")
        add(f"wirekeep_writer_batch_size_count {self.batches.count}")
        head("writer_commit_seconds", "summary", "Time spent in COMMITs of event batches.")
        add(f"wirekeep_writer_commit_seconds_sum {stats.commit_seconds_total:.6f}")
        add(f"wirekeep_writer_commit_seconds_count {stats.batches}")
        head("writer_last_commit_seconds", "gauge", "Duration of the last COMMIT.")
        add(f"wirekeep_writer_last_commit_seconds {stats.last_commit_s:.6f}")
        head("writer_lag_seconds", "gauge", "Age of the oldest event waiting for its COMMIT.")
        add(f"wirekeep_writer_lag_seconds {writer.lag():.6f}")
        head("writer_pending_events", "gauge", "Events queued for the next COMMIT.")
        add(f"wirekeep_writer_pending_events {writer.pending}")
        head("writer_stuck_seconds", "gauge", "How long the running COMMIT has taken so far.")
        add(f"wirekeep_writer_stuck_seconds {writer.stuck_for():.3f}")
        head("writer_failures_total", "counter", "Failed COMMITs (retried; nothing is lost).")
        add(f"wirekeep_writer_failures_total {stats.failures}")


# --------------------------------------------------------------------------- health


def health(
    sessions: Mapping[str, SessionRunner], name: str | None = None, *, stopping: bool = False
) -> tuple[int, dict[str, object]]:
    """(HTTP status, JSON body) for ``/health`` or ``/health?session=NAME``."""
    if stopping:
        return 503, {"status": "stopping"}
    if name is not None:
        runner = sessions.get(name)
        if runner is None:
            return 404, {"status": "unknown", "session": name}
        durable = runner.durable
        state, last = durable.state, durable.record
        body: dict[str, object] = {
            "status": "ok" if state is State.STREAMING else "unhealthy",
            "session": name,
            "state": state.name,
            "since": durable.since.isoformat() if durable.since is not None else None,
            "reason": last.reason if last is not None else "",
        }
        return (200 if state is State.STREAMING else 503), body
    paused = []
    not_streaming: dict[str, str] = {}
    streaming = 0
    for runner in sessions.values():
        state = runner.durable.state
        if state is State.STREAMING:
            streaming += 1
        elif state is State.PAUSED:
            paused.append(runner.name)
        else:
            not_streaming[runner.name] = state.name
    body = {
        "status": "unhealthy" if not_streaming else "ok",
        "sessions": len(sessions),
        "streaming": streaming,
        "paused": paused,
        "not_streaming": not_streaming,
    }
    return (503 if not_streaming else 200), body


# --------------------------------------------------------------------------- HTTP


_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}


def _response(status: int, content_type: str, body: bytes, *, head_only: bool = False) -> bytes:
    header = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Cache-Control: no-store\r\n"
        "Connection: close\r\n\r\n"
    )
    return header.encode("ascii") + (b"" if head_only else body)


def _json(status: int, body: Mapping[str, object], *, head_only: bool = False) -> bytes:
    data = json.dumps(body, separators=(",", ":")).encode() + b"\n"
    return _response(status, "application/json", data, head_only=head_only)


class MetricsServer:
    """The HTTP side: ``/metrics``, ``/health``; bound to ``daemon.metrics_listen``."""

    def __init__(self, metrics: Metrics, *, request_timeout: float = REQUEST_TIMEOUT) -> None:
        self.metrics = metrics
        self.request_timeout = request_timeout
        self.active = 0
        self.addresses: list[HostPort] = []

    async def bind(self, listen: HostPort) -> list[trio.SocketListener]:
        listeners = await trio.open_tcp_listeners(listen.port, host=listen.host)
        self.addresses = []
        for listener in listeners:
            host, port = listener.socket.getsockname()[:2]
            self.addresses.append(HostPort(host, port))
        log.info("metrics_listening", addresses=[str(a) for a in self.addresses])
        return listeners

    async def serve(
        self,
        listeners: list[trio.SocketListener],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._poll_writer)
            await nursery.start(trio.serve_listeners, self._connection, listeners)
            task_status.started()

    async def _poll_writer(self) -> None:
        while True:
            writer = self.metrics.target.writer
            if writer is not None:
                self.metrics.batches.update(writer.stats)
            await trio.sleep(1.0)

    async def _connection(self, stream: trio.SocketStream) -> None:
        self.active += 1
        try:
            with trio.move_on_after(self.request_timeout):
                if self.active > MAX_CONNECTIONS:
                    await stream.send_all(_json(503, {"status": "busy"}))
                    return
                request = await self._read_head(stream)
                await stream.send_all(self.answer(request))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        except Exception:  # a bug answers nothing; the daemon stays up
            log.exception("metrics_request_failed")
        finally:
            self.active -= 1
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _read_head(self, stream: trio.SocketStream) -> bytes | None:
        """The request head (up to the blank line), or None when it is too large."""
        data = bytearray()
        while b"\r\n\r\n" not in data and b"\n\n" not in data:
            if len(data) > MAX_REQUEST:
                return None
            chunk = await stream.receive_some(4096)
            if not chunk:
                break
            data += chunk
        return bytes(data)

    def answer(self, request: bytes | None) -> bytes:
        if request is None:
            return _response(431, "text/plain", b"request head too large\n")
        line = request.split(b"\n", 1)[0].decode("latin-1").strip()
        parts = line.split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return _response(400, "text/plain", b"bad request\n")
        method, target = parts[0], parts[1]
        if method not in ("GET", "HEAD"):
            return _response(405, "text/plain", b"GET or HEAD only\n")
        head_only = method == "HEAD"
        url = urlsplit(target)
        daemon = self.metrics.target
        if url.path == "/metrics":
            body = self.metrics.render().encode()
            return _response(200, CONTENT_TYPE, body, head_only=head_only)
        if url.path == "/health":
            names = parse_qs(url.query).get("session")
            status, payload = health(
                daemon.sessions, names[0] if names else None, stopping=daemon.stopping
            )
            return _json(status, payload, head_only=head_only)
        return _response(404, "text/plain", b"try /metrics or /health\n", head_only=head_only)
