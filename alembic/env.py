"""Alembic environment: runs against the connection the store hands in, or the configured URL."""

from __future__ import annotations

from sqlalchemy import Connection

from alembic import context
from store.schema import metadata
from store.sql import make_engine


def run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True,
                      compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


connection = context.config.attributes.get("connection")
if connection is not None:
    run(connection)
else:
    engine = make_engine(context.config.get_main_option("sqlalchemy.url") or "")
    with engine.begin() as conn:
        run(conn)
    engine.dispose()
