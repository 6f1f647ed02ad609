"""The writer lock (daemon/dblock.py): one holder per database, named to whoever is refused,
and released by the operating system (or the server) however the holder ends."""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from processkit import ProcessGroup, eventually

from daemon import dblock
from daemon.dberrors import DatabaseUnavailable
from daemon.store import EventStore

STARTED = datetime(2026, 12, 1, 9, 30, 15, 123456, tzinfo=UTC)


@pytest.fixture
def lock(db_url: str) -> Iterator[dblock.WriterLock]:
    held = dblock.acquire(db_url, started_at=STARTED)
    try:
        yield held
    finally:
        held.release()


def test_a_second_holder_is_refused_with_the_first_ones_pid_host_and_start(
    db_url: str, lock: dblock.WriterLock
) -> None:
    with pytest.raises(dblock.DatabaseBusy) as refused:
        dblock.acquire(db_url, started_at=datetime.now(UTC))
    message = str(refused.value)
    assert f"pid {os.getpid()}" in message
    assert f"on host {socket.gethostname()}" in message
    assert "started 2026-12-01T09:30:15Z" in message
    assert "\n" not in message
    holder = refused.value.holder
    assert (holder.pid, holder.host, holder.started) == (
        os.getpid(),
        socket.gethostname(),
        "2026-12-01T09:30:15Z",
    )


def test_release_lets_the_next_one_in(db_url: str) -> None:
    first = dblock.acquire(db_url, started_at=STARTED)
    first.release()
    first.release()  # twice is harmless
    second = dblock.acquire(db_url, started_at=STARTED)
    second.release()


def test_the_store_holds_the_lock_until_it_closes(db_url: str) -> None:
    store = EventStore(db_url)
    store.lock_writer(started_at=STARTED)
    store.lock_writer(started_at=STARTED)  # its own lock: taken once
    other = EventStore(db_url)
    try:
        with pytest.raises(dblock.DatabaseBusy):
            other.lock_writer(started_at=STARTED)
        store.close()
        other.lock_writer(started_at=STARTED)
    finally:
        other.close()


def test_the_sqlite_lock_file_names_the_holder(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'events.db'}"
    held = dblock.acquire(url, started_at=STARTED)
    try:
        record = json.loads((tmp_path / "events.db.lock").read_text())
        assert record == {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": "2026-12-01T09:30:15Z",
        }
    finally:
        held.release()
    assert not (tmp_path / "events.db").exists()  # the lock creates no database


def test_a_lock_file_left_behind_means_nothing(tmp_path: Path) -> None:
    (tmp_path / "events.db.lock").write_text('{"pid": 1, "host": "gone", "started": "x"}\n')
    dblock.acquire(f"sqlite:///{tmp_path / 'events.db'}", started_at=STARTED).release()


def test_no_lock_for_a_private_in_memory_database() -> None:
    first = dblock.acquire("sqlite://", started_at=STARTED)
    second = dblock.acquire("sqlite:///:memory:", started_at=STARTED)
    first.release()
    second.release()


def test_a_missing_directory_is_an_unavailable_database(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'nowhere' / 'events.db'}"
    with pytest.raises(DatabaseUnavailable, match=r"directory .*nowhere does not exist"):
        dblock.acquire(url, started_at=STARTED)


def test_schemas_of_one_postgresql_database_are_locked_separately(postgres_url: str) -> None:
    """Advisory locks are per database: the key includes the schema, so event stores in two
    schemas of one database (the test suite's, or two environments') do not collide."""
    other_schema = f"wk_other_{os.getpid()}"
    admin = sa.create_engine(postgres_url)
    with admin.begin() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA {other_schema}"))
    other_url = (
        sa.engine.make_url(postgres_url)
        .update_query_dict({"options": f"-csearch_path={other_schema}"})
        .render_as_string(hide_password=False)
    )
    try:
        first = dblock.acquire(postgres_url, started_at=STARTED)
        second = dblock.acquire(other_url, started_at=STARTED)
        with pytest.raises(dblock.DatabaseBusy):
            dblock.acquire(other_url, started_at=STARTED)
        first.release()
        second.release()
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f"DROP SCHEMA {other_schema} CASCADE"))
        admin.dispose()


HOLDER = """
import signal, sys
from datetime import UTC, datetime
from daemon import dblock
held = dblock.acquire(sys.argv[1], started_at=datetime.now(UTC))
print("locked", flush=True)
signal.pause()  # until killed
"""


async def test_the_lock_goes_with_a_sigkilled_holder(db_url: str, tmp_path: Path) -> None:
    group = ProcessGroup(tmp_path)
    try:
        holder = group.start("holder", [sys.executable, "-c", HOLDER, db_url])
        await eventually(lambda: holder.stdout() == "locked\n", holder.describe)
        with pytest.raises(dblock.DatabaseBusy, match=f"pid {holder.pid} "):
            dblock.acquire(db_url, started_at=STARTED)
        holder.sigkill()
        # The kernel closes the file and the socket; a PostgreSQL backend then ends its
        # session (and its locks) as soon as it reads the end of the connection.
        taken = await eventually(
            lambda: dblock.acquire(db_url, started_at=STARTED),
            "the lock after its holder was killed",
            seconds=10,
            tolerate=(dblock.DatabaseBusy,),
        )
        taken.release()
    finally:
        group.close()
