"""Admin: the queue by tenant, running jobs, capacity as the scheduler saw it, serving's cache.

Each test gets its own database (both backends) and app: the real scheduler ticks against it,
over a simulated Ray (service.scheduling.simulated), and would otherwise start other tests'
queued jobs. Serving is the real serving app (workers.serve.http) over the built-in tiny Llama.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid

import httpx
import pytest
import uvicorn
from api_helpers import ADMIN, SERVE_SIGNING_KEY, assert_problem, create_job, make_settings, new_tenant, uploaded_file
from fastapi.testclient import TestClient
from pydantic import SecretStr

from service.db.session import make_engine
from service.main import create_app
from service.scheduler import Scheduler
from service.scheduling.policy import Capacity
from service.scheduling.simulated import SimulatedCluster
from workers.signing import Signer

BASE_ID = "lorafleet/tiny-llama"  # the built-in model: no download, no tokenizer to train


def _app(tmp_path, database_url, **overrides) -> TestClient:
    settings = make_settings(tmp_path / "data", database_url)
    return TestClient(create_app(settings.model_copy(update=overrides)))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def serving(tmp_path_factory):
    """The serving app over the built-in tiny Llama and one random LoRA adapter, signed with the
    key the API tests' settings hold. Yields (url, adapter routing)."""
    from workers.serve import synthetic
    from workers.serve.http import create_app as create_serve_app
    from workers.serve.replica import ServeConfig, build_front
    from workers.signing import Verifier
    from workers.storage import LocalStore

    from transformers import AutoModelForCausalLM

    from workers.models.registry import local_builtin

    root = tmp_path_factory.mktemp("serving")
    base_dir = local_builtin(BASE_ID)
    peft = synthetic.random_adapters(AutoModelForCausalLM.from_pretrained(base_dir),
                                     [dict(name="ad8", r=8, target_modules=["q_proj"])])
    adapter_dir = synthetic.save_adapters(peft, ["ad8"], root / "adapters")["ad8"]
    store = LocalStore(root / "objects")
    prefix = "tenants/tn_a/adapters/ft-ad8/v1"
    synthetic.publish_adapter(store, adapter_dir, prefix, adapter_id="ft-ad8", base_model_id=BASE_ID)
    front = build_front(ServeConfig.load(base_model_id=BASE_ID, base_model_uri=str(base_dir), object_store_url=store.url,
                                         max_batch=4, max_len=128, max_rank=8, adapter_slots=2, default_max_tokens=2),
                        store)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_serve_app(front, Verifier([SERVE_SIGNING_KEY])), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive()
        time.sleep(0.05)
    routing = {"lorafleet": {"adapter": {"id": "ft-ad8", "prefix": prefix, "base_model_id": BASE_ID},
                             "base_model": {"id": BASE_ID, "uri": "x"}}}
    yield f"http://127.0.0.1:{port}", routing
    server.should_exit = True
    thread.join(10)
    front.close()


def _queued_jobs(client: TestClient, tenant, n: int) -> list[str]:
    file_id = uploaded_file(client, tenant)
    ids = []
    for _ in range(n):
        r = create_job(client, tenant, file_id)
        assert r.status_code in (200, 201), r.text
        ids.append(r.json()["id"])
    return ids


def test_queue_running_jobs_and_capacity_follow_the_scheduler(tmp_path, database_url):
    with _app(tmp_path, database_url) as client:
        assert client.get("/v1/admin/cluster", headers=ADMIN).json() == {
            "object": "cluster", "observed": False, "observed_at": None, "age_s": None, "total": None,
            "used": None, "free": None, "training": None, "other": None}
        a, b = new_tenant(client, max_concurrent_jobs=1), new_tenant(client)
        a_jobs, b_jobs = _queued_jobs(client, a, 2), _queued_jobs(client, b, 1)
        before = client.get("/v1/admin/queue", headers=ADMIN).json()
        assert {t["tenant_id"]: (t["queued"], t["running"], t["paused"]) for t in before["tenants"]} == {
            a.id: (2, 0, 0), b.id: (1, 0, 0)}
        assert before["running_jobs"] == [] and before["running_jobs_has_more"] is False
        row = next(t for t in before["tenants"] if t["tenant_id"] == a.id)
        assert row["queued_demand"] == {"cpus": 2.0, "gpus": 0.0}  # two jobs of one worker, one CPU each
        assert row["oldest_queued_age_s"] >= 0 and row["tenant_name"].startswith("t-")

        # 4 CPUs, one of them held by serving; the scheduler starts what tenant limits allow.
        cluster = SimulatedCluster(Capacity(cpus=4, gpus=0), duration_of=lambda _: 3600,
                                   held_by_serving=Capacity(cpus=1, gpus=0))
        engine = make_engine(database_url)
        scheduler = Scheduler(client.app.state.settings, engine, cluster)
        try:
            assert scheduler.tick() and scheduler.tick()  # the second sees its own runs held
        finally:
            scheduler.lock.release()
            engine.dispose()

        after = client.get("/v1/admin/queue", headers=ADMIN).json()
        assert {t["tenant_id"]: (t["queued"], t["running"]) for t in after["tenants"]} == {a.id: (1, 1), b.id: (0, 1)}
        assert next(t for t in after["tenants"] if t["tenant_id"] == b.id)["oldest_queued_age_s"] is None
        running = {j["id"]: j for j in after["running_jobs"]}
        assert set(running) == {a_jobs[0], b_jobs[0]}
        assert running[b_jobs[0]]["tenant_id"] == b.id and running[b_jobs[0]]["method"] == "lora"
        assert running[b_jobs[0]]["status"] == "running" and running[b_jobs[0]]["started_at"] > 0
        paged = client.get("/v1/admin/queue?running_limit=1", headers=ADMIN).json()
        assert len(paged["running_jobs"]) == 1 and paged["running_jobs_has_more"] is True

        seen = client.get("/v1/admin/cluster", headers=ADMIN).json()
        assert seen["observed"] is True and 0 <= seen["age_s"] < 60
        assert (seen["total"], seen["free"], seen["used"]) == (
            {"cpus": 4.0, "gpus": 0.0}, {"cpus": 1.0, "gpus": 0.0}, {"cpus": 3.0, "gpus": 0.0})
        assert (seen["training"], seen["other"]) == ({"cpus": 2.0, "gpus": 0.0}, {"cpus": 1.0, "gpus": 0.0})


def test_tenants_are_refused_and_a_bad_limit_is_a_problem(tmp_path, database_url):
    with _app(tmp_path, database_url) as client:
        tenant = new_tenant(client)
        _queued_jobs(client, tenant, 1)
        for path in ("/v1/admin/queue", "/v1/admin/cluster", "/v1/admin/serving"):
            assert_problem(client.get(path, headers=tenant.headers), 403, "forbidden")
            assert_problem(client.get(path), 401, "unauthorized")
        assert_problem(client.get("/v1/admin/queue?running_limit=0", headers=ADMIN), 422, "validation_error",
                       "running_limit")


def test_serving_not_configured_says_so(tmp_path, database_url):
    with _app(tmp_path, database_url) as client:
        assert client.get("/v1/admin/serving", headers=ADMIN).json() == {
            "object": "serving", "configured": False, "reachable": None, "error": None, "replica": None}


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # serving's side is what varies here
def test_serving_adapter_cache_through_the_signed_proxy(tmp_path, database_url, serving):
    url, routing = serving
    with httpx.Client(base_url=url) as direct:  # two requests for one adapter: one load, one hit
        body = json.dumps({"model": "ft-ad8", "prompt": "Hello", "max_tokens": 2, **routing}).encode()
        for _ in range(2):
            rid = f"req_{uuid.uuid4().hex[:12]}"
            r = direct.post("/v1/completions", content=body, headers={
                "content-type": "application/json",
                **Signer(SERVE_SIGNING_KEY).headers("POST", "/v1/completions", body, tenant="tn_a", request_id=rid)})
            assert r.status_code == 200, r.text
    with _app(tmp_path, database_url, serve_url=url) as client:
        answer = client.get("/v1/admin/serving", headers=ADMIN).json()
    assert (answer["configured"], answer["reachable"], answer["error"]) == (True, True, None)
    replica = answer["replica"]
    assert replica["base_model_id"] == BASE_ID and replica["engine"]["decode_tokens"] > 0
    host = next(c for c in replica["caches"] if c["tier"] == "host")
    assert host["resident_adapters"] == 1 and host["bytes_used"] > 0
    assert host["bytes_free"] == host["bytes_max"] - host["bytes_used"]
    assert host["misses"] == 1 and host["hits"] >= 1
    assert host["hit_rate"] == pytest.approx(host["hits"] / (host["hits"] + host["misses"]))


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_serving_down_or_refusing_is_reported_not_raised(tmp_path, database_url, serving):
    url, _ = serving
    with _app(tmp_path, database_url, serve_url=f"http://127.0.0.1:{_free_port()}") as client:
        down = client.get("/v1/admin/serving", headers=ADMIN).json()
    assert (down["configured"], down["reachable"], down["replica"]) == (True, False, None)
    assert down["error"].startswith("no answer from serving")
    with _app(tmp_path, database_url, serve_url=url, serve_signing_key=SecretStr("not-the-serving-key")) as client:
        refused = client.get("/v1/admin/serving", headers=ADMIN).json()
    assert (refused["reachable"], refused["replica"]) == (False, None) and "signature" in refused["error"]
