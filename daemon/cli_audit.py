"""The incident-review and audit commands: ``timeline``, ``db snapshot``, ``db audit-role``,
and replay's incident mode (``replay --around T --window 5m``).

daemon/cli.py wires them in: ``register(add, db_option, db_sub)`` adds the commands,
``add_replay_options(rp)`` adds ``--around``/``--window`` to ``replay``, and ``cmd_replay``
hands over to ``replay_around`` when ``--around`` is given. Like cli.py, this module
imports SQLAlchemy and the store lazily, inside the commands.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import closing
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

from daemon.render import table, to_csv, to_json
from daemon.timeparse import iso, parse_duration, parse_instant

AddCommand = Callable[..., argparse.ArgumentParser]
DEFAULT_WINDOW = "5m"


def _cli_error(message: str, *, usage: bool = False) -> Exception:
    from daemon.cli import EXIT_REFUSED, EXIT_USAGE, CliError  # cli.py imports this module

    return CliError(message, EXIT_USAGE if usage else EXIT_REFUSED)


def _now() -> datetime:
    return datetime.now(UTC)


# -- wiring -------------------------------------------------------------------------------


def register(
    add: AddCommand, db_option: Callable[[argparse.ArgumentParser], None], db_commands: Any
) -> None:
    """Add ``timeline``, ``db snapshot`` and ``db audit-role`` to the parser."""
    tl = add(
        "timeline",
        cmd_timeline,
        "write an SVG picture of the sessions' states over a time range",
    )
    tl.add_argument(
        "--session", action="append", metavar="NAME", help="only this session (repeatable)"
    )
    tl.add_argument(
        "--since",
        metavar="T",
        default=None,
        help="from T (ISO-8601, or relative: -15m, -2h, -1d; default: one hour before --until)",
    )
    tl.add_argument("--until", metavar="T", default="now", help="up to T (default: now)")
    tl.add_argument("--output", "-o", metavar="FILE", required=True, help="where to write the SVG")
    tl.add_argument("--width", type=int, default=1400, help="picture width in pixels")
    tl.add_argument(
        "--no-verify",
        action="store_true",
        help="draw a log that replay reports as corrupt (forensics)",
    )
    db_option(tl)

    snap = add(
        "snapshot",
        cmd_db_snapshot,
        "write a consistent, read-only copy of a (live) SQLite database for an auditor",
        db_commands,
    )
    snap.add_argument("path", metavar="PATH", help="the copy to write")
    snap.add_argument("--force", action="store_true", help="replace PATH if it exists")
    db_option(snap)

    role = add(
        "audit-role",
        cmd_db_audit_role,
        "print the SQL creating a PostgreSQL role that can read every table and view, "
        "and write nothing",
        db_commands,
    )
    role.add_argument("--role", default="wirekeep_audit", help="role name (wirekeep_audit)")
    role.add_argument("--schema", default="public", help="schema holding the event store (public)")
    role.add_argument(
        "--owner",
        default=None,
        help="role that owns the tables and runs the migrations (default: the URL's user)",
    )
    role.add_argument(
        "--login", action="store_true", help="a role that logs in itself, not a group role"
    )
    db_option(role)


def add_replay_options(parser: argparse.ArgumentParser) -> None:
    """``--around T`` and ``--window DURATION`` for ``wirekeep replay``."""
    parser.add_argument(
        "--around",
        metavar="T",
        help="incident mode: every session's transitions within --window of T, in time "
        "order, under the state of every session at T",
    )
    parser.add_argument(
        "--window",
        metavar="DURATION",
        default=None,
        help=f"with --around: how far to look on either side of T ({DEFAULT_WINDOW}; 30s, 5m, 2h)",
    )


# -- replay --around ----------------------------------------------------------------------


def replay_around(args: argparse.Namespace, store: Any) -> int:
    """``replay --around T [--window W]``: states at T, then transitions in [T-W, T+W].

    Output as a table, ``--json`` (one object) or ``--csv`` (one header row; a row per
    session's state at T, ``kind=state``, then a row per transition, ``kind=event``).
    """
    from daemon.replay import check, state_at
    from daemon.timeline import state_at_unverified

    if args.at or args.since or args.until:
        raise _cli_error("--around cannot be combined with --at, --since or --until", usage=True)
    now = _now()
    try:
        center = parse_instant(args.around, now)
        window = parse_duration(args.window or DEFAULT_WINDOW)
    except ValueError as exc:
        raise _cli_error(str(exc), usage=True) from None
    if window <= 0:
        raise _cli_error("--window must be longer than zero", usage=True)
    since, until = center - timedelta(seconds=window), center + timedelta(seconds=window)
    wanted = set(args.session) if args.session else None
    verify = not getattr(args, "no_verify", False)

    views = state_at(store, center) if verify else state_at_unverified(store, center)
    states = {name: (v.state, v.version) for name, v in views.items()}
    events = []
    with closing(store.iter_events(since=since, until=until)) as stream:
        for event in stream:
            if verify and event.version > states.get(event.session, ("", 0))[1]:
                # After T: not yet verified by state_at.
                state, version = states.get(event.session, ("DISCONNECTED", 0))
                check(
                    event.session,
                    state,
                    version,
                    (event.version, event.trigger, event.source, event.dest),
                    event,
                )
                states[event.session] = (event.dest, event.version)
            if wanted is None or event.session in wanted:
                events.append(event)
    if wanted is not None:
        views = {k: v for k, v in views.items() if k in wanted}
    events.sort(key=lambda e: (e.at, e.id))
    around = _Around(center, args.window or DEFAULT_WINDOW, window, views, events)
    if args.json:
        print(to_json(around.as_json()))
    elif args.csv:
        sys.stdout.write(around.as_csv())
    else:
        print(around.as_text())
    return 0


class _Around(NamedTuple):
    """What ``replay --around`` found, and its three renderings (a NamedTuple: importing
    dataclasses costs every command, ``status`` included, about 10 ms)."""

    center: datetime
    window_text: str
    window: float
    views: Mapping[str, Any]  # session -> SessionView at ``center``
    events: Sequence[Any]  # StoredEvents in the window, by time

    @property
    def since(self) -> datetime:
        return self.center - timedelta(seconds=self.window)

    @property
    def until(self) -> datetime:
        return self.center + timedelta(seconds=self.window)

    def offset(self, at: datetime) -> float:
        return round((at - self.center).total_seconds(), 6)

    def as_json(self) -> dict[str, Any]:
        return {
            "at": iso(self.center),
            "window_s": self.window,
            "since": iso(self.since),
            "until": iso(self.until),
            "sessions": [v.as_json() for v in self.views.values()],
            "events": [{**e.as_json(), "offset_s": self.offset(e.at)} for e in self.events],
        }

    def as_csv(self) -> str:
        # Offsets as repr(): every microsecond (the table's float formatting rounds).
        rows: list[tuple[Any, ...]] = [
            (
                "state",
                iso(v.since) if v.since else "",
                repr(self.offset(v.since)) if v.since else "",
                v.session,
                v.version,
                v.trigger or "",
                "",
                v.state,
                v.reason,
                json.dumps(dict(v.detail)),
            )
            for v in self.views.values()
        ]
        rows += [
            (
                "event",
                iso(e.at),
                repr(self.offset(e.at)),
                e.session,
                e.version,
                e.trigger,
                e.source,
                e.dest,
                e.reason,
                json.dumps(dict(e.detail)),
            )
            for e in self.events
        ]
        return to_csv(AROUND_CSV_COLUMNS, rows)

    def _row(self, e: Any) -> tuple[Any, ...]:
        transition = f"{e.source} --{e.trigger}--> {e.dest}"
        return (iso(e.at), _signed(self.offset(e.at)), e.session, e.version, transition, e.reason)

    def as_text(self) -> str:
        states = table(
            ["session", "state", "since", "version", "reason"],
            [
                (v.session, v.state, iso(v.since) if v.since else "", v.version, v.reason)
                for v in self.views.values()
            ],
        )
        mark = (iso(self.center), "0", "", "", "----- T -----", "")
        before = [e for e in self.events if e.at <= self.center]
        after = self.events[len(before) :]
        body: list[tuple[Any, ...]] = [
            *(self._row(e) for e in before),
            mark,
            *(self._row(e) for e in after),
        ]
        columns = ["at", "offset", "session", "version", "transition", "reason"]
        return (
            f"state of every session at {iso(self.center)}\n{states}\n\n"
            f"transitions from {iso(self.since)} to {iso(self.until)} "
            f"({self.window_text} either side of {iso(self.center)})\n"
            + table(columns, body, max_width=120)
        )


AROUND_CSV_COLUMNS = (
    "kind",
    "at",
    "offset_s",
    "session",
    "version",
    "trigger",
    "source",
    "dest",
    "reason",
    "detail",
)
STATE_CSV_COLUMNS = ("session", "state", "since", "version", "trigger", "reason", "detail")


def states_csv(views: Iterable[Any]) -> str:
    """``replay --at T --csv``: the state of every session at T, one row each."""
    return to_csv(
        STATE_CSV_COLUMNS,
        [
            (
                v.session,
                v.state,
                iso(v.since) if v.since else "",
                v.version,
                v.trigger or "",
                v.reason,
                json.dumps(dict(v.detail)),
            )
            for v in views
        ],
    )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _signed(seconds: float) -> str:
    """+1.250s, -2m13.500s, +1h02m03.000s."""
    sign = "-" if seconds < 0 else "+"
    rest = abs(seconds)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{sign}{int(hours)}h{int(minutes):02d}m{secs:06.3f}s"
    if minutes:
        return f"{sign}{int(minutes)}m{secs:06.3f}s"
    return f"{sign}{secs:.3f}s"


# -- timeline -----------------------------------------------------------------------------


def cmd_timeline(args: argparse.Namespace) -> int:
    from daemon.cli import open_store
    from daemon.timeline import load_timeline, render_svg

    now = _now()
    try:
        until = parse_instant(args.until, now)
        since = parse_instant(args.since, now) if args.since else until - timedelta(hours=1)
    except ValueError as exc:
        raise _cli_error(str(exc), usage=True) from None
    if since >= until:
        raise _cli_error(
            f"--since ({iso(since)}) must be before --until ({iso(until)})", usage=True
        )
    if args.width < 480:
        raise _cli_error("--width must be at least 480 pixels", usage=True)
    with open_store(args, readonly=True) as store:  # CorruptLog: exit 4, in daemon.cli
        timeline = load_timeline(store, since, until, args.session, verify=not args.no_verify)
    svg = render_svg(timeline, width=args.width)
    try:
        with open(args.output, "w", encoding="utf-8") as out:
            out.write(svg)
    except OSError as exc:
        raise _cli_error(f"cannot write {args.output}: {exc.strerror}") from None
    print(
        f"wrote {args.output}: {_count(len(timeline.lanes), 'session')}, "
        f"{_count(timeline.intervals, 'interval')}, {_count(len(timeline.markers), 'marker')}, "
        f"{iso(since)} to {iso(until)}"
    )
    return 0


# -- db snapshot / db audit-role ----------------------------------------------------------


def cmd_db_snapshot(args: argparse.Namespace) -> int:
    from sqlalchemy.engine import make_url

    from daemon.cli import database_url
    from daemon.snapshot import SnapshotError, snapshot_sqlite

    url = make_url(database_url(args))
    if url.get_backend_name() != "sqlite":
        raise _cli_error(
            "db snapshot copies an SQLite database; on PostgreSQL give auditors the "
            "read-only role (`wirekeep db audit-role`), or a pg_dump"
        )
    if not url.database:
        raise _cli_error(f"{url}: no database file in the URL")
    try:
        result = snapshot_sqlite(url.database, args.path, force=args.force)
    except SnapshotError as exc:
        raise _cli_error(str(exc)) from None
    print(
        f"wrote {result.path}: {result.events} events of {result.sessions} sessions, "
        f"last at {result.last_event_at or '-'}, schema revision {result.revision or '-'}, "
        f"{result.bytes} bytes"
    )
    print(f"open it read-only: sqlite3 -readonly {result.path}")
    print(f'               or: wirekeep sql --database sqlite:///{result.path} "SELECT ..."')
    return 0


def cmd_db_audit_role(args: argparse.Namespace) -> int:
    from sqlalchemy.engine import make_url

    from daemon.audit import audit_role_sql
    from daemon.cli import database_url

    url = make_url(database_url(args))
    if url.get_backend_name() != "postgresql":
        raise _cli_error(
            "db audit-role is for PostgreSQL; on SQLite give auditors a copy made with "
            "`wirekeep db snapshot`"
        )
    owner = args.owner or url.username
    if not owner:
        raise _cli_error("name the role that owns the tables with --owner", usage=True)
    statements = audit_role_sql(
        args.role, schema=args.schema, owner=owner, database=url.database, login=args.login
    )
    print(f"-- Run as {owner} (or a superuser). {args.role} may SELECT every table and view")
    print("-- in the schema, now and after later migrations, and write nothing.")
    for statement in statements:
        print(statement + ";")
    return 0
