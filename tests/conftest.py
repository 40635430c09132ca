"""Shared fixtures: real PostgreSQL and SQLite databases, a real S3-compatible endpoint (moto's
standalone server as a subprocess on loopback), and object stores over both backends."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from pg_databases import PG_URL, fresh_pg_database, url_of

from workers.local_ray import auth_env, ensure_token, free_port, start_local_ray, stop_local_ray
from workers.storage import LocalStore, S3Store

# Ray reads RAY_AUTH_MODE when it is first imported, so token auth for the session's local Ray
# (the `ray_cluster` fixture) is configured here, before any test imports ray.
RAY_STATE_DIR = Path(tempfile.mkdtemp(prefix="lf-test-ray-"))
os.environ.update(auth_env(RAY_STATE_DIR / "auth_token"))
ensure_token(RAY_STATE_DIR / "auth_token")


def _pg_reachable() -> bool:
    try:
        import sqlalchemy as sa

        engine = sa.create_engine(PG_URL, connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(sa.text("select 1"))
        engine.dispose()
        return True
    except Exception:
        return False


PG_OK = _pg_reachable()


def pytest_report_header(config):
    if not PG_OK:
        return f"!!! PostgreSQL NOT reachable at {PG_URL}: every postgres test is SKIPPED !!!"
    return f"PostgreSQL: {PG_URL}"



@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3-compatible HTTP endpoint on 127.0.0.1 (moto server subprocess)."""
    port = free_port()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("moto server did not start")
            time.sleep(0.1)
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="session")
def s3_credentials(s3_endpoint):
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "test")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "test")
    return {"endpoint_url": s3_endpoint, "access_key_id": "test", "secret_access_key": "test"}


@pytest.fixture
def s3_store(s3_credentials) -> S3Store:
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    store = S3Store(bucket, "lorafleet", endpoint_url=s3_credentials["endpoint_url"],
                    access_key_id="test", secret_access_key="test")
    store.ensure_bucket()
    return store


@pytest.fixture
def local_store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "objects")


@pytest.fixture(params=["local", "s3"])
def object_store(request):
    """Both object-store backends."""
    return request.getfixturevalue("local_store" if request.param == "local" else "s3_store")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request, tmp_path: Path) -> str:
    """A fresh, empty database on each backend. Postgres gets its own schema-isolated database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'test.db'}"
        return
    if not PG_OK:
        pytest.skip(f"PostgreSQL not reachable at {PG_URL}")
    with fresh_pg_database() as name:
        yield url_of(name)


@pytest.fixture(scope="session")
def ray_cluster():
    """One real local Ray for the whole test session (head with dashboard; 2 CPUs).

    Yields {"address": GCS address, "dashboard": dashboard URL}. Tests that need Ray share it
    rather than start their own: each start costs ~15 s on a 2-core machine.
    """
    info = start_local_ray(RAY_STATE_DIR, num_cpus=2)
    os.environ["RAY_ADDRESS"] = info["address"]
    yield info
    os.environ.pop("RAY_ADDRESS", None)
    stop_local_ray(info)
