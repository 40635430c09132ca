"""Admin answers about the cluster: the queue by tenant, running jobs, capacity, serving caches."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

from service.db.models import ClusterStatus, Job
from service.jobs.overview import TenantQueue


class Compute(BaseModel):
    cpus: float
    gpus: float


class TenantQueuePublic(BaseModel):
    tenant_id: str
    tenant_name: str
    queued: int
    running: int  # running, cancelling and pausing: every state that holds compute
    paused: int
    queued_demand: Compute  # what its queued jobs would hold, all together
    running_demand: Compute
    oldest_queued_at: int | None
    oldest_queued_age_s: int | None

    @classmethod
    def of(cls, q: TenantQueue, *, now: int) -> TenantQueuePublic:
        return cls(tenant_id=q.tenant_id, tenant_name=q.tenant_name, queued=q.counts.get("queued", 0),
                   running=sum(n for s, n in q.counts.items() if s not in ("queued", "paused")),
                   paused=q.counts.get("paused", 0),
                   queued_demand=Compute(cpus=q.queued_cpus, gpus=q.queued_gpus),
                   running_demand=Compute(cpus=q.active_cpus, gpus=q.active_gpus),
                   oldest_queued_at=q.oldest_queued_at,
                   oldest_queued_age_s=None if q.oldest_queued_at is None else max(0, now - q.oldest_queued_at))


class RunningJobPublic(BaseModel):
    id: str
    tenant_id: str
    tenant_name: str
    status: str
    method: str
    model: str
    started_at: int | None
    last_checkpoint_step: int | None
    trained_tokens: int | None
    estimated_finish: int | None

    @classmethod
    def of(cls, job: Job, tenant_name: str) -> RunningJobPublic:
        return cls(id=job.id, tenant_id=job.tenant_id, tenant_name=tenant_name, status=job.status,
                   method=job.method, model=job.model, started_at=job.started_at,
                   last_checkpoint_step=job.last_checkpoint_step, trained_tokens=job.trained_tokens,
                   estimated_finish=job.estimated_finish)


class QueuePublic(BaseModel):
    object: Literal["queue"] = "queue"
    tenants: list[TenantQueuePublic]
    running_jobs: list[RunningJobPublic]
    running_jobs_has_more: bool


class ClusterPublic(BaseModel):
    """``observed`` false: no scheduler has reported yet (none running, or Ray not answering)."""

    object: Literal["cluster"] = "cluster"
    observed: bool
    observed_at: int | None = None
    age_s: int | None = None
    total: Compute | None = None
    used: Compute | None = None  # held by anything: our runs, serving replicas, other Ray work
    free: Compute | None = None
    training: Compute | None = None  # held by our fine-tuning runs
    other: Compute | None = None  # held by the rest (serving replicas above all)

    @classmethod
    def of(cls, row: ClusterStatus | None, *, now: int) -> ClusterPublic:
        if row is None:
            return cls(observed=False)
        total = Compute(cpus=row.total_cpus, gpus=row.total_gpus)
        free = Compute(cpus=row.available_cpus, gpus=row.available_gpus)
        used = Compute(cpus=total.cpus - free.cpus, gpus=total.gpus - free.gpus)
        training = Compute(cpus=row.training_cpus, gpus=row.training_gpus)
        # Our runs count from commit, before Ray places them: "other" never goes below zero.
        other = Compute(cpus=max(0.0, used.cpus - training.cpus), gpus=max(0.0, used.gpus - training.gpus))
        return cls(observed=True, observed_at=row.observed_at, age_s=max(0, now - row.observed_at),
                   total=total, used=used, free=free, training=training, other=other)


class AdapterCachePublic(BaseModel):
    tier: Literal["host", "device"]
    resident_adapters: int
    max_adapters: int | None
    bytes_used: int
    bytes_max: int | None
    bytes_free: int | None
    hits: int
    misses: int
    hit_rate: float | None  # hits / (hits + misses); null before any lookup
    evictions: int

    @classmethod
    def of(cls, tier: Literal["host", "device"], s: dict[str, Any]) -> AdapterCachePublic:
        used = s.get("bytes_used", s.get("bytes", 0))
        most = s.get("bytes_budget", s.get("max_bytes"))
        hits, misses = int(s.get("hits", 0)), int(s.get("misses", 0))
        return cls(tier=tier, resident_adapters=s.get("adapters", 0), max_adapters=s.get("max_adapters"),
                   bytes_used=used, bytes_max=most, bytes_free=None if most is None else max(0, most - used),
                   hits=hits, misses=misses, hit_rate=hits / (hits + misses) if hits + misses else None,
                   evictions=int(s.get("evictions", 0)))


class ReplicaPublic(BaseModel):
    base_model_id: str | None
    caches: list[AdapterCachePublic]  # host memory, then the device's adapter pages where it has them
    engine: dict[str, Any]  # the engine's own counters, as serving reports them

    @classmethod
    def of(cls, stats: dict[str, Any]) -> ReplicaPublic:
        adapters = stats.get("adapters") or {}
        caches = [AdapterCachePublic.of(tier, adapters[tier]) for tier in ("host", "device") if tier in adapters]
        return cls(base_model_id=stats.get("base_model_id"), caches=caches, engine=stats.get("engine") or {})


class ServingPublic(BaseModel):
    """``configured`` false: this API has no serving application (LORAFLEET_SERVE_URL unset).
    ``reachable`` false: configured, and its stats route did not answer (``error`` says how)."""

    object: Literal["serving"] = "serving"
    configured: bool
    reachable: bool | None = None
    error: str | None = None
    replica: ReplicaPublic | None = None  # the replica that answered (Ray Serve routes to one)
