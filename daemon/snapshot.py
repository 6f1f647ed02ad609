"""``wirekeep db snapshot PATH``: a consistent, read-only copy of a live SQLite database.

Why a copy: the daemon keeps its database in WAL mode. Another user can open it
read-only while the daemon runs (the -wal and -shm files exist), but not after a clean
shutdown removed them: opening read-only cannot create them without write access to the
directory. A snapshot is a single file in rollback-journal mode that anyone allowed to
read it can open read-only, with the daemon running or not, and that does not change.

How: SQLite's online backup API copies every page inside one read transaction of a
read-only connection, so the copy is exactly the database as of one commit (later
commits by the running daemon are not in it and do not disturb it). The copy is then
switched out of WAL mode, checked with ``PRAGMA quick_check``, made read-only (the
source's read permissions, no write bits), and moved into place atomically: a failed
or interrupted snapshot leaves no file at PATH.

The source is never written, and no file is created beside it. With the daemon running
(its -wal and -shm exist) it is opened ``mode=ro``. With the daemon stopped there is no
-wal, and ``mode=ro`` would create -wal and -shm owned by whoever runs the snapshot
(``sudo`` makes them root's, and the daemon then cannot open its own database); so it
is opened ``immutable=1`` instead, and the copy is discarded if the file changed
meanwhile (a daemon started during the copy).
"""

from __future__ import annotations

import os
import sqlite3
import stat
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote


class SnapshotError(Exception):
    """The snapshot could not be written; nothing was left at the destination."""


@dataclass(frozen=True)
class SnapshotResult:
    path: Path
    bytes: int
    events: int
    sessions: int
    last_event_at: str | None
    revision: str | None


def snapshot_sqlite(source: str | Path, dest: str | Path, *, force: bool = False) -> SnapshotResult:
    """Copy the SQLite database at ``source`` to ``dest`` (see the module docstring)."""
    source, dest = Path(source), Path(dest)
    if not source.is_file():
        raise SnapshotError(f"{source}: no such database file")
    if dest.exists() and not force:
        raise SnapshotError(f"{dest} exists; pass --force to replace it")
    if dest.resolve() == source.resolve():
        raise SnapshotError(f"{dest} is the live database itself")
    if not dest.parent.is_dir():
        raise SnapshotError(f"{dest.parent}: no such directory")
    partial = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
    partial.unlink(missing_ok=True)
    try:
        _copy(source, partial)
        result = _inspect(partial, dest)
        mode = stat.S_IMODE(source.stat().st_mode) & 0o444
        os.chmod(partial, mode or 0o400)
        _fsync(partial)
        os.replace(partial, dest)
        _fsync(dest.parent)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return result


def _open_source(source: Path) -> tuple[sqlite3.Connection, bool]:
    """A read-only connection to ``source`` that creates no file; True if immutable."""
    wal, shm = Path(f"{source}-wal"), Path(f"{source}-shm")
    uri = f"file:{quote(str(source.resolve()))}?mode=ro"
    if wal.exists() and not shm.exists():
        raise SnapshotError(
            f"{source} has a -wal file but no -shm: start the daemon (or open the database "
            "once as its owner) so SQLite can recover it, then take the snapshot"
        )
    immutable = not wal.exists()
    if immutable:
        uri += "&immutable=1"
    try:
        conn = sqlite3.connect(uri, uri=True)
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.Error as exc:
        raise SnapshotError(f"{source}: cannot open read-only: {exc}") from None
    return conn, immutable


def _signature(path: Path) -> tuple[int, int, bool]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns, Path(f"{path}-wal").exists()


def _copy(source: Path, partial: Path) -> None:
    before = _signature(source)
    src, immutable = _open_source(source)
    try:
        dst = sqlite3.connect(partial)
        try:
            # pages=-1: every page in one step, inside one read transaction on the source.
            src.backup(dst, pages=-1)
            # The copied header says WAL; a rollback-journal file needs no -wal/-shm to be
            # opened read-only.
            mode = dst.execute("PRAGMA journal_mode=DELETE").fetchone()[0]
            if str(mode).lower() != "delete":
                raise SnapshotError(f"could not leave WAL mode (journal_mode is {mode})")
            check = dst.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise SnapshotError(f"the copy failed its integrity check: {check}")
        finally:
            dst.close()
    except sqlite3.Error as exc:
        raise SnapshotError(f"copying {source} failed: {exc}") from None
    finally:
        src.close()
    if immutable and _signature(source) != before:
        raise SnapshotError(
            f"{source} changed during the copy (did the daemon start?); run the snapshot again"
        )


def _inspect(partial: Path, dest: Path) -> SnapshotResult:
    conn = sqlite3.connect(f"file:{quote(str(partial.resolve()))}?mode=ro", uri=True)
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        events = sessions = 0
        last = revision = None
        if "session_events" in tables:
            events, sessions, last = conn.execute(
                "SELECT count(*), count(DISTINCT session), max(at) FROM session_events"
            ).fetchone()
        if "alembic_version" in tables:
            row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
            revision = row[0] if row else None
    finally:
        conn.close()
    return SnapshotResult(dest, partial.stat().st_size, events, sessions, last, revision)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
