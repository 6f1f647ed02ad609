"""Alembic environment: the daemon passes an open connection in ``config.attributes``.

No ``fileConfig()`` here: it would disable the daemon's existing (structlog) loggers.
"""

from alembic import context
from sqlalchemy import create_engine

from daemon.schema import metadata

config = context.config


def run() -> None:
    connection = config.attributes.get("connection")
    if connection is None:
        url = config.get_main_option("sqlalchemy.url")
        if not url:
            raise SystemExit("set sqlalchemy.url, or run migrations through `wirekeep db upgrade`")
        with create_engine(url).connect() as conn:
            _migrate(conn)
            conn.commit()
        return
    _migrate(connection)


def _migrate(connection: object) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=True,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


run()
