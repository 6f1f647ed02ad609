"""One task per session: drive the session machine from network I/O and timers.

The task never sets a state. It fires triggers on the shared machine, waits until the
resulting event is durable (write-ahead), and only then acts on it and shows it
(status, consumers). Timers run on Trio's clock (``trio.current_time``), so tests
drive them with ``MockClock``; stored times come from the injected wall clock.

Phases, by state:

- DISCONNECTED / BACKOFF / CIRCUIT_OPEN: wait out the delay, wait for one of the
  daemon's handshake slots (``max_handshakes``, first come first served; status shows
  ``handshake: queued``), take a connect slot from the host's rate limiter (a refused
  slot is a visible ``throttled`` transition), then ``start`` / ``retry`` / ``probe``.
- CONNECTING: transport + handshake (``connected``), authentication, subscriptions;
  the handshake slot is given back once subscribed, or when the attempt fails.
- AUTHENTICATED / STREAMING / STALE: read batches; silence moves STREAMING to STALE
  after ``stale_after`` and ends the link after ``dead_after``; heartbeats run beside.
- PAUSED: wait for ``resume``.

Operator commands (pause, resume, reconnect) and lifecycle commands (shutdown,
remove) interrupt whatever phase runs: they are queued, the phase's cancel scope is
cancelled, and the task handles them between phases, so one task alone ever changes
its model.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

import structlog
import trio

from daemon.adapters.base import Adapter, AdapterError, AuthRejected, Batch, Connection
from daemon.config import SessionConfig
from daemon.replay import SessionView
from daemon.writer import EventSink
from statemachines.policy import Backoff, CircuitBreaker, ConnectRateLimiter
from statemachines.session import SessionMachine, SessionModel, State, TransitionRecord, Trigger

log = structlog.get_logger("wirekeep.session")

LIVE = frozenset({State.CONNECTING, State.AUTHENTICATED, State.STREAMING, State.STALE})
#: How often a session on a fallback endpoint checks whether the primary is back.
PRIMARY_PROBE_INTERVAL = 30.0


class Publisher(Protocol):
    """Where a session's stream goes (the consumer hub); a no-op when nobody listens."""

    def data(self, session: str, batch: Batch, received_at_ns: int) -> None: ...

    def transition(self, record: TransitionRecord) -> None: ...


class NullPublisher:
    def data(self, session: str, batch: Batch, received_at_ns: int) -> None:
        return

    def transition(self, record: TransitionRecord) -> None:
        return


class CommandKind(enum.Enum):
    PAUSE = "pause"
    RESUME = "resume"
    RECONNECT = "reconnect"
    SHUTDOWN = "shutdown"
    REMOVE = "remove"
    #: Hand the session over to a runner with new settings: ``reconnect`` if it has a
    #: link or a pending attempt, nothing if it is paused or disconnected; then stop.
    RECONFIGURE = "reconfigure"


@dataclass(eq=False)
class Command:
    kind: CommandKind
    reason: str
    detail: Mapping[str, Any] = field(default_factory=dict)
    done: trio.Event = field(default_factory=trio.Event)
    result: str = ""  # what happened, for the requester: "paused", "already PAUSED", ...


@dataclass
class SessionClocks:
    """Time as the session sees it: Trio's clock for timers, a wall clock for events."""

    wall: Callable[[], datetime]
    wall_ns: Callable[[], int]
    uniform: Callable[[], float]


class _Silence(AdapterError):
    """Nothing arrived for too long; ``trigger`` is what the silence means in this state."""

    def __init__(self, trigger: Trigger, reason: str) -> None:
        super().__init__(reason, error_class="Silence")
        self.trigger = trigger


@dataclass
class _Link:
    """Why the current link ended; the first reason wins and stops the reader."""

    trigger: Trigger | None = None
    failure: AdapterError | None = None
    reader: trio.CancelScope | None = None

    def end(self, trigger: Trigger, failure: AdapterError | None) -> None:
        if self.trigger is None:
            self.trigger, self.failure = trigger, failure
        if self.reader is not None:
            self.reader.cancel()


def _first_leaf(group: BaseExceptionGroup[AdapterError]) -> AdapterError:
    leaf: BaseException = group
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    assert isinstance(leaf, AdapterError)
    return leaf


class SessionRunner:
    """The live side of one configured session."""

    def __init__(
        self,
        config: SessionConfig,
        *,
        machine: SessionMachine,
        sink: EventSink,
        adapter: Adapter,
        limiters: Callable[[str], ConnectRateLimiter],
        clocks: SessionClocks,
        resolve_url: Callable[[str], str] = str,
        publisher: Publisher | None = None,
        recovered: SessionView | None = None,
        handshakes: trio.CapacityLimiter | None = None,
    ) -> None:
        self.config = config
        self.name = config.name
        self._machine = machine
        self._sink = sink
        self._adapter = adapter
        self._limiters = limiters  # the shared connect-rate budget of an endpoint's host
        self._clocks = clocks
        # Endpoints are shown and stored as configured (placeholders, never secrets) and
        # resolved only to connect.
        self._resolve_url = resolve_url
        self._publisher: Publisher = publisher or NullPublisher()
        # Shared by every session of the daemon: attempts in progress at once.
        self._handshakes = handshakes
        #: "" | "queued" (waiting for a slot) | "in progress" (holding one): for status.
        self.handshake = ""
        self.backoff = Backoff(config.backoff, clocks.uniform)
        self.breaker = CircuitBreaker(config.circuit)
        self.model = machine.register(SessionModel(self.name))
        self._commands: list[Command] = []
        self._phase: trio.CancelScope | None = None
        self._interrupt: trio.CancelScope | None = None
        self._stable_noted = False
        self._stopping = False
        self.finished = trio.Event()
        # What status shows: updated only once the transition is durable.
        self.shown: TransitionRecord | None = None
        #: Set (and replaced) whenever ``shown`` changes: for watchers and tests.
        self.changed = trio.Event()
        self.endpoint_index = 0
        self.endpoint: str | None = None
        self.last_error: str | None = None
        self.last_venue_error: str | None = None
        self.throttled_until: datetime | None = None
        self.wait_until: datetime | None = None
        self.last_message_at: float | None = None  # trio time
        self.messages = 0
        self.connected_at: float | None = None
        self.disconnected_at: float | None = None
        self._resume_at: float | None = None  # trio time the current BACKOFF/OPEN wait ends
        if recovered is not None:
            self._restore(recovered)

    # -- recovery ------------------------------------------------------------------

    def _restore(self, view: SessionView) -> None:
        """Take over the state a previous run left in the log."""
        self.model.state = State[view.state]
        self.model.version = view.version
        self.model.since = view.since
        self.backoff.attempt = int(view.carry.get("attempt", 0))
        self.breaker.failures = int(view.carry.get("failures", 0))
        self.endpoint_index = int(view.carry.get("endpoint_index", 0)) % len(self.config.endpoints)
        self.last_error = view.detail.get("error") if view.detail else None
        deadline = _parse_deadline(view.detail.get("deadline")) if view.detail else None
        if deadline is not None and self.model.state in (State.BACKOFF, State.CIRCUIT_OPEN):
            remaining = max(0.0, (deadline - self._clocks.wall()).total_seconds())
            self._resume_at = trio.current_time() + remaining
            self.wait_until = deadline
            if self.model.state is State.CIRCUIT_OPEN:
                self.breaker.open_until(trio.current_time() + remaining)
        if view.since is not None:
            self.shown = TransitionRecord(
                self.name, view.version, view.since, view.trigger or "", view.state,
                view.state, view.reason, dict(view.detail),
            )  # fmt: skip

    # -- commands ------------------------------------------------------------------

    async def command(self, kind: CommandKind, reason: str, **detail: Any) -> str:
        """Queue an operator or lifecycle command; returns what the session did."""
        cmd = Command(kind, reason, detail)
        if self.finished.is_set():
            return "session is not running"
        self._commands.append(cmd)
        # Inside a connection, only its body is cancelled: the adapter's reader stays
        # alive while the link closes politely.
        target = self._interrupt or self._phase
        if target is not None:
            target.cancel()
        await cmd.done.wait()
        return cmd.result

    def _take_commands(self) -> list[Command]:
        commands, self._commands = self._commands, []
        return commands

    async def _handle(self, cmd: Command) -> None:
        state = self.model.state
        kind = cmd.kind
        if kind is CommandKind.PAUSE:
            if state is State.PAUSED:
                cmd.result = "already PAUSED"
            else:
                await self._fire(Trigger.PAUSE, cmd.reason, **cmd.detail)
                cmd.result = "paused"
        elif kind is CommandKind.RESUME:
            if state is not State.PAUSED:
                cmd.result = f"not paused (it is {state.name})"
            else:
                await self._fire(Trigger.RESUME, cmd.reason, **cmd.detail)
                self.backoff.reset()
                self.breaker.reset()
                cmd.result = "resumed"
        elif kind is CommandKind.RECONNECT:
            if state in (State.PAUSED, State.DISCONNECTED):
                cmd.result = f"nothing to reconnect (it is {state.name})"
            else:
                await self._fire(Trigger.RECONNECT, cmd.reason, **cmd.detail)
                self.breaker.half_open = False
                self._resume_at = None
                cmd.result = "reconnecting"
        elif kind is CommandKind.SHUTDOWN:
            self._stopping = True
            if state in LIVE:
                await self._fire(
                    Trigger.SHUTDOWN, cmd.reason, attempt=self.backoff.attempt,
                    failures=self.breaker.failures,
                )  # fmt: skip
            cmd.result = "stopped"
        elif kind is CommandKind.RECONFIGURE:
            self._stopping = True
            if state not in (State.PAUSED, State.DISCONNECTED):
                await self._fire(Trigger.RECONNECT, cmd.reason, **cmd.detail)
            cmd.result = "reconfigured"
        elif kind is CommandKind.REMOVE:
            self._stopping = True
            await self._fire(Trigger.REMOVE, cmd.reason, **cmd.detail)
            cmd.result = "removed"
        cmd.done.set()

    # -- transitions -----------------------------------------------------------------

    async def _fire(self, trigger: Trigger, reason: str, **detail: Any) -> TransitionRecord:
        """Fire, persist (write-ahead), then show."""
        record = self._machine.fire(
            self.model, trigger, at=self._clocks.wall(), reason=reason, detail=detail
        )
        # Shielded: once the model moved, its event must be queued and acknowledged even
        # if an operator command cancels the phase meanwhile.
        with trio.CancelScope(shield=True):
            await self._sink.append(record)
        self.shown = record
        changed, self.changed = self.changed, trio.Event()
        changed.set()
        log.info(
            "transition",
            session=self.name,
            source=record.source,
            trigger=record.trigger,
            dest=record.dest,
            reason=reason,
            version=record.version,
        )
        self._publisher.transition(record)
        return record

    def _deadline_in(self, seconds: float) -> datetime:
        return self._clocks.wall() + timedelta(seconds=seconds)

    # -- the task --------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        structlog.contextvars.bind_contextvars(session=self.name)
        try:
            if self.model.state in LIVE:
                # The previous run ended (crashed) while this session was live.
                await self._fire(
                    Trigger.RECOVER, "daemon restarted", attempt=self.backoff.attempt,
                    failures=self.breaker.failures,
                )  # fmt: skip
            task_status.started()
            while True:
                for cmd in self._take_commands():
                    await self._handle(cmd)
                if self.model.state is not State.CONNECTING:
                    # A slot is held from ``start`` to subscribed; a phase or a command
                    # (a pause right after ``start``) may have ended the attempt first.
                    self._release_handshake()
                if self._stopping:
                    return
                with trio.CancelScope() as scope:
                    self._phase = scope
                    if self._commands:
                        scope.cancel()
                    await self._run_phase()
                self._phase = None
        finally:
            self._phase = None
            self._release_handshake()
            for cmd in self._take_commands():
                cmd.result = cmd.result or "session stopped"
                cmd.done.set()
            self.finished.set()
            self._machine.unregister(self.model)

    async def _run_phase(self) -> None:
        state = self.model.state
        if state is State.DISCONNECTED:
            await self._begin_attempt(Trigger.START)
        elif state is State.BACKOFF:
            await self._sleep_until_resume()
            await self._begin_attempt(Trigger.RETRY)
        elif state is State.CIRCUIT_OPEN:
            await self._sleep_until_resume()
            await self._begin_attempt(Trigger.PROBE)
        elif state is State.PAUSED:
            await trio.sleep_forever()
        elif state is State.CONNECTING:
            await self._connection()
        else:  # pragma: no cover - a live state outside a connection cannot be entered
            raise AssertionError(f"{self.name}: no phase for {state.name}")

    async def _sleep_until_resume(self) -> None:
        if self._resume_at is not None:
            await trio.sleep_until(self._resume_at)
        self._resume_at = None
        self.wait_until = None

    async def _take_handshake(self) -> None:
        """Wait for a daemon-wide handshake slot (FIFO); held until subscribed or failed."""
        if self._handshakes is None or self.handshake == "in progress":
            return
        self.handshake = "queued"
        try:
            await self._handshakes.acquire_on_behalf_of(self)
        except BaseException:
            self.handshake = ""
            raise
        self.handshake = "in progress"

    def _release_handshake(self) -> None:
        if self.handshake == "in progress":
            assert self._handshakes is not None
            self._handshakes.release_on_behalf_of(self)
        self.handshake = ""

    async def _begin_attempt(self, trigger: Trigger) -> None:
        """Take a handshake slot, then a connect slot for the endpoint's host, or wait for
        one visibly.

        The host's slot is taken last, when the attempt really starts: taken before a
        queue, it would let queued attempts reach the host later in a burst.
        """
        await self._take_handshake()
        url = self.config.endpoints[self.endpoint_index]
        wait = self._limiters(url).try_acquire(trio.current_time())
        if wait > 0.0:
            self._release_handshake()  # nothing to do until then: let others go
            host = self.config.host_key(url)
            until = self._deadline_in(wait)
            self.throttled_until = until
            self.wait_until = until
            budget = self.config.connect_rate
            await self._fire(
                Trigger.THROTTLED,
                f"connect rate limit for {host} ({budget.per_host} per "
                f"{_fmt_s(budget.window)}): next slot in {_fmt_s(wait)}",
                throttled=True, delay=round(wait, 3), deadline=until.isoformat(), host=host,
                attempt=self.backoff.attempt, failures=self.breaker.failures,
            )  # fmt: skip
            self._resume_at = trio.current_time() + wait
            return
        self.throttled_until = None
        if trigger is Trigger.PROBE:
            self.breaker.probe()
        reason = {
            Trigger.START: "starting",
            Trigger.RETRY: "backoff elapsed",
            Trigger.PROBE: "cool-down over: half-open probe",
        }[trigger]
        await self._fire(
            trigger, f"{reason}: connecting to {url}", endpoint=url,
            endpoint_index=self.endpoint_index,
        )  # fmt: skip

    # -- one connection ------------------------------------------------------------------

    async def _connection(self) -> None:
        url = self.config.endpoints[self.endpoint_index]
        self.endpoint = url
        link = _Link()
        try:
            async with trio.open_nursery() as nursery:
                conn: Connection | None = None
                body = self._interrupt = trio.CancelScope()
                try:
                    with body:
                        await self._take_handshake()  # held since the attempt began
                        conn = await self._open(nursery, url)
                        await self._fire(
                            Trigger.CONNECTED, f"connected to {url}", endpoint=url,
                            endpoint_index=self.endpoint_index,
                        )  # fmt: skip
                        await self._authenticate(conn)
                        await self._subscribe(conn)
                        self._release_handshake()
                        self.connected_at = trio.current_time()
                        self._stable_noted = False
                        await self._stream(nursery, conn, link)
                except AuthRejected as exc:
                    link.end(Trigger.AUTH_REJECTED, exc)
                except _Silence as exc:
                    link.end(exc.trigger, exc)
                except AdapterError as exc:
                    link.end(Trigger.LOST, exc)
                finally:
                    self._interrupt = None
                    self._release_handshake()
                    if conn is not None:
                        with trio.CancelScope(shield=True):
                            await conn.aclose()
                    nursery.cancel_scope.cancel()
        except* AdapterError as group:  # raised by an adapter's own background task
            link.end(Trigger.LOST, _first_leaf(group))
        if link.trigger is None:
            return
        self.disconnected_at = trio.current_time()
        if link.trigger is Trigger.FAILBACK:
            primary = self.config.endpoints[0]
            self.endpoint_index = 0
            await self._fire(
                Trigger.FAILBACK,
                f"primary endpoint {primary} healthy again: leaving fallback {url}",
                endpoint=url, endpoint_index=0,
            )  # fmt: skip
            return
        assert link.failure is not None
        await self._fail(link.trigger, link.failure)

    async def _open(self, nursery: trio.Nursery, url: str) -> Connection:
        timeout = self.config.connect_timeout
        with trio.move_on_after(timeout):
            return await self._adapter.connect(nursery, self._resolve_url(url))
        raise AdapterError(
            f"connect to {url} timed out after {_fmt_s(timeout)}", error_class="ConnectTimeout"
        )

    async def _authenticate(self, conn: Connection) -> None:
        timeout = self.config.auth_timeout
        # The timeout is the venue's: the write-ahead COMMIT after it is ours.
        with trio.move_on_after(timeout) as scope:
            await conn.authenticate()
        if scope.cancelled_caught:
            raise AdapterError(
                f"no authentication reply within {_fmt_s(timeout)}", error_class="AuthTimeout"
            )
        await self._fire(Trigger.AUTHENTICATED, "authenticated", endpoint=conn.endpoint)

    async def _subscribe(self, conn: Connection) -> None:
        """Send the subscriptions; a venue that confirms them must do so within
        ``auth_timeout`` (a session must not sit in AUTHENTICATED forever)."""
        timeout = self.config.auth_timeout
        with trio.move_on_after(timeout) as scope:
            await conn.subscribe()
        if scope.cancelled_caught:
            raise AdapterError(
                f"no subscription reply within {_fmt_s(timeout)}", error_class="SubscribeTimeout"
            )

    async def _stream(self, nursery: trio.Nursery, conn: Connection, link: _Link) -> None:
        """Read until the link fails, goes silent for dead_after, or is told to end."""
        with trio.CancelScope() as reader:
            link.reader = reader
            nursery.start_soon(self._heartbeats, conn, link)
            if self.endpoint_index != 0:
                nursery.start_soon(self._watch_primary, link)
            await self._read(conn)
        # Ended by a sibling (heartbeat failure, primary healthy): link says why.

    async def _read(self, conn: Connection) -> None:
        cfg = self.config
        publisher = self._publisher
        wall_ns = self._clocks.wall_ns
        last = trio.current_time()
        self.last_message_at = None
        while True:
            window = cfg.stale_after if self.model.state is State.STREAMING else cfg.dead_after
            with trio.CancelScope(deadline=last + window) as silence:
                while True:
                    batch = await conn.receive_batch()
                    now = trio.current_time()
                    if self.model.state is not State.STREAMING:
                        await self._first_message(now, last)
                    silence.deadline = now + cfg.stale_after
                    last = self.last_message_at = now
                    self.messages += len(batch)
                    if batch.errors:
                        self.last_venue_error = batch.errors[-1]
                    if batch.messages:
                        publisher.data(self.name, batch, wall_ns())
                    if not self._stable_noted and self.backoff.is_stable(now):
                        await self._stable()
            silent_for = trio.current_time() - last
            state = self.model.state
            if state is State.STREAMING:
                await self._fire(
                    Trigger.STALE, f"no data for {_fmt_s(silent_for)}",
                    silent_s=round(silent_for, 3),
                )  # fmt: skip
                continue
            if state is State.STALE:
                raise _Silence(
                    Trigger.DEAD, f"no data for {_fmt_s(silent_for)}: link presumed dead"
                )
            raise _Silence(Trigger.LOST, f"no message within {_fmt_s(silent_for)} of subscribing")

    async def _stable(self) -> None:
        """Streamed for reset_after: forget the failures, and say so in the log, so that
        replay (and a restart) knows the counts were reset."""
        self._stable_noted = True
        had = (self.backoff.attempt, self.breaker.failures)
        self.backoff.attempt = 0
        self.breaker.on_stable()
        if had != (0, 0) and self.model.state is State.STREAMING:
            window = self.config.backoff.reset_after
            await self._fire(
                Trigger.STABLE, f"streaming for {_fmt_s(window)}: failure counts reset",
                attempt=0, failures=0,
            )  # fmt: skip

    async def _first_message(self, now: float, last: float) -> None:
        if self.model.state is State.AUTHENTICATED:
            await self._fire(Trigger.DATA, "first message after subscribing")
            self.breaker.on_streaming()
            self.backoff.on_streaming(now)
        else:  # STALE
            gap = now - last
            await self._fire(
                Trigger.DATA, f"data resumed after {_fmt_s(gap)} of silence", gap_s=round(gap, 3)
            )

    async def _heartbeats(self, conn: Connection, link: _Link) -> None:
        interval = self.config.heartbeat_interval
        while True:
            await trio.sleep(interval)
            try:
                await conn.heartbeat()
            except AdapterError as exc:
                link.end(Trigger.LOST, exc)
                return

    async def _watch_primary(self, link: _Link) -> None:
        """On a fallback: probe the primary now and then; leave the fallback once it answers."""
        primary = self.config.endpoints[0]
        while True:
            await trio.sleep(PRIMARY_PROBE_INTERVAL)
            if self._limiters(primary).try_acquire(trio.current_time()) > 0.0:
                continue  # no connect slot to spare for a probe now
            if await self._probe(primary):
                link.end(Trigger.FAILBACK, None)
                return

    async def _probe(self, url: str) -> bool:
        """Does ``url`` complete a transport and protocol handshake now?"""
        async with trio.open_nursery() as nursery:
            try:
                with trio.fail_after(self.config.connect_timeout):
                    conn = await self._adapter.connect(nursery, self._resolve_url(url))
                await conn.aclose()
                return True
            except (AdapterError, trio.TooSlowError):
                return False
            finally:
                nursery.cancel_scope.cancel()

    async def _fail(self, trigger: Trigger, failure: AdapterError) -> None:
        now = trio.current_time()
        self.last_error = failure.reason
        url = self.config.endpoints[self.endpoint_index]
        attempt, delay = self.backoff.on_failure(now)
        tripped = self.breaker.on_failure(now)
        endpoints = self.config.endpoints
        self.endpoint_index = (self.endpoint_index + 1) % len(endpoints)
        common = {
            "error": failure.reason,
            "error_class": failure.error_class,
            "endpoint": url,
            "endpoint_index": self.endpoint_index,
            "attempt": attempt,
            "failures": self.breaker.failures,
        }
        if tripped:
            cooldown = self.config.circuit.cooldown
            until = self._deadline_in(cooldown)
            self._resume_at = now + cooldown
            self.wait_until = until
            await self._fire(
                Trigger.TRIP,
                f"{failure.reason}; circuit open for {_fmt_s(cooldown)} after "
                f"{self.breaker.failures} consecutive failures",
                cooldown=cooldown, deadline=until.isoformat(), **common,
            )  # fmt: skip
            return
        until = self._deadline_in(delay)
        self._resume_at = now + delay
        self.wait_until = until
        await self._fire(
            trigger, failure.reason, delay=round(delay, 3), deadline=until.isoformat(), **common
        )

    # -- status --------------------------------------------------------------------------

    def seconds_since_last_message(self) -> float | None:
        if self.last_message_at is None:
            return None
        return max(0.0, trio.current_time() - self.last_message_at)


def _fmt_s(seconds: float) -> str:
    if math.isinf(seconds):
        return "ever"
    return f"{seconds:.1f} s"


def _parse_deadline(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None
