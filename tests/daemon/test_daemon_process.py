"""The daemon as a real process, against the bundled venue as a real process, over loopback.

Nothing here waits by sleeping a fixed time: every condition is polled with a deadline,
in the daemon's stdout (a ``transition`` log line is written only once its event is
committed: the acknowledged transitions) or in the database, read-only, as an auditor
would. The helpers live in ``tests/support/processkit.py``.
"""

from __future__ import annotations

import secrets
import signal
import socket
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trio
from processkit import (
    LIVE,
    WIREKEEP,
    Db,
    Process,
    ProcessGroup,
    Venue,
    child_env,
    eventually,
    parse_time,
    pb_session,
    remove_socket_dir,
    run_clis,
    socket_dir,
    start_daemon,
    start_venue,
    unused_port,
    write_config,
    ws_session,
)

from daemon.readonly import QueryError

EX_CONFIG = 78

pytestmark = pytest.mark.skipif(
    sys.platform == "win32", reason="POSIX signals, SO_LINGER resets and Unix sockets"
)


@pytest.fixture
def group(tmp_path: Path) -> Iterator[ProcessGroup]:
    processes = ProcessGroup(tmp_path)
    try:
        yield processes
    finally:
        processes.close()


@pytest.fixture
def sockets(tmp_path: Path) -> Iterator[Path]:
    directory = socket_dir(tmp_path)
    try:
        yield directory
    finally:
        remove_socket_dir(directory, tmp_path)


def sqlite_file(tmp_path: Path) -> tuple[str, Path]:
    path = tmp_path / "events.db"
    return f"sqlite:///{path}", path


def last_events(db: Db) -> dict[str, dict[str, Any]]:
    return {name: events[-1] for name, events in db.by_session().items()}


def streaming_since(db: Db, names: list[str], after: dict[str, int] | None = None) -> bool:
    """Has each session reached STREAMING at a version above ``after[name]``?"""
    events = db.by_session()
    floor = after or {}
    return all(
        any(e["dest"] == "STREAMING" and e["version"] > floor.get(n, 0) for e in events.get(n, []))
        for n in names
    )


def logged_streaming(daemon: Process, names: list[str]) -> bool:
    return all(any(t["dest"] == "STREAMING" for t in daemon.transitions(n)) for n in names)


def key(event: dict[str, Any]) -> tuple[str, int, str, str]:
    return (event["session"], int(event["version"]), event["trigger"], event["dest"])


def assert_gapless(db: Db) -> None:
    for name, events in db.by_session().items():
        versions = [e["version"] for e in events]
        assert versions == list(range(1, len(versions) + 1)), f"{name}: versions {versions}"


# --------------------------------------------------------------------------- 1. clean run


async def test_both_kinds_stream_then_sigterm_stops_cleanly(
    tmp_path: Path, db_url: str, group: ProcessGroup, sockets: Path
) -> None:
    venue = await start_venue(group)
    names = ["ws-live", "pb-live"]
    config = write_config(
        tmp_path / "wirekeep.toml",
        database=db_url,
        sockets=sockets,
        sessions=[ws_session("ws-live", venue.ws_url), pb_session("pb-live", venue.pb_url)],
    )
    db = Db(db_url)
    daemon = await start_daemon(group, config)

    await eventually(
        lambda: logged_streaming(daemon, names), lambda: f"STREAMING in the log{daemon.describe()}"
    )
    # Logged means committed: the database already has it.
    assert streaming_since(db, names)
    assert daemon.running

    assert await daemon.stop() == 0
    assert "Traceback" not in daemon.stderr()
    assert daemon.events("daemon_stopped")

    assert db.verify() == {n: ("DISCONNECTED", len(db.events(n))) for n in names}
    for name in names:
        events = db.events(name)
        assert [e["trigger"] for e in events[:4]] == [
            "start",
            "connected",
            "authenticated",
            "data",
        ], events
        last = events[-1]
        assert (last["trigger"], last["dest"]) == ("shutdown", "DISCONNECTED"), last
        assert last["source"] in LIVE
    # A clean stop: every committed event was acknowledged in the log, and vice versa.
    assert {key(t) for t in daemon.transitions()} == {key(e) for e in db.events()}
    (run,) = db.runs()
    assert run["clean"] is True
    assert run["stopped_at"] is not None
    assert run["pid"] == daemon.pid
    assert run["last_event_id"] == max(e["id"] for e in db.events())


# --------------------------------------------------------------------------- 2. crash


async def test_sigkill_while_flapping_loses_no_acknowledged_transition(
    tmp_path: Path, group: ProcessGroup, sockets: Path
) -> None:
    # Two ports of each kind: the sessions on the first ports flap (drops every 0.2 s),
    # those on the second stay STREAMING, so some session is always live at the kill.
    venue = await start_venue(group, ws_ports=2, pb_ports=2, rate=50.0)
    flapping = ["ws-flap", "pb-flap"]
    steady = ["ws-steady", "pb-steady"]
    names = flapping + steady
    url, _ = sqlite_file(tmp_path)
    config = write_config(
        tmp_path / "wirekeep.toml",
        database=url,
        sockets=sockets,
        sessions=[
            ws_session("ws-flap", venue.ws_urls[0]),
            pb_session("pb-flap", venue.pb_urls[0]),
            ws_session("ws-steady", venue.ws_urls[1]),
            pb_session("pb-steady", venue.pb_urls[1]),
        ],
    )
    db = Db(url)
    daemon = await start_daemon(group, config)
    await eventually(lambda: streaming_since(db, names), "every session STREAMING")

    flap_ports = [Venue.port_of(venue.ws_urls[0]), Venue.port_of(venue.pb_urls[0])]

    async def flap() -> None:
        while True:
            await venue.control(*({"fault": "drop", "port": port} for port in flap_ports))
            await trio.sleep(0.2)

    def flapped_enough() -> bool:
        events = db.by_session()
        return all(
            sum(e["trigger"] == "lost" for e in events.get(n, [])) >= 4 for n in flapping
        ) and all(events[n][-1]["dest"] == "STREAMING" for n in steady)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(flap)
        await eventually(flapped_enough, "four losses per flapping session", seconds=20)
        assert daemon.sigkill() == -signal.SIGKILL
        nursery.cancel_scope.cancel()

    # Every acknowledged transition is in the database, exactly as logged.
    acknowledged = daemon.transitions()
    stored = {(e["session"], e["version"]): e for e in db.events()}
    assert sum(t["trigger"] == "lost" for t in acknowledged) >= 6
    for t in acknowledged:
        event = stored.get((t["session"], t["version"]))
        assert event is not None, f"acknowledged but not stored: {t}"
        assert key(event) == key(t)
        assert (event["source"], event["reason"]) == (t["source"], t["reason"])
    assert_gapless(db)
    before = db.verify()  # every (source, trigger, dest) is legal, versions chain
    assert set(before) == set(names)
    last = last_events(db)
    for name in steady:
        assert last[name]["dest"] == "STREAMING", last[name]
    (killed,) = db.runs()
    assert killed["stopped_at"] is None

    # Restart on the same database.
    daemon2 = await start_daemon(group, config, name="daemon2")
    versions = {name: event["version"] for name, event in last.items()}
    await eventually(
        lambda: streaming_since(db, names, after=versions),
        lambda: f"every session STREAMING again after the restart{daemon2.describe()}",
    )
    events = db.by_session()
    for name in names:
        new = [e for e in events[name] if e["version"] > versions[name]]
        first = new[0]
        if last[name]["dest"] in LIVE:
            assert (first["trigger"], first["source"], first["dest"], first["reason"]) == (
                "recover",
                last[name]["dest"],
                "DISCONNECTED",
                "daemon restarted",
            ), first
            assert new[1]["trigger"] == "start", new[:2]
        else:
            # Left waiting (BACKOFF): the wait goes on; nothing to recover.
            assert last[name]["dest"] == "BACKOFF", last[name]
            assert first["trigger"] in ("retry", "throttled"), first
    runs = db.runs()
    assert len(runs) == 2
    assert runs[0]["clean"] is False, runs[0]
    assert runs[0]["stopped_at"] is None
    assert (runs[1]["pid"], runs[1]["stopped_at"]) == (daemon2.pid, None)

    assert await daemon2.stop() == 0
    final = db.verify()
    assert {name: state for name, (state, _) in final.items()} == dict.fromkeys(
        names, "DISCONNECTED"
    )
    assert_gapless(db)
    assert db.runs()[1]["clean"] is True


# --------------------------------------------------------------------------- 3. intent


def seed_paused(url: str, name: str, at: datetime) -> int:
    """Write a legal history that ends in PAUSED (as an operator would have left it)."""
    from daemon.store import EventStore
    from statemachines.session import SessionMachine, SessionModel, Trigger

    machine = SessionMachine()
    model = machine.register(SessionModel(name))
    steps = [
        (Trigger.START, "starting", {}),
        (Trigger.CONNECTED, "connected", {}),
        (Trigger.AUTHENTICATED, "authenticated", {}),
        (Trigger.DATA, "first message after subscribing", {}),
        (Trigger.PAUSE, "paused by uid 1000 (ops)", {"uid": 1000, "user": "ops"}),
    ]
    records = [
        machine.fire(model, trigger, at=at + timedelta(seconds=i), reason=reason, detail=detail)
        for i, (trigger, reason, detail) in enumerate(steps)
    ]
    store = EventStore(url)
    try:
        store.append(records)
    finally:
        store.close()
    return len(records)


async def test_paused_and_open_circuit_and_backoff_survive_sigkill(
    tmp_path: Path, group: ProcessGroup, sockets: Path
) -> None:
    url, _ = sqlite_file(tmp_path)
    venue: Venue | None = None

    async def venue_up() -> None:
        nonlocal venue
        venue = await start_venue(group)

    async with trio.open_nursery() as nursery:  # both are mostly Python start-up
        nursery.start_soon(venue_up)
        (upgrade,) = await run_clis(["db", "upgrade", "--database", url], cwd=tmp_path)
    assert upgrade.returncode == 0, upgrade.stderr
    assert venue is not None
    seeded = seed_paused(url, "paused-one", datetime.now(UTC) - timedelta(minutes=5))

    await venue.fault("reject_auth", seconds=100)
    tripping = ["tripping", "tripping-pb"]
    circuit = {"failures": 2, "cooldown": 600}
    config = write_config(
        tmp_path / "wirekeep.toml",
        database=url,
        sockets=sockets,
        sessions=[
            ws_session("paused-one", venue.ws_url),
            ws_session("tripping", venue.ws_url, circuit=circuit),
            pb_session("tripping-pb", venue.pb_url, circuit=circuit),
            # Nobody listens there: refused at once, so it sits in BACKOFF, counting.
            ws_session(
                "backing",
                f"ws://127.0.0.1:{unused_port()}/feed",
                circuit={"failures": 1000, "cooldown": 600},
            ),
        ],
    )
    db = Db(url)
    daemon = await start_daemon(group, config)

    def ready_to_kill() -> dict[str, Any] | None:
        last = last_events(db)
        if any(last[n]["dest"] != "CIRCUIT_OPEN" for n in tripping if n in last):
            return None
        if set(tripping) - set(last) or "backing" not in last:
            return None
        backing = last["backing"]
        if backing["dest"] != "BACKOFF" or backing["detail"]["attempt"] < 3:
            return None
        # Far enough from its deadline that the retry cannot happen before the kill.
        left = parse_time(backing["detail"]["deadline"]) - datetime.now(UTC)
        return last if left > timedelta(seconds=0.15) else None

    last = await eventually(
        ready_to_kill,
        lambda: f"both circuits open and 'backing' waiting{daemon.describe()}",
        interval=0.01,
    )
    assert daemon.sigkill() == -signal.SIGKILL

    for name in tripping:
        trip = last[name]
        assert (trip["trigger"], trip["detail"]["failures"]) == ("trip", 2), trip
        assert [e["trigger"] for e in db.events(name)].count("auth_rejected") == 1
    attempts = last["backing"]["detail"]["attempt"]
    assert db.events("paused-one")[-1]["dest"] == "PAUSED"
    assert len(db.events("paused-one")) == seeded
    versions = {name: event["version"] for name, event in last_events(db).items()}
    assert versions["backing"] == last["backing"]["version"]

    daemon2 = await start_daemon(group, config, name="daemon2")

    def backing_failed_twice() -> list[dict[str, Any]] | None:
        new = [e for e in db.events("backing") if e["version"] > versions["backing"]]
        failures = [e for e in new if e["dest"] == "BACKOFF"]
        return new if len(failures) >= 2 else None

    # Two more failures of 'backing' take a while (its delays are at the cap by now):
    # long enough for a wrongly resumed session to have tried something.
    new = await eventually(
        backing_failed_twice, lambda: f"'backing' to fail again{daemon2.describe()}"
    )
    assert new[0]["trigger"] == "retry", new[0]
    failure = next(e for e in new if e["dest"] == "BACKOFF")
    assert (failure["trigger"], failure["detail"]["attempt"]) == ("lost", attempts + 1), failure

    # PAUSED stays paused, CIRCUIT_OPEN stays open until its deadline: no event at all.
    after = db.by_session()
    assert [e["version"] for e in after["paused-one"]] == list(range(1, seeded + 1))
    assert after["paused-one"][-1]["reason"] == "paused by uid 1000 (ops)"
    for name in tripping:
        assert after[name][-1]["version"] == versions[name], after[name][versions[name] - 1 :]
        assert after[name][-1]["dest"] == "CIRCUIT_OPEN"
    assert not any(t["session"] in ("paused-one", *tripping) for t in daemon2.transitions())
    runs = db.runs()
    assert runs[0]["clean"] is False
    assert runs[0]["stopped_at"] is None

    assert await daemon2.stop() == 0
    states = {name: state for name, (state, _) in db.verify().items()}
    assert states["paused-one"] == "PAUSED"
    assert states["tripping"] == states["tripping-pb"] == "CIRCUIT_OPEN"


# --------------------------------------------------------------------------- 4. secrets


async def test_secrets_never_reach_the_log_the_database_or_the_audit_commands(
    tmp_path: Path, group: ProcessGroup, sockets: Path
) -> None:
    venue_key = f"VK{secrets.token_hex(16)}"
    pb_secret = f"PS{secrets.token_hex(16)}"
    pb_token = f"PT{secrets.token_hex(16)}"
    url_token = f"UT{secrets.token_hex(16)}"
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "pb_secret").write_text(pb_secret + "\n")
    (credentials / "pb_token").write_text(pb_token)
    venue = await start_venue(
        group,
        "--require-auth",
        "--ws-key", venue_key,
        "--client-secret", pb_secret,
        "--access-token", pb_token,
    )  # fmt: skip
    url, path = sqlite_file(tmp_path)
    names = ["ws-secret", "pb-secret"]
    config = write_config(
        tmp_path / "wirekeep.toml",
        database=url,
        sockets=sockets,
        # The rejections below must not open the circuit: streaming resumes after them.
        defaults={"circuit": {"failures": 1000, "cooldown": 600}},
        sessions=[
            ws_session(
                "ws-secret",
                venue.ws_url + "?token=${env:WS_TOKEN}",
                auth_message='{"op":"auth","key":"${env:VENUE_KEY}"}',
            ),
            pb_session(
                "pb-secret",
                venue.pb_url,
                auth={
                    "client_id": "wirekeep-tests",
                    "client_secret": "${cred:pb_secret}",
                    "account_id": 1001,
                    "access_token": "${cred:pb_token}",
                },
            ),
        ],
    )
    env = child_env(
        {"VENUE_KEY": venue_key, "WS_TOKEN": url_token, "CREDENTIALS_DIRECTORY": str(credentials)}
    )
    db = Db(url)
    daemon = await start_daemon(group, config, env=env)
    # Streaming proves the venue got the right secrets.
    await eventually(lambda: streaming_since(db, names), "both sessions STREAMING")

    async def failing(fault: str, *words: str) -> None:
        """Hold ``fault`` until each session failed an attempt on it; stream again."""
        floor = {n: db.events(n)[-1]["version"] for n in names}
        await venue.fault(fault)
        await venue.fault("drop")

        def failed(name: str) -> bool:
            return any(
                e["version"] > floor[name]
                and e["source"] == "CONNECTING"
                and any(w in e["reason"] for w in words)
                for e in db.events(name)
            )

        await eventually(
            lambda: all(failed(n) for n in names),
            lambda: f"an attempt per session failing on {fault}{daemon.describe()}",
        )
        await venue.fault("clear")
        failures = {n: db.events(n)[-1]["version"] for n in names}
        await eventually(lambda: streaming_since(db, names, after=failures), "streaming again")

    # The error paths: rejected credentials; refused handshakes (where the URL with its
    # token is in play); then streaming again each time.
    await failing("reject_auth", "auth rejected")
    await failing("refuse", "HTTP 503", "closed the connection")

    needles = [s.encode() for s in (venue_key, pb_secret, pb_token, url_token)]

    def assert_clean(where: str, data: bytes) -> None:
        for needle in needles:
            assert needle not in data, f"a secret leaked into {where}"

    def database_files() -> list[Path]:
        return [p for p in (path, Path(f"{path}-wal")) if p.exists()]

    for file in database_files():  # while running: the WAL holds the recent pages
        assert_clean(file.name, file.read_bytes())
    # The audit commands (and status, once it exists), all at once while the daemon runs.
    audits = (
        ["replay", "--json"],
        ["sql", "SELECT * FROM session_events"],
        ["check-config"],
        ["status", "--json"],
    )
    results = await run_clis(
        *([*args, "--config", str(config)] for args in audits), env=env, cwd=tmp_path
    )
    for args, result in zip(audits, results, strict=True):
        if args[0] == "status" and "invalid choice" in result.stderr:
            continue  # no such command yet
        assert result.returncode == 0, (args, result.stderr)
        assert_clean(f"wirekeep {' '.join(args)}", (result.stdout + result.stderr).encode())
        if args[0] != "check-config":
            assert "ws-secret" in result.stdout, (args, result.stdout)

    assert await daemon.stop() == 0
    for file in database_files():
        assert_clean(file.name, file.read_bytes())
    assert daemon.transitions(), "the daemon logged nothing: the check below would be empty"
    assert_clean("the daemon's stdout/stderr", daemon.output_bytes())
    reasons = " ".join(e["reason"] for e in db.events())
    assert "auth rejected" in reasons, reasons
    assert "HTTP 503" in reasons, reasons


# --------------------------------------------------------------------------- 5. bad config


async def test_bad_config_exits_78_naming_the_file_and_the_key(
    tmp_path: Path, sockets: Path
) -> None:
    url, path = sqlite_file(tmp_path)
    bad = write_config(
        tmp_path / "bad.toml",
        database=url,
        sockets=sockets,
        sessions=[ws_session("feed-a", "ws://127.0.0.1:9/feed", stale_after="soon")],
    )
    present = f"PRESENT{secrets.token_hex(12)}"
    missing = write_config(
        tmp_path / "missing.toml",
        database=url,
        sockets=sockets,
        sessions=[
            ws_session(
                "feed-b",
                "ws://127.0.0.1:9/feed",
                auth_message='{"op":"auth","key":"${env:WK_TEST_PRESENT}",'
                '"sig":"${env:WK_TEST_MISSING_KEY}"}',
            )
        ],
    )
    env = child_env({"WK_TEST_PRESENT": present}, drop=["WK_TEST_MISSING_KEY"])
    result, result2 = await run_clis(
        ["daemon", "--config", str(bad)],
        ["daemon", "--config", str(missing)],
        env=env,
        cwd=tmp_path,
    )

    assert result.returncode == EX_CONFIG, result
    assert str(bad) in result.stderr
    assert "sessions[feed-a].stale_after" in result.stderr
    assert "must be a number" in result.stderr
    assert "Traceback" not in result.stderr
    assert not path.exists(), "a daemon with a bad config must not touch the database"

    result = result2
    assert result.returncode == EX_CONFIG, result
    assert str(missing) in result.stderr
    assert "WK_TEST_MISSING_KEY" in result.stderr
    assert "sessions[feed-b].auth_message" in result.stderr
    assert present not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert not path.exists()


# --------------------------------------------------------------------------- 6. bad frames


async def test_garbage_and_oversized_frames_end_the_link_not_the_daemon(
    tmp_path: Path, group: ProcessGroup, sockets: Path
) -> None:
    venue = await start_venue(group)
    url, _ = sqlite_file(tmp_path)
    config = write_config(
        tmp_path / "wirekeep.toml",
        database=url,
        sockets=sockets,
        sessions=[ws_session("ws-frames", venue.ws_url), pb_session("pb-frames", venue.pb_url)],
    )
    db = Db(url)
    daemon = await start_daemon(group, config)

    async def provoke(session: str, *faults: str) -> dict[str, Any]:
        """Apply ``faults`` to the session's connection; the next event must be ``lost``."""
        await eventually(lambda: streaming_since(db, [session]), f"{session} STREAMING")
        floor = db.events(session)[-1]["version"]
        kind = "websocket" if session.startswith("ws") else "protobuf"
        replies = await venue.control(*({"fault": f, "kind": kind} for f in faults))
        assert [r["hit"] for r in replies] == [1] * len(faults), replies

        def next_event() -> dict[str, Any] | None:
            return next((e for e in db.events(session) if e["version"] == floor + 1), None)

        event = await eventually(
            next_event, lambda: f"{session}: an event after {faults}{daemon.describe()}"
        )
        assert (event["source"], event["trigger"], event["dest"]) == (
            "STREAMING",
            "lost",
            "BACKOFF",
        ), event
        await eventually(
            lambda: streaming_since(db, [session], after={session: event["version"]}),
            f"{session} reconnected after {faults}",
        )
        assert daemon.running, daemon.describe()
        return event

    event = await provoke("pb-frames", "garbage")
    assert event["reason"].startswith("garbage from venue: "), event
    event = await provoke("pb-frames", "oversized")
    assert event["reason"] == "frame of 67108864 bytes exceeds the 1048576-byte limit", event
    # WebSocket "garbage" is well-framed (a binary message, then non-JSON text): the
    # adapter relays it as data, by design. The oversized message right behind it on the
    # same connection is what ends the link: nothing in between.
    event = await provoke("ws-frames", "garbage", "oversized")
    assert event["reason"] == "venue sent a message larger than the 1048576-byte limit", event
    event = await provoke("ws-frames", "oversized")
    assert "larger than the 1048576-byte limit" in event["reason"], event

    assert daemon.running
    assert await daemon.stop(signum=signal.SIGINT) == 0  # SIGINT stops cleanly too
    assert [s["signal"] for s in daemon.events("signal")] == ["SIGINT"]
    assert {e["session"] for e in db.events() if e["trigger"] == "shutdown"} == {
        "ws-frames",
        "pb-frames",
    }
    db.verify()
    assert_gapless(db)


# --------------------------------------------------------------------------- 7. memory


async def test_a_clean_restart_carries_the_failure_counts_over_exactly(
    tmp_path: Path, group: ProcessGroup, sockets: Path
) -> None:
    """A clean restart carries over the policy memory the session had at the stop.

    Backoff attempts and breaker failures count consecutive failures, and ``reset_after``
    seconds of stable streaming forget them. ``pb-memory`` streams stably before the
    stop, so its next failure after the restart is a first one again; ``ws-count``
    (reset_after far away) goes on counting: 2 failures before the restart, the 3rd after.
    """
    venue = await start_venue(group)
    url, _ = sqlite_file(tmp_path)
    reset_after = 0.5
    config = write_config(
        tmp_path / "wirekeep.toml",
        database=url,
        sockets=sockets,
        sessions=[
            pb_session(
                "pb-memory",
                venue.pb_url,
                circuit={"failures": 2, "cooldown": 600},
                backoff={"initial": 0.05, "max": 0.5, "reset_after": reset_after},
            ),
            ws_session(
                "ws-count",
                venue.ws_url,
                circuit={"failures": 1000, "cooldown": 600},
                backoff={"initial": 0.05, "max": 0.5, "reset_after": 600.0},
            ),
        ],
    )
    db = Db(url)
    kinds = {"pb-memory": "protobuf", "ws-count": "websocket"}

    async def drop_and_reconnect(daemon: Process, name: str) -> dict[str, Any]:
        """Drop the session's link once it streams; the failure event that follows."""
        # READY can come before a session's first event: no events yet means "not yet".
        await eventually(
            lambda: (events := db.events(name)) and events[-1]["dest"] == "STREAMING",
            "STREAMING",
        )
        floor = db.events(name)[-1]["version"]
        assert await venue.fault("drop", kind=kinds[name]) == 1
        failure = await eventually(
            lambda: next((e for e in db.events(name)[floor:] if e["source"] == "STREAMING"), None),
            lambda: f"{name}: the failure after the drop{daemon.describe()}",
        )
        if failure["dest"] == "BACKOFF":
            await eventually(
                lambda: streaming_since(db, [name], after={name: failure["version"]}),
                f"{name} STREAMING again",
            )
        return failure

    async def stream_stably(daemon: Process, name: str) -> None:
        """Stream for longer than reset_after: a `stable` event records the reset counts."""
        since = db.events(name)[-1]
        assert since["dest"] == "STREAMING"
        stable = await eventually(
            lambda: next(
                (e for e in db.events(name)[since["version"] :] if e["trigger"] == "stable"), None
            ),
            lambda: f"{name}: the stable event{daemon.describe()}",
        )
        assert (stable["source"], stable["dest"]) == ("STREAMING", "STREAMING")
        assert (stable["detail"]["attempt"], stable["detail"]["failures"]) == (0, 0)

    def memory(event: dict[str, Any]) -> tuple[str, int, int]:
        return event["trigger"], event["detail"]["attempt"], event["detail"]["failures"]

    daemon = await start_daemon(group, config)
    assert memory(await drop_and_reconnect(daemon, "ws-count")) == ("lost", 1, 1)
    assert memory(await drop_and_reconnect(daemon, "ws-count")) == ("lost", 2, 2)
    assert memory(await drop_and_reconnect(daemon, "pb-memory")) == ("lost", 1, 1)
    await stream_stably(daemon, "pb-memory")
    # Within one run, stable streaming forgets the failure (the control experiment).
    assert memory(await drop_and_reconnect(daemon, "pb-memory")) == ("lost", 1, 1)
    await stream_stably(daemon, "pb-memory")
    assert await daemon.stop() == 0

    daemon2 = await start_daemon(group, config, name="daemon2")
    problems = []
    failure = await drop_and_reconnect(daemon2, "pb-memory")
    if memory(failure) != ("lost", 1, 1):
        problems.append(
            "pb-memory streamed stably, then a clean restart: its next failure should be "
            f"('lost', attempt 1, failures 1), got {memory(failure)}: {failure['reason']}"
        )
    failure = await drop_and_reconnect(daemon2, "ws-count")
    if memory(failure) != ("lost", 3, 3):
        problems.append(
            "ws-count failed twice, then a clean restart: its next failure should be "
            f"('lost', attempt 3, failures 3), got {memory(failure)}"
        )
    assert await daemon2.stop() == 0
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------- 8. redaction


async def test_a_short_secret_does_not_mangle_the_log_or_the_event_log(
    tmp_path: Path, group: ProcessGroup, sockets: Path
) -> None:
    """Redaction masks secret values, not every occurrence of a letter.

    A one-character client_secret is either refused as configuration (exit 78 naming the
    key), or the daemon runs and its log lines and stored reasons stay readable.
    """
    port = unused_port()
    url, _ = sqlite_file(tmp_path)
    auth = {"client_id": "wirekeep-tests", "client_secret": "s", "account_id": 1001,
            "access_token": "plain-access-token-for-tests"}  # fmt: skip
    config = write_config(
        tmp_path / "wirekeep.toml",
        database=url,
        sockets=sockets,
        sessions=[pb_session("pb-short", f"tcp://127.0.0.1:{port}", auth=auth)],
    )
    daemon = group.start("daemon", [*WIREKEEP, "daemon", "--config", str(config)])
    db = Db(url)

    def refused_or_failed() -> bool:
        if not daemon.running:
            return True
        try:
            return any(e["dest"] == "BACKOFF" for e in db.events("pb-short"))
        except QueryError:  # not created yet
            return False

    await eventually(refused_or_failed, lambda: f"a failed attempt{daemon.describe()}")
    if not daemon.running:
        assert daemon.popen.returncode == EX_CONFIG, daemon.describe()
        assert "sessions[pb-short].auth.client_secret" in daemon.stderr()
        return
    assert await daemon.stop() == 0
    events = {e["event"] for e in daemon.json_lines()}
    assert {"daemon_started", "transition", "daemon_stopped"} <= events, (
        f"log event names mangled by redaction: {sorted(events)}"
    )
    failure = next(e for e in db.events("pb-short") if e["dest"] == "BACKOFF")
    assert failure["reason"] == f"connection refused by 127.0.0.1:{port}", failure


# --------------------------------------------------------------------------- 9. close


async def test_sigterm_closes_a_websocket_link_without_waiting_out_the_close_timeout(
    tmp_path: Path, group: ProcessGroup, sockets: Path
) -> None:
    """Closing a link on a stop takes a loopback round trip, not a timeout.

    The WebSocket close handshake needs the link's reader to receive the venue's close
    reply; a stop that cancels the reader before closing waits out the adapter's whole
    close timeout (1 s) for a reply nobody reads.
    """
    venue = await start_venue(group)
    url, _ = sqlite_file(tmp_path)
    names = ["ws-close", "pb-close"]
    config = write_config(
        tmp_path / "wirekeep.toml",
        database=url,
        sockets=sockets,
        sessions=[ws_session("ws-close", venue.ws_url), pb_session("pb-close", venue.pb_url)],
    )
    db = Db(url)
    daemon = await start_daemon(group, config)
    await eventually(lambda: streaming_since(db, names), "both sessions STREAMING")
    assert await daemon.stop() == 0

    (signalled,) = daemon.events("signal")
    start = parse_time(signalled["timestamp"])
    took = {
        t["session"]: round((parse_time(t["timestamp"]) - start).total_seconds(), 3)
        for t in daemon.transitions()
        if t["trigger"] == "shutdown"
    }
    assert took["pb-close"] < 0.5, took  # the control: nothing to wait for
    assert took["ws-close"] < 0.5, f"seconds from SIGTERM to each session's shutdown: {took}"


# --------------------------------------------------------------------------- 10. one writer

EXIT_BUSY = 6


def refused_in_one_line(process: Process, holder: Process) -> str:
    """The refusal's one line, which names the holder."""
    err = process.stderr()
    assert "Traceback" not in err
    assert err.count("\n") == 1, err
    assert f"pid {holder.pid} on host {socket.gethostname()}, started 20" in err, err
    return err


async def test_a_second_daemon_on_the_same_database_refuses_and_touches_nothing(
    tmp_path: Path, db_url: str, group: ProcessGroup, sockets: Path
) -> None:
    """Same configuration, started twice (an operator's slip, a unit and a shell): the second
    refuses before it reads anything, so the first's run is not marked crashed, its sessions
    get no ``recover`` events, and it keeps running. A SIGKILLed holder's lock goes with it."""
    venue = await start_venue(group)
    config = write_config(
        tmp_path / "wirekeep.toml",
        database=db_url,
        sockets=sockets,
        sessions=[pb_session("pb-one", venue.pb_url), ws_session("ws-one", venue.ws_url)],
    )
    db = Db(db_url)
    first = await start_daemon(group, config)
    await eventually(lambda: streaming_since(db, ["pb-one", "ws-one"]), "both STREAMING")
    (run,) = db.runs()

    second = group.start("second", [*WIREKEEP, "daemon", "--config", str(config)])
    assert await second.wait() == EXIT_BUSY, second.describe()
    refused_in_one_line(second, first)
    assert not second.json_lines(), "the refused daemon logged as if it ran"

    assert first.running, first.describe()
    assert db.runs() == [run]  # no second run, and the first is not judged crashed
    assert run["stopped_at"] is None
    assert run["clean"] is None
    assert not [e for e in db.events() if e["trigger"] == "recover"]
    assert (sockets / "control.sock").exists(), "the refused daemon removed the live socket"
    (status,) = await run_clis(["status", "--json", "--config", str(config)], cwd=tmp_path)
    assert status.returncode == 0, status.stderr

    first.sigkill()
    third = await start_daemon(group, config, name="third")
    await eventually(
        lambda: streaming_since(db, ["pb-one", "ws-one"], {"pb-one": 3, "ws-one": 3}),
        "both STREAMING again under the third daemon",
    )
    assert [r["clean"] for r in db.runs()] == [False, None]  # now the first one crashed
    assert await third.stop() == 0


async def test_demo_refuses_a_folder_whose_demo_runs(
    tmp_path: Path, group: ProcessGroup, sockets: Path
) -> None:
    folder = sockets / "demo"
    first = group.start("demo", [*WIREKEEP, "demo", "--dir", str(folder), "--duration", "60"])
    config = folder / "wirekeep.toml"
    await eventually(
        lambda: config.exists() and "database" in config.read_text(),
        lambda: f"the demo's configuration{first.describe()}",
        seconds=30,
    )
    written = config.read_bytes(), config.stat().st_mtime_ns

    second = group.start("demo-2", [*WIREKEEP, "demo", "--dir", str(folder), "--duration", "60"])
    assert await second.wait(30) == EXIT_BUSY, second.describe()
    refused_in_one_line(second, first)
    assert (config.read_bytes(), config.stat().st_mtime_ns) == written
    assert first.running, first.describe()
    assert await first.stop(30, signal.SIGINT) == 0, first.describe()
