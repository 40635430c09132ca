"""The admin's view of the work in the system: jobs waiting and running, by tenant.

Counts and summed demand come from one GROUP BY over the unfinished jobs (the ``status``
index); running jobs are listed oldest start first, bounded, for the console's table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.db.models import Job, Tenant
from service.jobs import states

# The states an admin watches: waiting (queued, paused) and holding compute (ACTIVE).
UNFINISHED = (states.QUEUED, states.PAUSED, *sorted(states.ACTIVE))


@dataclass
class TenantQueue:
    tenant_id: str
    tenant_name: str
    counts: dict[str, int] = field(default_factory=dict)  # status → jobs
    queued_cpus: float = 0.0  # what its queued jobs would hold, all together
    queued_gpus: float = 0.0
    active_cpus: float = 0.0  # what its running (and cancelling, pausing) jobs hold
    active_gpus: float = 0.0
    oldest_queued_at: int | None = None  # created_at of its oldest queued job


def _demand_columns():
    r = Job.resources  # a workers.spec.Resources dump; Resources' defaults where a field is absent
    workers = func.coalesce(r["num_workers"].as_float(), 1.0)
    return (func.sum(workers * func.coalesce(r["cpus_per_worker"].as_float(), 1.0)),
            func.sum(workers * func.coalesce(r["gpus_per_worker"].as_float(), 0.0)))


def queue_by_tenant(session: Session) -> list[TenantQueue]:
    cpus, gpus = _demand_columns()
    rows = session.execute(
        select(Job.tenant_id, Tenant.name, Job.status, func.count(), cpus, gpus, func.min(Job.created_at))
        .join(Tenant, Tenant.id == Job.tenant_id)
        .where(Job.status.in_(UNFINISHED))
        .group_by(Job.tenant_id, Tenant.name, Job.status))
    out: dict[str, TenantQueue] = {}
    for tenant_id, name, status, count, need_cpus, need_gpus, oldest in rows:
        q = out.setdefault(tenant_id, TenantQueue(tenant_id, name))
        q.counts[status] = count
        if status == states.QUEUED:
            q.queued_cpus, q.queued_gpus, q.oldest_queued_at = need_cpus or 0.0, need_gpus or 0.0, oldest
        elif status in states.ACTIVE:
            q.active_cpus += need_cpus or 0.0
            q.active_gpus += need_gpus or 0.0
    # The longest wait first: that is whom the admin is asked about.
    return sorted(out.values(), key=lambda q: (q.oldest_queued_at is None, q.oldest_queued_at or 0, q.tenant_name))


def running_jobs(session: Session, *, limit: int) -> tuple[list[tuple[Job, str]], bool]:
    """Jobs holding compute, oldest start first, with their tenant's name; and whether more exist."""
    rows = session.execute(
        select(Job, Tenant.name).join(Tenant, Tenant.id == Job.tenant_id)
        .where(Job.status.in_(states.ACTIVE))
        .order_by(Job.started_at, Job.id).limit(limit + 1)).all()
    return [(job, name) for job, name in rows[:limit]], len(rows) > limit
