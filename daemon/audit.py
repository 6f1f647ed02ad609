"""Audit helpers: the views' contract, the operator-action detail keys, the questions
auditors ask (as SQL for each backend), and the read-only PostgreSQL role.

The views themselves are created by ``migrations/versions/0002_audit_views.py`` (frozen
SQL, as migrations must be; ``0005_audit_views_self_loops.py`` replaced the daily view so
that self-loops count as staying); the README's audit section explains every column.
This module is what code and tests rely on: names, columns, and queries that are run
against both backends in tests/daemon/test_audit_views.py, so the documented SQL keeps
working.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

# -- the views ----------------------------------------------------------------------------

#: Every audit view and its columns, in order. Same names on SQLite and PostgreSQL.
VIEW_COLUMNS: Final[Mapping[str, tuple[str, ...]]] = {
    "session_state_intervals": (
        "session",
        "state",
        "started_at",
        "ended_at",
        "duration_s",
        "enter_reason",
        "exit_reason",
        "enter_trigger",
        "exit_trigger",
        "previous_state",
        "next_state",
        "version",
    ),
    "session_uptime_daily": (
        "session",
        "day",
        "streaming_s",
        "stale_s",
        "not_connected_s",
        "paused_s",
        "observed_s",
        "uptime_ratio",
        "disconnects",
        "reconnect_attempts",
    ),
    "operator_actions": (
        "at",
        "session",
        "action",
        "uid",
        "user_name",
        "operator_reason",
        "reason",
        "state_before",
        "state_after",
        "event_id",
    ),
    "daemon_run_history": (
        "run_id",
        "started_at",
        "stopped_at",
        "outcome",
        "ran_s",
        "next_started_at",
        "version",
        "host",
        "pid",
        "config_hash",
        "last_event_id",
    ),
}

#: The daily view's buckets. Every second a session exists falls in exactly one.
STREAMING_STATES: Final = frozenset({"STREAMING"})
STALE_STATES: Final = frozenset({"STALE"})
PAUSED_STATES: Final = frozenset({"PAUSED"})
NOT_CONNECTED_STATES: Final = frozenset(
    {"DISCONNECTED", "CONNECTING", "AUTHENTICATED", "BACKOFF", "CIRCUIT_OPEN"}
)
#: A disconnect is a transition out of one of these into a state outside them.
CONNECTED_STATES: Final = frozenset({"AUTHENTICATED", "STREAMING", "STALE"})
#: Triggers counted as reconnect attempts (attempts made after a failure).
RECONNECT_TRIGGERS: Final = frozenset({"retry", "probe"})

# -- operator actions ---------------------------------------------------------------------

#: The triggers an operator fires through the control socket.
OPERATOR_TRIGGERS: Final = ("pause", "resume", "reconnect")

#: Detail keys of an operator action's event, read by the ``operator_actions`` view:
#: ``uid`` (integer, the peer's uid from SO_PEERCRED), ``user`` (text, that uid's login
#: name, if it has one), ``operator_reason`` (text, the reason the operator typed, if any).
UID_KEY: Final = "uid"
USER_KEY: Final = "user"
OPERATOR_REASON_KEY: Final = "operator_reason"


def operator_detail(uid: int, user: str | None, reason: str | None) -> dict[str, Any]:
    """The detail an operator action's event carries, as ``operator_actions`` reads it."""
    detail: dict[str, Any] = {UID_KEY: int(uid)}
    if user:
        detail[USER_KEY] = user
    if reason:
        detail[OPERATOR_REASON_KEY] = reason
    return detail


# -- the questions auditors ask -----------------------------------------------------------


@dataclass(frozen=True)
class Question:
    """One audit question, answered by one query per backend (the text docs/audit.md shows).

    ``:t1``/``:t2``-style parameters are not used: the queries are meant to be pasted
    into ``sqlite3``, ``psql`` or ``wirekeep sql`` with the times edited in place.
    """

    title: str
    sqlite: str
    postgresql: str

    def sql(self, dialect: str) -> str:
        return self.sqlite if dialect == "sqlite" else self.postgresql


def _both(title: str, sql: str) -> Question:
    return Question(title, sql, sql)


QUESTIONS: Final[tuple[Question, ...]] = (
    Question(
        "Which sessions were down between T1 and T2, and why",
        """SELECT session, state, started_at, ended_at, round(duration_s, 1) AS seconds,
       enter_reason, exit_reason
  FROM session_state_intervals
 WHERE state IN ('DISCONNECTED', 'CONNECTING', 'AUTHENTICATED', 'BACKOFF', 'CIRCUIT_OPEN')
   AND enter_trigger <> 'remove'
   AND started_at < '{t2}' AND (ended_at IS NULL OR ended_at > '{t1}')
 ORDER BY started_at, session;""",
        """SELECT session, state, started_at, ended_at, round(duration_s::numeric, 1) AS seconds,
       enter_reason, exit_reason
  FROM session_state_intervals
 WHERE state IN ('DISCONNECTED', 'CONNECTING', 'AUTHENTICATED', 'BACKOFF', 'CIRCUIT_OPEN')
   AND enter_trigger <> 'remove'
   AND started_at < '{t2}' AND (ended_at IS NULL OR ended_at > '{t1}')
 ORDER BY started_at, session;""",
    ),
    Question(
        "The longest stale period this week",
        """SELECT session, started_at, ended_at, round(duration_s, 1) AS seconds,
       enter_reason, exit_reason
  FROM session_state_intervals
 WHERE state = 'STALE' AND started_at >= datetime('now', '-7 days')
 ORDER BY duration_s DESC
 LIMIT 1;""",
        """SELECT session, started_at, ended_at, round(duration_s::numeric, 1) AS seconds,
       enter_reason, exit_reason
  FROM session_state_intervals
 WHERE state = 'STALE' AND started_at >= now() - interval '7 days'
 ORDER BY duration_s DESC
 LIMIT 1;""",
    ),
    _both(
        "Who paused a session, and when",
        """SELECT at, session, uid, user_name, operator_reason, reason
  FROM operator_actions
 WHERE action = 'pause'
 ORDER BY at;""",
    ),
    Question(
        "Uptime per session per day, last 30 days",
        """SELECT session, day, round(uptime_ratio, 4) AS uptime,
       round(streaming_s) AS streaming_s, round(stale_s) AS stale_s,
       round(not_connected_s) AS not_connected_s, round(paused_s) AS paused_s,
       disconnects, reconnect_attempts
  FROM session_uptime_daily
 WHERE day >= date('now', '-30 days')
 ORDER BY session, day;""",
        """SELECT session, day, round(uptime_ratio::numeric, 4) AS uptime,
       round(streaming_s) AS streaming_s, round(stale_s) AS stale_s,
       round(not_connected_s) AS not_connected_s, round(paused_s) AS paused_s,
       disconnects, reconnect_attempts
  FROM session_uptime_daily
 WHERE day >= (now() AT TIME ZONE 'UTC')::date - 30
 ORDER BY session, day;""",
    ),
    Question(
        "How often the circuit opened, per venue endpoint",
        """SELECT json_extract(detail, '$.endpoint') AS endpoint, count(*) AS circuit_opened,
       count(DISTINCT session) AS sessions, max(at) AS last_opened
  FROM session_events
 WHERE "trigger" = 'trip'
 GROUP BY 1
 ORDER BY 2 DESC;""",
        """SELECT detail ->> 'endpoint' AS endpoint, count(*) AS circuit_opened,
       count(DISTINCT session) AS sessions, max(at) AS last_opened
  FROM session_events
 WHERE "trigger" = 'trip'
 GROUP BY 1
 ORDER BY 2 DESC;""",
    ),
    _both(
        "Daemon runs, and how each ended",
        """SELECT run_id, started_at, stopped_at, outcome, next_started_at, version, host
  FROM daemon_run_history
 ORDER BY started_at;""",
    ),
)


# -- PostgreSQL: the read-only role ---------------------------------------------------------


def _ident(name: str) -> str:
    """A quoted SQL identifier (roles, schemas and databases may hold any character)."""
    return '"' + name.replace('"', '""') + '"'


def audit_role_sql(
    role: str, *, schema: str, owner: str, database: str | None = None, login: bool = False
) -> list[str]:
    """The statements that give ``role`` SELECT on every table and view, and nothing else.

    ``owner`` is the role that runs the migrations (it owns the tables and views, and
    will own those later migrations create: the default privileges cover them). Run them
    as that owner or as a superuser. ``login=False`` creates a group role to grant to
    people (``GRANT wirekeep_audit TO alice``); ``login=True`` one that can log in
    itself (set its password with ``\\password`` in psql, never in a file).
    """
    r, s, o = _ident(role), _ident(schema), _ident(owner)
    statements = [f"CREATE ROLE {r} {'LOGIN' if login else 'NOLOGIN'}"]
    if database is not None:
        statements.append(f"GRANT CONNECT ON DATABASE {_ident(database)} TO {r}")
    statements += [
        f"GRANT USAGE ON SCHEMA {s} TO {r}",
        f"GRANT SELECT ON ALL TABLES IN SCHEMA {s} TO {r}",
        f"ALTER DEFAULT PRIVILEGES FOR ROLE {o} IN SCHEMA {s} GRANT SELECT ON TABLES TO {r}",
        # A guard against accidents only; the grants above are the boundary.
        f"ALTER ROLE {r} SET default_transaction_read_only = on",
    ]
    return statements
