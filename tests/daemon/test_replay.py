"""Replay (daemon/replay.py) on both backends: the fold of the stored log equals the live
machine, recovery from snapshots, point-in-time state, and corruption detection."""

from __future__ import annotations

import gc
import json
import random
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
import sqlalchemy as sa

from daemon import replay
from daemon.cli import EXIT_CORRUPT, main
from daemon.replay import CARRIED, CorruptLog, SessionView, fold, recover, state_at, verify_rows
from daemon.schema import session_events
from daemon.store import EventStore, StoredEvent
from statemachines.session import (
    LEGAL,
    SessionMachine,
    SessionModel,
    State,
    TransitionRecord,
    Trigger,
)

T0 = datetime(2026, 11, 21, 14, 0, tzinfo=UTC)

# Operator and shutdown moves are rarer than the network's.
WEIGHTS = {
    Trigger.REMOVE: 0.05,
    Trigger.PAUSE: 0.2,
    Trigger.RECONNECT: 0.2,
    Trigger.SHUTDOWN: 0.1,
    Trigger.RECOVER: 0.1,
    Trigger.FAILBACK: 0.2,
    Trigger.FAULT: 0.1,
    Trigger.RESUME: 3.0,
    Trigger.DATA: 3.0,
}
REASONS = {
    Trigger.START: "begin an attempt",
    Trigger.CONNECTED: "transport up",
    Trigger.AUTHENTICATED: "auth accepted",
    Trigger.AUTH_REJECTED: "auth rejected: invalid key",
    Trigger.DATA: "data arriving",
    Trigger.STABLE: "streaming for 30.0 s: failure counts reset",
    Trigger.STALE: "no data for 5.0 s",
    Trigger.DEAD: "no data for 30.0 s",
    Trigger.LOST: "connection reset by peer",
    Trigger.THROTTLED: "no connect token for 127.0.0.1",
    Trigger.RETRY: "backoff elapsed",
    Trigger.TRIP: "5 consecutive failures",
    Trigger.PROBE: "cool-down over",
    Trigger.PAUSE: "paused by uid 1000",
    Trigger.RESUME: "resumed by uid 1000",
    Trigger.RECONNECT: "reconnect requested by uid 1000",
    Trigger.FAILBACK: "primary endpoint healthy",
    Trigger.SHUTDOWN: "daemon stopping",
    Trigger.RECOVER: "daemon restarted",
    Trigger.REMOVE: "removed from the configuration",
    Trigger.FAULT: "internal error: RuntimeError: boom",
}


def legal_triggers(state: State) -> list[Trigger]:
    return sorted(Trigger(t) for (s, t) in LEGAL if s == state.name)


@dataclass
class Walk:
    """A seeded random walk of several sessions through the real machine."""

    seed: int
    machine: SessionMachine = field(default_factory=SessionMachine)
    models: dict[str, SessionModel] = field(default_factory=dict)
    records: list[TransitionRecord] = field(default_factory=list)
    #: per session: (at, dest, version, reason, trigger, since) after each event
    history: dict[str, list[tuple[datetime, str, int, str, str, datetime]]] = field(
        default_factory=dict
    )
    carry: dict[str, dict[str, Any]] = field(default_factory=dict)
    last_detail: dict[str, dict[str, Any]] = field(default_factory=dict)
    clock: datetime = T0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def add(self, name: str) -> None:
        self.models[name] = self.machine.register(SessionModel(name))
        self.history[name] = []
        self.carry[name] = {}

    def step(self, name: str | None = None) -> TransitionRecord:
        rng = self.rng
        model = self.models[name if name is not None else rng.choice(sorted(self.models))]
        options = legal_triggers(model.state)
        trigger = rng.choices(options, weights=[WEIGHTS.get(t, 1.0) for t in options])[0]
        # Strictly increasing times, to the microsecond.
        self.clock += timedelta(
            milliseconds=rng.randrange(1, 5000), microseconds=rng.randrange(1000)
        )
        detail: dict[str, Any] = {"seq": len(self.records)}
        if trigger in (Trigger.LOST, Trigger.AUTH_REJECTED, Trigger.DEAD, Trigger.THROTTLED):
            detail["attempt"] = rng.randrange(1, 9)
            detail["delay_s"] = round(rng.uniform(0.1, 30.0), 3)
        if trigger is Trigger.TRIP:
            detail["failures"] = rng.randrange(5, 9)
        if trigger in (Trigger.START, Trigger.RETRY, Trigger.PROBE):
            detail["endpoint_index"] = rng.randrange(3)
            detail["url"] = f"ws://127.0.0.1:{8000 + detail['endpoint_index']}/feed"
        reason = f"{REASONS[trigger]} (#{model.version + 1} of {model.name})"
        record = self.machine.fire(model, trigger, at=self.clock, reason=reason, detail=detail)
        self.records.append(record)
        self.history[model.name].append(
            (record.at, record.dest, record.version, record.reason, record.trigger, model.since)
        )
        self.last_detail[model.name] = detail
        for key in CARRIED:
            if key in detail:
                self.carry[model.name][key] = detail[key]
        return record

    def expected_final(self) -> dict[str, tuple[str, int]]:
        return {name: (m.state.name, m.version) for name, m in self.models.items() if m.version > 0}

    def expected_at(self, at: datetime) -> dict[str, tuple[str, int, datetime, str]]:
        out = {}
        for name, hist in self.history.items():
            before = [h for h in hist if h[0] <= at]
            if before:
                _, dest, version, reason, _, since = before[-1]
                out[name] = (dest, version, since, reason)
        return out


def make_walk(seed: int, sessions: int, steps: int) -> Walk:
    walk = Walk(seed)
    for i in range(sessions):
        walk.add(f"venue-{i:02d}")
    for _ in range(steps):
        walk.step()
    return walk


def append_in_batches(
    store: EventStore, records: list[TransitionRecord], rng: random.Random
) -> None:
    i = 0
    while i < len(records):
        size = rng.randrange(1, 60)
        store.append(records[i : i + size])
        i += size


def view_key(view: SessionView) -> tuple[Any, ...]:
    return (view.state, view.version, view.reason, view.since, view.at, view.trigger)


def expected_key(walk: Walk, name: str) -> tuple[Any, ...]:
    at, dest, version, reason, trigger, since = walk.history[name][-1]
    return (dest, version, reason, since, at, trigger)


# -- the fold equals the live machine -------------------------------------------------------


def test_the_walk_covers_the_machine() -> None:
    """The generator is realistic enough: it visits every state and most edges."""
    walk = make_walk(seed=7, sessions=6, steps=1500)
    states = {r.dest for r in walk.records}
    assert states == {s.name for s in State}
    edges = {(r.source, r.trigger) for r in walk.records}
    assert len(edges) >= 0.8 * len(LEGAL)


@pytest.mark.parametrize("seed", [1, 2])
def test_replay_equals_the_live_fold(store: EventStore, seed: int) -> None:
    walk = make_walk(seed=seed, sessions=8, steps=1200)
    append_in_batches(store, walk.records, random.Random(seed))
    assert store.count_events() == len(walk.records)

    assert replay.verify_store(store) == walk.expected_final()

    views = recover(store)
    assert set(views) == set(walk.expected_final())
    for name, view in views.items():
        assert view_key(view) == expected_key(walk, name), name
        assert view.carry == walk.carry[name]
        assert dict(view.detail) == walk.last_detail[name]

    full = fold(store.iter_events())
    assert {n: view_key(v) for n, v in full.items()} == {n: view_key(v) for n, v in views.items()}


def test_replay_of_an_empty_log(store: EventStore) -> None:
    assert replay.verify_store(store) == {}
    assert recover(store) == {}
    assert state_at(store, T0) == {}


def test_recover_uses_the_snapshot_and_the_events_after_it(
    store: EventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    walk = Walk(seed=11)
    for i in range(6):
        walk.add(f"venue-{i}")
    for _ in range(400):
        walk.step()
    first_half = list(walk.records)
    append_in_batches(store, first_half, random.Random(3))

    # Snapshot every session as replay saw it mid-way, with a marker only the snapshot has.
    mid = fold(store.iter_events())
    snaps = []
    for view in mid.values():
        view.carry["from_snapshot"] = view.version
        snaps.append(view.snapshot())
    store.write_snapshots(snaps)
    snapshot_versions = {name: view.version for name, view in mid.items()}

    # More events; venue-0 gets none after the snapshot; a new session appears.
    walk.add("late-comer")
    names_after = [n for n in walk.models if n != "venue-0"]
    for _ in range(400):
        walk.step(walk.rng.choice(names_after))
    append_in_batches(store, walk.records[len(first_half) :], random.Random(4))

    calls: list[dict[str, Any]] = []
    real_iter_events = store.iter_events

    def spy(**kwargs: Any) -> Any:
        calls.append(kwargs)
        return real_iter_events(**kwargs)

    monkeypatch.setattr(store, "iter_events", spy)
    views = recover(store)

    assert set(views) == set(walk.expected_final())
    for name, view in views.items():
        assert view_key(view) == expected_key(walk, name), name
    # Snapshotted sessions resumed from their snapshot ...
    for name, version in snapshot_versions.items():
        assert views[name].carry.get("from_snapshot") == version, name
        assert {"session": name, "after_version": version} in calls
    assert "from_snapshot" not in views["late-comer"].carry
    # ... and did not re-read the events the snapshot covers.
    assert all(c.get("after_version", 0) > 0 for c in calls if c["session"] != "late-comer")
    # venue-0 is exactly its snapshot.
    assert view_key(views["venue-0"]) == view_key(mid["venue-0"])


def test_recover_detects_a_snapshot_ahead_of_the_log(store: EventStore) -> None:
    walk = make_walk(seed=5, sessions=2, steps=40)
    store.append(walk.records)
    view = fold(store.iter_events())["venue-00"]
    snap = view.snapshot()
    store.write_snapshots(
        [type(snap)(snap.session, snap.version + 5, snap.at, snap.state, snap.detail)]
    )
    exc = corrupt_log_from(recover, store)
    assert "'venue-00'" in str(exc)


# -- point in time ------------------------------------------------------------------------------


def test_state_at_every_instant(store: EventStore) -> None:
    walk = make_walk(seed=21, sessions=7, steps=700)
    append_in_batches(store, walk.records, random.Random(21))
    times = [r.at for r in walk.records]
    instants = [
        T0 - timedelta(days=1),  # before anything
        times[0],  # exactly the first event
        times[0] - timedelta(microseconds=1),
        times[100] - timedelta(microseconds=1),  # just before an event
        times[100],  # exactly at an event (inclusive)
        times[100] + (times[101] - times[100]) / 2,  # between two events
        times[350],
        times[-1],
        times[-1] + timedelta(days=365),  # after everything
    ]
    for at in instants:
        views = state_at(store, at)
        expected = walk.expected_at(at)
        got = {name: (v.state, v.version, v.since, v.reason) for name, v in views.items()}
        assert got == expected, at
        assert list(views) == sorted(views)
    # The same instant given with another offset is the same instant.
    at = times[200]
    plus2 = at.astimezone(timezone(timedelta(hours=2)))
    assert {n: v.version for n, v in state_at(store, plus2).items()} == {
        n: e[1] for n, e in walk.expected_at(at).items()
    }


# -- corruption -----------------------------------------------------------------------------------


def insert_raw(store: EventStore, rows: list[tuple[str, int, str, str, str]]) -> None:
    """INSERT straight into the table, bypassing the machine (the table is append-only,
    so corruption can only be built by appending)."""
    values = [
        {
            "session": session,
            "version": version,
            "at": T0 + timedelta(seconds=i),
            "trigger": trigger,
            "source": source,
            "dest": dest,
            "reason": f"raw {i}",
            "detail": {},
        }
        for i, (session, version, trigger, source, dest) in enumerate(rows)
    ]
    with store.engine.begin() as conn:
        conn.execute(sa.insert(session_events), values)


GOOD = [
    ("good", 1, "start", "DISCONNECTED", "CONNECTING"),
    ("good", 2, "connected", "CONNECTING", "CONNECTING"),
]
GOOD_AFTER = [("good", 3, "authenticated", "CONNECTING", "AUTHENTICATED")]
BAD_V1 = ("bad", 1, "start", "DISCONNECTED", "CONNECTING")

# name: (rows of "bad", offending row, words the message must contain)
CORRUPTIONS: dict[str, tuple[list[tuple[str, int, str, str, str]], tuple[Any, ...], list[str]]] = {
    "illegal transition": (
        [BAD_V1, ("bad", 2, "data", "CONNECTING", "STREAMING")],
        ("bad", 2, "data", "CONNECTING", "STREAMING"),
        ["v2", "not a legal transition"],
    ),
    "wrong dest": (
        [BAD_V1, ("bad", 2, "authenticated", "CONNECTING", "STREAMING")],
        ("bad", 2, "authenticated", "CONNECTING", "STREAMING"),
        ["v2", "not a legal transition"],
    ),
    "unknown trigger": (
        [BAD_V1, ("bad", 2, "teleport", "CONNECTING", "STREAMING")],
        ("bad", 2, "teleport", "CONNECTING", "STREAMING"),
        ["v2", "teleport"],
    ),
    "source does not match previous dest": (
        [BAD_V1, ("bad", 2, "stale", "STREAMING", "STALE")],
        ("bad", 2, "stale", "STREAMING", "STALE"),
        ["v2", "leaves STREAMING", "was in CONNECTING"],
    ),
    "first event not from DISCONNECTED": (
        [("bad", 1, "authenticated", "CONNECTING", "AUTHENTICATED")],
        ("bad", 1, "authenticated", "CONNECTING", "AUTHENTICATED"),
        ["v1", "DISCONNECTED"],
    ),
    "version gap": (
        [BAD_V1, ("bad", 3, "connected", "CONNECTING", "CONNECTING")],
        ("bad", 3, "connected", "CONNECTING", "CONNECTING"),
        ["version 3", "gap"],
    ),
    "log starts at v2": (
        [("bad", 2, "start", "DISCONNECTED", "CONNECTING")],
        ("bad", 2, "start", "DISCONNECTED", "CONNECTING"),
        ["version 2", "gap"],
    ),
}


def _check_corrupt(exc: CorruptLog, offending: tuple[Any, ...], words: list[str]) -> None:
    message = str(exc)
    assert "'bad'" in message
    for word in words:
        assert word in message, (word, message)
    assert "good" not in message.split(":", maxsplit=1)[0]
    row = exc.row
    assert (row["session"], row["version"], row["trigger"], row["source"], row["dest"]) == offending


def corrupt_log_from(fn: Callable[..., object], *args: Any) -> CorruptLog:
    """The CorruptLog ``fn`` raises, with its traceback dropped.

    The traceback holds the frames of the fold, and so the store's half-read iterator and
    its open connection; keeping it (as ``pytest.raises`` does, in a reference cycle) would
    keep a transaction open past the test and block the fixture's DROP SCHEMA.
    """
    try:
        fn(*args)
    except CorruptLog as exc:
        exc.__traceback__ = None
        return exc
    pytest.fail(f"{getattr(fn, '__name__', fn)} did not raise CorruptLog")


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_verify_rows_detects_corruption_without_a_database(kind: str) -> None:
    rows, offending, words = CORRUPTIONS[kind]
    exc = corrupt_log_from(verify_rows, [*GOOD, *rows, *GOOD_AFTER])
    _check_corrupt(exc, offending, words)


def test_verify_rows_detects_a_duplicate_version() -> None:
    rows = [BAD_V1, ("bad", 1, "start", "DISCONNECTED", "CONNECTING")]
    with pytest.raises(CorruptLog, match=r"'bad'.*version 1 follows 1 \(duplicate"):
        verify_rows(rows)


Runner = Callable[[EventStore], object]
READERS: dict[str, Runner] = {
    "verify_store": replay.verify_store,
    "recover": recover,
    "state_at": lambda st: state_at(st, T0 + timedelta(days=1)),
    "fold": lambda st: fold(st.iter_events()),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_stored_corruption_is_detected(store: EventStore, kind: str) -> None:
    rows, offending, words = CORRUPTIONS[kind]
    insert_raw(store, [*GOOD, *rows, *GOOD_AFTER])
    for reader, run in READERS.items():
        exc = corrupt_log_from(run, store)
        _check_corrupt(exc, offending, words)
        if reader in ("recover", "fold"):  # full rows: the id and time are there too
            assert isinstance(exc.row["id"], int), reader
            assert exc.row["at"], reader
    # Before the corruption, the log is fine: state_at stops short of it.
    assert state_at(store, T0 + timedelta(seconds=1.5)).keys() == {"good"}


@pytest.mark.parametrize("kind", ["illegal transition", "version gap"])
def test_replay_command_reports_a_corrupt_log(
    store: EventStore, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    rows, offending, _ = CORRUPTIONS[kind]
    insert_raw(store, [*GOOD, *rows])
    for extra in (
        [],
        ["--json"],
        ["--csv"],
        ["--session", "good"],
        ["--at", "2026-11-22T00:00:00Z"],
    ):
        capsys.readouterr()
        code = main(["replay", "--database", store.url, *extra])
        out, err = capsys.readouterr()
        assert code == EXIT_CORRUPT == 4, extra
        assert "corrupt event log" in err, extra
        assert "'bad'" in err
        assert f"v{offending[1]}" in err or f"version {offending[1]}" in err
        assert out == "", extra
    # --no-verify prints the timeline anyway, for forensics.
    assert main(["replay", "--database", store.url, "--no-verify", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == len(GOOD) + len(rows)


def test_stored_event_row_is_the_whole_event(store: EventStore) -> None:
    insert_raw(store, [BAD_V1, ("bad", 2, "data", "CONNECTING", "STREAMING")])
    row = corrupt_log_from(lambda: fold(store.iter_events())).row
    assert row["reason"] == "raw 1"
    stored = list(store.iter_events())[1]
    assert isinstance(stored, StoredEvent)
    assert row == stored.as_json()


@pytest.mark.parametrize("reader", ["recover", "state_at", "verify_store"])
def test_a_corrupt_log_leaves_no_read_open(store: EventStore, reader: str) -> None:
    """When replay finds corruption it must not leave its half-read cursor (and, on SQLite,
    the BEGIN IMMEDIATE write lock; on PostgreSQL an open transaction) behind for as long as
    the caller keeps the exception, e.g. to log it or to carry on with other sessions."""
    insert_raw(store, [*GOOD, BAD_V1, ("bad", 2, "data", "CONNECTING", "STREAMING"), *GOOD_AFTER])
    open_connections = 0

    def checkout(*_: object) -> None:
        nonlocal open_connections
        open_connections += 1

    def checkin(*_: object) -> None:
        nonlocal open_connections
        open_connections -= 1

    sa.event.listen(store.engine, "checkout", checkout)
    sa.event.listen(store.engine, "checkin", checkin)
    kept: list[BaseException] = []
    try:
        try:
            READERS[reader](store)
        except CorruptLog as exc:
            kept.append(exc)  # what a caller does that logs the error, with its traceback
        assert len(kept) == 1
        assert open_connections == 0, f"{reader} left {open_connections} connection(s) open"
    finally:
        # Let a leaked read go before the fixture drops the schema (it would wait on it).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            for exc in kept:
                exc.__traceback__ = None
            kept.clear()
            gc.collect()
