"""Alembic migrations (migrations/, daemon/migrate.py) on both backends: empty -> head,
idempotent, down to base and up again, and the result matches daemon/schema.py."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from daemon import migrate
from daemon.schema import metadata
from daemon.store import EventStore
from statemachines.session import TransitionRecord

TABLES = {"session_events", "daemon_runs", "session_snapshots"}


@pytest.fixture
def empty_store(db_url: str) -> Iterator[EventStore]:
    st = EventStore(db_url)
    try:
        yield st
    finally:
        st.close()


def _tables(engine: sa.Engine) -> set[str]:
    with engine.connect() as conn:
        return set(sa.inspect(conn).get_table_names())


def _alembic_versions(engine: sa.Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars())


def _triggers(store: EventStore) -> set[str]:
    with store.engine.connect() as conn:
        if store.sqlite:
            query = "SELECT name FROM sqlite_master WHERE type = 'trigger'"
        else:
            query = (
                "SELECT t.tgname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
                "WHERE c.relnamespace = current_schema()::regnamespace AND NOT t.tgisinternal"
            )
        return set(conn.execute(sa.text(query)).scalars())


def _assert_at_head(store: EventStore) -> None:
    engine = store.engine
    head = migrate.head_revision()
    assert migrate.current_revision(engine) == head
    assert _alembic_versions(engine) == [head]
    assert _tables(engine) >= TABLES
    with engine.connect() as conn:
        insp = sa.inspect(conn)
        uniques = {
            u["name"]: u["column_names"] for u in insp.get_unique_constraints("session_events")
        }
        assert uniques == {"uq_session_events_session_version": ["session", "version"]}
        index_names = {i["name"] for i in insp.get_indexes("session_events")}
        assert "ix_session_events_at" in index_names
        assert insp.get_pk_constraint("session_events")["constrained_columns"] == ["id"]
        assert insp.get_pk_constraint("session_snapshots")["constrained_columns"] == ["session"]
        if store.sqlite:
            ddl = conn.execute(
                sa.text("SELECT sql FROM sqlite_master WHERE name = 'session_events'")
            ).scalar_one()
            assert "AUTOINCREMENT" in ddl.upper()  # ids are never reused
    expected = (
        {"session_events_no_update", "session_events_no_delete"}
        | {"config_reloads_no_update", "config_reloads_no_delete"}
        if store.sqlite
        else {"session_events_append_only", "session_events_no_truncate"}
        | {"config_reloads_append_only", "config_reloads_no_truncate"}
    )
    assert expected <= _triggers(store)
    assert store.append_only_triggers_present()


def test_there_is_one_head() -> None:
    script = ScriptDirectory.from_config(migrate.alembic_config())
    assert len(script.get_heads()) == 1
    assert migrate.head_revision() == script.get_current_head()
    assert [r.revision for r in script.walk_revisions()][-1] == "0001"


def test_upgrade_from_empty_to_head(empty_store: EventStore) -> None:
    assert migrate.current_revision(empty_store.engine) is None
    assert _tables(empty_store.engine) == set()
    before, after = migrate.upgrade(empty_store.engine)
    assert before is None
    assert after == migrate.head_revision()
    _assert_at_head(empty_store)


def test_second_upgrade_is_a_no_op(empty_store: EventStore) -> None:
    head = migrate.head_revision()
    assert migrate.upgrade(empty_store.engine) == (None, head)
    assert migrate.upgrade(empty_store.engine) == (head, head)
    assert migrate.upgrade(empty_store.engine) == (head, head)
    _assert_at_head(empty_store)


def test_downgrade_to_base_and_upgrade_again(empty_store: EventStore) -> None:
    engine = empty_store.engine
    migrate.upgrade(engine)
    migrate.downgrade(engine, "base")
    assert migrate.current_revision(engine) is None
    assert _tables(engine) <= {"alembic_version"}
    assert _alembic_versions(engine) == []
    assert _triggers(empty_store) == set()
    if not empty_store.sqlite:
        with engine.connect() as conn:
            functions = conn.execute(
                sa.text(
                    "SELECT proname FROM pg_proc "
                    "WHERE pronamespace = current_schema()::regnamespace"
                )
            ).scalars()
            assert "wirekeep_append_only" not in set(functions)

    head = migrate.head_revision()
    assert migrate.upgrade(engine) == (None, head)
    _assert_at_head(empty_store)
    # The re-created tables and triggers work (row triggers need a row to fire on).
    empty_store.append(
        [TransitionRecord("a", 1, datetime.now(UTC), "start", "DISCONNECTED", "CONNECTING", "r")]
    )
    with pytest.raises(sa.exc.DBAPIError, match="append-only"), engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM session_events"))
    assert empty_store.count_events() == 1


def test_migrated_schema_matches_schema_module(empty_store: EventStore) -> None:
    """What the migrations build is what daemon/schema.py describes (no autogenerate diff)."""
    migrate.upgrade(empty_store.engine)
    with empty_store.engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(ctx, metadata) == []
