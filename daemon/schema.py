"""The event store's tables, as SQLAlchemy Core metadata.

Alembic migrations (``migrations/versions``) are the only way these reach a database;
this module is what the code reads and writes through, and what the migration
check compares against.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.types import TypeDecorator

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING)

# SQLite only makes INTEGER PRIMARY KEY an alias of the rowid.
BigId = BigInteger().with_variant(Integer(), "sqlite")
Detail = JSON().with_variant(JSONB(), "postgresql")


class UtcDateTime(TypeDecorator[datetime]):
    """An instant, always stored and returned in UTC.

    SQLite keeps no offset: without this, 16:03+02:00 would be stored as 16:03 and come
    back as 16:03 UTC. Naive values are taken as UTC.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None or value.tzinfo is None:
            return value
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


UtcTime = UtcDateTime()

session_events = Table(
    "session_events",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("session", String(64), nullable=False),
    Column("version", BigInteger, nullable=False),
    Column("at", UtcTime, nullable=False),
    Column("trigger", String(32), nullable=False),
    Column("source", String(16), nullable=False),
    Column("dest", String(16), nullable=False),
    Column("reason", Text, nullable=False),
    Column("detail", Detail, nullable=False),
    UniqueConstraint("session", "version"),
    Index(None, "at"),
    sqlite_autoincrement=True,
)

daemon_runs = Table(
    "daemon_runs",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("started_at", UtcTime, nullable=False),
    Column("stopped_at", UtcTime, nullable=True),
    Column("clean", Boolean, nullable=True),
    Column("version", String(32), nullable=False),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("config_hash", String(64), nullable=False),
    Column("last_event_id", BigInteger, nullable=True),
    sqlite_autoincrement=True,
)

session_snapshots = Table(
    "session_snapshots",
    metadata,
    Column("session", String(64), primary_key=True),
    Column("version", BigInteger, nullable=False),
    Column("at", UtcTime, nullable=False),
    Column("state", String(16), nullable=False),
    Column("detail", Detail, nullable=False),
)

config_reloads = Table(
    "config_reloads",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("run_id", BigInteger, nullable=True),
    Column("at", UtcTime, nullable=False),
    Column("config_hash", String(64), nullable=False),
    Column("previous_hash", String(64), nullable=False),
    Column("reason", Text, nullable=False),
    Column("detail", Detail, nullable=False),
    Index(None, "at"),
    sqlite_autoincrement=True,
)

APPEND_ONLY_TABLES = ("session_events",)
