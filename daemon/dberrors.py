"""A database that cannot be reached, opened or used, as one line naming it.

The drivers say what went wrong in tracebacks of 100 lines (SQLAlchemy's wrapper around
psycopg's or sqlite3's error, inside Trio's exception groups for the daemon). A command
wraps its database work in :func:`translate`, which turns those errors into one
:class:`DatabaseUnavailable` naming the database (password redacted) and the driver's
first line; ``daemon.cli`` prints it and exits with its status. Errors that are not about
reaching the database (a bug, a corrupt log) pass through unchanged.

The command line imports it only in commands that use a database, and on the way out.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from sqlalchemy import create_engine, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from daemon.config import redact_url
from daemon.excgroups import sole

#: SQLSTATEs meaning "this database is not (yet) a wirekeep event store" and "refused".
_UNDEFINED_TABLE = "42P01"
_INSUFFICIENT_PRIVILEGE = "42501"


class DatabaseUnavailable(Exception):
    """The database cannot be reached, opened or used; the message says which and why."""


def shown(url: str) -> str:
    """``url`` for a message: the password and secret-looking query values hidden."""
    return redact_url(url)


@contextmanager
def translate(url: str) -> Iterator[None]:
    """Raise :class:`DatabaseUnavailable` for a driver error about reaching ``url``."""
    try:
        yield
    except BaseException as exc:
        failure = unavailable(sole(exc), url)
        if failure is None:
            raise
        raise failure from exc


def unavailable(exc: BaseException, url: str) -> DatabaseUnavailable | None:
    """``exc`` as a DatabaseUnavailable, or None when it is about something else."""
    if isinstance(exc, DatabaseUnavailable):
        return exc
    orig: BaseException = exc
    if isinstance(exc, sa_exc.DBAPIError) and exc.orig is not None:
        orig = exc.orig
    elif not isinstance(exc, sqlite3.Error | psycopg.Error):
        return None
    where = shown(url)
    text = str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
    sqlstate = getattr(orig, "sqlstate", None)
    if sqlstate == _UNDEFINED_TABLE or text.startswith("no such table"):
        return DatabaseUnavailable(
            f"{where} holds no wirekeep event store ({text}): is it the right database? "
            "`wirekeep db upgrade` creates one"
        )
    if sqlstate == _INSUFFICIENT_PRIVILEGE:
        return DatabaseUnavailable(f"the database {where} refused: {text}")
    if isinstance(orig, psycopg.OperationalError | psycopg.InterfaceError):
        return DatabaseUnavailable(f"cannot reach the database {where}: {text}")
    if isinstance(orig, sqlite3.OperationalError):
        hint = sqlite_hint(url)
        return DatabaseUnavailable(
            f"cannot use the database {where}: {text}" + (f" ({hint})" if hint else "")
        )
    return None


def sqlite_hint(url: str) -> str:
    """Why SQLite may not open the file: what its own message ("unable to open") omits."""
    parsed = make_url(url)
    path = parsed.database
    if not path or parsed.get_backend_name() != "sqlite":
        return ""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        return f"the directory {directory} does not exist"
    if not os.access(directory, os.W_OK | os.X_OK):
        return f"the directory {directory} is not writable by uid {os.getuid()}"
    if os.path.exists(path) and not os.access(path, os.R_OK | os.W_OK):
        return f"no read and write permission on {path} for uid {os.getuid()}"
    return ""


#: How long ``probe`` waits for a PostgreSQL server (a filtered port would take minutes).
PROBE_TIMEOUT_S = 5


def probe(url: str) -> str:
    """Whether the database at ``url`` can be used, as a phrase for ``check-config``.

    Raises DatabaseUnavailable saying why not. Creates nothing: a missing SQLite file in
    a writable directory is fine (the daemon creates it on its first start).
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        path = parsed.database
        if not path or path == ":memory:":
            return "(in memory)"
        hint = sqlite_hint(url)
        if hint:
            raise DatabaseUnavailable(f"cannot use the database {shown(url)}: {hint}")
        return "reachable" if os.path.exists(path) else "not created yet (the daemon creates it)"
    engine = create_engine(
        url, poolclass=NullPool, connect_args={"connect_timeout": PROBE_TIMEOUT_S}
    )
    try:
        with translate(url), engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    finally:
        engine.dispose()
    return "reachable"
