"""Adapters to export or blend, and a stand-in for the export/blend run (its internal routes)."""

from __future__ import annotations

import hashlib
import json

from api_helpers import ADMIN, publish_adapter, running_job

from service.db.models import Adapter, Operation
from service.exports import states
from service.security import job_token
from workers.spec import ExportManifest, FileDigest
from workers.storage import put_bytes


def trained_adapter(client, app, tenant, *, method: str | None = None, base: str | None = None,
                    rank: int | None = None) -> str:
    """A published adapter of ``tenant`` (the real result route); ``method``/``base`` then set on
    its row, ``rank`` written into its adapter_config.json."""
    job_id, token = running_job(client, app, tenant)
    key = publish_adapter(app, job_id)
    r = client.post(f"/internal/v1/jobs/{job_id}/result", json={"manifest_key": key},
                    headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200, r.text
    adapter_id = r.json()["adapter_id"]
    with app.state.session_factory() as s:
        row = s.get(Adapter, adapter_id)
        if rank is not None:
            put_bytes(app.state.store, f"{row.key_prefix}/adapter_config.json", json.dumps({"r": rank}).encode())
        row.method = method or row.method
        row.base_model_id = base or row.base_model_id
        s.commit()
    return adapter_id


def other_base(client) -> str:
    body = {"id": "acme/other-base", "source_uri": "s3://models/other", "architecture": "llama",
            "methods": ["lora"], "max_rank": 16}
    r = client.post("/v1/admin/models", json=body, headers=ADMIN)
    assert r.status_code in (201, 409), r.text
    return body["id"]


def start_run(app, op_id: str) -> dict[str, str]:
    """queued → running as the scheduler moves it (attempt 1); that run's token headers."""
    with app.state.session_factory() as s:
        op = s.get(Operation, op_id)
        states.transition(s, op, states.RUNNING, attempts=1)
        s.commit()
    return {"Authorization": f"Bearer {job_token(op_id, 1, app.state.settings, ttl_s=600)}"}


def publish_export(app, op_id: str, files: dict[str, bytes], *, tamper: str | None = None) -> str:
    """Write an export's files and manifest where the run would; ``tamper`` names a file whose
    stored bytes then differ from the manifest."""
    with app.state.session_factory() as s:
        op = s.get(Operation, op_id)
        prefix, adapter_id, tenant_id, base = op.key_prefix, op.adapter_id, op.tenant_id, op.base_model_id
    from workers.spec import BaseModelRef

    store = app.state.store
    for name, data in files.items():
        put_bytes(store, f"{prefix}/{name}", data + (b"!" if name == tamper else b""))
    manifest = ExportManifest(export_id=op_id, adapter_id=adapter_id, tenant_id=tenant_id,
                              base_model=BaseModelRef(id=base, uri="builtin://lorafleet/tiny-llama"),
                              method="lora", dtype="float32",
                              files={n: FileDigest(sha256=hashlib.sha256(d).hexdigest(), bytes=len(d))
                                     for n, d in files.items()})
    put_bytes(store, f"{prefix}/manifest.json", manifest.model_dump_json().encode())
    return f"{prefix}/manifest.json"
