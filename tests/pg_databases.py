"""The test PostgreSQL server (LORAFLEET_TEST_DATABASE_URL) and fresh databases on it."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import sqlalchemy as sa

PG_URL = os.environ.get("LORAFLEET_TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
PG = sa.make_url(PG_URL)  # .host / .port: where a FaultProxy points


def url_of(name: str, *, port: int | None = None) -> str:
    """The URL of database ``name`` on the test server, or through a proxy on ``port``."""
    url = PG.set(database=name) if port is None else PG.set(database=name, host="127.0.0.1", port=port)
    return url.render_as_string(hide_password=False)


@contextmanager
def fresh_pg_database(prefix: str = "lf") -> Iterator[str]:
    """A new, empty database on the test server (its name), dropped afterwards; skips the test
    when the server is unreachable."""
    admin = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError:
        admin.dispose()
        pytest.skip(f"PostgreSQL not reachable at {PG_URL}")
    try:
        yield name
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
