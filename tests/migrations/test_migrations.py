"""alembic upgrade head / downgrade base on SQLite and Postgres, and no drift from the models."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext

from service.db.models import Base

ROOT = Path(__file__).resolve().parents[2]


def _config(url: str) -> Config:
    cfg = Config(str(ROOT / "alembic.ini"))
    cfg.attributes["url"] = url
    return cfg


def _tables(engine: sa.Engine) -> set[str]:
    return set(sa.inspect(engine).get_table_names()) - {"alembic_version"}


def test_upgrade_matches_models_then_downgrade_to_empty(database_url):
    cfg = _config(database_url)
    engine = sa.create_engine(database_url)
    try:
        command.upgrade(cfg, "head")
        assert _tables(engine) == set(Base.metadata.tables)
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            diff = compare_metadata(ctx, Base.metadata)
        assert diff == [], f"models and migrations differ: {diff}"

        command.downgrade(cfg, "base")
        assert _tables(engine) == set()
        command.upgrade(cfg, "head")  # and the round trip is repeatable
        assert _tables(engine) == set(Base.metadata.tables)
    finally:
        engine.dispose()
