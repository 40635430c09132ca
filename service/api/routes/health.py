"""Liveness, readiness (database and object store reachable) and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


def _checks(request: Request) -> dict[str, str]:
    results: dict[str, str] = {}
    try:
        with request.app.state.read_session_factory() as session:
            session.execute(text("SELECT 1"))
        results["database"] = "ok"
    except Exception as exc:  # report, don't raise: readiness answers 503 with the reason
        results["database"] = f"error: {exc.__class__.__name__}"
    try:
        request.app.state.store.ping()
        results["object_store"] = "ok"
    except Exception as exc:
        results["object_store"] = f"error: {exc.__class__.__name__}"
    return results


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    checks = await run_in_threadpool(_checks, request)
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse({"status": "ready" if ready else "unavailable", "checks": checks},
                        status_code=200 if ready else 503)


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    registry = request.app.state.metrics.registry
    return Response(await run_in_threadpool(generate_latest, registry), media_type=CONTENT_TYPE_LATEST)
