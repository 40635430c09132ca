"""Engine and session factory built from Settings."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from service.settings import Settings

# At least as many connections as FastAPI's worker threads (anyio's default: 40). A sync
# handler keeps its session's connection until dependency teardown, and its response is
# serialised on another worker thread: with fewer connections than threads, every thread can
# end up waiting for a connection held by a request that is waiting for a thread.
POOL_SIZE, POOL_OVERFLOW = 10, 30


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        # The API serves requests from a thread pool: SQLite connections must cross threads.
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):
            cur = dbapi_conn.cursor()
            # WAL lets readers proceed during a write; SQLite leaves foreign keys off by default.
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        return engine
    # No pool_pre_ping: it costs a round trip on every checkout (the API's hot path is one
    # query). A dropped connection instead fails its request once and SQLAlchemy invalidates
    # the pool; pool_recycle retires connections before server-side idle timeouts.
    return create_engine(url, pool_size=POOL_SIZE, max_overflow=POOL_OVERFLOW, pool_recycle=1800)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    # expire_on_commit=False: handlers serialise rows after committing without reloading them.
    return sessionmaker(engine, expire_on_commit=False)


def make_read_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions for read-only requests: autocommit, so no BEGIN/ROLLBACK round trips.

    Each statement sees its own snapshot, fine for a GET that issues one or two reads.
    Never write through these sessions.
    """
    return sessionmaker(engine.execution_options(isolation_level="AUTOCOMMIT"), expire_on_commit=False)


def engine_from_settings(settings: Settings) -> Engine:
    return make_engine(settings.effective_database_url)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One transaction: commit on success, roll back on any error."""
    with factory() as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
