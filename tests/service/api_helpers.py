"""Plain helpers shared by the API tests (fixtures live in conftest.py)."""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from pathlib import Path

from fastapi.testclient import TestClient

from service.db.models import Job
from service.jobs import states
from service.jobs.naming import adapter_id_for, adapter_prefix
from service.security import job_token
from service.settings import Settings, TenantDefaults
from workers.spec import AdapterManifest, BaseModelRef, FileDigest, hyperparameters_for
from workers.storage import put_bytes

ADMIN_TOKEN = "test-admin-token"
UPLOAD_LIMIT = 64 * 1024
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


# Signs what the API forwards to serving (tests/service/test_api_inference.py verifies it).
SERVE_SIGNING_KEY = "test-serve-signing-key"


def make_settings(data_dir: Path, database_url: str, **overrides) -> Settings:
    return Settings(data_dir=data_dir, database_url=database_url, admin_token=ADMIN_TOKEN,
                    internal_secret="test-internal-secret", max_upload_bytes=UPLOAD_LIMIT,
                    serve_signing_key=SERVE_SIGNING_KEY,
                    tenant_defaults=TenantDefaults(max_concurrent_jobs=2, max_queued_jobs=5,
                                                   requests_per_minute=10_000),
                    **overrides)


@dataclass
class TenantCtx:
    id: str
    key: str
    key_id: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


def new_tenant(client: TestClient, **quotas) -> TenantCtx:
    r = client.post("/v1/admin/tenants", json={"name": f"t-{uuid.uuid4().hex[:6]}", **quotas}, headers=ADMIN)
    assert r.status_code == 201, r.text
    tid = r.json()["id"]
    r = client.post(f"/v1/admin/tenants/{tid}/api_keys", json={"name": "test"}, headers=ADMIN)
    assert r.status_code == 201, r.text
    return TenantCtx(tid, r.json()["key"], r.json()["id"])



CHAT_LINE = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "arr"}]}\n'


def upload(client: TestClient, tenant: TenantCtx, data: bytes = CHAT_LINE * 3, name: str = "train.jsonl",
           **kw):
    return client.post("/v1/files", files={"file": (name, data)}, data={"purpose": "fine-tune"},
                       headers={**tenant.headers, **kw.pop("headers", {})}, **kw)


def uploaded_file(client: TestClient, tenant: TenantCtx) -> str:
    r = upload(client, tenant)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def create_job(client: TestClient, tenant: TenantCtx, file_id: str, **body):
    return client.post("/v1/fine_tuning/jobs", headers=tenant.headers,
                       json={"model": "lorafleet/tiny-llama", "training_file": file_id, **body})


def running_job(client: TestClient, app, tenant: TenantCtx, attempt: int = 0, **body) -> tuple[str, str]:
    """A job of ``tenant`` moved to running, and that run's worker token. ``attempt``: the run the
    scheduler would have counted (0: moved here without a scheduler counting one)."""
    job_id = create_job(client, tenant, uploaded_file(client, tenant), **body).json()["id"]
    with app.state.session_factory() as s:
        states.transition(s, s.get(Job, job_id), states.RUNNING, **({"attempts": attempt} if attempt else {}))
        s.commit()
    return job_id, job_token(job_id, attempt, app.state.settings, ttl_s=3600)


def assert_problem(response, status: int, code: str, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["code"] == code and body["error"]["code"] == code, body
    assert body["status"] == status and body["request_id"] == response.headers["x-request-id"]
    if param is not None:
        assert body["param"] == param, body
    return body


def job_row(app, job_id: str) -> Job:
    with app.state.session_factory() as s:
        return s.get(Job, job_id)


def publish_adapter(app, job_id: str, tamper: bool = False, drop: str | None = None,
                    method: str = "lora", extra_name: str | None = None) -> str:
    """Write adapter files + manifest where the worker would; return the manifest key.

    ``tamper`` corrupts the weights, ``drop`` leaves a file out of the manifest, ``method`` is
    what the manifest claims, ``extra_name`` lists one more (unstorable) file name."""
    job = job_row(app, job_id)
    prefix, store = adapter_prefix(job), app.state.store
    files = {"adapter_model.safetensors": b"\x00weights" * 100, "adapter_config.json": b'{"r": 8}'}
    digests = {n: FileDigest(sha256=hashlib.sha256(b).hexdigest(), bytes=len(b)) for n, b in files.items()
               if n != drop}
    if extra_name:
        digests[extra_name] = FileDigest(sha256="0" * 64, bytes=1)
    for name, data in files.items():
        put_bytes(store, f"{prefix}/{name}", data + (b"!" if tamper and name.endswith("safetensors") else b""))
    manifest = AdapterManifest(
        adapter_id=adapter_id_for(job), job_id=job.id, tenant_id=job.tenant_id,
        base_model=BaseModelRef(id=job.model, uri="builtin://lorafleet/tiny-llama"), method=method,
        quantization="none", hyperparameters=hyperparameters_for(method, {}), dataset_sha256="0" * 64,
        files=digests)
    put_bytes(store, f"{prefix}/manifest.json", manifest.model_dump_json().encode())
    return f"{prefix}/manifest.json"
