"""The ``wirekeep`` command line: one parser, one small function per command.

Exit statuses, for every command: 0 ok; 1 refused or failed; 2 usage; 3 the daemon's
socket cannot be reached (or speaks another protocol); 4 corrupt event log; 5 the
database cannot be reached, opened or used; 6 another daemon is writing to the database;
78 bad configuration (EX_CONFIG); 130 interrupted (Ctrl-C); 141 standard output closed by
its reader (``| head``), as for a command killed by SIGPIPE. A failure is one line on
stderr (a bad configuration: one line per problem); ``--debug`` adds the traceback.

Importing this module stays cheap (``wirekeep status`` must answer 10,000 sessions in
100 ms, interpreter start included): the configuration, the database, Trio and protobuf
are imported inside the commands that use them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from daemon.cli_audit import add_replay_options, register, replay_around, states_csv
from daemon.cli_consumers import register as register_consumer_commands
from daemon.cli_ops import register as register_operator_commands
from daemon.render import table, to_csv, to_json
from daemon.venue.cli import add_venue_arguments, venue_command

if TYPE_CHECKING:
    from daemon.config import Config
    from daemon.store import EventStore, StoredEvent

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_CORRUPT = 4
EXIT_DATABASE = 5
EXIT_BUSY = 6
EXIT_INTERRUPTED = 130
EXIT_PIPE = 141  # 128 + SIGPIPE

#: daemon.config's CONFIG_ENV_VAR and DEFAULT_CONFIG_PATH, for --help without importing it
#: (tests/daemon/test_cli_errors.py checks that they agree).
CONFIG_ENV_VAR = "WIREKEEP_CONFIG"
DEFAULT_CONFIG_PATH = "/etc/wirekeep/wirekeep.toml"

Handler = Callable[[argparse.Namespace], int]


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_REFUSED) -> None:
        super().__init__(message)
        self.code = code


def _now() -> datetime:
    return datetime.now(UTC)


# -- configuration and database ------------------------------------------------------


def load_config(args: argparse.Namespace) -> Config:
    from daemon import config as cfg

    return cfg.load_config(cfg.config_path(args.config, os.environ))


def database_url(args: argparse.Namespace) -> str:
    """``--database``, else the configured database with its secrets resolved."""
    if getattr(args, "database", None):
        return str(args.database)
    from daemon import config as cfg

    config = load_config(args)
    secrets = cfg.resolve_secrets(config, os.environ, os.environ.get(cfg.CREDENTIALS_ENV_VAR))
    return config.daemon.resolved_database(secrets)


@contextmanager
def open_store(args: argparse.Namespace, *, readonly: bool = False) -> Iterator[EventStore]:
    """The event store, closed afterwards; a database that cannot be reached (now or while
    the block reads it) raises DatabaseUnavailable naming it."""
    from daemon.dberrors import translate
    from daemon.store import EventStore

    url = database_url(args)
    with translate(url):
        store = EventStore(url, readonly=readonly)
        try:
            yield store
        finally:
            store.close()


# -- commands ----------------------------------------------------------------------------


def cmd_daemon(args: argparse.Namespace) -> int:
    import trio

    from daemon import config as cfg
    from daemon import logs
    from daemon.adapters.net import adapter_for
    from daemon.app import Daemon
    from daemon.control import ControlSocketError
    from daemon.dberrors import translate
    from daemon.excgroups import sole

    config = load_config(args)
    secrets = cfg.resolve_secrets(config, os.environ, os.environ.get(cfg.CREDENTIALS_ENV_VAR))
    logs.configure(config.daemon.log_format, secrets=config.secret_values(secrets))
    daemon = Daemon(
        config=config,
        secrets=secrets,
        database_url=config.daemon.resolved_database(secrets),
        adapter_factory=adapter_for,
    )

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.handle_signals)
            await daemon.run()
            nursery.cancel_scope.cancel()

    try:
        with translate(daemon.database_url):
            trio.run(main)
    except Exception as exc:
        failure = sole(exc)  # out of Trio's exception groups
        if isinstance(failure, ControlSocketError):
            raise CliError(str(failure)) from exc
        raise
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from daemon.demo import demo_command

    return demo_command(args.dir, args.duration)


def cmd_check_config(args: argparse.Namespace) -> int:
    from daemon import config as cfg
    from daemon.dberrors import DatabaseUnavailable, probe

    path = cfg.config_path(args.config, os.environ)
    config = cfg.load_config(path)
    secrets = cfg.resolve_secrets(config, os.environ, os.environ.get(cfg.CREDENTIALS_ENV_VAR))
    try:
        database = probe(config.daemon.resolved_database(secrets))
    except DatabaseUnavailable as exc:
        raise DatabaseUnavailable(f"{path}: the configuration is valid, but {exc}") from exc
    enabled = sum(1 for s in config.sessions if s.enabled)
    print(
        f"{path}: ok ({len(config.sessions)} sessions, {enabled} enabled; "
        f"database {cfg.redact_url(config.daemon.database)} {database}; "
        f"hash {config.config_hash})"
    )
    return EXIT_OK


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from daemon import migrate
    from daemon.config import redact_url

    with open_store(args) as store:
        before, after = migrate.upgrade(store.engine)
    where = redact_url(store.url)
    if before == after:
        print(f"{where}: already at revision {after}")
    else:
        print(f"{where}: upgraded from {before or 'an empty database'} to revision {after}")
    return EXIT_OK


def cmd_sql(args: argparse.Namespace) -> int:
    from daemon.dberrors import DatabaseUnavailable, translate
    from daemon.readonly import QueryError, RefusedWrite, run_query

    url = database_url(args)
    try:
        with translate(url):
            result = run_query(url, args.query, limit=args.limit)
    except RefusedWrite as exc:
        raise CliError(str(exc)) from None
    except DatabaseUnavailable:
        raise  # not the query's fault: exit 5, like every command
    except QueryError as exc:
        raise CliError(f"query failed: {exc}") from None
    if args.json:
        print(to_json([dict(zip(result.columns, row, strict=True)) for row in result.rows]))
    elif args.csv:
        sys.stdout.write(to_csv(result.columns, result.rows))
    elif result.columns:
        print(table(result.columns, result.rows, max_width=args.width))
        print(f"({len(result.rows)} row{'s' if len(result.rows) != 1 else ''})")
    return EXIT_OK


def cmd_replay(args: argparse.Namespace) -> int:
    from daemon import replay
    from daemon.timeparse import iso, parse_instant

    now = _now()
    try:
        since = parse_instant(args.since, now) if args.since else None
        until = parse_instant(args.until, now) if args.until else None
        at = parse_instant(args.at, now) if args.at else None
    except ValueError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    if args.window is not None and args.around is None:
        raise CliError("--window needs --around", EXIT_USAGE)
    with open_store(args, readonly=True) as store:
        if args.around is not None:
            return replay_around(args, store)
        if at is not None:
            views = replay.state_at(store, at)
            if args.session:
                views = {k: v for k, v in views.items() if k in set(args.session)}
            if args.json:
                print(to_json({"at": iso(at), "sessions": [v.as_json() for v in views.values()]}))
                return EXIT_OK
            if args.csv:
                sys.stdout.write(states_csv(views.values()))
                return EXIT_OK
            print(f"state of every session at {iso(at)}")
            print(
                table(
                    ["session", "state", "since", "version", "reason"],
                    [
                        (v.session, v.state, iso(v.since) if v.since else "", v.version, v.reason)
                        for v in views.values()
                    ],
                )
            )
            return EXIT_OK
        if not args.no_verify:
            with closing(store.iter_fold_rows(until=until)) as fold_rows:
                replay.verify_rows(fold_rows)
        sessions = args.session or [None]
        events: list[StoredEvent] = []
        for name in sessions:
            events.extend(store.iter_events(session=name, since=since, until=until))
        events.sort(key=lambda e: e.id)
        if args.json:
            print(to_json([e.as_json() for e in events]))
            return EXIT_OK
        columns = ["at", "session", "version", "transition", "reason"]
        rows: list[tuple[Any, ...]] = [
            (iso(e.at), e.session, e.version, f"{e.source} --{e.trigger}--> {e.dest}", e.reason)
            for e in events
        ]
        if args.csv:
            sys.stdout.write(
                to_csv(
                    [
                        "id",
                        "at",
                        "session",
                        "version",
                        "trigger",
                        "source",
                        "dest",
                        "reason",
                        "detail",
                    ],
                    [
                        (
                            e.id,
                            iso(e.at),
                            e.session,
                            e.version,
                            e.trigger,
                            e.source,
                            e.dest,
                            e.reason,
                            json.dumps(dict(e.detail)),
                        )
                        for e in events
                    ],
                )
            )
            return EXIT_OK
        print(table(columns, rows, max_width=120))
        return EXIT_OK


# -- the parser --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wirekeep",
        description="Keeps sessions to trading venues alive and records every state change.",
    )
    parser.add_argument(
        "--config",
        metavar="PATH",
        help=f"configuration file (default: ${CONFIG_ENV_VAR}, else {DEFAULT_CONFIG_PATH})",
    )
    debug_help = "on a failure, print the traceback after the one-line message"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    # --config and --debug are accepted after the command too (``wirekeep daemon --config PATH``).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config", metavar="PATH", default=argparse.SUPPRESS, help="configuration file"
    )
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(
        name: str, handler: Handler, help_text: str, into: Any = sub
    ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = into.add_parser(
            name, help=help_text, description=help_text, parents=[common]
        )
        p.set_defaults(handler=handler)
        return p

    def db_option(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--database",
            metavar="URL",
            help="database URL (default: daemon.database from the configuration)",
        )

    add("daemon", cmd_daemon, "run the daemon in the foreground (systemd Type=notify)")
    add_venue_arguments(
        add("venue", venue_command, "run the bundled simulated venue (both kinds, with faults)")
    )
    demo = add("demo", cmd_demo, "run the simulated venue and the daemon, with faults")
    demo.add_argument("--dir", default="wirekeep-demo", help="where the database and config go")
    demo.add_argument(
        "--duration",
        type=float,
        default=None,
        metavar="SECONDS",
        help="stop after this long (default: run until Ctrl-C)",
    )
    add("check-config", cmd_check_config, "validate the configuration and its secrets")
    register_operator_commands(add)
    register_consumer_commands(add)

    db = sub.add_parser("db", help="database maintenance")
    db_sub = db.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    upgrade = add("upgrade", cmd_db_upgrade, "apply the schema migrations (Alembic)", db_sub)
    db_option(upgrade)

    sql = add("sql", cmd_sql, "run a read-only SQL query against the event store")
    sql.add_argument("query", help='one SQL statement, e.g. "SELECT * FROM session_events"')
    fmt = sql.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print a JSON list of objects")
    fmt.add_argument("--csv", action="store_true", help="print CSV with a header row")
    sql.add_argument("--limit", type=int, default=None, help="print at most this many rows")
    sql.add_argument("--width", type=int, default=60, help="clip table cells to this width")
    db_option(sql)

    rp = add(
        "replay",
        cmd_replay,
        "the timeline of transitions, or the state of every session at an instant",
    )
    rp.add_argument(
        "--session", action="append", metavar="NAME", help="only this session (repeatable)"
    )
    rp.add_argument("--since", metavar="T", help="from T (ISO-8601, or relative: -15m, -2h, -1d)")
    rp.add_argument("--until", metavar="T", help="up to T")
    rp.add_argument("--at", metavar="T", help="print the state of every session at instant T")
    rfmt = rp.add_mutually_exclusive_group()
    rfmt.add_argument("--json", action="store_true", help="print JSON")
    rfmt.add_argument("--csv", action="store_true", help="print CSV with a header row")
    rp.add_argument(
        "--no-verify",
        action="store_true",
        help="skip folding the log through the machine before printing",
    )
    db_option(rp)
    add_replay_options(rp)
    register(add, db_option, db_sub)
    return parser


_TIME_OPTIONS = frozenset({"--since", "--until", "--at", "--around"})


def _join_relative_times(argv: Sequence[str]) -> list[str]:
    """Let ``--since -15m`` through: argparse would read ``-15m`` as an option."""
    out: list[str] = []
    tokens = iter(argv)
    for token in tokens:
        if token in _TIME_OPTIONS:
            value = next(tokens, None)
            out.append(token if value is None else f"{token}={value}")
        else:
            out.append(token)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_join_relative_times(sys.argv[1:] if argv is None else argv))
    try:
        code = int(args.handler(args))
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's last flush
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader of stdout went away (``| head``): nothing more to say, to nobody. The
        # commands turn a broken *socket* into a CliError, so this is stdout. stdout goes
        # to /dev/null so that the interpreter's own last flush does not fail.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_PIPE
    except Exception as exc:  # noqa: BLE001 - explained in one line, or re-raised
        return _failed(exc, debug=args.debug)
    return code


def _failed(exc: Exception, *, debug: bool) -> int:
    """Print a failure the user can act on (see :func:`explain`) and return its status.

    Anything else is a bug: re-raised, with its traceback.
    """
    explained = explain(exc)
    if explained is None:
        raise exc
    message, code = explained
    print(f"wirekeep: {message}", file=sys.stderr)
    if debug:
        import traceback

        traceback.print_exception(exc, file=sys.stderr)
    return code


def explain(exc: BaseException) -> tuple[str, int] | None:
    """(one line, exit status) for a failure that is not a bug, else None.

    The other failure classes are imported here, on the way out, after the command line's
    own: ``status`` never pays for them, not even when the daemon is down.
    """
    if isinstance(exc, CliError):
        return str(exc), exc.code
    from daemon.config import EX_CONFIG, ConfigError
    from daemon.dberrors import DatabaseUnavailable
    from daemon.dblock import DatabaseBusy
    from daemon.excgroups import sole
    from daemon.replay import CorruptLog

    failure = sole(exc)
    if isinstance(failure, CliError):
        return str(failure), failure.code
    if isinstance(failure, ConfigError):
        return f"configuration error:\n{failure}", EX_CONFIG
    if isinstance(failure, DatabaseBusy):
        return str(failure), EXIT_BUSY
    if isinstance(failure, DatabaseUnavailable):
        return str(failure), EXIT_DATABASE
    if isinstance(failure, CorruptLog):
        return f"corrupt event log: {failure}", EXIT_CORRUPT
    return None
