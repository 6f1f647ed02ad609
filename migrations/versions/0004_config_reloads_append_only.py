"""config_reloads is append-only, like session_events.

It is audit history (who reloaded which configuration, when): the database refuses
UPDATE and DELETE on it (and TRUNCATE on PostgreSQL), as it does for the event log.
On PostgreSQL the shared trigger function now names the table it guards.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-21
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SQLITE_UP = (
    """CREATE TRIGGER config_reloads_no_update BEFORE UPDATE ON config_reloads
    BEGIN SELECT RAISE(ABORT, 'config_reloads is append-only: UPDATE is not allowed'); END""",
    """CREATE TRIGGER config_reloads_no_delete BEFORE DELETE ON config_reloads
    BEGIN SELECT RAISE(ABORT, 'config_reloads is append-only: DELETE is not allowed'); END""",
)
SQLITE_DOWN = (
    "DROP TRIGGER config_reloads_no_delete",
    "DROP TRIGGER config_reloads_no_update",
)


def _postgres_function(table: str) -> str:
    """The trigger function; ``table`` is a literal name or the SQL expression TG_TABLE_NAME."""
    return f"""CREATE OR REPLACE FUNCTION wirekeep_append_only() RETURNS trigger
    LANGUAGE plpgsql AS $$
    BEGIN
        RAISE EXCEPTION '% is append-only: % is not allowed', {table}, TG_OP
            USING ERRCODE = 'insufficient_privilege';
    END
    $$"""


POSTGRES_UP = (
    _postgres_function("TG_TABLE_NAME"),
    """CREATE TRIGGER config_reloads_append_only BEFORE UPDATE OR DELETE ON config_reloads
    FOR EACH ROW EXECUTE FUNCTION wirekeep_append_only()""",
    """CREATE TRIGGER config_reloads_no_truncate BEFORE TRUNCATE ON config_reloads
    FOR EACH STATEMENT EXECUTE FUNCTION wirekeep_append_only()""",
)
POSTGRES_DOWN = (
    "DROP TRIGGER config_reloads_no_truncate ON config_reloads",
    "DROP TRIGGER config_reloads_append_only ON config_reloads",
    _postgres_function("'session_events'"),
)


def upgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    for ddl in SQLITE_UP if sqlite else POSTGRES_UP:
        op.execute(sa.text(ddl))


def downgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    for ddl in SQLITE_DOWN if sqlite else POSTGRES_DOWN:
        op.execute(sa.text(ddl))
