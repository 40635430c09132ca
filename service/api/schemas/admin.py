"""Admin bodies: tenants, API keys, base models."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, Field

from service.api.schemas.common import Strict
from service.db.models import ApiKey, BaseModelRow, Tenant
from workers.spec import METHODS, Method

Quota = Annotated[int, Field(ge=0, le=1_000_000)]
Rate = Annotated[int, Field(ge=1, le=10_000_000)]
# Compute limits (null: none of the tenant's own; the cluster's and the service's still apply).
GpuLimit = Annotated[float, Field(ge=0, le=100_000)]
CpuLimit = Annotated[float, Field(ge=0, le=1_000_000)]
WallClockSeconds = Annotated[int, Field(ge=60, le=365 * 24 * 3600)]


class TenantLimits(Strict):
    max_gpus_per_job: GpuLimit | None = None
    max_cpus_per_job: CpuLimit | None = None
    max_concurrent_gpus: GpuLimit | None = None
    max_concurrent_cpus: CpuLimit | None = None
    max_job_wall_clock_s: WallClockSeconds | None = None

    # Fields an update may set back to null (to lift the tenant's own limit).
    CLEARABLE: ClassVar[frozenset[str]] = frozenset({
        "max_gpus_per_job", "max_cpus_per_job", "max_concurrent_gpus", "max_concurrent_cpus",
        "max_job_wall_clock_s"})
MethodName = Method


class TenantCreate(TenantLimits):
    name: Annotated[str, Field(min_length=1, max_length=200)]
    max_concurrent_jobs: Quota | None = None
    max_queued_jobs: Quota | None = None
    requests_per_minute: Rate | None = None


class TenantUpdate(TenantLimits):
    status: Literal["active", "disabled"] | None = None
    max_concurrent_jobs: Quota | None = None
    max_queued_jobs: Quota | None = None
    requests_per_minute: Rate | None = None


class TenantPublic(BaseModel):
    id: str
    object: Literal["tenant"] = "tenant"
    name: str
    status: str
    max_concurrent_jobs: int
    max_queued_jobs: int
    requests_per_minute: int
    max_gpus_per_job: float | None = None
    max_cpus_per_job: float | None = None
    max_concurrent_gpus: float | None = None
    max_concurrent_cpus: float | None = None
    max_job_wall_clock_s: int | None = None
    created_at: int

    @classmethod
    def of(cls, t: Tenant) -> TenantPublic:
        return cls(id=t.id, name=t.name, status=t.status, max_concurrent_jobs=t.max_concurrent_jobs,
                   max_queued_jobs=t.max_queued_jobs, requests_per_minute=t.requests_per_minute,
                   max_gpus_per_job=t.max_gpus_per_job, max_cpus_per_job=t.max_cpus_per_job,
                   max_concurrent_gpus=t.max_concurrent_gpus, max_concurrent_cpus=t.max_concurrent_cpus,
                   max_job_wall_clock_s=t.max_job_wall_clock_s, created_at=t.created_at)


class ApiKeyCreate(Strict):
    name: Annotated[str, Field(max_length=200)] | None = None


class ApiKeyPublic(BaseModel):
    id: str
    object: Literal["api_key"] = "api_key"
    tenant_id: str
    name: str | None
    prefix: str
    created_at: int
    revoked_at: int | None

    @classmethod
    def of(cls, k: ApiKey) -> ApiKeyPublic:
        return cls(id=k.id, tenant_id=k.tenant_id, name=k.name, prefix=k.prefix,
                   created_at=k.created_at, revoked_at=k.revoked_at)


class ApiKeyCreated(ApiKeyPublic):
    key: str  # the secret: in this response only, never again


class BaseModelCreate(Strict):
    # No '/' at either end, none doubled, and no ':' (ids appear in URLs and adapter ids).
    id: Annotated[str, Field(min_length=1, max_length=200,
                             pattern=r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")]
    source_uri: Annotated[str, Field(min_length=1, max_length=1000)]
    architecture: Annotated[str, Field(max_length=64)] | None = None
    methods: Annotated[list[MethodName], Field(min_length=1, max_length=len(METHODS))] = list(METHODS)
    max_rank: Annotated[int, Field(ge=1, le=1024)] = 64
    quantization: Literal["nf4", "none"] | None = None


class BaseModelPublic(BaseModel):
    id: str
    object: Literal["base_model"] = "base_model"
    source_uri: str
    architecture: str | None
    methods: list[str]
    max_rank: int
    quantization: str | None
    created_at: int

    @classmethod
    def of(cls, m: BaseModelRow) -> BaseModelPublic:
        return cls(id=m.id, source_uri=m.source_uri, architecture=m.architecture, methods=m.methods,
                   max_rank=m.max_rank, quantization=m.quantization, created_at=m.created_at)
