"""Alembic environment: runs migrations against the URL from settings (LORAFLEET_DATABASE_URL).

A caller may pass a URL with ``config.attributes["url"]`` or ``-x url=...`` (tests do).
"""

from __future__ import annotations

from alembic import context

from service.db.models import Base
from service.db.session import make_engine
from service.settings import Settings

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    return (config.attributes.get("url") or context.get_x_argument(as_dictionary=True).get("url")
            or Settings().effective_database_url)


def _configure(**kw) -> None:
    # render_as_batch: SQLite cannot ALTER most things, so later revisions copy-and-move tables.
    context.configure(target_metadata=target_metadata, compare_type=True,
                      render_as_batch=True, **kw)


def run_offline() -> None:
    _configure(url=_url(), literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection=connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = make_engine(_url())
    with engine.connect() as conn:
        _configure(connection=conn)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
