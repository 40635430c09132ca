"""The control plane's tables (SQLAlchemy 2.0 typed ORM). Schema changes go through migrations/.

Conventions: public string ids that sort by creation time (service.ids), timestamps as integer
Unix seconds (what the API shows), statuses as short strings checked against the declared sets.
Every list route pages on an index that starts with the owning tenant.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from service.jobs.states import JOB_STATUSES
from workers.spec import METHODS

# Deterministic constraint names, so alembic can drop exactly what it created on both backends.
NAMING = {
    "ix": "ix_%(column_0_N_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite only auto-increments an INTEGER PRIMARY KEY; Postgres gets a 64-bit identity.
AutoIncrementId = BigInteger().with_variant(Integer(), "sqlite")


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: JSON, list[str]: JSON, int: BigInteger}


class Tenant(Base):
    __tablename__ = "tenants"
    __table_args__ = (CheckConstraint(_in("status", ("active", "disabled")), name="status"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16), default="active")
    max_concurrent_jobs: Mapped[int]
    max_queued_jobs: Mapped[int]
    requests_per_minute: Mapped[int]
    created_at: Mapped[int]
    # Compute limits set by the admin (None: only the cluster's and the service's own limits).
    max_gpus_per_job: Mapped[float | None]
    max_cpus_per_job: Mapped[float | None]
    max_concurrent_gpus: Mapped[float | None]  # GPUs its running jobs may hold at once
    max_concurrent_cpus: Mapped[float | None]
    max_job_wall_clock_s: Mapped[int | None]


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str | None] = mapped_column(String(200))
    # Keys are 256-bit random secrets, so an unsalted sha256 is enough and allows an indexed lookup.
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[int]
    revoked_at: Mapped[int | None]

    tenant: Mapped[Tenant] = relationship(lazy="joined")


class File(Base):
    __tablename__ = "files"
    __table_args__ = (Index("ix_files_tenant_id_id", "tenant_id", "id"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    filename: Mapped[str] = mapped_column(String(255))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int]
    sha256: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))
    status_details: Mapped[str | None] = mapped_column(Text)
    format: Mapped[str | None] = mapped_column(String(16))
    examples: Mapped[int]
    object_key: Mapped[str] = mapped_column(String(500))
    created_at: Mapped[int]


class BaseModelRow(Base):
    __tablename__ = "base_models"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    source_uri: Mapped[str] = mapped_column(String(1000))
    architecture: Mapped[str | None] = mapped_column(String(64))
    methods: Mapped[list[str]]
    max_rank: Mapped[int]
    quantization: Mapped[str | None] = mapped_column(String(16))
    created_at: Mapped[int]


class Sweep(Base):
    """A base job and the hyperparameters it varies; its child jobs point at it (jobs.sweep_id)."""

    __tablename__ = "sweeps"
    __table_args__ = (Index("ix_sweeps_tenant_id_id", "tenant_id", "id"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    model: Mapped[str] = mapped_column(String(200))
    base: Mapped[dict[str, Any]]  # the base job request, as the API validated it
    parameters: Mapped[list[Any]] = mapped_column(JSON)  # [{name, values}]
    user_metadata: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON)
    created_at: Mapped[int]


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(_in("status", JOB_STATUSES), name="status"),
        CheckConstraint(_in("method", METHODS), name="method"),
        Index("ix_jobs_tenant_id_id", "tenant_id", "id"),
        Index("ix_jobs_tenant_id_status_id", "tenant_id", "status", "id"),
        # The scheduler scans by status in creation order.
        Index("ix_jobs_status_id", "status", "id"),
        Index("ix_jobs_sweep_id_id", "sweep_id", "id"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    model: Mapped[str] = mapped_column(ForeignKey("base_models.id"))
    # Plain ids, not foreign keys: a tenant may delete a file once no active job needs it,
    # and a finished job still shows which file it was trained on.
    training_file: Mapped[str] = mapped_column(String(40))
    validation_file: Mapped[str | None] = mapped_column(String(40))
    status: Mapped[str] = mapped_column(String(20))
    method: Mapped[str] = mapped_column(String(16))
    hyperparameters: Mapped[dict[str, Any]]  # a full workers.spec.Hyperparameters dump
    # Names of the hyperparameters the request left `auto` (their chosen values are above).
    auto_hyperparameters: Mapped[list[str] | None] = mapped_column(JSON)
    sweep_id: Mapped[str | None] = mapped_column(ForeignKey("sweeps.id", ondelete="CASCADE"))
    result_metrics: Mapped[dict[str, Any] | None]  # what the succeeded run reported (TrainResult.metrics)
    resources: Mapped[dict[str, Any]]  # a workers.spec.Resources dump
    suffix: Mapped[str | None] = mapped_column(String(64))
    seed: Mapped[int]
    # "metadata" is reserved on declarative classes; the column keeps the API's name.
    user_metadata: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    error_param: Mapped[str | None] = mapped_column(String(200))
    fine_tuned_model: Mapped[str | None] = mapped_column(String(200))
    # Ray bookkeeping: submission_id is the job id; attempts counts (re)submissions.
    attempts: Mapped[int] = mapped_column(default=0)
    # Of those, runs that ended at a pause: a resume is not a crash retry (max_job_attempts).
    paused_runs: Mapped[int] = mapped_column(default=0, server_default="0")
    trained_tokens: Mapped[int | None]
    last_checkpoint_step: Mapped[int | None]
    estimated_finish: Mapped[int | None]
    created_at: Mapped[int]
    updated_at: Mapped[int]
    started_at: Mapped[int | None]
    finished_at: Mapped[int | None]


class JobEventRow(Base):
    __tablename__ = "job_events"
    __table_args__ = (Index("ix_job_events_job_id_id", "job_id", "id"),)

    # Autoincrement: the order events were written in, and the events cursor.
    id: Mapped[int] = mapped_column(AutoIncrementId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    created_at: Mapped[int]
    level: Mapped[str] = mapped_column(String(8))
    type: Mapped[str] = mapped_column(String(16))
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None]


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (
        UniqueConstraint("job_id", "step_number"),
        Index("ix_checkpoints_job_id_id", "job_id", "id"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    step_number: Mapped[int]
    metrics: Mapped[dict[str, Any]]
    key_prefix: Mapped[str] = mapped_column(String(500))
    created_at: Mapped[int]


class Adapter(Base):
    __tablename__ = "adapters"
    __table_args__ = (Index("ix_adapters_tenant_id_id", "tenant_id", "id"),)

    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    # The job that trained it; None for an adapter an offline blend made (Operation).
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), unique=True)
    base_model_id: Mapped[str] = mapped_column(ForeignKey("base_models.id"))
    version: Mapped[int] = mapped_column(default=1)
    method: Mapped[str] = mapped_column(String(16))
    key_prefix: Mapped[str] = mapped_column(String(500))  # tenants/{t}/adapters/{id}/v{version}
    manifest_sha256: Mapped[str] = mapped_column(String(64))
    files: Mapped[list[Any]] = mapped_column(JSON)  # [{name, bytes, sha256}]
    created_at: Mapped[int]


class IdempotencyKey(Base):
    """A POST's first response, replayed for a retry with the same key and body."""

    __tablename__ = "idempotency_keys"

    # The caller: a tenant id, "admin", or "job:<id>" for worker calls (not a foreign key).
    scope: Mapped[str] = mapped_column(String(64), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    status_code: Mapped[int] = mapped_column(Integer)
    content_type: Mapped[str | None] = mapped_column(String(100))
    body: Mapped[str] = mapped_column(Text)
    created_at: Mapped[int]


class Operation(Base):
    """An export (adapter merged into its base) or an offline blend, run as a Ray Job
    (service.exports; states in service.exports.states)."""

    __tablename__ = "operations"
    __table_args__ = (
        CheckConstraint(_in("kind", ("export", "blend")), name="kind"),
        CheckConstraint(_in("status", ("queued", "running", "succeeded", "failed")), name="status"),
        Index("ix_operations_tenant_id_kind_id", "tenant_id", "kind", "id"),
        Index("ix_operations_status_id", "status", "id"),  # the scheduler scans by status
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(8))
    status: Mapped[str] = mapped_column(String(16))
    # Export: the adapter merged (no foreign key: a finished export outlives its adapter).
    adapter_id: Mapped[str | None] = mapped_column(String(200))
    base_model_id: Mapped[str] = mapped_column(String(200))
    method: Mapped[str] = mapped_column(String(16))
    # What was asked: blend inputs [{id, prefix, weight}], combination, density, dtype, name...
    request: Mapped[dict[str, Any]]
    # Blend: the adapter it publishes (its row commits with the success).
    result_adapter_id: Mapped[str | None] = mapped_column(String(200))
    key_prefix: Mapped[str] = mapped_column(String(500))
    files: Mapped[list[Any] | None] = mapped_column(JSON)  # [{name, bytes, sha256}] once succeeded
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(default=0)
    created_at: Mapped[int]
    updated_at: Mapped[int]
    started_at: Mapped[int | None]
    finished_at: Mapped[int | None]


class OperationEventRow(Base):
    __tablename__ = "operation_events"
    __table_args__ = (Index("ix_operation_events_operation_id_id", "operation_id", "id"),)

    id: Mapped[int] = mapped_column(AutoIncrementId, primary_key=True, autoincrement=True)
    operation_id: Mapped[str] = mapped_column(ForeignKey("operations.id", ondelete="CASCADE"))
    created_at: Mapped[int]
    level: Mapped[str] = mapped_column(String(8))
    type: Mapped[str] = mapped_column(String(16))
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None]


class ClusterStatus(Base):
    """The scheduler leader's last view of the Ray cluster: one row (id 1), written by
    service.scheduling.observed. The API reads it so that it needs no Ray address or token."""

    __tablename__ = "cluster_status"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    total_cpus: Mapped[float]
    total_gpus: Mapped[float]
    available_cpus: Mapped[float]  # held by nothing: not our runs, serving, nor other Ray work
    available_gpus: Mapped[float]
    training_cpus: Mapped[float]  # what our committed runs hold (counted before Ray places them)
    training_gpus: Mapped[float]
    observed_at: Mapped[int]
