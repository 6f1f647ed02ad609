"""session_uptime_daily: self-loops stay in their state.

The bug (0002, both dialects): the daily view sums, per state X, ``t - midnight`` over
the events that leave X minus the same over the events that enter X, written as one
``CASE WHEN source = X THEN t WHEN dest = X THEN -t END``. A self-loop (``stable`` within
STREAMING, ``throttled`` within BACKOFF or CIRCUIT_OPEN, ``connected`` within CONNECTING)
has ``source = dest = X``: CASE takes the first branch only, so the self-loop counted as
leaving X and never as entering it, and each ``stable`` event added its time of day to
that day's streaming seconds (uptime far above 1, negative not-connected seconds).

The fix is the rule ``session_state_intervals`` already follows: only an event whose
``dest`` differs from its ``source``, or a ``remove``, moves a session between stays.
The daily view now aggregates those events alone. Nothing else changes: a self-loop
never counts as a disconnect or a reconnect attempt, never begins the session's
existence, and leaves the session in the state it found it in, so the state at the end
of a day (the last such event's ``dest``) is the same; a day whose only events are
self-loops becomes a day without events, filled in from the day before like any quiet
day. It is still one aggregate pass, over fewer rows.

0002 is frozen: the new view is 0002's text with that one clause added (checked below),
so the two revisions differ by exactly the fix. Views only, as in 0002: no table is
touched, and the append-only triggers on ``session_events`` stay.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05
"""

import importlib
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: The frozen 0002 revision, whose dialect fragments and daily view this one builds on.
V0002: Any = importlib.import_module("migrations.versions.0002_audit_views")

VIEW = "session_uptime_daily"

#: Where 0002's ``moves`` reads the log, and the same read restricted to state changes.
_READ = "    FROM session_events AS e\n    GROUP BY "
_READ_STATE_CHANGES = (
    "    FROM session_events AS e\n"
    "    WHERE e.source <> e.dest OR e.\"trigger\" = 'remove'\n"
    "    GROUP BY "
)


def daily_sql(d: dict[str, Any]) -> str:
    """0002's ``session_uptime_daily`` with self-loops left out of its one pass."""
    old: str = V0002.daily_sql(d)
    if old.count(_READ) != 1:
        raise RuntimeError("0002's session_uptime_daily is not the text this revision patches")
    return old.replace(_READ, _READ_STATE_CHANGES)


def _replace_view(build: Any) -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    op.execute(sa.text(f"DROP VIEW {VIEW}"))
    op.execute(sa.text(build(V0002.SQLITE if sqlite else V0002.POSTGRES)))


def upgrade() -> None:
    _replace_view(daily_sql)


def downgrade() -> None:
    _replace_view(V0002.daily_sql)
