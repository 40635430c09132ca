"""Where a job's outputs live and what its adapter is called (the scheduler builds specs from these)."""

from __future__ import annotations

import hashlib
import re

from service.db.models import Job

ADAPTER_VERSION = 1


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def adapter_id_for(job: Job) -> str:
    """``ft-<base short>-<suffix or 'lora'>-<16 hex>``: URL-safe, stable for the job, unique per job."""
    base = _slug(job.model.rsplit("/", 1)[-1]) or "model"
    suffix = _slug(job.suffix or "") or "lora"
    # 64 bits: adapter ids are global keys, and 32 bits would collide around 77k same-named jobs.
    return f"ft-{base}-{suffix}-{hashlib.sha256(job.id.encode()).hexdigest()[:16]}"


def adapter_prefix(job: Job) -> str:
    return f"tenants/{job.tenant_id}/adapters/{adapter_id_for(job)}/v{ADAPTER_VERSION}"


def checkpoint_prefix(job: Job, step: int | None = None) -> str:
    base = f"tenants/{job.tenant_id}/jobs/{job.id}/checkpoints"
    return base if step is None else f"{base}/step-{step:06d}"
