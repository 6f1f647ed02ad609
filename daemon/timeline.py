"""``wirekeep timeline``: a picture of the sessions' states over a time range, as SVG.

One lane per session, one rectangle per stay in a state (coloured by state), a UTC time
axis, markers for operator actions and daemon starts and stops, and each rectangle's
``<title>`` (shown on hover by every browser) holding the reasons the session entered
and left that state. The file is self-contained: no script, no external font or style.

The stays are built the way ``session_state_intervals`` defines them (an event whose
``dest`` differs from its ``source``, or a ``remove``, begins one; self-loops such as
``throttled`` stay inside it and are listed in its title), from the log itself through
replay, so the picture needs no migration and is verified like ``replay`` output.

The SVG is written with ``xml.etree.ElementTree``: a few hundred lines of rectangles,
lines and text do not need a drawing library, and the standard library escapes every
reason correctly and keeps the output deterministic for tests.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, or_, select

from daemon.audit import OPERATOR_REASON_KEY, OPERATOR_TRIGGERS, UID_KEY, USER_KEY
from daemon.replay import SessionView, check, state_at
from daemon.schema import daemon_runs, session_events
from daemon.store import EventStore, StoredEvent, utc
from daemon.timeparse import iso
from statemachines.session import LEGAL, begins_stay

SVG_NS = "http://www.w3.org/2000/svg"

#: Fill colours by state: green is good, amber is degraded, red and orange are failing,
#: blues are on the way up, grey is down, purple is an operator's doing.
STATE_COLORS: Mapping[str, str] = {
    "STREAMING": "#2f9e44",
    "STALE": "#f2c12e",
    "AUTHENTICATED": "#74a9d8",
    "CONNECTING": "#a5c8ec",
    "BACKOFF": "#f08c2e",
    "CIRCUIT_OPEN": "#d63031",
    "DISCONNECTED": "#b4b4b4",
    "PAUSED": "#8e6cc0",
}
REMOVED_FILL = "#ffffff"

#: Tick steps the axis may use, in seconds.
_TICK_STEPS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800,
               21600, 43200, 86400, 172800, 604800)  # fmt: skip
_MIN_TICK_SPACING_PX = 90


# -- the data -----------------------------------------------------------------------------


@dataclass
class Stay:
    """One stay of one session in one state (unclipped times; ``end`` None while current)."""

    session: str
    state: str
    start: datetime
    enter_trigger: str | None
    enter_reason: str
    end: datetime | None = None
    exit_trigger: str | None = None
    exit_reason: str | None = None
    inner: list[StoredEvent] = field(default_factory=list)  # self-loops within the stay

    @property
    def removed(self) -> bool:
        return self.enter_trigger == "remove"


@dataclass(frozen=True)
class Marker:
    at: datetime
    kind: str  # "operator", "daemon" (a start or stop), or "gap" (after a crash, to ``end``)
    label: str
    title: str
    session: str | None = None
    end: datetime | None = None


@dataclass
class Timeline:
    since: datetime
    until: datetime
    lanes: dict[str, list[Stay]]
    markers: list[Marker]

    @property
    def intervals(self) -> int:
        return sum(len(stays) for stays in self.lanes.values())


def load_timeline(
    store: EventStore,
    since: datetime,
    until: datetime,
    sessions: Sequence[str] | None = None,
    *,
    verify: bool = True,
) -> Timeline:
    """The stays and markers of ``sessions`` (default: all) between ``since`` and ``until``.

    The state at ``since`` comes from replay (verified, unless ``verify`` is false), the
    events after it are checked against the machine one by one. Raises CorruptLog.
    """
    wanted = set(sessions) if sessions else None
    views = state_at(store, since) if verify else state_at_unverified(store, since)
    if wanted is not None:
        views = {k: v for k, v in views.items() if k in wanted}
    lanes: dict[str, list[Stay]] = {}
    current: dict[str, Stay] = {}
    states: dict[str, tuple[str, int]] = {}
    for name, view in views.items():
        current[name] = _stay_at(store, view)
        lanes[name] = [current[name]]
        states[name] = (view.state, view.version)
    markers: list[Marker] = []
    with closing(store.iter_events(since=since, until=until)) as events:
        for event in events:
            name = event.session
            if wanted is not None and name not in wanted:
                continue
            state, version = states.get(name, ("DISCONNECTED", 0))
            if event.version <= version:
                continue  # at ``since`` exactly: already in the state at ``since``
            if verify:
                check(
                    name,
                    state,
                    version,
                    (event.version, event.trigger, event.source, event.dest),
                    event,
                )
            states[name] = (event.dest, event.version)
            stay = current.get(name)
            if stay is None or begins_stay(event.trigger, event.source, event.dest):
                if stay is not None:
                    stay.end, stay.exit_trigger, stay.exit_reason = (
                        event.at,
                        event.trigger,
                        event.reason,
                    )
                stay = current[name] = Stay(name, event.dest, event.at, event.trigger, event.reason)
                lanes.setdefault(name, []).append(stay)
            else:
                stay.inner.append(event)
            if event.trigger in OPERATOR_TRIGGERS:
                markers.append(_operator_marker(event))
    markers.extend(_daemon_markers(store, since, until))
    markers.sort(key=lambda m: m.at)
    # A session removed before the range and not back in it has nothing to show.
    gone = [
        n for n, stays in lanes.items() if len(stays) == 1 and stays[0].removed and not stays[0].end
    ]
    for name in gone:
        del lanes[name]
    return Timeline(since, until, dict(sorted(lanes.items())), markers)


def state_at_unverified(store: EventStore, at: datetime) -> dict[str, SessionView]:
    """The last event of every session at or before ``at``, for forensics on a bad log.

    ``since`` is when the session entered its state, as replay has it: a self-loop does
    not move it. An event that lands in another state than the one before it (which only
    a corrupt log holds) does, so the stay shown is the one the log last recorded.
    """
    views: dict[str, SessionView] = {}
    with closing(store.iter_events(until=at)) as events:
        for e in events:
            before = views.get(e.session)
            since: datetime | None = e.at
            if (
                before is not None
                and before.state == e.dest
                and not begins_stay(e.trigger, e.source, e.dest)
            ):
                since = before.since
            views[e.session] = SessionView(
                e.session, e.dest, e.version, since, e.trigger, e.reason, e.detail, at=e.at
            )
    return dict(sorted(views.items()))


def _stay_at(store: EventStore, view: SessionView) -> Stay:
    """The stay ``view``'s session was in: from the event that began it."""
    assert view.since is not None
    trigger = view.trigger or ""
    if LEGAL.get((view.state, trigger)) != view.state or trigger == "remove":
        return Stay(view.session, view.state, view.since, view.trigger, view.reason)
    # The last event was a self-loop: find the event that began the stay.
    t = session_events
    query = (
        select(t.c.at, t.c.trigger, t.c.reason)
        .where(
            t.c.session == view.session,
            t.c.version <= view.version,
            or_(t.c.source != t.c.dest, t.c.trigger == "remove"),
        )
        .order_by(t.c.version.desc())
        .limit(1)
    )
    with store.engine.connect() as conn:
        row = conn.execute(query).first()
    if row is None:  # only self-loops since version 1
        return Stay(view.session, view.state, view.since, None, "")
    return Stay(view.session, view.state, utc(row.at), row.trigger, row.reason)


def _operator_marker(event: StoredEvent) -> Marker:
    detail = event.detail
    who = []
    if isinstance(detail.get(UID_KEY), int):
        who.append(f"uid {detail[UID_KEY]}")
    if isinstance(detail.get(USER_KEY), str):
        who.append(f"({detail[USER_KEY]})")
    lines = [f"{iso(event.at)}  {event.session}: operator {event.trigger}", event.reason]
    if who:
        lines.append("by " + " ".join(who))
    if isinstance(detail.get(OPERATOR_REASON_KEY), str):
        lines.append(f"stated reason: {detail[OPERATOR_REASON_KEY]}")
    return Marker(event.at, "operator", event.trigger, "\n".join(lines), event.session)


def _daemon_markers(store: EventStore, since: datetime, until: datetime) -> list[Marker]:
    """Starts and stops in the range, and the stretch after each crash the log is silent on."""
    t = daemon_runs
    with store.engine.connect() as conn:
        runs = list(
            conn.execute(select(t).where(t.c.started_at <= until).order_by(t.c.started_at, t.c.id))
        )
        following: dict[int, Any] = {}  # run id -> the next run on the same host
        preceding: dict[int, Any] = {}  # run id -> the run before it on the same host
        last_on_host: dict[str, Any] = {}
        for run in runs:
            before = last_on_host.get(run.host)
            if before is not None:
                following[before.id] = run
                preceding[run.id] = before
            last_on_host[run.host] = run
        crashed = {
            run.id
            for run in runs
            if run.clean is False or (run.stopped_at is None and run.id in following)
        }
        out = []
        for run in runs:
            started = utc(run.started_at)
            what = f"pid {run.pid} on {run.host}, wirekeep {run.version}"
            before = preceding.get(run.id)
            if since <= started <= until:
                restart = before is not None and before.id in crashed
                note = (
                    f" after a crash of run {before.id}" if before is not None and restart else ""
                )
                out.append(
                    Marker(
                        started,
                        "daemon",
                        "restart" if restart else "start",
                        f"{iso(started)}  daemon started{note} (run {run.id}: {what})",
                    )
                )
            if run.stopped_at is not None and since <= utc(run.stopped_at) <= until:
                stopped = utc(run.stopped_at)
                how = "cleanly" if run.clean else "without a clean shutdown"
                out.append(
                    Marker(
                        stopped,
                        "daemon",
                        "stop",
                        f"{iso(stopped)}  daemon stopped {how} (run {run.id}: {what})",
                    )
                )
            nxt = following.get(run.id)
            if run.id in crashed and nxt is not None:
                out.extend(_crash_gap(conn, run, nxt, since, until))
    return out


def _crash_gap(conn: Any, run: Any, nxt: Any, since: datetime, until: datetime) -> list[Marker]:
    """From the last event a crashed run wrote to the next start: the log knows nothing."""
    e = session_events
    restarted = utc(nxt.started_at)
    last = conn.execute(
        select(func.max(e.c.at)).where(e.c.at >= run.started_at, e.c.at < nxt.started_at)
    ).scalar()
    begin = utc(last) if last is not None else utc(run.started_at)
    if begin > until or restarted < since:
        return []
    return [
        Marker(
            begin,
            "gap",
            "crash",
            f"run {run.id} crashed (pid {run.pid} on {run.host}). The last event it wrote is "
            f"from {iso(begin)}; the daemon started again at {iso(restarted)} (run {nxt.id}). "
            "In between, each session is drawn in the last state the log recorded: the log "
            "cannot say when the crash happened, or what the sessions did after it.",
            end=restarted,
        )
    ]


# -- the picture --------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    width: int = 1400
    lane_height: int = 18
    lane_gap: int = 6
    top: int = 96  # title, legend, axis labels
    bottom: int = 40
    right: int = 48
    label_width: int = 150

    def lanes_top(self) -> int:
        return self.top

    def plot_left(self) -> int:
        return self.label_width + 12

    def plot_width(self) -> int:
        return self.width - self.plot_left() - self.right


def render_svg(timeline: Timeline, *, width: int = 1400) -> str:
    """The timeline as a standalone SVG document (a string, with an XML declaration)."""
    names = list(timeline.lanes)
    longest = max((len(n) for n in names), default=8)
    layout = Layout(width=max(width, 480), label_width=min(260, max(90, 7 * longest + 10)))
    since, until = timeline.since, timeline.until
    span = max((until - since).total_seconds(), 1e-6)
    left, plot_w = layout.plot_left(), layout.plot_width()

    def x(at: datetime) -> float:
        clipped = min(max(at, since), until)
        return left + (clipped - since).total_seconds() / span * plot_w

    pitch = layout.lane_height + layout.lane_gap
    height = layout.top + max(1, len(names)) * pitch + layout.bottom
    svg = ET.Element(
        "svg",
        {
            "xmlns": SVG_NS,
            "width": str(layout.width),
            "height": str(height),
            "viewBox": f"0 0 {layout.width} {height}",
            "role": "img",
            "font-family": "system-ui, -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif",
            "font-size": "12",
        },
    )
    heading = (
        f"wirekeep timeline: {len(names)} session{'s' if len(names) != 1 else ''}, "
        f"{iso(since)} to {iso(until)} ({_duration(span)}), times in UTC"
    )
    ET.SubElement(svg, "title").text = heading
    ET.SubElement(svg, "desc").text = (
        "One lane per session; one rectangle per stay in a state, coloured by state. "
        "Hover a rectangle for the reasons the session entered and left that state; "
        "triangles are operator actions, dashed lines daemon starts and stops."
    )
    ET.SubElement(svg, "style").text = _STYLE
    ET.SubElement(svg, "rect", {"width": "100%", "height": "100%", "fill": "#ffffff"})
    _text(svg, 12, 20, heading, {"class": "heading"})
    _legend(svg, 12, 40)

    lanes_top = layout.lanes_top()
    lanes_bottom = lanes_top + max(1, len(names)) * pitch - layout.lane_gap
    _axis(svg, since, until, x=x, top=lanes_top, bottom=lanes_bottom, plot_w=plot_w)

    for i, name in enumerate(names):
        y = lanes_top + i * pitch
        lane = ET.SubElement(svg, "g", {"class": "lane", "data-session": name})
        ET.SubElement(
            lane,
            "rect",
            {
                "class": "lane-bg",
                "x": str(left),
                "y": str(y),
                "width": _num(plot_w),
                "height": str(layout.lane_height),
            },
        )
        label = _text(
            lane,
            left - 8,
            y + layout.lane_height - 5,
            _clip(name, longest),
            {"class": "lane-label", "text-anchor": "end"},
        )
        ET.SubElement(label, "title").text = name
        for stay in timeline.lanes[name]:
            _interval(lane, stay, x=x, y=y, h=layout.lane_height, until=until)
    if not names:
        _text(svg, left, lanes_top + 14, "no session has events up to the end of this range")

    markers = ET.SubElement(svg, "g", {"class": "markers"})
    label_end: list[float] = [-1e9, 1]  # where the last daemon label ends, and its row
    lane_y = {name: lanes_top + i * pitch for i, name in enumerate(names)}
    for marker in timeline.markers:
        mx = x(marker.at)
        if marker.kind == "operator" and marker.session in lane_y:
            top = lane_y[marker.session]
            shape = ET.SubElement(
                markers,
                "path",
                {
                    "class": f"marker operator {marker.label}",
                    "d": f"M{_num(mx)},{top + 7} l-5,-8 h10 z",
                },
            )
            ET.SubElement(shape, "title").text = marker.title
        elif marker.kind == "gap" and marker.end is not None:
            gx = x(marker.at)
            band = ET.SubElement(
                markers,
                "rect",
                {
                    "class": f"marker gap {marker.label}",
                    "x": _num(gx),
                    "y": str(lanes_top - 6),
                    "width": _num(max(x(marker.end) - gx, 1.0)),
                    "height": str(lanes_bottom - lanes_top + 10),
                },
            )
            ET.SubElement(band, "title").text = marker.title
        elif marker.kind == "daemon":
            group = ET.SubElement(markers, "g", {"class": f"marker daemon {marker.label}"})
            ET.SubElement(
                group,
                "line",
                {
                    "x1": _num(mx),
                    "x2": _num(mx),
                    "y1": str(lanes_top - 6),
                    "y2": str(lanes_bottom + 4),
                },
            )
            caption = f"daemon {marker.label}"
            text_w = 6.5 * len(caption)
            # Right of the line, or left of it at the right edge; a second row when the
            # previous label is in the way (a stop and the next start are often close).
            lx, anchor = (mx + 3, "start") if mx + 3 + text_w <= layout.width else (mx - 3, "end")
            left_edge = lx if anchor == "start" else lx - text_w
            row = 1 if left_edge < label_end[0] + 6 and label_end[1] == 0 else 0
            _text(group, lx, lanes_bottom + 16 + 13 * row, caption, {"text-anchor": anchor})
            label_end[:] = [(lx + text_w if anchor == "start" else lx), row]
            ET.SubElement(group, "title").text = marker.title
    ET.indent(svg, space=" ")
    body = ET.tostring(svg, encoding="unicode")
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + body + "\n"


_STYLE = """
.heading { font-size: 14px; font-weight: 600; fill: #222; }
.legend text, .axis text { fill: #444; }
.axis line { stroke: #e3e3e3; }
.axis .day { font-weight: 600; }
.lane-bg { fill: #f7f7f7; }
.lane-label { fill: #222; }
.interval { stroke: none; }
.interval.removed { stroke: #999; stroke-dasharray: 3 2; }
.interval:hover { stroke: #000; stroke-width: 1.5px; }
.marker.operator { fill: #222; stroke: #fff; stroke-width: 1px; }
.marker.operator:hover { fill: #d63031; }
.marker.daemon line { stroke: #222; stroke-width: 1.2px; stroke-dasharray: 5 3; }
.marker.daemon text { fill: #222; font-size: 11px; }
.marker.daemon:hover line { stroke: #d63031; stroke-width: 2px; }
.marker.gap { fill: #000; fill-opacity: 0.16; stroke: #555; stroke-dasharray: 2 2; }
.marker.gap:hover { fill-opacity: 0.28; }
"""


def _interval(lane: ET.Element, stay: Stay, *, x: Any, y: int, h: int, until: datetime) -> None:
    end = stay.end if stay.end is not None else until
    x0, x1 = x(stay.start), x(end)
    fill = REMOVED_FILL if stay.removed else STATE_COLORS.get(stay.state, "#cccccc")
    rect = ET.SubElement(
        lane,
        "rect",
        {
            "class": "interval removed" if stay.removed else "interval",
            "data-state": stay.state,
            "x": _num(x0),
            "y": str(y),
            "width": _num(max(x1 - x0, 0.6)),
            "height": str(h),
            "fill": fill,
        },
    )
    ET.SubElement(rect, "title").text = _interval_title(stay, until)


def _interval_title(stay: Stay, until: datetime) -> str:
    state = "removed (DISCONNECTED)" if stay.removed else stay.state
    lines = [f"{stay.session}: {state}"]
    if stay.end is not None:
        seconds = (stay.end - stay.start).total_seconds()
        lines.append(f"{iso(stay.start)} to {iso(stay.end)} ({_duration(seconds)})")
    else:
        seconds = (until - stay.start).total_seconds()
        lines.append(
            f"since {iso(stay.start)}, still {state} at {iso(until)} ({_duration(seconds)} so far)"
        )
    lines.append(f"entered by {stay.enter_trigger or '?'}: {stay.enter_reason or '?'}")
    if stay.end is not None:
        lines.append(f"left by {stay.exit_trigger}: {stay.exit_reason}")
    shown = stay.inner[:5]
    for event in shown:
        lines.append(f"  {iso(event.at)} {event.trigger}: {event.reason}")
    if len(stay.inner) > len(shown):
        lines.append(f"  ... and {len(stay.inner) - len(shown)} more")
    return "\n".join(lines)


def _legend(svg: ET.Element, x0: int, y: int) -> None:
    legend = ET.SubElement(svg, "g", {"class": "legend"})
    x = x0
    for state, color in STATE_COLORS.items():
        ET.SubElement(
            legend, "rect", {"x": str(x), "y": str(y), "width": "12", "height": "12", "fill": color}
        )
        _text(legend, x + 16, y + 10, state)
        x += 28 + round(8.2 * len(state))
    ET.SubElement(
        legend, "path", {"class": "marker operator", "d": f"M{x + 6},{y + 11} l-5,-8 h10 z"}
    )
    _text(legend, x + 16, y + 10, "operator action")
    x += 130
    ET.SubElement(
        legend,
        "line",
        {
            "x1": str(x + 6),
            "x2": str(x + 6),
            "y1": str(y - 2),
            "y2": str(y + 14),
            "stroke": "#222",
            "stroke-dasharray": "5 3",
        },
    )
    _text(legend, x + 14, y + 10, "daemon start / stop")
    x += 150
    ET.SubElement(
        legend,
        "rect",
        {"class": "marker gap", "x": str(x), "y": str(y), "width": "12", "height": "12"},
    )
    _text(legend, x + 16, y + 10, "no record after a crash")


def _axis(
    svg: ET.Element,
    since: datetime,
    until: datetime,
    *,
    x: Any,
    top: int,
    bottom: int,
    plot_w: float,
) -> None:
    axis = ET.SubElement(svg, "g", {"class": "axis"})
    span = (until - since).total_seconds()
    step = next(
        (s for s in _TICK_STEPS if span / s <= max(1.0, plot_w / _MIN_TICK_SPACING_PX)),
        _TICK_STEPS[-1],
    )
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    first = math.ceil((since - epoch).total_seconds() / step) * step
    tick = epoch + timedelta(seconds=first)
    previous_day = None
    while tick <= until:
        tx = x(tick)
        ET.SubElement(
            axis, "line", {"x1": _num(tx), "x2": _num(tx), "y1": str(top - 4), "y2": str(bottom)}
        )
        label = tick.strftime("%H:%M:%S" if step < 60 else "%H:%M")
        _text(axis, tx, top - 8, label, {"text-anchor": "middle"})
        day = tick.date()
        if day != previous_day:
            _text(
                axis,
                tx,
                top - 22,
                tick.strftime("%Y-%m-%d"),
                {"text-anchor": "middle", "class": "day"},
            )
            previous_day = day
        tick += timedelta(seconds=step)


def _text(
    parent: ET.Element, x: float, y: float, text: str, attrs: dict[str, str] | None = None
) -> ET.Element:
    element = ET.SubElement(parent, "text", {"x": _num(x), "y": _num(y), **(attrs or {})})
    element.text = text
    return element


def _num(value: float) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".")


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.3g} s" if seconds < 10 else f"{seconds:.1f} s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{int(minutes)} min {secs:.0f} s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{int(hours)} h {int(minutes)} min"
    return f"{hours / 24:.1f} days"
