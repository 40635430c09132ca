"""Admin: what the cluster is doing. The queue by tenant with the running jobs, capacity as the
scheduler last saw it, and the serving application's adapter cache. Every route needs the admin
token; a tenant key gets 403 as on every admin route.

Capacity: only the scheduler talks to Ray (it holds the Ray address and token), so it records
its last view in the database (service.scheduling.observed) and this route reads that row,
with its age; nothing recorded yet answers ``observed: false``. Serving: its signed stats route
(``GET /internal/v1/stats``), asked through the same client and signing key as inference; no
serving configured answers ``configured: false``, serving down answers ``reachable: false``.
"""

from __future__ import annotations

import logging
from typing import Annotated

import httpx
from fastapi import APIRouter, Query, Request

from service.api.deps import AdminDep, ReadDB
from service.api.schemas.cluster import (
    ClusterPublic,
    QueuePublic,
    ReplicaPublic,
    RunningJobPublic,
    ServingPublic,
    TenantQueuePublic,
)
from service.ids import now
from service.jobs import overview
from service.scheduling import observed
from service.settings import Settings
from workers.signing import Signer

router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[AdminDep])
log = logging.getLogger(__name__)

STATS_PATH = "/internal/v1/stats"
STATS_TIMEOUT_S = 5.0  # an admin page refreshing: a slow serving app answers "unreachable", not a hang


@router.get("/queue")
async def get_queue(db: ReadDB, running_limit: Annotated[int, Query(ge=1, le=1000)] = 200) -> QueuePublic:
    tenants = await db.run(overview.queue_by_tenant)
    running, more = await db.run(overview.running_jobs, limit=running_limit)
    ts = now()
    return QueuePublic(tenants=[TenantQueuePublic.of(q, now=ts) for q in tenants],
                       running_jobs=[RunningJobPublic.of(job, name) for job, name in running],
                       running_jobs_has_more=more)


@router.get("/cluster")
async def get_cluster(db: ReadDB) -> ClusterPublic:
    return ClusterPublic.of(await db.run(observed.latest), now=now())


@router.get("/serving")
async def get_serving(request: Request) -> ServingPublic:
    settings: Settings = request.app.state.settings
    if not settings.serve_url:
        return ServingPublic(configured=False)
    if settings.serve_signing_key is None:
        return ServingPublic(configured=True, reachable=False,
                             error="LORAFLEET_SERVE_SIGNING_KEY is not set: serving refuses unsigned requests")
    rid = request.scope["state"]["request_id"]
    headers = Signer(settings.serve_signing_key.get_secret_value()).headers("GET", STATS_PATH, request_id=rid)
    client: httpx.AsyncClient = request.app.state.http
    try:
        resp = await client.get(settings.serve_url.rstrip("/") + STATS_PATH, headers=headers, timeout=STATS_TIMEOUT_S)
    except httpx.HTTPError as exc:
        log.warning("serving stats unreachable (request %s): %r", rid, exc)
        return ServingPublic(configured=True, reachable=False, error=f"no answer from serving ({type(exc).__name__})")
    if resp.status_code == 401:
        return ServingPublic(configured=True, reachable=False,
                             error="serving refused the signature: check LORAFLEET_SERVE_SIGNING_KEY on both sides")
    if resp.status_code != 200:
        return ServingPublic(configured=True, reachable=False, error=f"serving answered {resp.status_code}")
    try:
        replica = ReplicaPublic.of(resp.json())
    except (ValueError, TypeError, AttributeError):  # not JSON, or not stats: the serving app is not ours or not current
        return ServingPublic(configured=True, reachable=False, error="serving answered something other than its stats")
    return ServingPublic(configured=True, reachable=True, replica=replica)
