"""The control-plane API: ``create_app(settings)`` builds it, ``run()`` serves it with uvicorn."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import httpx
from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from service.api import errors
from service.api.auth import FailedAuthLimiter, PrincipalCache, RateLimiter
from service.api.deps import ReadDatabase
from service.api.idempotency import IdempotencyMiddleware, purge_periodically
from service.api.metrics import ApiMetrics
from service.api.middleware import AuthGate, BodyGuard, RequestMiddleware
from service.api.openapi import document_problems
from service.api.routes import admin, blends, exports, files, health, inference, internal, jobs, models, operations_internal
from service.api.routes import admin_cluster, sweeps
from service.catalog.repository import DEFAULT_BASE_MODEL, ensure_base_model
from service.console import router as console
from service.db.migrate import upgrade_to_head
from service.db.session import engine_from_settings, make_read_session_factory, make_session_factory
from service.files.upload import ENVELOPE_BYTES
from service.jobs.repository import count_jobs_by_status
from service.settings import Settings, get_settings
from workers.storage import ObjectStore, open_store


def open_object_store(settings: Settings) -> ObjectStore:
    def secret(value):
        return value.get_secret_value() if value is not None else None

    return open_store(settings.effective_object_store_url, endpoint_url=settings.s3_endpoint_url,
                      region=settings.s3_region, access_key_id=secret(settings.s3_access_key_id),
                      secret_access_key=secret(settings.s3_secret_access_key))


def _prepare(settings: Settings, factory) -> None:
    if settings.auto_migrate:
        upgrade_to_head(settings.effective_database_url)
    with factory() as session:
        ensure_base_model(session, **{**DEFAULT_BASE_MODEL, "id": settings.default_base_model})
        session.commit()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = engine_from_settings(settings)
    factory = make_session_factory(engine)

    read_factory = make_read_session_factory(engine)

    def count_jobs() -> dict[str, int]:
        with read_factory() as session:
            return count_jobs_by_status(session)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(_prepare, settings, factory)
        # Everything alive now (modules, routes, schemas, the app) lives as long as the
        # process: move it out of the collector's reach, so that a full collection walks only
        # what requests allocate (it took ~50 ms, a latency spike, with all of it included).
        gc.collect()
        gc.freeze()
        async with httpx.AsyncClient(timeout=settings.serve_timeout_s) as client, \
                anyio.create_task_group() as background:
            app.state.http = client
            background.start_soon(purge_periodically, factory, settings)
            yield
            background.cancel_scope.cancel()
        engine.dispose()

    app = FastAPI(title="LoRA Fleet", version="1", lifespan=lifespan,
                  description="Multi-tenant LoRA / QLoRA fine-tuning and serving (OpenAI-compatible).")
    app.state.settings = settings
    app.state.session_factory = factory
    app.state.read_session_factory = read_factory
    app.state.read_db = ReadDatabase(read_factory, max_threads=settings.db_read_threads)
    app.state.store = open_object_store(settings)
    app.state.principals = PrincipalCache(read_factory, ttl_s=settings.auth_cache_ttl_s,
                                          max_entries=settings.auth_cache_max_entries)
    app.state.auth_failures = FailedAuthLimiter(settings.failed_auth_per_minute)
    app.state.rate_limiter = RateLimiter()
    app.state.metrics = ApiMetrics(count_jobs)

    errors.install(app)
    # exports before models: GET /v1/models/{id:path} would take /v1/models/{id}/exports.
    for module in (admin, files, jobs, exports, blends, models, inference, internal, operations_internal, health):
        app.include_router(module.router)
    app.include_router(sweeps.router)
    app.include_router(admin_cluster.router)
    document_problems(app)
    console.mount(app)  # the web console: static pages over the public API above
    # Added last = outermost. Request ids and metrics see every response, replays included;
    # then authentication from the headers alone; then the body limit, so nothing inside
    # (idempotency's read-ahead, FastAPI's JSON parsing) ever holds more than the limit.
    app.add_middleware(IdempotencyMiddleware, settings=settings, factory=factory,
                       principals=app.state.principals)
    app.add_middleware(BodyGuard, limit=settings.max_body_bytes, timeout_s=settings.body_read_timeout_s,
                       # the upload route's own checks answer first (they name the param)
                       upload_limit=settings.max_upload_bytes + 2 * ENVELOPE_BYTES)
    app.add_middleware(AuthGate, settings=settings, principals=app.state.principals,
                       failures=app.state.auth_failures)
    app.add_middleware(RequestMiddleware, metrics=app.state.metrics)
    return app


def run() -> None:
    import uvicorn

    logging.basicConfig(level=logging.INFO)
    settings = get_settings()
    # h11 keeps a request's headers to 64 KiB; idle keep-alive connections close after 5 s.
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port,
                h11_max_incomplete_event_size=64 * 1024, timeout_keep_alive=5)
