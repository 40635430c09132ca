"""Committing a finished run: verify the adapter in the object store, then publish it atomically.

The invariant: a job is ``succeeded`` only when every adapter file is in the store with the
checksum its manifest records, and the adapter row commits in the same transaction as the status.

A blip is not a verdict. Only a definite answer rejects a result for good (the store says a key
is not there, twice; a checksum, size, owner or name that does not match). A connection error,
a timeout or a 5xx from the store raises StorageError, which the API answers with a retryable
503: the job stays ``running`` and the worker posts the same result again.
"""

from __future__ import annotations

import hashlib
import posixpath

from pydantic import ValidationError
from sqlalchemy.orm import Session

from service.db.models import Adapter, Job
from service.errors import InvalidTransition
from service.ids import now
from service.jobs import states
from service.jobs.naming import ADAPTER_VERSION, adapter_id_for, adapter_prefix
from workers.spec import AdapterManifest, TrainResult
from workers.storage import ObjectNotFound, ObjectStore, StorageError, get_bytes, sha256_of


# What `PeftModel.from_pretrained` needs: a manifest without them publishes nothing servable.
REQUIRED_FILES = {"adapter_config.json", "adapter_model.safetensors"}


class ResultRejected(Exception):
    """The reported adapter does not check out; the job fails with ``storage_error``."""


def _store_failures() -> tuple[type[BaseException], ...]:
    """What a store read can raise when the store, not the result, is at fault: our StorageError,
    and errors that surface while a body streams (botocore wraps those itself, outside S3Store)."""
    from botocore.exceptions import BotoCoreError

    return (StorageError, BotoCoreError, OSError)


def _read(store: ObjectStore, key: str, read):
    """``read(store, key)``; a transient failure becomes StorageError (→ 503, retried)."""
    try:
        return read(store, key)
    except ObjectNotFound:
        # S3 answered 404: definite, but ask once more so a store that lost its mind for a
        # moment (a proxy, a failover) cannot make us fail a good result.
        if _exists(store, key):
            raise StorageError(f"{key!r} was not found, then found: the store is inconsistent") from None
        raise
    except _store_failures() as exc:
        if isinstance(exc, StorageError):
            raise
        raise StorageError(f"reading {key!r} failed: {type(exc).__name__}: {exc}") from exc


def _exists(store: ObjectStore, key: str) -> bool:
    try:
        return store.exists(key)
    except _store_failures() as exc:
        raise StorageError(f"checking {key!r} failed: {exc}") from exc


def _verified_manifest(store: ObjectStore, job: Job, result: TrainResult) -> tuple[AdapterManifest, bytes]:
    expected_prefix = adapter_prefix(job)
    if posixpath.dirname(result.manifest_key) != expected_prefix:
        raise ResultRejected(f"manifest must be under {expected_prefix}/, got {result.manifest_key}")
    try:
        raw = _read(store, result.manifest_key, get_bytes)
        manifest = AdapterManifest.model_validate_json(raw)
    except ObjectNotFound:
        raise ResultRejected(f"manifest {result.manifest_key} is not in the object store") from None
    except ValidationError as exc:
        raise ResultRejected(f"manifest is invalid: {exc.error_count()} errors") from None
    if (manifest.job_id, manifest.tenant_id, manifest.adapter_id) != (job.id, job.tenant_id, adapter_id_for(job)):
        raise ResultRejected("manifest belongs to another job, tenant or adapter")
    if (manifest.base_model.id, manifest.method) != (job.model, job.method):
        raise ResultRejected("manifest names another base model or method than the job's")
    missing = REQUIRED_FILES - manifest.files.keys()
    if missing:
        raise ResultRejected(f"manifest lists no {', '.join(sorted(missing))}")
    for name, digest in manifest.files.items():
        try:
            sha, size = _read(store, f"{expected_prefix}/{name}", sha256_of)
        except ObjectNotFound:
            raise ResultRejected(f"adapter file {name} is missing") from None
        except ValueError:  # a name that is no valid object key ("..", "//")
            raise ResultRejected(f"adapter file name {name!r} is invalid") from None
        if (sha, size) != (digest.sha256, digest.bytes):
            raise ResultRejected(f"adapter file {name} does not match its manifest checksum")
    return manifest, raw


def commit_result(session: Session, store: ObjectStore, job: Job, result: TrainResult) -> Adapter | None:
    """Publish the adapter and mark the job succeeded, or fail it with ``storage_error``.

    Returns the adapter, or None when the job was failed instead. The caller commits.
    Raises InvalidTransition when the job is not running (e.g. it is being cancelled), and
    StorageError when the store could not be read (nothing changed; the worker retries).
    """
    if not states.can_transition(job.status, states.SUCCEEDED):
        raise InvalidTransition(job.id, job.status, states.SUCCEEDED)
    try:
        manifest, raw = _verified_manifest(store, job, result)
    except ResultRejected as exc:
        states.transition(session, job, states.FAILED, error_code="storage_error",
                          error_message=f"adapter rejected: {exc}", error_param="manifest_key")
        return None
    adapter = Adapter(
        id=adapter_id_for(job), tenant_id=job.tenant_id, job_id=job.id, base_model_id=job.model,
        version=ADAPTER_VERSION, method=job.method, key_prefix=adapter_prefix(job),
        manifest_sha256=hashlib.sha256(raw).hexdigest(),
        files=[{"name": name, "bytes": d.bytes, "sha256": d.sha256}
               for name, d in sorted(manifest.files.items())]
        + [{"name": "manifest.json", "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}],
        created_at=now())
    session.add(adapter)
    tokens = result.metrics.get("trained_tokens")
    states.transition(session, job, states.SUCCEEDED, fine_tuned_model=adapter.id,
                      trained_tokens=int(tokens) if tokens is not None else job.trained_tokens,
                      result_metrics=dict(result.metrics),
                      message=f"Fine-tuning succeeded: {adapter.id}")
    return adapter

