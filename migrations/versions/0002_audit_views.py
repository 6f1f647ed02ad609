"""Audit views: state intervals, daily uptime, operator actions, daemon run history.

Views only: nothing here touches a table, so the append-only triggers on
``session_events`` stay as they are (no batch mode, which would rebuild the table and
drop them). Each view has the same name and columns on SQLite and PostgreSQL; the SQL
differs only where the two date/time and JSON dialects do. docs/audit.md defines every
column and shows the queries auditors ask.

Two ways of reading the same log:

- ``session_state_intervals`` is one row per stay in a state: an event whose ``dest``
  differs from its ``source`` (or a ``remove``) begins a stay, the next such event of
  the session ends it. Self-loops (``connected`` within CONNECTING, ``throttled``
  within BACKOFF or CIRCUIT_OPEN) do not split a stay.
- ``session_uptime_daily`` sums, per session and UTC day, the time spent in each state
  without materialising the intervals: within one day, the time in state X is
  ``sum(t - midnight)`` over the events that leave X, minus the same over the events
  that enter X, plus ``(end of day - midnight)`` if the session is in X when the day
  ends. That is one aggregate pass over the events (plus one short lookup per
  session-day), where splitting every interval at midnight costs a window pass, a
  split and a second sort; it is what keeps the all-sessions query within its budget
  on a million events (tests/benchmarks/bench_audit.py). It relies on a consistent log
  (each event leaves the state the previous one entered), which replay verifies.

No index is added: per-session queries use ``uq_session_events_session_version`` and
the all-sessions daily query is one sequential scan.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

VIEWS = (
    "session_state_intervals",
    "session_uptime_daily",
    "operator_actions",
    "daemon_run_history",
)

# -- dialect fragments ------------------------------------------------------------------
#
# SQLite stores ``at`` as text 'YYYY-MM-DD HH:MM:SS.ffffff' (UTC); PostgreSQL as
# timestamptz. Seconds are computed exactly from the text on SQLite (its julianday()
# rounds to milliseconds) and from epoch values on PostgreSQL (a UTC day is 86,400 s of
# epoch time, whatever the session's TimeZone).


def _sqlite_seconds_of_day(x: str) -> str:
    return (
        f"(CAST(substr({x}, 12, 2) AS INTEGER) * 3600 + CAST(substr({x}, 15, 2) AS INTEGER) * 60"
        f" + CAST(substr({x}, 18) AS REAL))"
    )


def _sqlite_seconds_between(a: str, b: str) -> str:
    # unixepoch() truncates to whole seconds; the fractions come from the text.
    return (
        f"((unixepoch({b}) - unixepoch({a}))"
        f" + (CAST(substr({b}, 20) AS REAL) - CAST(substr({a}, 20) AS REAL)))"
    )


SQLITE_NOW = "strftime('%Y-%m-%d %H:%M:%f', 'now')"

SQLITE = {
    "now": SQLITE_NOW,
    "seconds_between": _sqlite_seconds_between,
    # moves: the UTC day of an event, and its seconds since that day's midnight
    "event_day": "substr(e.at, 1, 10)",
    # unixepoch() truncates to whole seconds; the fraction comes from the text.
    "event_t": "(unixepoch(e.at) % 86400 + CAST(substr(e.at, 20) AS REAL))",
    # Day first: the planner then scans the table instead of walking the session index.
    "group_moves": "substr(e.at, 1, 10), e.session",
    # spans: whole days between a day with events and the next one (or the end of today)
    "gap": (
        "max(0, CAST(julianday(coalesce(r.next_day, date('now', '+1 day'))) - julianday(r.day)"
        " AS INTEGER) - 1)"
    ),
    # cells: one row per day of a span
    "split": (
        "JOIN json_each(CASE WHEN s.gap = 0 THEN '[0]' ELSE '[0' || "
        "replace(substr(printf('%.*c', s.gap, 'x'), 1, s.gap), 'x', ',0') || ']' END) AS k"
    ),
    "k": "k.key",
    "cell_day": "date(s.day, '+' || k.key || ' days')",
    "day_length": (
        f"CASE WHEN c.day = date('now') THEN {_sqlite_seconds_of_day(SQLITE_NOW)} ELSE 86400.0 END"
    ),
    "output_day": "day",
    "json_int": "CASE WHEN json_type(detail, '$.{key}') = 'integer' "
    "THEN json_extract(detail, '$.{key}') END",
    "json_text": "CASE WHEN json_type(detail, '$.{key}') = 'text' "
    "THEN json_extract(detail, '$.{key}') END",
}


def _pg_seconds_between(a: str, b: str) -> str:
    return f"date_part('epoch', {b} - {a})"


PG_EPOCH = "date_part('epoch', e.at)"
PG_DAY = f"floor({PG_EPOCH} / 86400)"

POSTGRES = {
    "now": "now()",
    "seconds_between": _pg_seconds_between,
    "event_day": PG_DAY,
    "event_t": f"({PG_EPOCH} - {PG_DAY} * 86400)",
    "group_moves": f"e.session, {PG_DAY}",
    "gap": (
        "greatest(0, (coalesce(r.next_day, floor(date_part('epoch', now()) / 86400) + 1)"
        " - r.day - 1)::integer)"
    ),
    # unnest, not generate_series, in the FROM list: the planner guesses 10 rows for it
    # instead of 1,000, and the one-session query stays under the JIT threshold.
    "split": (
        "CROSS JOIN LATERAL unnest(CASE WHEN s.gap = 0 THEN ARRAY[0] "
        "ELSE ARRAY(SELECT generate_series(0, s.gap)) END) AS k(key)"
    ),
    "k": "k.key",
    "cell_day": "s.day + k.key",
    "day_length": (
        "CASE WHEN c.day = floor(date_part('epoch', now()) / 86400) "
        "THEN date_part('epoch', now()) - c.day * 86400 ELSE 86400.0 END"
    ),
    "output_day": "(date '1970-01-01' + day::integer)",
    "json_int": "CASE WHEN jsonb_typeof(detail -> '{key}') = 'number' "
    "THEN (detail ->> '{key}')::numeric::bigint END",
    "json_text": "CASE WHEN jsonb_typeof(detail -> '{key}') = 'string' THEN detail ->> '{key}' END",
}

# -- the views --------------------------------------------------------------------------


def intervals_sql(d: dict) -> str:
    ended = "lead(at) OVER w"
    duration = d["seconds_between"]("at", f"coalesce({ended}, {d['now']})")
    return f"""CREATE VIEW session_state_intervals AS
SELECT
    session,
    dest AS state,
    at AS started_at,
    {ended} AS ended_at,
    {duration} AS duration_s,
    reason AS enter_reason,
    lead(reason) OVER w AS exit_reason,
    "trigger" AS enter_trigger,
    lead("trigger") OVER w AS exit_trigger,
    source AS previous_state,
    lead(dest) OVER w AS next_state,
    version
FROM session_events
WHERE source <> dest OR "trigger" = 'remove'
WINDOW w AS (PARTITION BY session ORDER BY version)"""


#: An event that follows a ``remove``: the session did not exist before it.
AFTER_REMOVE = """(e.source = 'DISCONNECTED' AND (SELECT p."trigger" FROM session_events AS p
            WHERE p.session = e.session AND p.version = e.version - 1) = 'remove')"""


def daily_sql(d: dict) -> str:
    t = d["event_t"]

    # Per state X: sum of (t - midnight) over events leaving X minus over events entering
    # X. "observed" is the same for "the session exists": it begins at version 1 and at
    # the first event after a remove, and ends at a remove.
    def moved(state: str) -> str:
        return (
            f"coalesce(sum(CASE WHEN e.source = '{state}' THEN {t} "
            f"WHEN e.dest = '{state}' THEN -{t} END), 0)"
        )

    def in_state(column: str, state: str) -> str:
        return f"{column} + CASE WHEN end_state = '{state}' THEN day_length ELSE 0 END"

    return f"""CREATE VIEW session_uptime_daily AS
WITH moves AS (
    SELECT
        e.session AS session,
        {d["event_day"]} AS day,
        {moved("STREAMING")} AS streaming,
        {moved("STALE")} AS stale,
        {moved("PAUSED")} AS paused,
        coalesce(sum(CASE
            WHEN e.version = 1 OR {AFTER_REMOVE}
                THEN CASE WHEN e."trigger" = 'remove' THEN 0 ELSE -{t} END
            WHEN e."trigger" = 'remove' THEN {t}
        END), 0) AS observed,
        -- sum(CASE ...), not count(*) FILTER: an SQLite older than 3.30 could not even
        -- load a schema holding FILTER (views are parsed when the database opens)
        sum(CASE WHEN e.source IN ('AUTHENTICATED', 'STREAMING', 'STALE')
            AND e.dest NOT IN ('AUTHENTICATED', 'STREAMING', 'STALE') THEN 1 ELSE 0 END)
            AS disconnects,
        sum(CASE WHEN e."trigger" IN ('retry', 'probe') THEN 1 ELSE 0 END) AS reconnect_attempts,
        max(e.version) AS last_version
    FROM session_events AS e
    GROUP BY {d["group_moves"]}
),
runs AS (
    SELECT
        m.*,
        (SELECT CASE WHEN p."trigger" = 'remove' THEN 'REMOVED' ELSE p.dest END
           FROM session_events AS p
          WHERE p.session = m.session AND p.version = m.last_version) AS end_state,
        lead(m.day) OVER (PARTITION BY m.session ORDER BY m.day) AS next_day
    FROM moves AS m
),
spans AS (
    SELECT r.*, CASE WHEN r.end_state = 'REMOVED' THEN 0 ELSE {d["gap"]} END AS gap
    FROM runs AS r
),
cells AS (
    SELECT
        s.session,
        {d["cell_day"]} AS day,
        s.end_state,
        CASE WHEN {d["k"]} = 0 THEN s.streaming ELSE 0.0 END AS streaming,
        CASE WHEN {d["k"]} = 0 THEN s.stale ELSE 0.0 END AS stale,
        CASE WHEN {d["k"]} = 0 THEN s.paused ELSE 0.0 END AS paused,
        CASE WHEN {d["k"]} = 0 THEN s.observed ELSE 0.0 END AS observed,
        CASE WHEN {d["k"]} = 0 THEN s.disconnects ELSE 0 END AS disconnects,
        CASE WHEN {d["k"]} = 0 THEN s.reconnect_attempts ELSE 0 END AS reconnect_attempts
    FROM spans AS s
    {d["split"]}
),
days AS (
    SELECT
        c.session,
        c.day,
        {d["day_length"]} AS day_length,
        c.end_state,
        c.streaming, c.stale, c.paused, c.observed, c.disconnects, c.reconnect_attempts
    FROM cells AS c
),
totals AS (
    SELECT
        session,
        day,
        {in_state("streaming", "STREAMING")} AS streaming_s,
        {in_state("stale", "STALE")} AS stale_s,
        {in_state("paused", "PAUSED")} AS paused_s,
        observed + CASE WHEN end_state <> 'REMOVED' THEN day_length ELSE 0 END AS observed_s,
        disconnects,
        reconnect_attempts
    FROM days
)
SELECT
    session,
    {d["output_day"]} AS day,
    streaming_s,
    stale_s,
    observed_s - streaming_s - stale_s - paused_s AS not_connected_s,
    paused_s,
    observed_s,
    streaming_s / nullif(observed_s - paused_s, 0) AS uptime_ratio,
    disconnects,
    reconnect_attempts
FROM totals"""


def operator_actions_sql(d: dict) -> str:
    uid = d["json_int"].format(key="uid")
    user = d["json_text"].format(key="user")
    stated = d["json_text"].format(key="operator_reason")
    return f"""CREATE VIEW operator_actions AS
SELECT
    at,
    session,
    "trigger" AS action,
    {uid} AS uid,
    {user} AS user_name,
    {stated} AS operator_reason,
    reason,
    source AS state_before,
    dest AS state_after,
    id AS event_id
FROM session_events
WHERE "trigger" IN ('pause', 'resume', 'reconnect')"""


def run_history_sql(d: dict) -> str:
    ran = d["seconds_between"]("started_at", "stopped_at")
    return f"""CREATE VIEW daemon_run_history AS
SELECT
    id AS run_id,
    started_at,
    stopped_at,
    CASE WHEN clean THEN 'clean' WHEN NOT clean THEN 'crashed' ELSE 'not stopped' END
        AS outcome,
    {ran} AS ran_s,
    lead(started_at) OVER (PARTITION BY host ORDER BY started_at, id) AS next_started_at,
    version,
    host,
    pid,
    config_hash,
    last_event_id
FROM daemon_runs"""


def create_statements(dialect: str) -> list[str]:
    d = SQLITE if dialect == "sqlite" else POSTGRES
    return [intervals_sql(d), daily_sql(d), operator_actions_sql(d), run_history_sql(d)]


def upgrade() -> None:
    for ddl in create_statements(op.get_bind().dialect.name):
        op.execute(sa.text(ddl))


def downgrade() -> None:
    for name in reversed(VIEWS):
        op.execute(sa.text(f"DROP VIEW IF EXISTS {name}"))
