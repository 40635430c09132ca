"""Reading sweeps: the tenant's sweeps and the chapter's comparison table (6.2.3) per child.

Each child's numbers are what its run reported when it succeeded (jobs.result_metrics): eval
loss (train loss when the sweep has no validation file), trainable parameters, peak memory,
tokens/s and training time. The best child has the lowest such loss among the succeeded ones.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.api.schemas.sweeps import SweepChild, SweepPublic
from service.db.models import Job, Sweep
from service.db.pages import Page, fetch_page
from service.errors import NotFound
from service.jobs import states
from service.jobs.submit import cancel_job


def get_sweep_for_tenant(session: Session, *, tenant_id: str, sweep_id: str) -> Sweep:
    """The tenant's sweep; another tenant's is NotFound exactly like a missing one."""
    sweep = session.scalars(select(Sweep).where(Sweep.id == sweep_id, Sweep.tenant_id == tenant_id)).one_or_none()
    if sweep is None:
        raise NotFound(f"no sweep {sweep_id!r}", param="sweep_id")
    return sweep


def _children(session: Session, sweep_ids: Sequence[str]) -> dict[str, list[Job]]:
    out: dict[str, list[Job]] = defaultdict(list)
    for job in session.scalars(select(Job).where(Job.sweep_id.in_(sweep_ids)).order_by(Job.id)):
        out[job.sweep_id].append(job)
    return out


def _row(job: Job, names: list[str]) -> SweepChild:
    m: dict[str, Any] = job.result_metrics or {}
    params = m.get("trainable_params")
    return SweepChild(job_id=job.id, status=job.status, values={n: job.hyperparameters.get(n) for n in names},
                      fine_tuned_model=job.fine_tuned_model, eval_loss=m.get("eval_loss"),
                      train_loss=m.get("train_loss"), trainable_params=int(params) if params is not None else None,
                      peak_memory_mb=m.get("peak_memory_mb"), tokens_per_s=m.get("tokens_per_s"),
                      train_time_s=m.get("train_runtime_s"))


def _status(children: list[Job]) -> str:
    if any(j.status not in states.TERMINAL for j in children):
        return "running"
    succeeded = sum(j.status == states.SUCCEEDED for j in children)
    return "succeeded" if succeeded == len(children) else "partially_succeeded" if succeeded else "failed"


def public(sweep: Sweep, children: list[Job]) -> SweepPublic:
    names = [p["name"] for p in sweep.parameters]
    rows = [_row(j, names) for j in children]
    metric = "eval_loss" if sweep.base.get("validation_file") else "train_loss"
    scored = [r for r in rows if r.status == states.SUCCEEDED and getattr(r, metric) is not None]
    best = min(scored, key=lambda r: getattr(r, metric)) if scored else None
    return SweepPublic(id=sweep.id, created_at=sweep.created_at, model=sweep.model, status=_status(children),
                       parameters=sweep.parameters, base=sweep.base, metadata=sweep.user_metadata,
                       metric=metric, children=rows, best=best)


def sweep_public(session: Session, *, tenant_id: str, sweep_id: str) -> SweepPublic:
    sweep = get_sweep_for_tenant(session, tenant_id=tenant_id, sweep_id=sweep_id)
    return public(sweep, _children(session, [sweep.id])[sweep.id])


def list_sweeps(session: Session, *, tenant_id: str, after: str | None, limit: int) -> Page[SweepPublic]:
    page = fetch_page(session, select(Sweep).where(Sweep.tenant_id == tenant_id), Sweep.id, after=after, limit=limit)
    children = _children(session, [s.id for s in page.items])
    return Page(items=[public(s, children[s.id]) for s in page.items], has_more=page.has_more)


def cancel_sweep(session: Session, *, tenant_id: str, sweep_id: str) -> SweepPublic:
    """Cancel every child that has not finished (a running one is stopped by the scheduler)."""
    sweep = get_sweep_for_tenant(session, tenant_id=tenant_id, sweep_id=sweep_id)
    children = list(session.scalars(select(Job).where(Job.sweep_id == sweep.id).order_by(Job.id).with_for_update()))
    for job in children:
        if job.status not in states.TERMINAL:
            cancel_job(session, job)
    return public(sweep, children)
