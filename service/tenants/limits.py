"""What a job may ask for: the cluster's maximum size and its tenant's limits.

One rule, applied twice: at create (a job that can never run is refused with 422
``insufficient_resources``) and at dispatch (a limit lowered since the job was queued fails it
with the same code instead of leaving it queued forever).
"""

from __future__ import annotations

from typing import Any, Protocol

from service.scheduling.policy import Capacity
from service.settings import Settings

INSUFFICIENT_RESOURCES = "insufficient_resources"


class ComputeLimits(Protocol):
    """A tenant's limits: a Tenant row, or any row with these columns."""

    max_gpus_per_job: float | None
    max_cpus_per_job: float | None
    max_concurrent_gpus: float | None
    max_concurrent_cpus: float | None


def demand(resources: dict[str, Any] | None) -> Capacity:
    """CPUs and GPUs a job's runs hold, from its stored ``workers.spec.Resources`` dump.

    Read straight from the dict (the scheduler reads thousands per tick); the defaults are
    Resources' own, for rows written before a field existed.
    """
    r = resources or {}
    workers = r.get("num_workers", 1)
    return Capacity(cpus=workers * r.get("cpus_per_worker", 1), gpus=workers * r.get("gpus_per_worker", 0))


def limit_violation(need: Capacity, *, tenant: ComputeLimits, settings: Settings) -> str | None:
    """Why a job needing ``need`` can never run, naming the limit it passes; None if it can."""
    checks = (
        (need.gpus, settings.cluster_max_gpus, "GPUs", "the cluster's maximum (LORAFLEET_CLUSTER_MAX_GPUS)"),
        (need.cpus, settings.cluster_max_cpus, "CPUs", "the cluster's maximum (LORAFLEET_CLUSTER_MAX_CPUS)"),
        (need.gpus, tenant.max_gpus_per_job, "GPUs", "this tenant's per-job limit (max_gpus_per_job)"),
        (need.cpus, tenant.max_cpus_per_job, "CPUs", "this tenant's per-job limit (max_cpus_per_job)"),
        (need.gpus, tenant.max_concurrent_gpus, "GPUs", "this tenant's concurrent limit (max_concurrent_gpus)"),
        (need.cpus, tenant.max_concurrent_cpus, "CPUs", "this tenant's concurrent limit (max_concurrent_cpus)"),
    )
    for asked, limit, unit, what in checks:
        if limit is not None and asked > limit + 1e-9:
            return f"the job needs {asked:g} {unit} (num_workers × per-worker); {what} is {limit:g}"
    return None
