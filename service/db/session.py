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

# TCP keepalives, both ends: a peer that vanished (node lost, network partition) is noticed
# within KEEPALIVE_IDLE_S + KEEPALIVE_INTERVAL_S * KEEPALIVE_COUNT seconds instead of the
# kernel's ~2 h. Server side this is what frees a dead scheduler leader's advisory lock;
# client side, tcp_user_timeout also bounds a write that is never acknowledged.
KEEPALIVE_IDLE_S, KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT = 5, 1, 3
TCP_USER_TIMEOUT_MS = 10_000


def postgres_connect_args(*, connect_timeout_s: int = 5, statement_timeout_s: float = 0) -> dict:
    """libpq connection parameters (psycopg); ``options`` sets the server's side of the session."""
    server = [f"tcp_keepalives_idle={KEEPALIVE_IDLE_S}", f"tcp_keepalives_interval={KEEPALIVE_INTERVAL_S}",
              f"tcp_keepalives_count={KEEPALIVE_COUNT}", f"tcp_user_timeout={TCP_USER_TIMEOUT_MS}"]
    if statement_timeout_s:  # a query stuck on a lock or a sick server fails, it does not hang
        server.append(f"statement_timeout={int(statement_timeout_s * 1000)}")
    return {"connect_timeout": connect_timeout_s, "keepalives": 1, "keepalives_idle": KEEPALIVE_IDLE_S,
            "keepalives_interval": KEEPALIVE_INTERVAL_S, "keepalives_count": KEEPALIVE_COUNT,
            "tcp_user_timeout": TCP_USER_TIMEOUT_MS, "options": " ".join(f"-c {o}" for o in server)}


def make_engine(url: str, *, pool_size: int = POOL_SIZE, max_overflow: int = POOL_OVERFLOW,
                pool_timeout_s: float = 10.0, connect_timeout_s: int = 5,
                statement_timeout_s: float = 0) -> Engine:
    """An engine that fails fast when the database is away, so the API can answer 503.

    The defaults (no statement timeout) suit migrations; the service passes its settings.
    """
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
    # pool_pre_ping costs a round trip per checkout, and buys this: after a failover or a cut
    # every pooled connection is dead, and without it each one would fail one request. With
    # it, the first request after the outage already gets a fresh connection.
    # pool_timeout bounds the wait for a connection when all are busy (then 503, not a hang);
    # pool_recycle retires connections before server-side idle timeouts.
    return create_engine(url, pool_size=pool_size, max_overflow=max_overflow, pool_timeout=pool_timeout_s,
                         pool_pre_ping=True, pool_recycle=1800,
                         connect_args=postgres_connect_args(connect_timeout_s=connect_timeout_s,
                                                            statement_timeout_s=statement_timeout_s))


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
    return make_engine(settings.effective_database_url, pool_size=settings.db_pool_size,
                       max_overflow=settings.db_max_overflow, pool_timeout_s=settings.db_pool_timeout_s,
                       connect_timeout_s=settings.db_connect_timeout_s,
                       statement_timeout_s=settings.db_statement_timeout_s)


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
