"""The real control plane (``service.main:create_app``) under uvicorn on a loopback port, with
SQLite and a local object store in a temp folder, plus what stands in for the two processes
these tests do not run: a stub serving application (the data plane behind the inference proxy)
and a scripted worker/scheduler that moves a job through its real internal endpoints."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx

import lorafleet

ROOT = Path(__file__).resolve().parents[2]
FAKE_SERVE = Path(__file__).with_name("fake_serve.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"{url} did not come up:\n{log.read_text()[-4000:]}")
        time.sleep(0.1)


@dataclass
class LiveStack:
    base_url: str
    admin_token: str
    internal_secret: str
    data_dir: Path
    procs: list[subprocess.Popen]

    @property
    def database_url(self) -> str:
        return f"sqlite:///{self.data_dir / 'lorafleet.db'}"

    @property
    def objects(self) -> Path:
        return self.data_dir / "objects"

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def start_stack(data_dir: Path) -> LiveStack:
    data_dir.mkdir(parents=True, exist_ok=True)
    serve_port, api_port = free_port(), free_port()
    signing_key = secrets.token_urlsafe(32)  # the fake serving app refuses what the API did not sign
    serve_log, api_log = data_dir / "serve.log", data_dir / "api.log"
    serve = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "fake_serve:app", "--app-dir", str(FAKE_SERVE.parent),
         "--host", "127.0.0.1", "--port", str(serve_port), "--log-level", "warning"],
        stdout=serve_log.open("wb"), stderr=subprocess.STDOUT, cwd=ROOT,
        env={**os.environ, "LORAFLEET_SERVE_SIGNING_KEY": signing_key})
    admin_token, internal_secret = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    env = {**os.environ,
           "LORAFLEET_DATA_DIR": str(data_dir),
           "LORAFLEET_DATABASE_URL": f"sqlite:///{data_dir / 'lorafleet.db'}",
           "LORAFLEET_OBJECT_STORE_URL": (data_dir / "objects").resolve().as_uri(),
           "LORAFLEET_ADMIN_TOKEN": admin_token,
           "LORAFLEET_INTERNAL_SECRET": internal_secret,
           "LORAFLEET_SERVE_URL": f"http://127.0.0.1:{serve_port}",
           "LORAFLEET_SERVE_SIGNING_KEY": signing_key,
           "LORAFLEET_PUBLIC_URL": f"http://127.0.0.1:{api_port}",
           "LORAFLEET_AUTH_CACHE_TTL_S": "0"}
    api = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", "service.main:create_app",
         "--host", "127.0.0.1", "--port", str(api_port), "--log-level", "warning"],
        stdout=api_log.open("wb"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    stack = LiveStack(f"http://127.0.0.1:{api_port}", admin_token, internal_secret, data_dir, [api, serve])
    try:
        _wait_ready(f"http://127.0.0.1:{serve_port}/healthz", serve, serve_log)
        _wait_ready(f"{stack.base_url}/healthz", api, api_log)
    except BaseException:
        stack.stop()
        raise
    return stack


def new_tenant(stack: LiveStack, admin: lorafleet.Client, **quotas) -> lorafleet.Client:
    tenant = admin.admin.tenants.create(f"t-{uuid.uuid4().hex[:8]}", **quotas)
    key = admin.admin.api_keys.create(tenant.id, name="tests")
    client = lorafleet.Client(base_url=stack.base_url, api_key=key.key, max_retries=1)
    client.tenant_id = tenant.id
    return client


class FakeWorker:
    """Plays the scheduler (queued → running, through the service's own state machine) and the
    training worker (events, checkpoint, adapter files + manifest, result) for one job."""

    def __init__(self, stack: LiveStack, job_id: str):
        from service.db.models import Job
        from service.db.session import make_engine, make_session_factory
        from service.jobs import naming
        from service.security import job_token
        from service.settings import Settings

        self.stack, self.job_id = stack, job_id
        self._engine = make_engine(stack.database_url)
        self._factory = make_session_factory(self._engine)
        with self._factory() as session:
            job = session.get(Job, job_id)
            self.tenant_id = job.tenant_id
            self.adapter_id = naming.adapter_id_for(job)
            self.adapter_prefix = naming.adapter_prefix(job)
            self.checkpoint_prefix = naming.checkpoint_prefix(job)
            self.base_model, self.method = job.model, job.method
        # attempt 0: start() below moves the job to running without counting a Ray run
        token = job_token(job_id, 0, Settings(internal_secret=stack.internal_secret), ttl_s=3600)
        self.http = httpx.Client(base_url=f"{stack.base_url}/internal/v1/jobs/{job_id}",
                                 headers={"Authorization": f"Bearer {token}"}, timeout=30)

    def start(self) -> None:
        from service.db.models import Job
        from service.jobs import states

        with self._factory() as session:
            job = session.get(Job, self.job_id)
            if job.status == states.VALIDATING_FILES:
                states.transition(session, job, states.QUEUED)
            states.transition(session, job, states.RUNNING, message="Job started (test worker)")
            session.commit()

    def events(self, *events: dict) -> None:
        self.http.post("/events", json={"events": list(events)}).raise_for_status()

    def checkpoint(self, step: int) -> dict:
        r = self.http.post("/checkpoints", json={"step": step, "metrics": {"train_loss": 1.5},
                                                 "key_prefix": f"{self.checkpoint_prefix}/step-{step:06d}"})
        r.raise_for_status()
        return r.json()

    def publish(self, files: dict[str, bytes], metrics: dict[str, float] | None = None) -> str:
        """Write the adapter files and manifest to the object store, then report the result
        (``metrics``: what the run measured, beside its trained tokens)."""
        from workers.spec import AdapterManifest, BaseModelRef, FileDigest, Hyperparameters

        folder = self.stack.objects / self.adapter_prefix
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (folder / name).write_bytes(data)
        manifest = AdapterManifest(
            adapter_id=self.adapter_id, job_id=self.job_id, tenant_id=self.tenant_id,
            base_model=BaseModelRef(id=self.base_model, uri="builtin://lorafleet/tiny-llama"),
            method=self.method, quantization="nf4" if self.method == "qlora" else "none",
            hyperparameters=Hyperparameters(), dataset_sha256="0" * 64,
            files={n: FileDigest(sha256=hashlib.sha256(d).hexdigest(), bytes=len(d)) for n, d in files.items()})
        (folder / "manifest.json").write_text(manifest.model_dump_json())
        r = self.http.post("/result", json={"manifest_key": f"{self.adapter_prefix}/manifest.json",
                                            "metrics": {"trained_tokens": 1234, **(metrics or {})}})
        r.raise_for_status()
        return r.json()["adapter_id"]

    def fail(self, code: str, message: str) -> None:
        self.http.post("/failure", json={"code": code, "message": message}).raise_for_status()

    def close(self) -> None:
        self.http.close()
        self._engine.dispose()


def adapter_files() -> dict[str, bytes]:
    """A real PEFT LoRA adapter for a 2-layer llama-shaped model would be heavy to build here;
    these are well-formed stand-ins of the same names."""
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
              "base_model_name_or_path": "lorafleet/tiny-llama", "task_type": "CAUSAL_LM"}
    return {"adapter_config.json": json.dumps(config).encode(),
            "adapter_model.safetensors": os.urandom(4096)}
