"""All configuration, read once from the environment (prefix ``LORAFLEET_``).

Every tunable of the control plane lives here; nothing else reads ``os.environ``.
"""

from __future__ import annotations

import secrets
from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class TenantDefaults(BaseSettings):
    """Quotas a new tenant gets unless the admin sets others."""

    model_config = SettingsConfigDict(env_prefix="LORAFLEET_TENANT_", extra="ignore")

    max_concurrent_jobs: int = Field(2, ge=0)
    max_queued_jobs: int = Field(100, ge=0)
    requests_per_minute: int = Field(600, ge=1)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LORAFLEET_", extra="ignore")

    data_dir: Path = Path(".lorafleet")
    # Default: a SQLite file in data_dir (see `effective_database_url`).
    database_url: str | None = None
    # Default: a local folder in data_dir. Or s3://bucket/prefix.
    object_store_url: str | None = None
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    s3_access_key_id: SecretStr | None = None
    s3_secret_access_key: SecretStr | None = None
    # Empty: start (or join) a local Ray. Else e.g. "http://ray-head:8265" for job submission.
    ray_address: str | None = None
    # URL of the serving application's HTTP endpoint (Ray Serve); the API proxies to it.
    serve_url: str | None = None
    # Signs every request to serving (workers.signing); serving accepts this key and the previous
    # one, so a rotation is: new key as current + old as previous, roll out, then drop previous.
    # Unset: inference answers 503 (serving refuses unsigned requests anyway).
    serve_signing_key: SecretStr | None = None
    serve_signing_key_previous: SecretStr | None = None
    # How the embedded stack's serving replica holds the shared base: "nf4" (4-bit) or "none".
    serve_quantization: str = "nf4"
    # URL workers use to reach the control plane's internal endpoints.
    public_url: str = "http://127.0.0.1:8000"
    admin_token: SecretStr = Field(default_factory=lambda: SecretStr(secrets.token_urlsafe(24)))
    # Signs job-scoped worker tokens. Generated per process unless set (set it in multi-replica deployments).
    internal_secret: SecretStr = Field(default_factory=lambda: SecretStr(secrets.token_urlsafe(32)))
    # How long a run's job token stays valid (it is also refused once its run is over). Generous:
    # a resubmitted run gets a fresh one, Ray's own worker restarts reuse it. A run with a
    # wall-clock limit gets no more than that limit + 1 h (service.security.JOB_TOKEN_SLACK_S).
    job_token_ttl_s: int = Field(7 * 24 * 3600, ge=60)
    max_upload_bytes: int = Field(512 * 1024 * 1024, ge=1)
    default_base_model: str = "lorafleet/tiny-llama"
    scheduler_interval_s: float = Field(1.0, gt=0)
    # Apply alembic migrations when the API starts (the embedded quick start). Deployments run
    # them once, as a Helm hook, and set this to false.
    auto_migrate: bool = True
    # How long a tenant key → tenant lookup is cached (revocations in other replicas lag this much).
    auth_cache_ttl_s: float = Field(5.0, ge=0)
    # Bounded input (issue 10): the cache of key lookups evicts least-recently-used entries past
    # this size; failed authentications are limited per client address (no DB query once spent).
    auth_cache_max_entries: int = Field(100_000, ge=1)
    failed_auth_per_minute: int = Field(30, ge=1)
    # Request bodies are counted while read: past this many bytes the answer is 413 (uploads have
    # max_upload_bytes). A body that stalls this long between two chunks is answered 408.
    max_body_bytes: int = Field(1024 * 1024, ge=1024)
    body_read_timeout_s: float = Field(30.0, gt=0)
    # A dataset line longer than this is refused (422 naming the line), never held in full.
    max_dataset_line_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    # Idempotency records are kept this long, then purged in the background in batches.
    idempotency_ttl_s: int = Field(24 * 3600, ge=60)
    idempotency_purge_interval_s: float = Field(600.0, gt=0)
    # Worker threads per API process for database reads (bench/api_load.py: a few keep the
    # database busy; dozens only contend for the GIL and stretch the latency tail).
    db_read_threads: int = Field(8, ge=1, le=256)
    # Database connections per process (API and scheduler alike): a pool plus overflow. The chart
    # keeps replicas × (pool + overflow) within Postgres' max_connections budget.
    db_pool_size: int = Field(10, ge=1)
    db_max_overflow: int = Field(30, ge=0)
    # Seconds a request waits for a pooled connection before it answers 503 (not a hang).
    db_pool_timeout_s: float = Field(10.0, gt=0)
    db_connect_timeout_s: int = Field(5, ge=1)
    # PostgreSQL statement_timeout for the service's own queries (0 = none; migrations have none).
    db_statement_timeout_s: float = Field(30.0, ge=0)
    # Timeout for calls proxied to the serving application.
    serve_timeout_s: float = Field(300.0, gt=0)
    # Seconds a proxied request waits for a free connection to serving before a 503 (never a hang
    # behind other tenants' long streams).
    serve_pool_timeout_s: float = Field(2.0, gt=0)
    # Inference requests (streams included) one tenant may have open through one API process;
    # past it, 429 with Retry-After (LORAFLEET_TENANT_MAX_CONCURRENT_INFERENCE).
    tenant_max_concurrent_inference: int = Field(16, ge=1)
    # Runs of one job (first + retries after a crashed run) before it fails with worker_lost.
    max_job_attempts: int = Field(3, ge=1)
    # Cap on concurrently running fine-tunes, on top of what the Ray cluster's CPUs/GPUs allow.
    max_running_jobs: int | None = Field(None, ge=1)
    # True where Ray's autoscaler adds nodes on demand (KubeRay): submit runs beyond the CPUs/GPUs
    # the cluster has right now, up to cluster_max_gpus/cpus, and let Ray queue them.
    ray_autoscaling: bool = False
    # The most the cluster can ever give training (its size, or the autoscaler's maximum). A job
    # needing more is refused at create (422 insufficient_resources); None: no such check.
    cluster_max_gpus: float | None = Field(None, ge=0)
    cluster_max_cpus: float | None = Field(None, ge=0)
    # Ray Jobs in flight at once, whatever the capacity: each pins a driver, a JobSupervisor and
    # a Train controller on the Ray head pod.
    max_ray_jobs_in_flight: int = Field(64, ge=1)
    # A job still queued (never started) after this long fails with insufficient_resources.
    max_queue_wait_s: int | None = Field(7 * 24 * 3600, ge=1)
    # A run is stopped and its job fails `timeout` past this (a tenant's own limit overrides it).
    max_job_wall_clock_s: int | None = Field(24 * 3600, ge=1)
    # Times Ray may refuse one job's submission before that job fails with submission_failed.
    max_submission_attempts: int = Field(3, ge=1)
    # Fair share remembers GPU (or CPU) time used with this half-life.
    fair_share_half_life_s: float = Field(24 * 3600, gt=0)
    # The Ray Job entrypoint of a fine-tune (default: this interpreter, `-m workers.train.ray_job`).
    train_entrypoint: str | None = None
    # CPU threads each training worker uses.
    train_threads: int = Field(1, ge=1)
    # Exports and blends (service.exports): their Ray Job entrypoint (default: this interpreter,
    # `-m workers.ops.ray_job`) and how many run at once (each one process on one CPU).
    ops_entrypoint: str | None = None
    max_running_operations: int = Field(2, ge=1)
    host: str = "127.0.0.1"
    port: int = 8000

    tenant_defaults: TenantDefaults = Field(default_factory=TenantDefaults)

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'lorafleet.db').resolve()}"

    @property
    def effective_object_store_url(self) -> str:
        if self.object_store_url:
            return self.object_store_url
        return (self.data_dir / "objects").resolve().as_uri()


@lru_cache
def get_settings() -> Settings:
    return Settings()
