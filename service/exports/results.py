"""Committing an export's or a blend's result: verify the output in the object store, then mark
the operation succeeded (and, for a blend, publish its adapter row in the same transaction).

As for training results (service.jobs.results): only a definite answer rejects a result (a
file missing, a checksum or a name that does not match); a store failure raises StorageError,
answered 503, and the worker posts again.
"""

from __future__ import annotations

import hashlib
import posixpath

from pydantic import BaseModel, ValidationError
from sqlalchemy.orm import Session

from service.db.models import Adapter, Operation
from service.exports import states
from service.ids import now
from service.jobs.results import REQUIRED_FILES, ResultRejected, _read
from workers.spec import AdapterManifest, ExportManifest, OperationResult
from workers.storage import ObjectNotFound, ObjectStore, get_bytes, sha256_of


def _verified(store: ObjectStore, op: Operation, result: OperationResult) -> tuple[BaseModel, bytes]:
    if posixpath.dirname(result.manifest_key) != op.key_prefix:
        raise ResultRejected(f"manifest must be under {op.key_prefix}/")
    model = ExportManifest if op.kind == "export" else AdapterManifest
    try:
        raw = _read(store, result.manifest_key, get_bytes)
        manifest = model.model_validate_json(raw)
    except ObjectNotFound:
        raise ResultRejected("manifest is not in the object store") from None
    except ValidationError as exc:
        raise ResultRejected(f"manifest is invalid: {exc.error_count()} errors") from None
    if op.kind == "export":
        mine = (manifest.export_id, manifest.adapter_id) == (op.id, op.adapter_id)
    else:
        mine = (manifest.job_id, manifest.adapter_id) == (op.id, op.result_adapter_id)
        if REQUIRED_FILES - manifest.files.keys():
            raise ResultRejected("the blend's manifest lacks adapter files")
    if not mine or manifest.tenant_id != op.tenant_id or manifest.base_model.id != op.base_model_id:
        raise ResultRejected("manifest belongs to another operation, tenant or base model")
    for name, digest in manifest.files.items():
        try:
            if _read(store, f"{op.key_prefix}/{name}", sha256_of) != (digest.sha256, digest.bytes):
                raise ResultRejected(f"{name} does not match its manifest checksum")
        except ObjectNotFound:
            raise ResultRejected(f"{name} is missing") from None
        except ValueError:  # a name that is no valid object key
            raise ResultRejected(f"file name {name!r} is invalid") from None
    return manifest, raw


def commit_result(session: Session, store: ObjectStore, op: Operation, result: OperationResult) -> bool:
    """Succeed the operation, or fail it with ``storage_error``; True on success. The caller commits."""
    try:
        manifest, raw = _verified(store, op, result)
    except ResultRejected as exc:
        states.transition(session, op, states.FAILED, error_code="storage_error",
                          error_message=f"output rejected: {exc}")
        return False
    digest = hashlib.sha256(raw).hexdigest()
    files = [{"name": n, "bytes": d.bytes, "sha256": d.sha256} for n, d in sorted(manifest.files.items())]
    files.append({"name": "manifest.json", "bytes": len(raw), "sha256": digest})
    if op.kind == "blend":
        session.add(Adapter(id=op.result_adapter_id, tenant_id=op.tenant_id, job_id=None,
                            base_model_id=op.base_model_id, version=1, method=op.method, key_prefix=op.key_prefix,
                            manifest_sha256=digest, files=files, created_at=now()))
    states.transition(session, op, states.SUCCEEDED, files=files, message=(
        f"Blend succeeded: {op.result_adapter_id}" if op.kind == "blend" else
        f"Export succeeded: {len(files)} files"))
    return True
