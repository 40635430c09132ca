"""Creating a sweep: one child job per combination of the varied values, all or none.

Every child is an ordinary job (queued, scheduled by fair share, counted by the tenant's
quotas). The quota is checked for all of them first: a sweep that does not fit is refused
(422 ``sweep_over_quota``) before any child exists; a child whose values fail validation
fails the whole request, and the caller's transaction (never committed) leaves nothing behind.
"""

from __future__ import annotations

import itertools
from typing import Any

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.api.schemas.jobs import JobCreate
from service.api.schemas.sweeps import SweepCreate
from service.db.models import Sweep, Tenant
from service.errors import ValidationFailed
from service.ids import new_id, now
from service.jobs import repository as jobs
from service.jobs import states
from service.jobs.submit import submit_job
from service.settings import Settings
from workers.spec import Resources

SWEEP_ID_PREFIX = "ftsweep-"
OVER_QUOTA = "sweep_over_quota"


def combinations(body: SweepCreate) -> list[tuple[dict[str, Any], str]]:
    """Each child's values, {name: value}, with the param naming its value(s), in the order of
    the parameters' values."""
    names = [p.name for p in body.parameters]
    out = []
    for picks in itertools.product(*(list(enumerate(p.values)) for p in body.parameters)):
        values = {name: value for name, (_, value) in zip(names, picks, strict=True)}
        where = ", ".join(f"parameters[{i}].values[{j}]" for i, (j, _) in enumerate(picks))
        out.append((values, where))
    return out


def child_body(base: JobCreate, values: dict[str, Any]) -> JobCreate:
    """The base job with ``values`` set as the method's own hyperparameters (they win over the
    top-level OpenAI ones and over `auto`)."""
    data = base.model_dump(mode="json", exclude_unset=True)
    method = data.get("method") or {}  # absent, or an explicit null: the default LoRA
    kind = method["type"] = method.get("type") or "lora"
    params = method.get(kind) or {}
    params["hyperparameters"] = {**(params.get("hyperparameters") or {}), **values}
    method[kind] = params
    data["method"] = method
    return JobCreate.model_validate(data)


def _child(base: JobCreate, values: dict[str, Any], where: str) -> JobCreate:
    try:
        return child_body(base, values)
    except ValidationError as exc:  # e.g. a name the method has no hyperparameter for, or a bad value
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        raise ValidationFailed(f"the child with {values}: {field}: {err['msg']}", param=where) from None


def create_sweep(session: Session, *, tenant_id: str, body: SweepCreate, settings: Settings) -> Sweep:
    combos = combinations(body)
    method_type = body.base.method.type if body.base.method else "lora"
    tenant = session.scalars(select(Tenant).where(Tenant.id == tenant_id).with_for_update()).one()
    pending = jobs.count_jobs(session, tenant_id=tenant_id, statuses=states.PENDING)
    if pending + len(combos) > tenant.max_queued_jobs:
        raise ValidationFailed(
            f"the sweep makes {len(combos)} jobs and {pending} are already queued; the tenant's "
            f"queue holds {tenant.max_queued_jobs}", code=OVER_QUOTA, param="parameters")
    sweep = Sweep(id=new_id(SWEEP_ID_PREFIX), tenant_id=tenant_id, model=body.base.model,
                  base=body.base.model_dump(mode="json", exclude_unset=True),
                  parameters=[p.model_dump(mode="json") for p in body.parameters],
                  user_metadata=body.metadata, created_at=now())
    session.add(sweep)
    session.flush()
    for values, where in combos:
        child = _child(body.base, values, where)
        method, hyperparameters = child.resolved()
        try:
            submit_job(session, tenant_id=tenant_id, model=child.model, training_file=child.training_file,
                       validation_file=child.validation_file, method=method, hyperparameters=hyperparameters,
                       resources=child.resources or Resources(), suffix=child.suffix, metadata=child.metadata,
                       method_type=method_type, settings=settings, auto=child.auto_fields(), sweep_id=sweep.id)
        except ValidationFailed as exc:  # the same code; the param names the sweep's value(s)
            raise ValidationFailed(f"the child with {values}: {exc.message} ({exc.param})", code=exc.code,
                                   param=where) from None
    return sweep
