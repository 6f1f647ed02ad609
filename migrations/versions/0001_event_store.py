"""The event store: session_events (append-only), daemon_runs, session_snapshots.

Revision ID: 0001
Revises:
Create Date: 2026-11-21
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
DETAIL = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
UTC_TIME = sa.DateTime(timezone=True)

SQLITE_TRIGGERS = (
    """CREATE TRIGGER session_events_no_update BEFORE UPDATE ON session_events
    BEGIN SELECT RAISE(ABORT, 'session_events is append-only: UPDATE is not allowed'); END""",
    """CREATE TRIGGER session_events_no_delete BEFORE DELETE ON session_events
    BEGIN SELECT RAISE(ABORT, 'session_events is append-only: DELETE is not allowed'); END""",
)

POSTGRES_TRIGGERS = (
    """CREATE FUNCTION wirekeep_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        RAISE EXCEPTION 'session_events is append-only: % is not allowed', TG_OP
            USING ERRCODE = 'insufficient_privilege';
    END
    $$""",
    """CREATE TRIGGER session_events_append_only BEFORE UPDATE OR DELETE ON session_events
    FOR EACH ROW EXECUTE FUNCTION wirekeep_append_only()""",
    # Row triggers do not fire on TRUNCATE.
    """CREATE TRIGGER session_events_no_truncate BEFORE TRUNCATE ON session_events
    FOR EACH STATEMENT EXECUTE FUNCTION wirekeep_append_only()""",
)


def upgrade() -> None:
    op.create_table(
        "session_events",
        sa.Column("id", BIG_ID, primary_key=True, autoincrement=True),
        sa.Column("session", sa.String(64), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("at", UTC_TIME, nullable=False),
        sa.Column("trigger", sa.String(32), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("dest", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("detail", DETAIL, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_session_events"),
        sa.UniqueConstraint("session", "version", name="uq_session_events_session_version"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_session_events_at", "session_events", ["at"])
    op.create_table(
        "daemon_runs",
        sa.Column("id", BIG_ID, primary_key=True, autoincrement=True),
        sa.Column("started_at", UTC_TIME, nullable=False),
        sa.Column("stopped_at", UTC_TIME, nullable=True),
        sa.Column("clean", sa.Boolean(), nullable=True),
        sa.Column("version", sa.String(32), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("config_hash", sa.String(64), nullable=False),
        sa.Column("last_event_id", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_daemon_runs"),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "session_snapshots",
        sa.Column("session", sa.String(64), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("at", UTC_TIME, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("detail", DETAIL, nullable=False),
        sa.PrimaryKeyConstraint("session", name="pk_session_snapshots"),
    )
    triggers = SQLITE_TRIGGERS if op.get_bind().dialect.name == "sqlite" else POSTGRES_TRIGGERS
    for ddl in triggers:
        op.execute(sa.text(ddl))


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(sa.text("DROP TRIGGER session_events_no_truncate ON session_events"))
        op.execute(sa.text("DROP TRIGGER session_events_append_only ON session_events"))
        op.execute(sa.text("DROP FUNCTION wirekeep_append_only()"))
    op.drop_table("session_snapshots")
    op.drop_table("daemon_runs")
    op.drop_index("ix_session_events_at", table_name="session_events")
    op.drop_table("session_events")
