"""One task per session: pump network I/O and timers, and ask the session's policy.

The task decides nothing itself: what a command, silence, a failure, the first message,
a probe result or a bug means is :class:`statemachines.decide.SessionPolicy`'s answer.
The task fires the decision on the shared machine, waits until its event is durable
(write-ahead), and only then publishes it: :attr:`SessionRunner.durable` (what status,
metrics, ``/health`` and STATUS= read), the log line, and the consumer hub, in that one
place. Readers never read ``model`` (it moves before the COMMIT). Timers run on Trio's
clock (``trio.current_time``), so tests drive them with ``MockClock``; stored times come
from the injected wall clock.

Phases, by state:

- DISCONNECTED / BACKOFF / CIRCUIT_OPEN: wait out the delay, wait for one of the
  daemon's handshake slots (``max_handshakes``, first come first served; status shows
  ``handshake: queued``), take a connect slot from the host's rate limiter (a refused
  slot is a visible ``throttled`` transition), then ``start`` / ``retry`` / ``probe``.
- CONNECTING: transport + handshake (``connected``), authentication, subscriptions;
  the handshake slot is given back once subscribed, or when the attempt fails.
- AUTHENTICATED / STREAMING / STALE: read batches; silence is reported to the policy
  (STALE, then the end of the link); heartbeats run beside.
- PAUSED: wait for ``resume``.

Operator commands (pause, resume, reconnect) and lifecycle commands (shutdown, remove)
that apply in the current state interrupt whatever phase runs: they are queued, the
phase's cancel scope is cancelled, and the task handles them between phases, so one
task alone ever changes its model. A command that does not apply ("not paused") is
answered at once and interrupts nothing.

An unexpected exception in the task (a bug) is logged with its traceback and becomes a
transition (detail ``error_class = "internal"``) that counts as a failure: the session
comes back through the backoff and the breaker, and no other session notices.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import structlog
import trio

from daemon.adapters.base import Adapter, AdapterError, AuthRejected, Batch, Connection
from daemon.config import SessionConfig
from daemon.excgroups import first_error
from daemon.replay import SessionView
from daemon.writer import EventSink
from statemachines.decide import (
    Answer,
    CommandKind,
    Decision,
    Failure,
    SessionPolicy,
    Timing,
    fmt_s,
)
from statemachines.memory import Memory
from statemachines.policy import Backoff, CircuitBreaker, ConnectRateLimiter
from statemachines.session import (
    WAITING,
    SessionMachine,
    SessionModel,
    State,
    TransitionRecord,
    Trigger,
)

__all__ = ["CommandKind", "Durable", "NullPublisher", "Publisher", "SessionClocks", "SessionRunner"]

log = structlog.get_logger("wirekeep.session")

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


@dataclass(frozen=True, slots=True)
class Durable:
    """What the log holds about a session: published after each COMMIT, never before.

    ``since`` is when the session entered ``state`` (self-loops do not move it);
    ``record`` the last durable event (None: nothing yet); ``breaker`` "closed", "open"
    or "half-open"; ``wait_until`` the end of the current BACKOFF / CIRCUIT_OPEN wait;
    ``throttled_until`` set while a throttled attempt waits for its connect slot.
    """

    state: State
    version: int
    since: datetime | None
    record: TransitionRecord | None
    memory: Memory
    breaker: str
    wait_until: datetime | None
    throttled_until: datetime | None
    last_error: str | None


class _Silence(AdapterError):
    """Nothing arrived for too long, and the policy says the link is over."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.reason, error_class=failure.error_class)
        self.failure = failure


@dataclass
class _Link:
    """Why the current link ended; the first reason wins and stops the reader."""

    failure: Failure | None = None
    failback: bool = False
    reader: trio.CancelScope | None = None

    @property
    def ended(self) -> bool:
        return self.failure is not None or self.failback

    def end(self, failure: Failure | None) -> None:
        """End with ``failure``, or (None) to fail back to the primary."""
        if not self.ended:
            self.failure, self.failback = failure, failure is None
        if self.reader is not None:
            self.reader.cancel()


def _failure(exc: AdapterError) -> Failure:
    if isinstance(exc, _Silence):
        return exc.failure
    trigger = Trigger.AUTH_REJECTED if isinstance(exc, AuthRejected) else Trigger.LOST
    return Failure(trigger, exc.reason, exc.error_class)


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
        memory = recovered.memory if recovered is not None else Memory()
        self.policy = SessionPolicy(
            config.endpoints, backoff=config.backoff, circuit=config.circuit,
            timing=Timing(config.stale_after, config.dead_after), uniform=clocks.uniform,
            memory=memory,
        )  # fmt: skip
        self.model = machine.register(SessionModel(self.name))
        self._commands: list[Command] = []
        self._phase: trio.CancelScope | None = None
        self._interrupt: trio.CancelScope | None = None
        self._stopping = False
        self.finished = trio.Event()
        # The last durable event (kept for its readers; ``durable`` has the rest).
        self.shown: TransitionRecord | None = None
        #: Set (and replaced) whenever ``durable`` changes: for watchers and tests.
        self.changed = trio.Event()
        self.endpoint: str | None = None
        self.last_venue_error: str | None = None
        self.last_message_at: float | None = None  # trio time
        self.messages = 0
        self.connected_at: float | None = None
        self.disconnected_at: float | None = None
        self._resume_at: float | None = None  # trio time the current BACKOFF/OPEN wait ends
        self.durable = Durable(
            State.DISCONNECTED, 0, None, None, memory, "closed", None, None, None
        )
        if recovered is not None:
            self._restore(recovered, memory)

    # Policy memory, as the policy holds it now (status and metrics read ``durable``).
    @property
    def backoff(self) -> Backoff:
        return self.policy.backoff

    @property
    def breaker(self) -> CircuitBreaker:
        return self.policy.breaker

    @property
    def endpoint_index(self) -> int:
        return self.policy.endpoint_index

    # What status shows: durable, like the state.
    @property
    def last_error(self) -> str | None:
        return self.durable.last_error

    @property
    def wait_until(self) -> datetime | None:
        return self.durable.wait_until

    @property
    def throttled_until(self) -> datetime | None:
        return self.durable.throttled_until

    # -- recovery ------------------------------------------------------------------

    def _restore(self, view: SessionView, memory: Memory) -> None:
        """Take over the state a previous run left in the log."""
        model = self.model
        model.state = State[view.state]
        model.version = view.version
        model.since = view.since
        wait_until = None
        if memory.deadline is not None and model.state in WAITING:
            remaining = max(0.0, (memory.deadline - self._clocks.wall()).total_seconds())
            self._resume_at = trio.current_time() + remaining
            wait_until = memory.deadline
            if model.state is State.CIRCUIT_OPEN:
                self.policy.restore_open(remaining, trio.current_time())
        if view.version:
            at = view.at or view.since
            assert at is not None
            self.shown = TransitionRecord(
                self.name, view.version, at, view.trigger or "", view.state, view.state,
                view.reason, dict(view.detail),
            )  # fmt: skip
        error = view.detail.get("error")
        self.durable = Durable(
            model.state, model.version, model.since, self.shown, memory,
            self.policy.breaker_state(), wait_until, None,
            error if isinstance(error, str) else None,
        )  # fmt: skip

    # -- commands ------------------------------------------------------------------

    async def command(self, kind: CommandKind, reason: str, **detail: Any) -> str:
        """Ask for an operator or lifecycle command; returns what the session did.

        One that does not apply in the current state is answered at once ("not paused")
        and interrupts nothing; one that does is queued and interrupts the phase.
        """
        if self.finished.is_set():
            return "session is not running"
        refused = self.policy.refusal(self.model.state, kind)
        if refused is not None:
            return refused
        cmd = Command(kind, reason, detail)
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

    async def _handle_commands(self) -> None:
        commands = self._take_commands()
        for i, cmd in enumerate(commands):
            try:
                answer = await self._handle(cmd)
                cmd.result = answer.result
            except BaseException:
                cmd.result = "failed: internal error"
                self._commands[:0] = commands[i + 1 :]  # the next turn answers them
                raise
            finally:
                cmd.done.set()

    async def _handle(self, cmd: Command) -> Answer:
        answer = self.policy.command(self.model.state, cmd.kind, cmd.reason, cmd.detail)
        if answer.decision is not None:
            await self._apply(answer.decision)
        if answer.stop:
            self._stopping = True
        return answer

    # -- transitions -----------------------------------------------------------------

    async def _apply(self, decision: Decision) -> TransitionRecord:
        """Fire the decision, persist it (write-ahead), then publish it."""
        model = self.model
        now, since = trio.current_time(), model.since
        record = self._machine.fire(
            model, decision.trigger, at=self._clocks.wall(), reason=decision.reason,
            detail=decision.detail,
        )  # fmt: skip
        try:
            # Shielded: once the model moved, its event must be queued and acknowledged
            # even if an operator command cancels the phase meanwhile.
            with trio.CancelScope(shield=True):
                await self._sink.append(record)
        except BaseException:
            self._machine.revert(model, record, since)  # not durable: it did not happen
            raise
        self._resume_at = None if decision.wait is None else now + decision.wait
        self._publish(record, decision)
        return record

    def _publish(self, record: TransitionRecord, decision: Decision) -> None:
        """The one after-COMMIT step: every observer learns of the transition here."""
        before = self.durable
        error = record.detail.get("error")
        self.shown = record
        self.durable = Durable(
            state=self.model.state,
            version=record.version,
            since=self.model.since,
            record=record,
            memory=self.policy.memory(decision.deadline),
            breaker=self.policy.breaker_state(),
            wait_until=decision.deadline,
            throttled_until=decision.deadline if decision.trigger is Trigger.THROTTLED else None,
            last_error=error if isinstance(error, str) else before.last_error,
        )
        changed, self.changed = self.changed, trio.Event()
        changed.set()
        log.info(
            "transition",
            session=self.name,
            source=record.source,
            trigger=record.trigger,
            dest=record.dest,
            reason=record.reason,
            version=record.version,
        )
        self._publisher.transition(record)

    # -- the task --------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        structlog.contextvars.bind_contextvars(session=self.name)
        try:
            # The previous run ended (crashed) while this session was live.
            recover = self.policy.recover(self.model.state)
            if recover is not None:
                await self._apply(recover)
            task_status.started()
            while not self._stopping:
                try:
                    await self._turn()
                except Exception as exc:  # a bug: contained to this session
                    log.exception("session_fault", session=self.name)
                    await self._fault(exc)
        except Exception:  # even the fault could not be recorded: this session stops
            log.exception("session_stopped", session=self.name)
        finally:
            self._phase = None
            self._release_handshake()
            for cmd in self._take_commands():
                cmd.result = cmd.result or "session stopped"
                cmd.done.set()
            self.finished.set()
            self._machine.unregister(self.model)

    async def _turn(self) -> None:
        """Commands first, then one phase of the current state."""
        await self._handle_commands()
        if self.model.state is not State.CONNECTING:
            # A slot is held from ``start`` to subscribed; a phase or a command (a pause
            # right after ``start``) may have ended the attempt first.
            self._release_handshake()
        if self._stopping:
            return
        with trio.CancelScope() as scope:
            self._phase = scope
            if self._commands:
                scope.cancel()
            try:
                await self._run_phase()
            finally:
                self._phase = None

    async def _fault(self, exc: Exception) -> None:
        """A bug in this session's task: recorded, and paced by the backoff (see
        :meth:`SessionPolicy.fault`)."""
        leaf = first_error(exc)
        self._release_handshake()
        decision = self.policy.fault(
            self.model.state, f"{type(leaf).__name__}: {leaf}",
            now=trio.current_time(), wall=self._clocks.wall(),
        )  # fmt: skip
        await self._apply(decision)

    async def _run_phase(self) -> None:
        state = self.model.state
        if state is State.PAUSED:
            await trio.sleep_forever()
        elif state is State.CONNECTING:
            await self._connection()
        elif state in (State.DISCONNECTED, *WAITING):
            await self._sleep_until_resume()
            await self._begin_attempt()
        else:  # a live state outside a connection cannot be entered: a bug if it is
            raise AssertionError(f"{self.name}: no phase for {state.name}")

    async def _sleep_until_resume(self) -> None:
        if self._resume_at is not None:
            await trio.sleep_until(self._resume_at)
        self._resume_at = None

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

    async def _begin_attempt(self) -> None:
        """Take a handshake slot, then a connect slot for the endpoint's host, or wait for
        one visibly.

        The host's slot is taken last, when the attempt really starts: taken before a
        queue, it would let queued attempts reach the host later in a burst.
        """
        await self._take_handshake()
        url = self.policy.endpoint
        wait = self._limiters(url).try_acquire(trio.current_time())
        if wait > 0.0:
            self._release_handshake()  # nothing to do until then: let others go
        decision = self.policy.attempt(
            self.model.state, wait=wait, host=self.config.host_key(url),
            rate=self.config.connect_rate, wall=self._clocks.wall(),
        )  # fmt: skip
        await self._apply(decision)

    # -- one connection ------------------------------------------------------------------

    async def _connection(self) -> None:
        url = self.policy.endpoint
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
                        index = self.policy.endpoint_index
                        connected = {"endpoint": url, "endpoint_index": index}
                        await self._apply(
                            Decision(Trigger.CONNECTED, f"connected to {url}", connected)
                        )
                        await self._authenticate(conn)
                        await self._subscribe(conn)
                        self._release_handshake()
                        self.connected_at = trio.current_time()
                        self.policy.link_up()
                        await self._stream(nursery, conn, link)
                except AdapterError as exc:
                    link.end(_failure(exc))
                finally:
                    self._interrupt = None
                    self._release_handshake()
                    if conn is not None:
                        with trio.CancelScope(shield=True):
                            await conn.aclose()
                    nursery.cancel_scope.cancel()
        except* AdapterError as group:  # raised by an adapter's own background task
            leaf = first_error(group)
            assert isinstance(leaf, AdapterError)
            link.end(_failure(leaf))
        if not link.ended:
            return
        self.disconnected_at = trio.current_time()
        if link.failure is None:
            await self._apply(self.policy.failback())
            return
        decision = self.policy.failure(
            link.failure, now=trio.current_time(), wall=self._clocks.wall()
        )
        await self._apply(decision)

    async def _open(self, nursery: trio.Nursery, url: str) -> Connection:
        timeout = self.config.connect_timeout
        with trio.move_on_after(timeout):
            return await self._adapter.connect(nursery, self._resolve_url(url))
        raise AdapterError(
            f"connect to {url} timed out after {fmt_s(timeout)}", error_class="ConnectTimeout"
        )

    async def _authenticate(self, conn: Connection) -> None:
        timeout = self.config.auth_timeout
        # The timeout is the venue's: the write-ahead COMMIT after it is ours.
        with trio.move_on_after(timeout) as scope:
            await conn.authenticate()
        if scope.cancelled_caught:
            raise AdapterError(
                f"no authentication reply within {fmt_s(timeout)}", error_class="AuthTimeout"
            )
        await self._apply(
            Decision(Trigger.AUTHENTICATED, "authenticated", {"endpoint": conn.endpoint})
        )

    async def _subscribe(self, conn: Connection) -> None:
        """Send the subscriptions; a venue that confirms them must do so within
        ``auth_timeout`` (a session must not sit in AUTHENTICATED forever)."""
        timeout = self.config.auth_timeout
        with trio.move_on_after(timeout) as scope:
            await conn.subscribe()
        if scope.cancelled_caught:
            raise AdapterError(
                f"no subscription reply within {fmt_s(timeout)}", error_class="SubscribeTimeout"
            )

    async def _stream(self, nursery: trio.Nursery, conn: Connection, link: _Link) -> None:
        """Read until the link fails, goes silent for good, or is told to end."""
        with trio.CancelScope() as reader:
            link.reader = reader
            nursery.start_soon(self._heartbeats, conn, link)
            if self.policy.endpoint_index != 0:
                nursery.start_soon(self._watch_primary, link)
            await self._read(conn)
        # Ended by a sibling (heartbeat failure, primary healthy): link says why.

    async def _read(self, conn: Connection) -> None:
        policy = self.policy
        publisher = self._publisher
        wall_ns = self._clocks.wall_ns
        last = trio.current_time()
        self.last_message_at = None
        while True:
            window = policy.silence_window(self.model.state)
            with trio.CancelScope(deadline=last + window) as silence:
                while True:
                    batch = await conn.receive_batch()
                    now = trio.current_time()
                    if self.model.state is not State.STREAMING:
                        decision = policy.message(self.model.state, now, now - last)
                        if decision is not None:
                            await self._apply(decision)
                    silence.deadline = now + policy.timing.stale_after
                    last = self.last_message_at = now
                    self.messages += len(batch)
                    if batch.errors:
                        self.last_venue_error = batch.errors[-1]
                    if batch.messages:
                        publisher.data(self.name, batch, wall_ns())
                    stable = policy.stable(self.model.state, now)
                    if stable is not None:
                        await self._apply(stable)
            verdict = policy.silence(self.model.state, trio.current_time() - last)
            if isinstance(verdict, Failure):
                raise _Silence(verdict)
            await self._apply(verdict)

    async def _heartbeats(self, conn: Connection, link: _Link) -> None:
        interval = self.config.heartbeat_interval
        while True:
            await trio.sleep(interval)
            try:
                await conn.heartbeat()
            except AdapterError as exc:
                link.end(_failure(exc))
                return

    async def _watch_primary(self, link: _Link) -> None:
        """On a fallback: probe the primary now and then; leave the fallback once it
        answers and the policy agrees."""
        primary = self.config.endpoints[0]
        while True:
            await trio.sleep(PRIMARY_PROBE_INTERVAL)
            if self._limiters(primary).try_acquire(trio.current_time()) > 0.0:
                continue  # no connect slot to spare for a probe now
            if await self._probe(primary) and self.policy.may_fail_back(self.model.state):
                link.end(None)
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

    # -- status --------------------------------------------------------------------------

    def seconds_since_last_message(self) -> float | None:
        if self.last_message_at is None:
            return None
        return max(0.0, trio.current_time() - self.last_message_at)
