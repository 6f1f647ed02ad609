"""Group commit from the Trio loop to the event store.

A session task calls ``await writer.append(record)`` and resumes only once the
COMMIT holding the record has returned: write-ahead, so nobody is ever shown a
transition the log does not have. One task drains everything queued since the
last commit into a single transaction in a worker thread, so many transitions
share one fsync and the loop never blocks on the database.

When the database goes away the batch is kept and retried with backoff; appends
wait (the daemon does not act on transitions it could not record) and no event
is lost. A batch rejected for a reason that retrying will not fix (a version
conflict: another daemon owns the session) is split per session, so only the
sessions at fault get the error.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import psycopg
import structlog
import trio
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from statemachines.session import TransitionRecord

log = structlog.get_logger("wirekeep.writer")


class EventSink(Protocol):
    """Where a session task sends its transitions."""

    async def append(self, record: TransitionRecord) -> None: ...


class StoreLike(Protocol):
    def append(self, records: Sequence[TransitionRecord]) -> None: ...


class WriterClosed(Exception):
    """The writer is shutting down and takes no new events."""


def is_transient(exc: BaseException) -> bool:
    """Will retrying help? Connection-level trouble: yes; a refused row: no."""
    if isinstance(exc, DBAPIError):
        return exc.connection_invalidated or isinstance(exc, OperationalError | InterfaceError)
    # The PostgreSQL COPY path talks to psycopg directly: its errors arrive unwrapped.
    return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError | OSError)


class _Ticket:
    """The fate of one group of appends: settled once their COMMIT has returned.

    A list of parked tasks rescheduled in one pass; at tens of thousands of acks per
    second this costs half of what a ``trio.Event`` per group does (measured).
    """

    __slots__ = ("errors", "settled", "waiters")

    def __init__(self) -> None:
        self.waiters: list[trio.lowlevel.Task] = []
        self.errors: dict[str, BaseException] = {}
        self.settled = False

    async def wait(self) -> None:
        if self.settled:
            await trio.lowlevel.checkpoint()
            return
        task = trio.lowlevel.current_task()
        self.waiters.append(task)

        def abort(_: object) -> trio.lowlevel.Abort:
            self.waiters.remove(task)
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def settle(self) -> None:
        self.settled = True
        waiters, self.waiters = self.waiters, []
        for task in waiters:
            trio.lowlevel.reschedule(task)


@dataclass
class WriterStats:
    events_written: int = 0
    batches: int = 0
    last_batch_size: int = 0
    last_commit_s: float = 0.0
    commit_seconds_total: float = 0.0
    failures: int = 0
    batch_sizes: list[int] = field(default_factory=list)  # recent sizes, for the metrics histogram


class EventWriter:
    def __init__(
        self,
        store: StoreLike,
        *,
        max_batch: int = 20_000,
        retry_initial: float = 0.1,
        retry_max: float = 5.0,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self._store = store
        self._max_batch = max_batch
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self._clock = clock
        self._queue: list[TransitionRecord] = []
        self._tickets: list[_Ticket] = []
        self._ticket = _Ticket()
        self._wakeup = trio.Event()
        self._closing = False
        self._partial = False
        self._oldest: float | None = None
        self.commit_started: float | None = None
        self.failing_since: float | None = None
        self.last_error: str | None = None
        self.stats = WriterStats()

    # -- the session side ----------------------------------------------------------

    async def append(self, record: TransitionRecord) -> None:
        """Queue ``record`` and return once it is durable."""
        ticket = self._enqueue((record,))
        await ticket.wait()
        if ticket.errors:
            error = ticket.errors.get(record.session)
            if error is not None:
                raise error

    async def append_many(self, records: Sequence[TransitionRecord]) -> None:
        if not records:
            return
        ticket = self._enqueue(records)
        await ticket.wait()
        for record in records:
            error = ticket.errors.get(record.session)
            if error is not None:
                raise error

    def _enqueue(self, records: Iterable[TransitionRecord]) -> _Ticket:
        if self._closing:
            raise WriterClosed("the event writer is shutting down")
        if self._oldest is None:
            self._oldest = self._clock()
        self._queue.extend(records)
        self._wakeup.set()
        return self._ticket

    # -- observability -------------------------------------------------------------

    @property
    def pending(self) -> int:
        return len(self._queue)

    def lag(self) -> float:
        """Seconds the oldest un-committed event has waited (0.0 when none waits)."""
        return 0.0 if self._oldest is None else max(0.0, self._clock() - self._oldest)

    def stuck_for(self) -> float:
        """How long the current COMMIT has been running (0.0 when none is)."""
        return 0.0 if self.commit_started is None else self._clock() - self.commit_started

    # -- the writer task -----------------------------------------------------------

    def close(self) -> None:
        """Stop taking appends; ``run`` returns once everything queued is committed."""
        self._closing = True
        self._wakeup.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        batch: list[TransitionRecord] = []
        delay = self._retry_initial
        while True:
            if not batch:
                if not self._queue:
                    if self._closing:
                        return
                    await self._wakeup.wait()
                    self._wakeup = trio.Event()
                    continue
                batch = self._take()
            try:
                await self._commit(batch)
            except Exception as exc:  # noqa: BLE001 - sorted into transient / isolate below
                if is_transient(exc):
                    # Keep the batch and retry it alone: order is preserved, nothing is lost.
                    self._note_failure(exc, len(batch) + len(self._queue), delay)
                    await trio.sleep(delay)
                    delay = min(self._retry_max, delay * 2)
                    continue
                await self._commit_per_session(batch)
            if self.failing_since is not None:
                log.info(
                    "event_writer_recovered", down_s=round(self._clock() - self.failing_since, 3)
                )
                self.failing_since = None
                self.last_error = None
            batch = []
            delay = self._retry_initial
            self._settle()

    def _take(self) -> list[TransitionRecord]:
        """Everything queued, up to ``max_batch``; closes the current ticket if all is taken."""
        if len(self._queue) <= self._max_batch:
            batch, self._queue = self._queue, []
            self._tickets.append(self._ticket)
            self._ticket = _Ticket()
            self._partial = False
        else:
            # The current ticket stays open: its later records go in the next batch.
            batch = self._queue[: self._max_batch]
            self._queue = self._queue[self._max_batch :]
            self._partial = True
        return batch

    def _settle(self) -> None:
        """Wake every waiter whose records are all committed."""
        self._oldest = self._clock() if self._queue else None
        for ticket in self._tickets:
            ticket.settle()
        self._tickets = []

    async def _commit(self, batch: list[TransitionRecord]) -> None:
        started = self._clock()
        self.commit_started = started
        try:
            # abandon_on_cancel=False: an in-flight COMMIT always finishes, even on shutdown.
            await trio.to_thread.run_sync(self._store.append, batch, abandon_on_cancel=False)
        finally:
            self.commit_started = None
        elapsed = self._clock() - started
        stats = self.stats
        stats.events_written += len(batch)
        stats.batches += 1
        stats.last_batch_size = len(batch)
        stats.last_commit_s = elapsed
        stats.commit_seconds_total += elapsed
        stats.batch_sizes.append(len(batch))
        if len(stats.batch_sizes) > 1024:
            del stats.batch_sizes[:512]

    async def _commit_per_session(self, batch: list[TransitionRecord]) -> None:
        """Isolate a batch the database refused: commit each session's records alone.

        A session whose records are refused again gets the error; transient trouble meanwhile
        is retried for that session's records, as for a whole batch.
        """
        by_session: dict[str, list[TransitionRecord]] = {}
        for record in batch:
            by_session.setdefault(record.session, []).append(record)
        errors: dict[str, BaseException] = {}
        for session, records in by_session.items():
            delay = self._retry_initial
            while True:
                try:
                    await self._commit(records)
                except Exception as exc:  # noqa: BLE001 - transient: retry; else that session's
                    if is_transient(exc):
                        self._note_failure(exc, len(records), delay)
                        await trio.sleep(delay)
                        delay = min(self._retry_max, delay * 2)
                        continue
                    log.error("event_rejected", session=session, error=_first_line(exc))
                    errors[session] = exc
                break
        for ticket in self._tickets:
            ticket.errors.update(errors)
        if self._partial:
            self._ticket.errors.update(errors)

    def _note_failure(self, exc: BaseException, pending: int, delay: float) -> None:
        self.stats.failures += 1
        self.last_error = _first_line(exc)
        if self.failing_since is None:
            self.failing_since = self._clock()
        log.warning(
            "event_writer_retry", pending=pending, retry_in_s=round(delay, 3), error=self.last_error
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
    return ordered[index]
