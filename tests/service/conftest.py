"""API fixtures: one migrated database per backend for the whole session (SQLite and Postgres),
one app per backend, and a fresh tenant per test. Every resource is tenant-scoped, so fresh
tenants isolate tests from each other without a new database each time (which would cost the
suite minutes on Postgres)."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

import pytest
import sqlalchemy as sa
import uvicorn
from api_helpers import TenantCtx, make_settings, new_tenant
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from fastapi.testclient import TestClient

from service.main import create_app
from service.settings import Settings

PG_URL = os.environ.get("LORAFLEET_TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def _create_pg_database() -> str:
    try:
        admin = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})
        name = f"lf_api_{uuid.uuid4().hex[:10]}"
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        admin.dispose()
    except sa.exc.OperationalError:
        pytest.skip(f"PostgreSQL not reachable at {PG_URL}")
    return name


def _drop_pg_database(name: str) -> None:
    admin = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def api_database_url(request, tmp_path_factory):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('db') / 'api.db'}"
        return
    name = _create_pg_database()
    yield PG_URL.rsplit("/", 1)[0] + f"/{name}"
    _drop_pg_database(name)


@pytest.fixture(scope="session")
def api_settings(api_database_url, tmp_path_factory) -> Settings:
    return make_settings(tmp_path_factory.mktemp("data"), api_database_url)


@pytest.fixture(scope="session")
def client(api_settings):
    with TestClient(create_app(api_settings)) as c:
        yield c


@pytest.fixture
def app(client):
    return client.app


@pytest.fixture
def tenant(client) -> TenantCtx:
    return new_tenant(client)


@pytest.fixture
def other_tenant(client) -> TenantCtx:
    return new_tenant(client)




@pytest.fixture(scope="session")
def live_url(api_settings):
    """The API served by a real uvicorn server on a loopback port (in a thread of this process)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(api_settings), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def _echo_app() -> FastAPI:
    echo = FastAPI()

    @echo.post("/v1/{kind:path}")
    async def reply(kind: str, request: Request):
        body = await request.json()
        if body.get("stream"):
            async def events():
                for word in ("ahoy", "matey"):
                    yield f"data: {json.dumps({'choices': [{'delta': {'content': word}}]})}\n\n"
                yield f"data: {json.dumps({'seen': body})}\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")
        return {"object": kind, "seen": body, "usage": {"prompt_tokens": 1, "completion_tokens": 2}}

    return echo


@pytest.fixture(scope="session")
def serve_url():
    """A stand-in for the serving application: echoes what the control plane forwards."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(_echo_app(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)
