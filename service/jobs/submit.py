"""Creating and cancelling jobs: the rules a request must pass before a job enters the queue."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.catalog.limits import check_hyperparameters
from service.catalog.repository import get_base_model
from service.db.models import File, Job, Tenant
from service.errors import QuotaExceeded, ValidationFailed
from service.files.repository import get_file_for_tenant
from service.jobs import repository as jobs
from service.jobs import states
from service.jobs.auto import auto_message, resolve_auto
from service.settings import Settings
from service.tenants.limits import INSUFFICIENT_RESOURCES, demand, limit_violation
from workers.spec import AnyHyperparameters, Resources


def _usable_file(session: Session, *, tenant_id: str, file_id: str, param: str) -> File:
    file = get_file_for_tenant(session, tenant_id=tenant_id, file_id=file_id, param=param)
    if file.purpose != "fine-tune":
        raise ValidationFailed(f"file {file_id} has purpose {file.purpose!r}, not 'fine-tune'",
                               code="invalid_file_purpose", param=param)
    if file.status != "processed":
        raise ValidationFailed(f"file {file_id} is {file.status!r}, not 'processed'",
                               code="file_not_ready", param=param)
    return file


def submit_job(session: Session, *, tenant_id: str, model: str, training_file: str,
               validation_file: str | None, method: str, hyperparameters: AnyHyperparameters,
               resources: Resources, suffix: str | None, metadata: dict[str, str] | None,
               method_type: str, settings: Settings, auto: frozenset[str] = frozenset(),
               sweep_id: str | None = None) -> Job:
    """Validate everything, then create the job and move it validating_files → queued.

    ``auto``: the hyperparameters the request left `auto`, chosen here from the training file
    (service.jobs.auto). Raises NotFound / ValidationFailed / QuotaExceeded before anything is
    written.
    """
    base = get_base_model(session, model_id=model)
    if method not in base.methods:
        raise ValidationFailed(f"base model {model} does not allow method {method!r} "
                               f"(allowed: {', '.join(base.methods)})", param="method.type")
    train = _usable_file(session, tenant_id=tenant_id, file_id=training_file, param="training_file")
    if auto:
        hyperparameters = resolve_auto(hyperparameters, auto, examples=train.examples, file_bytes=train.bytes)
    # Rank, context, batch, bias and target modules against what this base can train and serve.
    check_hyperparameters(base, hyperparameters, param=f"method.{method_type}.hyperparameters", method=method)
    if validation_file is not None:
        _usable_file(session, tenant_id=tenant_id, file_id=validation_file, param="validation_file")

    # Lock the tenant row so two concurrent creates cannot both take the last queue slot.
    tenant = session.scalars(select(Tenant).where(Tenant.id == tenant_id).with_for_update()).one()
    # A job that could never run is refused now, not left queued until its wait runs out.
    if reason := limit_violation(demand(resources.model_dump()), tenant=tenant, settings=settings):
        raise ValidationFailed(f"insufficient resources: {reason}", code=INSUFFICIENT_RESOURCES,
                               param="resources")
    pending = jobs.count_jobs(session, tenant_id=tenant_id, statuses=states.PENDING)
    if pending >= tenant.max_queued_jobs:
        raise QuotaExceeded(f"{pending} jobs already queued; the limit is {tenant.max_queued_jobs}",
                            retry_after=60)

    job = jobs.create_job(session, tenant_id=tenant_id, model=model, training_file=training_file,
                          validation_file=validation_file, method=method,
                          hyperparameters=hyperparameters.model_dump(mode="json"),
                          resources=resources.model_dump(mode="json"), suffix=suffix,
                          seed=hyperparameters.seed, metadata=metadata,
                          auto_hyperparameters=sorted(auto) or None, sweep_id=sweep_id)
    if auto:
        jobs.add_events(session, job_id=job.id, events=[{
            "type": "message", "message": auto_message(hyperparameters, auto, train.examples),
            "data": {"auto": sorted(auto), "examples": train.examples}}])
    # Files are validated on upload, so this step only re-checks they are usable (done above).
    states.transition(session, job, states.QUEUED, message="Files validated; job queued")
    return job


def cancel_job(session: Session, job: Job) -> Job:
    """Queued work is dropped at once; a running one is asked to stop (the scheduler finishes it)."""
    if job.status == states.CANCELLING:
        return job
    target = states.CANCELLING if job.status in states.ACTIVE else states.CANCELLED
    states.transition(session, job, target, message="Cancellation requested")
    return job
