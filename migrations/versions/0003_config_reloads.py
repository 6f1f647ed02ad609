"""config_reloads: one row per configuration reload the daemon applied.

A reload changes sessions through ordinary transitions (REMOVE for a removed session,
a hand-over for a changed one, START for an added one), each with the config hash in
its reason. This row is the reload itself: when, by whom, from which hash to which,
and which sessions it added, removed and changed, also when it changed no session at
all (a comment edited, a [daemon] setting that waits for a restart).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
DETAIL = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
UTC_TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "config_reloads",
        sa.Column("id", BIG_ID, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.BigInteger(), nullable=True),  # daemon_runs.id of the process
        sa.Column("at", UTC_TIME, nullable=False),
        sa.Column("config_hash", sa.String(64), nullable=False),
        sa.Column("previous_hash", sa.String(64), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),  # "configuration reloaded by uid 0 (root)"
        sa.Column("detail", DETAIL, nullable=False),  # path, added, removed, changed, uid, user
        sa.PrimaryKeyConstraint("id", name="pk_config_reloads"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_config_reloads_at", "config_reloads", ["at"])


def downgrade() -> None:
    op.drop_index("ix_config_reloads_at", table_name="config_reloads")
    op.drop_table("config_reloads")
