"""Fixtures shared by the whole suite: fresh databases on every backend.

PostgreSQL tests use the server named by ``WIREKEEP_TEST_POSTGRES_URL`` (``.ci/run`` sets
it to the local server). Where it is unset or no server answers they are skipped with
the reason, except under ``CI=true``, where a missing PostgreSQL fails the run.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

POSTGRES_ENV = "WIREKEEP_TEST_POSTGRES_URL"
BACKENDS = ["sqlite", "postgresql"]


def _postgres_base_url() -> str:
    url = os.environ.get(POSTGRES_ENV)
    reason = None
    if not url:
        reason = f"PostgreSQL tests need {POSTGRES_ENV} (e.g. postgresql+psycopg://postgres@127.0.0.1:5432/test)"
    else:
        try:
            engine = sa.create_engine(url)
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
            engine.dispose()
        except sa.exc.OperationalError as exc:
            reason = f"no PostgreSQL answers at {POSTGRES_ENV}={url}: {str(exc.orig).strip()}"
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true and {reason}", pytrace=False)
        pytest.skip(reason)
    assert url is not None
    return url


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A URL whose connections live in a fresh, empty schema (dropped afterwards)."""
    base = _postgres_base_url()
    schema = f"wk_test_{secrets.token_hex(6)}"
    admin = sa.create_engine(base)
    with admin.begin() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
    url = sa.engine.make_url(base).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'events.db'}"


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database on each backend in turn."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'events.db'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def store(db_url: str) -> Iterator[object]:
    """A migrated EventStore on each backend in turn."""
    from daemon import migrate
    from daemon.store import EventStore

    st = EventStore(db_url)
    migrate.upgrade(st.engine)
    try:
        yield st
    finally:
        st.close()
