"""Read-only SQL for auditors: ``wirekeep sql``.

SQLite is opened with ``mode=ro`` and an authorizer that refuses every action but
reading, so a write is refused before it runs (``PRAGMA query_only`` alone can be
switched off by the same connection). PostgreSQL runs the query in a READ ONLY
transaction; the real boundary there is a role with SELECT grants only (README).
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url

from daemon.dberrors import DatabaseUnavailable

# The authorizer's action codes that only read.
_READ_ACTIONS = {
    sqlite3.SQLITE_SELECT,
    sqlite3.SQLITE_READ,
    sqlite3.SQLITE_FUNCTION,
    sqlite3.SQLITE_RECURSIVE,
}
_AUTHORIZER_ACTIONS = (
    "CREATE_INDEX",
    "CREATE_TABLE",
    "CREATE_TEMP_INDEX",
    "CREATE_TEMP_TABLE",
    "CREATE_TEMP_TRIGGER",
    "CREATE_TEMP_VIEW",
    "CREATE_TRIGGER",
    "CREATE_VIEW",
    "DELETE",
    "DROP_INDEX",
    "DROP_TABLE",
    "DROP_TEMP_INDEX",
    "DROP_TEMP_TABLE",
    "DROP_TEMP_TRIGGER",
    "DROP_TEMP_VIEW",
    "DROP_TRIGGER",
    "DROP_VIEW",
    "INSERT",
    "PRAGMA",
    "READ",
    "SELECT",
    "TRANSACTION",
    "UPDATE",
    "ATTACH",
    "DETACH",
    "ALTER_TABLE",
    "REINDEX",
    "ANALYZE",
    "CREATE_VTABLE",
    "DROP_VTABLE",
    "FUNCTION",
    "SAVEPOINT",
    "RECURSIVE",
)
_ACTION_NAMES = {getattr(sqlite3, f"SQLITE_{name}"): name for name in _AUTHORIZER_ACTIONS}
# Pragmas that only report.
_READ_PRAGMAS = {
    "read_uncommitted",  # SQLAlchemy asks for the isolation level on connect
    "table_info",
    "table_xinfo",
    "index_list",
    "index_info",
    "foreign_key_list",
    "database_list",
    "user_version",
    "schema_version",
    "page_count",
    "page_size",
}


#: read_only_sql_transaction; active_sql_transaction (e.g. SET TRANSACTION READ WRITE late)
READ_ONLY_SQLSTATES = frozenset({"25006", "25001"})


class RefusedWrite(Exception):
    """The statement would change the database; nothing was changed."""


class QueryError(Exception):
    """The database could not run the statement."""


class UnreadableDatabase(QueryError, DatabaseUnavailable):
    """There is no database file to read, or it cannot be opened: the statement never ran
    (a QueryError), and the command line reports it as a database it cannot use."""


@dataclass(frozen=True)
class QueryResult:
    columns: Sequence[str]
    rows: Sequence[Sequence[Any]]


def sqlite_path(url: str) -> str:
    database = make_url(url).database
    if not database:
        raise UnreadableDatabase(f"{url}: no database file in the URL")
    return database


def open_sqlite_readonly(path: str, refused: list[str] | None = None) -> sqlite3.Connection:
    """A connection that cannot write, even to a WAL database opened by a running daemon.

    The names of the actions the authorizer refused are appended to ``refused``.
    """
    if not Path(path).exists():
        raise UnreadableDatabase(f"{path}: no such database file")
    # A file name, not URI text: '#' or '?' in it must not cut the path short.
    uri = f"file:{quote(os.path.abspath(path))}"
    if not Path(f"{path}-wal").exists():
        # No daemon is writing it (a WAL database being written has its -wal file), so
        # immutable is exact, and opening it creates no -wal/-shm owned by this user that
        # the daemon's user could not write afterwards.
        conn = sqlite3.connect(f"{uri}?mode=ro&immutable=1", uri=True, check_same_thread=False)
    else:
        try:
            conn = sqlite3.connect(f"{uri}?mode=ro", uri=True, check_same_thread=False)
            conn.execute("SELECT 1 FROM sqlite_master LIMIT 1")
        except sqlite3.OperationalError as exc:
            raise UnreadableDatabase(
                f"{path}: cannot open read-only ({exc}); ask for read access to the database "
                "directory, or read a copy made with `wirekeep db snapshot`"
            ) from None
    conn.execute("PRAGMA query_only = 1")
    log = refused if refused is not None else []

    def authorizer(
        action: int, arg1: str | None, _arg2: str | None, _db: str | None, _source: str | None
    ) -> int:
        if action in _READ_ACTIONS:
            return sqlite3.SQLITE_OK
        if action == sqlite3.SQLITE_PRAGMA and arg1 in _READ_PRAGMAS and _arg2 is None:
            return sqlite3.SQLITE_OK  # the query form only (a value would set it)
        if action == sqlite3.SQLITE_TRANSACTION:
            return sqlite3.SQLITE_OK  # BEGIN/COMMIT of a read: nothing to write on mode=ro
        log.append(_ACTION_NAMES.get(action, str(action)))
        return sqlite3.SQLITE_DENY

    conn.set_authorizer(authorizer)
    return conn


def run_query(url: str, sql: str, *, limit: int | None = None) -> QueryResult:
    if make_url(url).get_backend_name() == "sqlite":
        return _run_sqlite(sqlite_path(url), sql, limit)
    return _run_postgres(url, sql, limit)


def _run_sqlite(path: str, sql: str, limit: int | None) -> QueryResult:
    refused: list[str] = []
    conn = open_sqlite_readonly(path, refused)
    try:
        cursor = conn.execute(sql)
        rows = cursor.fetchmany(limit) if limit else cursor.fetchall()
        columns = [d[0] for d in cursor.description or ()]
    except sqlite3.DatabaseError as exc:
        if refused or "not authorized" in str(exc) or "readonly" in str(exc):
            what = ", ".join(dict.fromkeys(refused)) or "a write"
            raise RefusedWrite(
                f"refused: `wirekeep sql` is read-only and this statement needs {what}; "
                "nothing was changed"
            ) from None
        raise QueryError(str(exc)) from None
    finally:
        conn.close()
    return QueryResult(columns, rows)


def _run_postgres(url: str, sql: str, limit: int | None) -> QueryResult:
    parsed = make_url(url)
    options = f"{parsed.query.get('options', '')} -c default_transaction_read_only=on".strip()
    engine = create_engine(parsed.update_query_dict({"options": options}))
    try:
        with engine.connect().execution_options(postgresql_readonly=True) as conn:
            raw = conn.connection.driver_connection
            assert raw is not None
            try:
                with raw.cursor() as cursor:
                    # prepare=True: the extended protocol runs exactly one statement, so
                    # "COMMIT; INSERT ..." cannot leave the READ ONLY transaction; with
                    # no parameters, a % in the text is just a %.
                    cursor.execute(sql, prepare=True)
                    if cursor.description is None:
                        return QueryResult([], [])
                    rows = cursor.fetchmany(limit) if limit else cursor.fetchall()
                    return QueryResult([d.name for d in cursor.description], rows)
            except psycopg.Error as exc:
                message = str(exc).strip().splitlines()[0]
                if "multiple commands" in message:
                    raise RefusedWrite(
                        "refused: `wirekeep sql` is read-only and runs exactly one statement; "
                        "this text holds several; nothing was changed"
                    ) from None
                if exc.sqlstate in READ_ONLY_SQLSTATES:
                    raise RefusedWrite(
                        f"refused: `wirekeep sql` is read-only ({message}); nothing was changed"
                    ) from None
                raise QueryError(message) from None
            finally:
                conn.rollback()
    finally:
        engine.dispose()
