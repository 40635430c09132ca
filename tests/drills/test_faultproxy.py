"""The fault proxy itself, and what a cut does to our engine and the scheduler's leader lock
(fast: no stack, no Ray; the drills in test_drills.py build on both)."""

from __future__ import annotations

import time

import pytest
import sqlalchemy as sa
from faultproxy import FaultProxy  # tests/drills is on sys.path (conftest.py)
from pg_databases import PG, PG_URL, url_of

from service.db.session import make_engine
from service.scheduler import LeaderLock

pytestmark = pytest.mark.postgres

@pytest.fixture
def pg_proxy():
    probe = make_engine(PG_URL, connect_timeout_s=3)
    try:
        _one(probe)
    except sa.exc.OperationalError:
        pytest.skip(f"needs PostgreSQL at {PG_URL}")
    finally:
        probe.dispose()
    proxy = FaultProxy(PG.port or 5432, PG.host or "127.0.0.1")
    yield proxy
    proxy.close()


def _one(engine) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.text("select 1")).scalar()


def test_cut_refuses_and_resets_then_restore_recovers(pg_proxy):
    engine = make_engine(url_of(PG.database, port=pg_proxy.port), connect_timeout_s=2)
    held = engine.connect()
    assert held.execute(sa.text("select 1")).scalar() == 1
    pg_proxy.cut()
    started = time.monotonic()
    with pytest.raises(sa.exc.OperationalError):  # the open connection was reset
        held.execute(sa.text("select 2"))
    with pytest.raises(sa.exc.OperationalError):  # and new ones are refused
        _one(engine)
    assert time.monotonic() - started < 3, "a cut fails fast, it does not hang"
    held.close()
    pg_proxy.restore()
    assert _one(engine) == 1  # pool_pre_ping replaced the dead pooled connection
    engine.dispose()


def test_leader_loses_its_lock_within_seconds_when_its_connection_dies(pg_proxy):
    """The advisory lock lives on the leader's connection: once that dies, another scheduler
    takes over within seconds, and the old leader knows it no longer leads."""
    key_engine = make_engine(url_of(PG.database, port=pg_proxy.port), connect_timeout_s=2)
    direct = make_engine(PG_URL)
    leader = LeaderLock(key_engine)
    rival = LeaderLock(direct)
    try:
        assert leader.acquire()
        assert not rival.acquire()
        pg_proxy.cut()
        started = time.monotonic()
        while not rival.acquire():
            assert time.monotonic() - started < 10, "the dead leader's lock outlived its connection"
            time.sleep(0.2)
        took = time.monotonic() - started
        pg_proxy.restore()
        assert leader.acquire() is False  # it noticed, let go, and the rival holds the lock now
        print(f"\nleader lock handed over {took:.2f} s after the cut")
    finally:
        rival.release()
        key_engine.dispose()
        direct.dispose()


def test_a_silent_peer_is_dropped_within_seconds_on_both_ends(pg_proxy):
    """A cut sends RST; a vanished node sends nothing. Then TCP keepalives decide how long the
    server keeps a dead leader's session (and its advisory lock): seconds, not the kernel's 2 h."""
    from service.db.session import KEEPALIVE_COUNT, KEEPALIVE_IDLE_S, KEEPALIVE_INTERVAL_S

    engine = make_engine(url_of(PG.database, port=pg_proxy.port))
    with engine.connect() as conn:
        server = {k: conn.execute(sa.text(f"SHOW {k}")).scalar()
                  for k in ("tcp_keepalives_idle", "tcp_keepalives_interval", "tcp_keepalives_count")}
    engine.dispose()
    assert server == {"tcp_keepalives_idle": str(KEEPALIVE_IDLE_S),
                      "tcp_keepalives_interval": str(KEEPALIVE_INTERVAL_S),
                      "tcp_keepalives_count": str(KEEPALIVE_COUNT)}
    assert KEEPALIVE_IDLE_S + KEEPALIVE_INTERVAL_S * KEEPALIVE_COUNT <= 10
