"""The group-commit writer (daemon/writer.py) against real databases, with the real clock
(MockClock's autojump misbehaves while a test waits on a worker thread; see PITFALLS)."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
import trio
import trio.testing
from sqlalchemy.exc import OperationalError

from daemon import migrate
from daemon.replay import verify_store
from daemon.store import EventStore, VersionConflict
from daemon.writer import EventWriter, WriterClosed, is_transient
from statemachines.session import LEGAL, SessionMachine, SessionModel, State, TransitionRecord

T0 = datetime(2026, 11, 21, 14, 0, tzinfo=UTC)
TIMEOUT = 30


def legal_triggers(state: State) -> list[str]:
    return sorted(t for (s, t) in LEGAL if s == state.name and t != "remove")


class Walker:
    """Legal records for one session, fired through the real machine."""

    def __init__(self, machine: SessionMachine, name: str, seed: int) -> None:
        self.machine = machine
        self.model = machine.register(SessionModel(name))
        self.rng = random.Random(seed)

    def next(self) -> TransitionRecord:
        trigger = self.rng.choice(legal_triggers(self.model.state))
        at = T0 + timedelta(milliseconds=10 * (self.model.version + 1))
        return self.machine.fire(
            self.model,
            trigger,
            at=at,
            reason=f"{trigger} #{self.model.version + 1}",
            detail={"n": self.model.version + 1},
        )


def record(session: str, version: int, reason: str = "r") -> TransitionRecord:
    return TransitionRecord(
        session,
        version,
        T0 + timedelta(seconds=version),
        "start",
        "DISCONNECTED",
        "CONNECTING",
        reason,
        {},
    )


def stored(store: EventStore) -> list[tuple[str, int, str]]:
    return [(e.session, e.version, e.reason) for e in store.iter_events()]


def assert_gapless(store: EventStore, expected: dict[str, int]) -> None:
    versions: dict[str, list[int]] = {}
    for e in store.iter_events():
        versions.setdefault(e.session, []).append(e.version)
    assert {name: len(v) for name, v in versions.items()} == expected
    for name, v in versions.items():
        assert v == list(range(1, len(v) + 1)), name


class FlakyStore:
    """A real store whose first ``failures`` appends (those matching ``when``) raise."""

    def __init__(
        self,
        inner: EventStore,
        failures: int,
        error: Callable[[], BaseException],
        when: Callable[[Sequence[TransitionRecord]], bool] = lambda _: True,
    ) -> None:
        self.inner = inner
        self.remaining = failures
        self.error = error
        self.when = when
        self.calls = 0
        self.observe: Callable[[], object] | None = None
        self.observed: list[object] = []
        self.raised = 0

    def append(self, records: Sequence[TransitionRecord]) -> None:
        self.calls += 1
        if self.observe is not None:
            self.observed.append(self.observe())
        if self.remaining > 0 and self.when(records):
            self.remaining -= 1
            self.raised += 1
            raise self.error()
        self.inner.append(records)


def db_gone() -> BaseException:
    return OperationalError("INSERT INTO session_events ...", None, Exception("db gone"))


async def test_many_concurrent_appends_are_durable_and_batched(store: EventStore) -> None:
    tasks, per_task = 200, 20
    writer = EventWriter(store, retry_initial=0.01)
    machine = SessionMachine()
    walkers = [Walker(machine, f"s{i:03d}", seed=i) for i in range(tasks)]
    returned: dict[str, int] = {}
    not_durable: list[tuple[str, int]] = []

    async def session_task(walker: Walker) -> None:
        for _ in range(per_task):
            rec = walker.next()
            await writer.append(rec)
            returned[rec.session] = rec.version
            if rec.version in (1, per_task // 2):  # spot check: committed when append returns
                found = await trio.to_thread.run_sync(store.events_at, {rec.session: rec.version})
                if found.get(rec.session) is None or found[rec.session].reason != rec.reason:
                    not_durable.append((rec.session, rec.version))

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            async with trio.open_nursery() as sessions:
                for walker in walkers:
                    sessions.start_soon(session_task, walker)
            assert writer.pending == 0
            writer.close()

    total = tasks * per_task
    assert not_durable == []
    assert returned == {w.model.name: per_task for w in walkers}
    assert store.count_events() == total
    assert_gapless(store, {w.model.name: per_task for w in walkers})
    # The records went in as fired: replay gives every session's live state.
    assert verify_store(store) == {w.model.name: (w.model.state.name, per_task) for w in walkers}
    stats = writer.stats
    assert stats.events_written == total
    assert 1 <= stats.batches < total  # group commit happened
    assert max(stats.batch_sizes) > 1
    assert sum(stats.batch_sizes) == total
    assert stats.failures == 0
    assert writer.failing_since is None
    assert writer.lag() == 0.0
    assert writer.stuck_for() == 0.0


async def test_version_conflict_is_isolated_to_its_session(store: EventStore) -> None:
    store.append([record("x", 1, "original")])
    writer = EventWriter(store, retry_initial=0.01)
    results: dict[str, object] = {}

    async def put(rec: TransitionRecord) -> None:
        try:
            await writer.append(rec)
            results[rec.session] = "ok"
        except VersionConflict as exc:
            results[rec.session] = exc

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            async with trio.open_nursery() as appends:
                appends.start_soon(put, record("x", 1, "second writer"))
                appends.start_soon(put, record("y", 1, "innocent"))
                await trio.testing.wait_all_tasks_blocked()
                assert writer.pending == 2  # both in one batch
                await nursery.start(writer.run)
            # The writer carries on after a conflict.
            await writer.append(record("x", 2, "next"))
            await writer.append(record("z", 1, "later"))
            writer.close()

    assert isinstance(results["x"], VersionConflict)
    assert results["y"] == "ok"
    assert sorted(stored(store)) == [
        ("x", 1, "original"),
        ("x", 2, "next"),
        ("y", 1, "innocent"),
        ("z", 1, "later"),
    ]


async def test_conflicting_session_gets_the_error_even_when_mixed_with_many(
    store: EventStore,
) -> None:
    store.append([record("x", 1, "original")])
    writer = EventWriter(store, retry_initial=0.01)
    errors: list[str] = []

    async def put(rec: TransitionRecord) -> None:
        try:
            await writer.append(rec)
        except VersionConflict:
            errors.append(rec.session)

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            async with trio.open_nursery() as appends:
                for i in range(30):
                    appends.start_soon(put, record(f"ok{i}", 1))
                appends.start_soon(put, record("x", 1, "second writer"))
                await trio.testing.wait_all_tasks_blocked()
                await nursery.start(writer.run)
            writer.close()
    assert errors == ["x"]
    assert store.count_events() == 31


@pytest.mark.parametrize("failures", [1, 3])
async def test_transient_failures_are_retried_and_nothing_is_lost(
    store: EventStore, failures: int
) -> None:
    flaky = FlakyStore(store, failures, db_gone)
    writer = EventWriter(flaky, retry_initial=0.01, retry_max=0.05)
    machine = SessionMachine()
    walkers = [Walker(machine, f"s{i}", seed=i) for i in range(10)]
    # What the writer reports at each attempt (read from the worker thread, at the call).
    flaky.observe = lambda: (writer.failing_since, writer.last_error, writer.stats.failures)

    async def session_task(walker: Walker) -> None:
        for _ in range(5):
            await writer.append(walker.next())

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            async with trio.open_nursery() as sessions:
                for walker in walkers:
                    sessions.start_soon(session_task, walker)
            writer.close()

    assert flaky.raised == failures
    assert writer.stats.failures == failures
    assert flaky.observed[0] == (None, None, 0)
    retries = flaky.observed[1 : failures + 1]
    assert [n for _, _, n in retries] == list(range(1, failures + 1))
    first_since = retries[0][0]
    for since, error, _ in retries:  # failing while the retries go on, since the first
        assert since is not None
        assert since == first_since
        assert error is not None
        assert "db gone" in error
    assert writer.failing_since is None  # reset after the first successful commit
    assert writer.last_error is None
    assert store.count_events() == 50
    assert_gapless(store, {w.model.name: 5 for w in walkers})
    assert verify_store(store) == {w.model.name: (w.model.state.name, 5) for w in walkers}


async def test_close_commits_everything_queued_then_run_returns(store: EventStore) -> None:
    writer = EventWriter(store, retry_initial=0.01)
    done: list[str] = []

    async def put(rec: TransitionRecord) -> None:
        await writer.append(rec)
        done.append(rec.session)

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            for i in range(50):
                nursery.start_soon(put, record(f"q{i}", 1))
            await trio.testing.wait_all_tasks_blocked()
            assert writer.pending == 50
            writer.close()
            with pytest.raises(WriterClosed):
                await writer.append(record("late", 1))
            with pytest.raises(WriterClosed):
                await writer.append_many([record("late", 1)])
            # run() drains what was queued before close() and returns by itself.
            await writer.run()
            assert writer.pending == 0
    assert sorted(done) == sorted(f"q{i}" for i in range(50))
    assert store.count_events() == 50
    assert "late" not in {e.session for e in store.iter_events()}


async def test_close_while_running_lets_in_flight_appends_finish(store: EventStore) -> None:
    writer = EventWriter(store, retry_initial=0.01)
    returned: dict[str, int] = {}
    refused: list[str] = []
    enough = trio.Event()

    async def session_task(name: str) -> None:
        for version in range(1, 1000):
            try:
                await writer.append(record(name, version))
            except WriterClosed:
                refused.append(name)
                return
            returned[name] = version
            if sum(returned.values()) >= 200:
                enough.set()

    names = [f"c{i}" for i in range(20)]
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            for name in names:
                nursery.start_soon(session_task, name)
            await enough.wait()
            writer.close()
    assert sorted(refused) == sorted(names)
    # Every append that returned is stored, gaplessly, and nothing refused was stored.
    assert_gapless(store, returned)
    assert store.count_events() == writer.stats.events_written == sum(returned.values())


async def test_append_many_is_one_wait(store: EventStore) -> None:
    writer = EventWriter(store, retry_initial=0.01)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            await writer.append_many([record("m", v) for v in range(1, 4)])
            await writer.append_many([])
            writer.close()
    assert [(s, v) for s, v, _ in stored(store)] == [("m", 1), ("m", 2), ("m", 3)]
    assert writer.stats.batches == 1


async def test_max_batch_splits_a_large_queue(store: EventStore) -> None:
    writer = EventWriter(store, retry_initial=0.01, max_batch=7)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            async with trio.open_nursery() as appends:
                for i in range(30):
                    appends.start_soon(writer.append, record(f"b{i}", 1))
                await trio.testing.wait_all_tasks_blocked()
                await nursery.start(writer.run)
            writer.close()
    assert store.count_events() == 30
    assert max(writer.stats.batch_sizes) <= 7
    assert writer.stats.batches >= 5


# -- transient errors the writer must recognise -------------------------------------------------


def admin_shutdown() -> BaseException:
    # What COPY raises (straight from psycopg, not wrapped by SQLAlchemy) when PostgreSQL
    # is restarted under the writer: SQLSTATE 57P01, a subclass of psycopg.OperationalError.
    return psycopg.errors.AdminShutdown("terminating connection due to administrator command")


@pytest.mark.parametrize(
    "error",
    [
        psycopg.OperationalError("server closed the connection unexpectedly"),
        psycopg.errors.AdminShutdown("terminating connection due to administrator command"),
        psycopg.errors.CrashShutdown("terminating connection because of crash of another server"),
        psycopg.errors.CannotConnectNow("the database system is starting up"),
        psycopg.errors.ConnectionFailure("connection failure"),
        psycopg.InterfaceError("the connection is closed"),
        OperationalError("SELECT 1", None, Exception("db gone")),
        ConnectionResetError("reset"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_connection_errors_are_transient(error: BaseException) -> None:
    assert is_transient(error)


@pytest.mark.parametrize(
    "error",
    [VersionConflict("dup"), psycopg.errors.UniqueViolation("dup"), ValueError("bad")],
    ids=lambda e: type(e).__name__,
)
def test_rejections_are_not_transient(error: BaseException) -> None:
    assert not is_transient(error)


@pytest.fixture
def pg_store(postgres_url: str) -> Iterator[EventStore]:
    st = EventStore(postgres_url)
    migrate.upgrade(st.engine)
    try:
        yield st
    finally:
        st.close()


async def test_postgresql_restart_during_copy_loses_nothing(pg_store: EventStore) -> None:
    """PostgreSQL restarts under the writer: the raw psycopg error that COPY raises must be
    retried like any lost connection, not handed to the session as a rejection."""
    flaky = FlakyStore(pg_store, 2, admin_shutdown)
    writer = EventWriter(flaky, retry_initial=0.01, retry_max=0.05)
    outcome: list[object] = []
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            try:
                await writer.append(record("p", 1))
                outcome.append("ok")
            except Exception as exc:  # noqa: BLE001 - recorded for the assertion
                outcome.append(exc)
            writer.close()
    assert outcome == ["ok"], f"the append failed instead of being retried: {outcome[0]!r}"
    assert stored(pg_store) == [("p", 1, "r")]
    assert writer.stats.failures == 2


async def test_transient_error_while_isolating_a_conflict_loses_nothing(store: EventStore) -> None:
    """A batch is refused for a conflict and split per session; if the database blips while
    the innocent session's records are re-committed, they must be retried, not rejected."""
    store.append([record("x", 1, "original")])
    flaky = FlakyStore(store, 1, db_gone, when=lambda recs: {r.session for r in recs} == {"y"})
    writer = EventWriter(flaky, retry_initial=0.01)
    results: dict[str, object] = {}

    async def put(rec: TransitionRecord) -> None:
        try:
            await writer.append(rec)
            results[rec.session] = "ok"
        except Exception as exc:  # noqa: BLE001 - recorded for the assertions
            results[rec.session] = exc

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            async with trio.open_nursery() as appends:
                appends.start_soon(put, record("x", 1, "second writer"))
                appends.start_soon(put, record("y", 1, "innocent"))
                await trio.testing.wait_all_tasks_blocked()
                await nursery.start(writer.run)
            writer.close()
    assert isinstance(results["x"], VersionConflict)
    assert flaky.raised == 1
    assert results["y"] == "ok", f"y was rejected by a transient error: {results['y']!r}"
    assert ("y", 1, "innocent") in stored(store)
