"""What the scheduler hands Ray, and what Ray's words become for the tenant.

Everything in a Ray Job (its runtime_env, its entrypoint, its metadata) is readable by whoever
holds the Ray token, i.e. every Ray pod: the submitted JSON must hold no credential of ours.
And Ray's own messages (driver log tails: paths, tracebacks, addresses) stay in our logs.

Ray is played by a small HTTP server speaking the dashboard's Job Submission API (the part
service.launcher uses), so the exact bytes the real launcher sends can be read back. The control
plane is real: the API (create a job, read it back) and the Scheduler on one database.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service"))
from api_helpers import create_job, make_settings, new_tenant, uploaded_file  # noqa: E402

from service.db.models import File, Job  # noqa: E402
from service.db.session import make_engine  # noqa: E402
from service.jobs import states  # noqa: E402
from service.jobs.public_errors import public_failure_message  # noqa: E402
from service.launcher import RayJobLauncher  # noqa: E402
from service.main import create_app  # noqa: E402
from service.scheduler import Scheduler  # noqa: E402
from service.security import job_token_claims  # noqa: E402

S3_SECRET = "s3-secret-0f9e8d7c6b5a"
S3_KEY_ID = "AKIA-TEST-KEY-ID-42"
DB_PASSWORD = "db-pass-5e4d3c2b1a"
ADMIN = "admin-token-for-this-test-77"
INTERNAL = "internal-secret-for-this-test-88"
RAY_FAILURE = ('Job entrypoint command failed with exit code 1, last available logs:\nTraceback (most '
               'recent call last):\n  File "/home/ray/anaconda3/lib/python3.11/site-packages/ray/train/'
               'base_trainer.py", line 722, in fit\nray.exceptions.RayTaskError(OSError): ray::_Inner.train() '
               '(pid=4242, ip=10.0.3.7, actor_id=af3c)\nOSError: [Errno 28] No space left on device: '
               "'/tmp/ray/session_2026-12-03/artifacts/ckpt'")


class FakeRayDashboard:
    """The Ray dashboard's Job Submission API, in memory: records every submitted body."""

    def __init__(self):
        self.submitted: list[dict] = []
        self.jobs: dict[str, dict] = {}
        dashboard = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, status: int, body: dict | None = None):
                data = json.dumps(body or {}).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.path == "/api/jobs/":
                    body = json.loads(raw)
                    dashboard.submitted.append({"raw": raw.decode(), "json": body})
                    dashboard.jobs[body["submission_id"]] = {"status": "RUNNING", "message": ""}
                    return self._reply(200, {"submission_id": body["submission_id"]})
                if self.path.endswith("/stop"):
                    return self._reply(200, {"stopped": True})
                self._reply(404)

            def do_GET(self):
                if self.path == "/api/cluster_status":
                    usage = {"CPU": [0, 16], "GPU": [0, 0]}
                    return self._reply(200, {"data": {"clusterStatus": {"loadMetricsReport": {"usage": usage}}}})
                sub = self.path.removeprefix("/api/jobs/")
                if sub in dashboard.jobs:
                    return self._reply(200, dashboard.jobs[sub])
                self._reply(404)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stack(tmp_path):
    """The API and a scheduler on one database, the scheduler submitting to the fake dashboard;
    settings hold every secret we have, so that a leak of any of them shows."""
    db_url = f"sqlite:///{tmp_path / 'api.db'}"
    api_settings = make_settings(tmp_path, db_url)  # the API's own store: a local folder
    settings = api_settings.model_copy(update={
        "admin_token": SecretStr(ADMIN), "internal_secret": SecretStr(INTERNAL),
        "object_store_url": "s3://bucket/lorafleet", "s3_endpoint_url": "http://minio.storage:9000",
        "s3_access_key_id": SecretStr(S3_KEY_ID), "s3_secret_access_key": SecretStr(S3_SECRET),
        "max_job_attempts": 1})
    with FakeRayDashboard() as ray, TestClient(create_app(api_settings)) as client:
        engine = make_engine(db_url)
        scheduler = Scheduler(settings.model_copy(update={"ray_address": ray.url}), engine,
                              RayJobLauncher(ray.url, entrypoint="python -m workers.train.ray_job"))
        yield client, scheduler, ray, settings
        scheduler.lock.release()
        engine.dispose()


def _queued_job(client, app) -> tuple[object, str]:
    tenant = new_tenant(client)
    job_id = create_job(client, tenant, uploaded_file(client, tenant)).json()["id"]
    with app.state.session_factory() as s:
        job = s.get(Job, job_id)
        if job.status == states.VALIDATING_FILES:
            states.transition(s, job, states.QUEUED)
            s.commit()
    return tenant, job_id


def test_the_submitted_ray_job_holds_no_secret_of_ours(stack):
    client, scheduler, ray, settings = stack
    _, job_id = _queued_job(client, client.app)
    scheduler.tick()
    assert len(ray.submitted) == 1, "the scheduler submitted nothing"
    raw, body = ray.submitted[0]["raw"], ray.submitted[0]["json"]
    for secret in (S3_SECRET, S3_KEY_ID, ADMIN, INTERNAL, settings.effective_database_url, "sqlite:"):
        assert secret not in raw, f"{secret!r} reached Ray"
    env = body["runtime_env"]["env_vars"]
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"} & env.keys()
    assert not [k for k in env if "DATABASE" in k.upper() or k.startswith("LORAFLEET_") and k != "LORAFLEET_JOB_SPEC"]
    assert env["AWS_ENDPOINT_URL"] == "http://minio.storage:9000"  # an address is no secret
    # What the run does get: its spec, whose token is bound to this run (attempt 1) and expires.
    spec = json.loads(env["LORAFLEET_JOB_SPEC"])
    claims = job_token_claims(spec["job_token"], settings)
    assert (claims.job_id, claims.attempt) == (job_id, 1)
    assert time.time() < claims.expires_at <= time.time() + settings.job_token_ttl_s + 1


def test_a_ray_failure_message_never_reaches_the_tenant(stack, caplog):
    client, scheduler, ray, _ = stack
    tenant, job_id = _queued_job(client, client.app)
    scheduler.tick()
    ray.jobs[job_id] = {"status": "FAILED", "message": RAY_FAILURE}
    with caplog.at_level("WARNING"):
        scheduler.tick()  # the run ended without a result: Ray's message is all we have
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=tenant.headers).json()
    assert job["status"] == "failed" and job["error"]["code"] == "worker_lost"
    events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events?limit=100", headers=tenant.headers).text
    for leak in ("Traceback", "/home/ray", "10.0.3.7", "Errno", "RayTaskError", "/tmp/ray", "exit code"):
        assert leak not in json.dumps(job) and leak not in events, leak
    assert any("/home/ray" in r.getMessage() and job_id in r.getMessage() for r in caplog.records)


def test_a_run_that_cannot_be_prepared_fails_in_our_words(stack, caplog):
    client, scheduler, ray, _ = stack
    tenant, job_id = _queued_job(client, client.app)
    with client.app.state.session_factory() as s:  # the spec cannot be built: its file is gone
        s.delete(s.get(File, s.get(Job, job_id).training_file))
        s.commit()
    with caplog.at_level("WARNING"):
        scheduler.tick()
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=tenant.headers).json()
    assert job["error"] == {"code": "internal_error", "message": public_failure_message("internal_error"),
                            "param": None}
    assert ray.submitted == []
    assert any("no longer exists" in r.getMessage() and job_id in r.getMessage() for r in caplog.records)


def test_the_embedded_ray_node_holds_the_store_keys_and_none_of_the_control_planes(tmp_path, monkeypatch):
    """The embedded stack's local Ray gets the object store's keys in the node's own environment
    (where its training workers and serving replicas read them) and none of our secrets."""
    from service.embedded import object_store_env
    from workers.local_ray import node_env

    monkeypatch.setenv("LORAFLEET_DATABASE_URL", "postgresql://u:p@db/lf")
    monkeypatch.setenv("LORAFLEET_INTERNAL_SECRET", INTERNAL)
    settings = make_settings(tmp_path, "sqlite:///x.db").model_copy(update={
        "object_store_url": "s3://bucket/lorafleet", "s3_endpoint_url": "http://minio:9000",
        "s3_access_key_id": SecretStr(S3_KEY_ID), "s3_secret_access_key": SecretStr(S3_SECRET)})
    env = node_env(tmp_path / "auth_token", object_store_env(settings))
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == (S3_KEY_ID, S3_SECRET)
    assert env["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert not [k for k in env if k.startswith("LORAFLEET_")]
    local = make_settings(tmp_path, "sqlite:///x.db")  # a local folder store: nothing to hand over
    assert object_store_env(local) == {}
