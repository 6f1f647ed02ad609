"""Incident review (daemon/timeline.py, daemon/cli_audit.py) on both backends: the SVG
timeline of a recorded incident, and replay's incident mode ``--around T --window W``
with its table, JSON and CSV outputs."""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from daemon.cli import EXIT_CORRUPT, EXIT_USAGE, CliError, explain
from daemon.cli_audit import AROUND_CSV_COLUMNS, register, replay_around, states_csv
from daemon.replay import CorruptLog, state_at
from daemon.store import EventStore
from daemon.timeline import STATE_COLORS, load_timeline, render_svg
from daemon.timeparse import iso
from statemachines.session import SessionMachine, SessionModel, TransitionRecord

CAPTURE = pytest.CaptureFixture[str]
NS = {"svg": "http://www.w3.org/2000/svg"}
T0 = datetime(2026, 11, 20, 14, 0, tzinfo=UTC)
ALICE = {"uid": 1000, "user": "alice", "operator_reason": "maintenance"}


def t(clock: str) -> datetime:
    h, m, s = clock.split(":")
    return T0.replace(hour=int(h), minute=int(m)) + timedelta(seconds=float(s))


# The incident: venue-a goes stale and dies, venue-b loses its link and trips its circuit,
# an operator pauses venue-c, and the daemon is restarted at 14:03.
INCIDENT: list[tuple[str, str, str, str, dict[str, Any]]] = [
    ("venue-a", "13:50:00", "start", "connecting to ws://127.0.0.1:8765/feed", {}),
    ("venue-a", "13:50:00.2", "connected", "connected to ws://127.0.0.1:8765/feed", {}),
    ("venue-a", "13:50:00.4", "authenticated", "authenticated", {}),
    ("venue-a", "13:50:01", "data", "first message after subscribing", {}),
    ("venue-b", "13:55:00", "start", "connecting to tcp://127.0.0.1:9000", {}),
    ("venue-b", "13:55:00.5", "authenticated", "authenticated", {}),
    ("venue-b", "13:55:01", "data", "first message after subscribing", {}),
    ("venue-c", "13:58:00", "start", "connecting to tcp://127.0.0.1:9001", {}),
    ("venue-c", "13:58:00.5", "authenticated", "authenticated", {}),
    ("venue-c", "13:58:01", "data", "first message after subscribing", {}),
    ("venue-b", "14:00:30", "lost", "connection reset by peer",
     {"endpoint": "tcp://127.0.0.1:9000"}),
    ("venue-b", "14:00:31", "retry", "backoff elapsed: connecting to tcp://127.0.0.1:9000", {}),
    ("venue-b", "14:00:33", "trip",
     "connection refused; circuit open for 60.0 s after 5 consecutive failures",
     {"endpoint": "tcp://127.0.0.1:9000"}),
    ("venue-a", "14:01:10", "stale", "no data for 5.0 s", {}),
    ("venue-b", "14:01:33", "probe", "cool-down over: probing tcp://127.0.0.1:9000", {}),
    ("venue-b", "14:01:34", "authenticated", "authenticated", {}),
    ("venue-b", "14:01:35", "data", "first message after subscribing", {}),
    ("venue-a", "14:01:40", "dead", "still nothing after 30.0 s: dropping the link", {}),
    ("venue-a", "14:01:40.5", "throttled", "no connect token for 127.0.0.1: waiting", {}),
    ("venue-a", "14:01:42", "retry", "backoff elapsed: connecting", {}),
    ("venue-a", "14:01:42.3", "connected", "connected to ws://127.0.0.1:8765/feed", {}),
    ("venue-a", "14:01:42.6", "authenticated", "authenticated", {}),
    ("venue-a", "14:01:43", "data", "first message after subscribing", {}),
    ("venue-c", "14:02:00", "pause", "paused by uid 1000 (alice): maintenance", ALICE),
    ("venue-a", "14:03:00", "shutdown", "daemon shutting down", {}),
    ("venue-b", "14:03:00", "shutdown", "daemon shutting down", {}),
    ("venue-a", "14:03:21", "start", "connecting to ws://127.0.0.1:8765/feed", {}),
    ("venue-b", "14:03:21", "start", "connecting to tcp://127.0.0.1:9000", {}),
    ("venue-a", "14:03:21.5", "authenticated", "authenticated", {}),
    ("venue-b", "14:03:21.5", "authenticated", "authenticated", {}),
    ("venue-a", "14:03:22", "data", "first message after subscribing", {}),
    ("venue-b", "14:03:22", "data", "first message after subscribing", {}),
    ("venue-c", "14:04:00", "resume", "resumed by uid 1000 (alice)",
     {"uid": 1000, "user": "alice"}),
    ("venue-c", "14:04:00.2", "start", "connecting to tcp://127.0.0.1:9001", {}),
    ("venue-c", "14:04:00.4", "authenticated", "authenticated", {}),
    ("venue-c", "14:04:00.6", "data", "first message after subscribing", {}),
]  # fmt: skip
SINCE, UNTIL = t("14:00:00"), t("14:05:00")

# What the picture must show between SINCE and UNTIL: each lane's stays, in order, as
# (state, entered by, left by). Self-loops (throttled, connected) stay inside a stay.
STAYS = {
    "venue-a": [
        ("STREAMING", "data", "stale"),
        ("STALE", "stale", "dead"),
        ("BACKOFF", "dead", "retry"),
        ("CONNECTING", "retry", "authenticated"),
        ("AUTHENTICATED", "authenticated", "data"),
        ("STREAMING", "data", "shutdown"),
        ("DISCONNECTED", "shutdown", "start"),
        ("CONNECTING", "start", "authenticated"),
        ("AUTHENTICATED", "authenticated", "data"),
        ("STREAMING", "data", None),
    ],
    "venue-b": [
        ("STREAMING", "data", "lost"),
        ("BACKOFF", "lost", "retry"),
        ("CONNECTING", "retry", "trip"),
        ("CIRCUIT_OPEN", "trip", "probe"),
        ("CONNECTING", "probe", "authenticated"),
        ("AUTHENTICATED", "authenticated", "data"),
        ("STREAMING", "data", "shutdown"),
        ("DISCONNECTED", "shutdown", "start"),
        ("CONNECTING", "start", "authenticated"),
        ("AUTHENTICATED", "authenticated", "data"),
        ("STREAMING", "data", None),
    ],
    "venue-c": [
        ("STREAMING", "data", "pause"),
        ("PAUSED", "pause", "resume"),
        ("DISCONNECTED", "resume", "start"),
        ("CONNECTING", "start", "authenticated"),
        ("AUTHENTICATED", "authenticated", "data"),
        ("STREAMING", "data", None),
    ],
}


def incident_records() -> list[TransitionRecord]:
    machine = SessionMachine()
    models: dict[str, SessionModel] = {}
    out = []
    for session, clock, trigger, reason, detail in sorted(INCIDENT, key=lambda r: t(r[1])):
        model = models.get(session) or machine.register(SessionModel(session))
        models[session] = model
        out.append(machine.fire(model, trigger, at=t(clock), reason=reason, detail=detail))
    return out


@pytest.fixture
def incident(store: EventStore) -> EventStore:
    store.append(incident_records())
    common = {"version": "0.1.0", "host": "vps-1", "config_hash": "c0ffee"}
    first = store.start_run(started_at=t("13:49:59"), pid=100, **common)
    store.finish_run(first, stopped_at=t("14:03:00.5"), clean=True)
    store.start_run(started_at=t("14:03:20"), pid=200, **common)
    return store


def reason_of(session: str, trigger: str, after: datetime | None = None) -> str:
    for s, clock, trig, reason, _ in INCIDENT:
        if s == session and trig == trigger and (after is None or t(clock) >= after):
            return reason
    raise KeyError((session, trigger))


def parse_svg(text: str) -> ET.Element:
    assert text.startswith('<?xml version="1.0" encoding="UTF-8"?>')
    return ET.fromstring(text.split("\n", 1)[1])


def title(element: ET.Element) -> str:
    node = element.find("svg:title", NS)
    assert node is not None
    assert node.text is not None
    return node.text


# -- the timeline -------------------------------------------------------------------------


def test_the_timeline_of_a_recorded_incident(incident: EventStore) -> None:
    svg = parse_svg(render_svg(load_timeline(incident, SINCE, UNTIL)))
    assert svg.tag == "{http://www.w3.org/2000/svg}svg"
    lanes = svg.findall("svg:g[@class='lane']", NS)
    assert [lane.get("data-session") for lane in lanes] == list(STAYS)
    width = float(svg.get("width", "0"))
    for lane in lanes:
        session = lane.get("data-session")
        assert session is not None
        rects = lane.findall("svg:rect", NS)
        intervals = [r for r in rects if "interval" in (r.get("class") or "")]
        expected = STAYS[session]
        assert len(intervals) == len(expected), session  # one element per interval
        xs = [float(r.get("x", "nan")) for r in intervals]
        assert xs == sorted(xs), f"{session}: intervals out of time order"
        for rect, (state, entered, left) in zip(intervals, expected, strict=True):
            assert rect.get("data-state") == state
            assert rect.get("fill") == STATE_COLORS[state]
            x, w = float(rect.get("x", "nan")), float(rect.get("width", "nan"))
            assert x > 0
            assert x + w <= width + 0.01
            text = title(rect)
            assert f"{session}: {state}" in text
            assert f"entered by {entered}: " in text
            if left is None:
                assert f"still {state} at {iso(UNTIL)}" in text
            else:
                assert f"left by {left}: " in text
        # the title carries the transition reasons themselves
        titles = " ".join(title(r) for r in intervals)
        for session_, clock, _, reason, _ in INCIDENT:
            if session_ == session and SINCE <= t(clock) <= UNTIL:
                assert reason in titles, (session, reason)
    # Self-loops are listed inside their stay, not drawn as stays of their own.
    a_backoff = lanes[0].findall("svg:rect", NS)[3]
    assert a_backoff.get("data-state") == "BACKOFF"
    assert "throttled: no connect token for 127.0.0.1: waiting" in title(a_backoff)


def test_the_timeline_marks_operator_actions_and_daemon_restarts(incident: EventStore) -> None:
    svg = parse_svg(render_svg(load_timeline(incident, SINCE, UNTIL)))
    markers = svg.find("svg:g[@class='markers']", NS)
    assert markers is not None
    operator = [m for m in markers if "operator" in (m.get("class") or "")]
    assert [m.get("class") for m in operator] == [
        "marker operator pause",
        "marker operator resume",
    ]
    assert "uid 1000 (alice)" in title(operator[0])
    assert "stated reason: maintenance" in title(operator[0])
    daemon = [m for m in markers if "daemon" in (m.get("class") or "")]
    assert [m.get("class") for m in daemon] == ["marker daemon stop", "marker daemon start"]
    assert "daemon stopped cleanly" in title(daemon[0])
    assert "daemon started" in title(daemon[1])
    assert "pid 200" in title(daemon[1])


def test_a_crash_shows_as_a_restart(store: EventStore) -> None:
    common = {"version": "0.1.0", "host": "vps-1", "config_hash": "c0ffee"}
    store.start_run(started_at=t("13:00:00"), pid=100, **common)
    store.mark_crashed_runs(host="vps-1")
    store.start_run(started_at=t("14:02:00"), pid=200, **common)
    store.append(incident_records())
    timeline = load_timeline(store, SINCE, UNTIL)
    daemon = [m for m in timeline.markers if m.kind == "daemon"]
    assert [(m.label, m.at) for m in daemon] == [("restart", t("14:02:00"))]
    assert "after a crash of run 1" in daemon[0].title
    # From the last event the crashed run wrote to the restart, the log knows nothing.
    gaps = [m for m in timeline.markers if m.kind == "gap"]
    assert [(m.at, m.end) for m in gaps] == [(t("14:01:43"), t("14:02:00"))]
    assert "cannot say when the crash happened" in gaps[0].title
    svg = parse_svg(render_svg(timeline))
    band = svg.find("svg:g[@class='markers']/svg:rect[@class='marker gap crash']", NS)
    assert band is not None
    assert "run 1 crashed" in title(band)


def test_the_picture_is_self_contained(incident: EventStore) -> None:
    text = render_svg(load_timeline(incident, SINCE, UNTIL))
    assert "<script" not in text
    assert "href" not in text
    assert "url(" not in text
    assert "@import" not in text


def test_stays_begun_by_a_self_loop_before_the_range_start_at_their_first_event(
    incident: EventStore,
) -> None:
    # At 14:01:41 venue-a's last event is 'throttled' (a self-loop) at 14:01:40.5; its
    # BACKOFF began with 'dead' at 14:01:40.
    timeline = load_timeline(incident, t("14:01:41"), UNTIL, ["venue-a"])
    first = timeline.lanes["venue-a"][0]
    assert (first.state, first.start, first.enter_trigger) == ("BACKOFF", t("14:01:40"), "dead")


def test_a_session_removed_before_the_range_has_no_lane(incident: EventStore) -> None:
    incident.append(
        [
            TransitionRecord("gone", 1, t("13:00:00"), "start", "DISCONNECTED", "CONNECTING", "s"),
            TransitionRecord("gone", 2, t("13:00:01"), "remove", "CONNECTING", "DISCONNECTED",
                             "removed from the configuration"),
            TransitionRecord("back", 1, t("13:00:00"), "start", "DISCONNECTED", "CONNECTING", "s"),
            TransitionRecord("back", 2, t("13:00:01"), "remove", "CONNECTING", "DISCONNECTED",
                             "removed from the configuration"),
            TransitionRecord("back", 3, t("14:04:00"), "start", "DISCONNECTED", "CONNECTING",
                             "added again: connecting"),
        ]
    )  # fmt: skip
    timeline = load_timeline(incident, SINCE, UNTIL)
    assert "gone" not in timeline.lanes
    back = timeline.lanes["back"]
    assert [(s.state, s.removed) for s in back] == [("DISCONNECTED", True), ("CONNECTING", False)]
    svg = parse_svg(render_svg(timeline))
    lane = svg.find("svg:g[@data-session='back']", NS)
    assert lane is not None
    removed = lane.find("svg:rect[@class='interval removed']", NS)
    assert removed is not None
    assert "removed (DISCONNECTED)" in title(removed)


def test_one_session_only(incident: EventStore) -> None:
    timeline = load_timeline(incident, SINCE, UNTIL, ["venue-c"])
    assert list(timeline.lanes) == ["venue-c"]
    assert [m.label for m in timeline.markers if m.kind == "operator"] == ["pause", "resume"]


def _ticks(svg: ET.Element) -> list[str]:
    axis = svg.find("svg:g[@class='axis']", NS)
    assert axis is not None
    return [e.text or "" for e in axis.findall("svg:text", NS) if e.get("class") != "day"]


def test_readable_for_three_sessions_over_five_minutes(incident: EventStore) -> None:
    svg = parse_svg(render_svg(load_timeline(incident, SINCE, UNTIL)))
    ticks = _ticks(svg)
    assert 5 <= len(ticks) <= 16
    assert all(re.fullmatch(r"\d\d:\d\d:\d\d", tick) for tick in ticks)
    assert ticks[0] == "14:00:00"
    assert ticks[-1] == "14:05:00"


def test_readable_for_fifty_sessions_over_a_day(store: EventStore) -> None:
    machine = SessionMachine()
    day = datetime(2026, 11, 19, tzinfo=UTC)
    cycle = [
        "start",
        "authenticated",
        "data",
        "stale",
        "data",
        "lost",
        "retry",
        "authenticated",
        "data",
        "lost",
    ]
    records = []
    for i in range(50):
        model = machine.register(SessionModel(f"venue-{i:02d}"))
        offset = timedelta(minutes=7 * i)
        for n in range(60):
            trigger = cycle[n % len(cycle)] if n else "start"
            if n and model.state.name == "BACKOFF":
                trigger = "retry"
            at = day + offset + timedelta(minutes=23 * n)
            records.append(machine.fire(model, trigger, at=at, reason=f"{trigger} #{n}"))
    store.append(records)
    timeline = load_timeline(store, day, day + timedelta(days=1))
    svg = parse_svg(render_svg(timeline))
    lanes = svg.findall("svg:g[@class='lane']", NS)
    assert len(lanes) == 50
    assert float(svg.get("height", "0")) <= 1400  # fits a screen at 100 % zoom or so
    ticks = _ticks(svg)
    assert 6 <= len(ticks) <= 16
    assert all(re.fullmatch(r"\d\d:\d\d", tick) for tick in ticks)
    labels = [lane.find("svg:text", NS) for lane in lanes]
    assert [label.text for label in labels if label is not None][:2] == ["venue-00", "venue-01"]
    assert timeline.intervals == sum(len(s) for s in timeline.lanes.values()) > 50 * 30


def test_a_corrupt_log_is_reported_not_drawn(incident: EventStore) -> None:
    bad = TransitionRecord(
        "venue-c", 9, t("14:04:30"), "data", "CONNECTING", "STREAMING", "impossible"
    )
    incident.append([bad])
    with pytest.raises(CorruptLog, match="venue-c"):
        load_timeline(incident, SINCE, UNTIL)
    timeline = load_timeline(incident, SINCE, UNTIL, verify=False)  # forensics
    assert timeline.lanes["venue-c"][-1].enter_reason == "impossible"


# -- the commands ---------------------------------------------------------------------------


def run(argv: list[str]) -> int:
    """The commands as daemon/cli.py wires them (register + the same add/db_option)."""
    parser = argparse.ArgumentParser(prog="wirekeep")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, handler: Callable[..., int], help_text: str, into: Any = sub) -> Any:
        p = into.add_parser(name, help=help_text)
        p.set_defaults(handler=handler)
        return p

    def db_option(p: argparse.ArgumentParser) -> None:
        p.add_argument("--database", metavar="URL")

    db = sub.add_parser("db")
    register(add, db_option, db.add_subparsers(dest="db_command", required=True))
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except Exception as exc:  # as daemon.cli.main does: one line and a status, or a bug
        explained = explain(exc)
        if explained is None:
            raise
        message, code = explained
        print(f"wirekeep: {message}", file=sys.stderr)
        return code


def test_timeline_command_writes_the_svg(
    incident: EventStore, tmp_path: Path, capsys: CAPTURE
) -> None:
    out = tmp_path / "incident.svg"
    code = run(
        [
            "timeline",
            "--database",
            incident.url,
            "--since",
            iso(SINCE),
            "--until",
            iso(UNTIL),
            "--output",
            str(out),
        ]
    )
    assert code == 0
    assert f"wrote {out}: 3 sessions, 27 intervals, 4 markers" in capsys.readouterr().out
    assert len(parse_svg(out.read_text()).findall("svg:g[@class='lane']", NS)) == 3
    code = run(
        [
            "timeline",
            "--database",
            incident.url,
            "--session",
            "venue-b",
            "--since",
            iso(SINCE),
            "--until",
            iso(UNTIL),
            "-o",
            str(out),
        ]
    )
    assert code == 0
    assert "1 session, 11 intervals, 2 markers" in capsys.readouterr().out


def test_timeline_command_refuses_bad_ranges(
    incident: EventStore, tmp_path: Path, capsys: CAPTURE
) -> None:
    out = tmp_path / "x.svg"
    base = ["timeline", "--database", incident.url, "--output", str(out)]
    assert run([*base, "--since", iso(UNTIL), "--until", iso(SINCE)]) == EXIT_USAGE
    assert "must be before" in capsys.readouterr().err
    assert run([*base, "--since", "yesterday"]) == EXIT_USAGE
    assert run([*base, "--width", "100"]) == EXIT_USAGE
    assert not out.exists()
    incident.append(
        [
            TransitionRecord(
                "venue-c", 9, t("14:04:30"), "data", "CONNECTING", "STREAMING", "impossible"
            )
        ]
    )
    assert run([*base, "--since", iso(SINCE), "--until", iso(UNTIL)]) == EXIT_CORRUPT
    assert "corrupt event log" in capsys.readouterr().err


# -- replay --around --------------------------------------------------------------------------


def around(store: EventStore, when: datetime, window: str | None = "1m", **options: Any) -> int:
    args = argparse.Namespace(
        around=iso(when),
        window=window,
        at=None,
        since=None,
        until=None,
        session=None,
        json=False,
        csv=False,
        no_verify=False,
    )
    for key, value in options.items():
        setattr(args, key, value)
    return replay_around(args, store)


def test_around_shows_states_at_t_then_the_window_in_time_order(
    incident: EventStore, capsys: CAPTURE
) -> None:
    center = t("14:02:00")
    assert around(incident, center, "1m") == 0
    out = capsys.readouterr().out
    head, _, body = out.partition("\n\n")
    assert head.splitlines()[0] == f"state of every session at {iso(center)}"
    states = {line.split()[0]: line.split()[1] for line in head.splitlines()[3:]}
    assert states == {"venue-a": "STREAMING", "venue-b": "STREAMING", "venue-c": "PAUSED"}
    lines = body.splitlines()
    assert lines[0] == (
        f"transitions from {iso(t('14:01:00'))} to {iso(t('14:03:00'))} "
        f"(1m either side of {iso(center)})"
    )
    rows = lines[3:]
    times = [row.split()[0] for row in rows]
    assert times == sorted(times)
    sessions = [row.split()[2] for row in rows if "----- T -----" not in row]
    # interleaved: every session's transitions in the window, in time order
    assert sessions == [
        "venue-a",
        "venue-b",
        "venue-b",
        "venue-b",
        "venue-a",
        "venue-a",
        "venue-a",
        "venue-a",
        "venue-a",
        "venue-a",
        "venue-c",
        "venue-a",
        "venue-b",
    ]
    marker = next(i for i, row in enumerate(rows) if "----- T -----" in row)
    assert "venue-c" in rows[marker - 1]  # the pause at exactly T comes before the marker
    assert "-50.000s" in rows[0]  # venue-a went stale 50 s before T


def test_around_json(incident: EventStore, capsys: CAPTURE) -> None:
    center = t("14:02:00")
    assert around(incident, center, "30s", json=True) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["at"] == iso(center)
    assert doc["window_s"] == 30
    assert [s["session"] for s in doc["sessions"]] == ["venue-a", "venue-b", "venue-c"]
    assert [s["state"] for s in doc["sessions"]] == ["STREAMING", "STREAMING", "PAUSED"]
    assert [(e["session"], e["trigger"], e["offset_s"]) for e in doc["events"]] == [
        ("venue-b", "probe", -27.0),
        ("venue-b", "authenticated", -26.0),
        ("venue-b", "data", -25.0),
        ("venue-a", "dead", -20.0),
        ("venue-a", "throttled", -19.5),
        ("venue-a", "retry", -18.0),
        ("venue-a", "connected", -17.7),
        ("venue-a", "authenticated", -17.4),
        ("venue-a", "data", -17.0),
        ("venue-c", "pause", 0.0),
    ]
    assert doc["events"][-1]["detail"] == ALICE


def test_around_csv_opens_with_the_csv_module(incident: EventStore, capsys: CAPTURE) -> None:
    center = t("14:03:10")
    assert around(incident, center, "15s", csv=True, session=["venue-a", "venue-b"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert rows, "a header row and data rows"
    assert list(rows[0]) == list(AROUND_CSV_COLUMNS)
    assert [(r["kind"], r["session"], r["dest"]) for r in rows] == [
        ("state", "venue-a", "DISCONNECTED"),
        ("state", "venue-b", "DISCONNECTED"),
        ("event", "venue-a", "DISCONNECTED"),
        ("event", "venue-b", "DISCONNECTED"),
        ("event", "venue-a", "CONNECTING"),
        ("event", "venue-b", "CONNECTING"),
        ("event", "venue-a", "AUTHENTICATED"),
        ("event", "venue-b", "AUTHENTICATED"),
        ("event", "venue-a", "STREAMING"),
        ("event", "venue-b", "STREAMING"),
    ]
    assert rows[2]["offset_s"] == "-10.0"
    assert rows[2]["reason"] == "daemon shutting down"
    assert json.loads(rows[0]["detail"]) == {}


def test_state_at_csv(incident: EventStore) -> None:
    views = state_at(incident, t("14:02:30"))
    rows = list(csv.reader(io.StringIO(states_csv(views.values()))))
    assert rows[0] == ["session", "state", "since", "version", "trigger", "reason", "detail"]
    assert [(r[0], r[1]) for r in rows[1:]] == [
        ("venue-a", "STREAMING"),
        ("venue-b", "STREAMING"),
        ("venue-c", "PAUSED"),
    ]
    assert json.loads(rows[3][6]) == ALICE


@pytest.mark.parametrize("no_verify", [False, True])
def test_around_gives_since_as_when_the_state_was_entered(
    incident: EventStore, capsys: CAPTURE, no_verify: bool
) -> None:
    """At 14:01:41 venue-a's last event is the ``throttled`` self-loop at 14:01:40.5: its
    BACKOFF began with ``dead`` at 14:01:40, and that is its ``since`` (the views' rule)."""
    assert around(incident, t("14:01:41"), "1s", json=True, no_verify=no_verify) == 0
    sessions = {s["session"]: s for s in json.loads(capsys.readouterr().out)["sessions"]}
    venue_a = sessions["venue-a"]
    assert (venue_a["state"], venue_a["trigger"]) == ("BACKOFF", "throttled")
    assert venue_a["since"] == t("14:01:40").isoformat()
    assert around(incident, t("14:01:41"), "1s", csv=True, no_verify=no_verify) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    state = next(r for r in rows if r["kind"] == "state" and r["session"] == "venue-a")
    assert (state["at"], state["offset_s"]) == (iso(t("14:01:40")), "-1.0")


def test_around_refuses_other_time_options_and_bad_windows(incident: EventStore) -> None:
    for options in (
        {"at": "now"},
        {"since": "-1h"},
        {"until": "now"},
        {"window": "soon"},
        {"window": "0s"},
    ):
        with pytest.raises(CliError) as refused:
            around(incident, t("14:02:00"), **options)
        assert refused.value.code == EXIT_USAGE, options


def test_around_reports_a_corrupt_log_after_t(incident: EventStore) -> None:
    incident.append(
        [
            TransitionRecord(
                "venue-c", 9, t("14:04:30"), "data", "CONNECTING", "STREAMING", "impossible"
            )
        ]
    )
    with pytest.raises(CorruptLog, match="venue-c"):
        around(incident, t("14:04:00"), "1m")
    assert around(incident, t("14:04:00"), "1m", no_verify=True) == 0
