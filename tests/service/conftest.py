"""API fixtures: one migrated database per backend for the whole session (SQLite and Postgres),
one app per backend, and a fresh tenant per test. Every resource is tenant-scoped, so fresh
tenants isolate tests from each other without a new database each time (which would cost the
suite minutes on Postgres)."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import uvicorn
from api_helpers import TenantCtx, make_settings, new_tenant
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from fastapi.testclient import TestClient
from pg_databases import fresh_pg_database, url_of

from service.db.models import Base
from service.db.session import make_engine, make_session_factory
from service.main import create_app
from service.settings import Settings

@pytest.fixture
def session(database_url):
    """A session on a fresh database of each backend with the schema created (no app)."""
    engine = make_engine(database_url)
    Base.metadata.create_all(engine)
    with make_session_factory(engine)() as s:
        yield s
    engine.dispose()


@pytest.fixture(scope="session", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def api_database_url(request, tmp_path_factory):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('db') / 'api.db'}"
        return
    with fresh_pg_database("lf_api") as name:
        yield url_of(name)


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
