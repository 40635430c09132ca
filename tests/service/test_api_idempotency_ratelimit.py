"""Idempotency-Key replay / reuse, and the per-tenant rate limit."""

from __future__ import annotations

import threading
import time
import uuid

import httpx
import sqlalchemy as sa
from api_helpers import ADMIN, CHAT_LINE, assert_problem, create_job, new_tenant, upload, uploaded_file
from fastapi.testclient import TestClient

from service.api.idempotency import IN_FLIGHT, IN_FLIGHT_TIMEOUT_S, purge_expired
from service.db.models import IdempotencyKey, Tenant
from service.ids import now
from service.main import create_app


def test_same_key_same_body_replays_the_first_response(client, tenant):
    file_id = uploaded_file(client, tenant)
    key = {"Idempotency-Key": "create-1"}
    first = client.post("/v1/fine_tuning/jobs", headers={**tenant.headers, **key},
                        json={"model": "lorafleet/tiny-llama", "training_file": file_id})
    again = client.post("/v1/fine_tuning/jobs", headers={**tenant.headers, **key},
                        json={"model": "lorafleet/tiny-llama", "training_file": file_id})
    assert first.status_code == again.status_code == 201
    assert first.json() == again.json() and again.headers["idempotent-replayed"] == "true"
    assert len(client.get("/v1/fine_tuning/jobs", headers=tenant.headers).json()["data"]) == 1

    other = client.post("/v1/fine_tuning/jobs", headers={**tenant.headers, **key},
                        json={"model": "lorafleet/tiny-llama", "training_file": file_id, "suffix": "x"})
    assert_problem(other, 422, "idempotency_key_reused", "Idempotency-Key")
    assert len(client.get("/v1/fine_tuning/jobs", headers=tenant.headers).json()["data"]) == 1


def test_keys_are_per_tenant_and_uploads_ignore_the_boundary(client, tenant, other_tenant):
    key = {"Idempotency-Key": "upload-1"}
    a1 = upload(client, tenant, headers=key)
    a2 = upload(client, tenant, headers=key)  # a new random multipart boundary: still a replay
    b1 = upload(client, other_tenant, headers=key)
    assert a1.status_code == a2.status_code == b1.status_code == 201
    assert a1.json()["id"] == a2.json()["id"] != b1.json()["id"]
    assert len(client.get("/v1/files", headers=tenant.headers).json()["data"]) == 1
    assert_problem(upload(client, tenant, CHAT_LINE * 5, headers=key), 422, "idempotency_key_reused")


def test_errors_are_replayed_but_nothing_is_created(client, tenant):
    key = {"Idempotency-Key": "bad-1", **tenant.headers}
    body = {"model": "lorafleet/tiny-llama", "training_file": "file-nope"}
    first = client.post("/v1/fine_tuning/jobs", headers=key, json=body)
    again = client.post("/v1/fine_tuning/jobs", headers=key, json=body)
    assert first.status_code == again.status_code == 404 and first.json()["detail"] == again.json()["detail"]


def _post_together(url: str, headers: dict[str, str], body: dict, n: int = 8) -> list[httpx.Response]:
    """``n`` identical POSTs released at once from ``n`` threads, one connection each."""
    start, responses = threading.Barrier(n), [None] * n

    def post(i: int) -> None:
        with httpx.Client(timeout=30) as http:
            start.wait()
            responses[i] = http.post(url, headers=headers, json=body)

    threads = [threading.Thread(target=post, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(r is not None for r in responses)
    return responses


def _exactly_one_ran(responses: list[httpx.Response]) -> str:
    """Every attempt either got the one answer (first or replayed) or was told to retry."""
    ok = [r for r in responses if r.status_code == 201]
    for r in responses:
        if r.status_code != 201:
            assert_problem(r, 409, "idempotency_key_in_flight", "Idempotency-Key")
            assert r.headers["retry-after"] == "1"
    assert ok and len({r.json()["id"] for r in ok}) == 1
    assert sum(r.headers.get("idempotent-replayed") != "true" for r in ok) == 1
    return ok[0].json()["id"]


def test_concurrent_attempts_with_one_key_run_once(client, tenant, live_url):
    file_id = uploaded_file(client, tenant)
    body = {"model": "lorafleet/tiny-llama", "training_file": file_id}
    responses = _post_together(f"{live_url}/v1/fine_tuning/jobs",
                               {**tenant.headers, "Idempotency-Key": "race-1"}, body)
    job_id = _exactly_one_ran(responses)
    jobs = client.get("/v1/fine_tuning/jobs", headers=tenant.headers).json()["data"]
    assert [j["id"] for j in jobs] == [job_id]
    # once the first attempt has finished, a retry (what a 409'd client does) gets its replay
    again = client.post("/v1/fine_tuning/jobs", headers={**tenant.headers, "Idempotency-Key": "race-1"}, json=body)
    assert again.status_code == 201 and again.json()["id"] == job_id


def test_concurrent_admin_creates_with_one_key_make_one_tenant(client, app, live_url):
    name = f"race-{uuid.uuid4().hex[:8]}"
    responses = _post_together(f"{live_url}/v1/admin/tenants", {**ADMIN, "Idempotency-Key": name}, {"name": name})
    tenant_id = _exactly_one_ran(responses)
    with app.state.session_factory() as session:
        ids = session.scalars(sa.select(Tenant.id).where(Tenant.name == name)).all()
    assert ids == [tenant_id]


def test_an_abandoned_reservation_is_taken_over(client, app, tenant):
    file_id = uploaded_file(client, tenant)
    body = {"model": "lorafleet/tiny-llama", "training_file": file_id}
    key = {"Idempotency-Key": "crashed-1", **tenant.headers}
    with app.state.session_factory() as session:
        session.add(IdempotencyKey(scope=tenant.id, key="crashed-1", request_hash="?", status_code=IN_FLIGHT,
                                   content_type=None, body="", created_at=now() - 10))
        session.commit()
    assert_problem(client.post("/v1/fine_tuning/jobs", headers=key, json=body), 422, "idempotency_key_reused")
    with app.state.session_factory() as session:  # now as if its attempt crashed long ago
        session.get(IdempotencyKey, (tenant.id, "crashed-1")).created_at = now() - IN_FLIGHT_TIMEOUT_S - 1
        session.commit()
    first = client.post("/v1/fine_tuning/jobs", headers=key, json=body)
    again = client.post("/v1/fine_tuning/jobs", headers=key, json=body)
    assert first.status_code == again.status_code == 201 and first.json()["id"] == again.json()["id"]


def test_rate_limit_is_429_with_retry_after(client):
    t = new_tenant(client, requests_per_minute=3)
    codes = [client.get("/v1/files", headers=t.headers).status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]
    r = client.get("/v1/fine_tuning/jobs", headers=t.headers)
    assert_problem(r, 429, "rate_limited")
    assert 1 <= int(r.headers["retry-after"]) <= 20
    # the limit is per tenant: others are unaffected
    assert client.get("/v1/files", headers=new_tenant(client).headers).status_code == 200
    client.patch(f"/v1/admin/tenants/{t.id}", json={"requests_per_minute": 1000}, headers=ADMIN)


def test_quota_429_is_not_replayed_as_a_stored_answer(client):
    t = new_tenant(client, max_queued_jobs=0)
    file_id = uploaded_file(client, t)
    key = {"Idempotency-Key": "q-1"}
    r1 = client.post("/v1/fine_tuning/jobs", headers={**t.headers, **key},
                     json={"model": "lorafleet/tiny-llama", "training_file": file_id})
    assert_problem(r1, 429, "quota_exceeded")
    client.patch(f"/v1/admin/tenants/{t.id}", json={"max_queued_jobs": 1}, headers=ADMIN)
    r2 = client.post("/v1/fine_tuning/jobs", headers={**t.headers, **key},
                     json={"model": "lorafleet/tiny-llama", "training_file": file_id})
    assert r2.status_code == 201  # the retry really retried
    assert create_job(client, t, file_id).status_code == 429


# --- expiry, purge, inference, long uploads (issue 10) --------------------------------------

def _stored(app, scope: str, key: str) -> IdempotencyKey | None:
    with app.state.session_factory() as session:
        return session.get(IdempotencyKey, (scope, key))


def test_an_expired_record_no_longer_answers(client, app, tenant, api_settings):
    file_id = uploaded_file(client, tenant)
    key = {"Idempotency-Key": "old-1", **tenant.headers}
    body = {"model": "lorafleet/tiny-llama", "training_file": file_id}
    first = client.post("/v1/fine_tuning/jobs", headers=key, json=body)
    with app.state.session_factory() as session:  # a day and a second later
        session.get(IdempotencyKey, (tenant.id, "old-1")).created_at = now() - api_settings.idempotency_ttl_s - 1
        session.commit()
    again = client.post("/v1/fine_tuning/jobs", headers=key, json=body)
    assert first.status_code == again.status_code == 201 and "idempotent-replayed" not in again.headers
    assert first.json()["id"] != again.json()["id"]  # it ran again: the old answer was forgotten
    assert _stored(app, tenant.id, "old-1").created_at >= now() - 60


def test_expired_records_are_purged_in_batches(client, app, tenant):
    with app.state.session_factory() as session:
        for i in range(25):
            session.add(IdempotencyKey(scope=tenant.id, key=f"purge-{i}", request_hash="h", status_code=201,
                                       content_type="application/json", body="{}",
                                       created_at=now() - 100 if i < 23 else now()))
        session.commit()
    assert purge_expired(app.state.session_factory, ttl_s=50, batch=10) >= 23
    with app.state.session_factory() as session:
        left = session.scalars(sa.select(IdempotencyKey.key).where(
            IdempotencyKey.scope == tenant.id, IdempotencyKey.key.like("purge-%"))).all()
    assert sorted(left) == ["purge-23", "purge-24"]


def test_the_app_purges_in_the_background(api_settings, tmp_path):
    settings = api_settings.model_copy(update={"idempotency_ttl_s": 60, "idempotency_purge_interval_s": 0.2})
    app = create_app(settings)
    with app.state.session_factory() as session:
        session.add(IdempotencyKey(scope="bg", key=f"bg-{uuid.uuid4().hex}", request_hash="h", status_code=201,
                                   content_type=None, body="", created_at=now() - 3600))
        session.commit()
    with TestClient(app):  # the lifespan runs the purge task
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with app.state.session_factory() as session:
                if not session.scalars(sa.select(IdempotencyKey).where(IdempotencyKey.scope == "bg")).all():
                    break
            time.sleep(0.1)
        else:
            raise AssertionError("the background purge did not delete the expired record")


def test_inference_calls_are_not_recorded(api_settings, serve_url, tenant):
    app = create_app(api_settings.model_copy(update={"serve_url": serve_url}))
    with TestClient(app) as c:
        headers = {**tenant.headers, "Idempotency-Key": "chat-1"}
        body = {"model": "lorafleet/tiny-llama", "messages": [{"role": "user", "content": "hi"}]}
        for path in ("/v1/chat/completions", "/v1/completions"):
            payload = body if "chat" in path else {"model": "lorafleet/tiny-llama", "prompt": "hi"}
            first, again = (c.post(path, headers=headers, json=payload) for _ in range(2))
            assert first.status_code == again.status_code == 200, first.text
            assert "idempotent-replayed" not in again.headers  # it ran again
        assert _stored(app, tenant.id, "chat-1") is None


def test_a_long_upload_is_replayed_without_being_held_twice(api_settings, tenant):
    """Past max_body_bytes an upload is not read ahead: the key is reserved when its last byte
    arrives. Replay, reuse with another body and the in-memory bound all still hold."""
    app = create_app(api_settings.model_copy(update={"max_body_bytes": 4096}))
    data = CHAT_LINE * 200  # ~18 KB, over max_body_bytes, under the upload limit
    with TestClient(app) as c:
        key = {"Idempotency-Key": "long-1"}
        first, again = upload(c, tenant, data, headers=key), upload(c, tenant, data, headers=key)
        assert first.status_code == again.status_code == 201, first.text
        assert first.json()["id"] == again.json()["id"] and again.headers["idempotent-replayed"] == "true"
        assert_problem(upload(c, tenant, data + CHAT_LINE, headers=key), 422, "idempotency_key_reused")
        files = c.get("/v1/files", headers=tenant.headers).json()["data"]
        assert [f["id"] for f in files].count(first.json()["id"]) == 1
        # a non-upload body over max_body_bytes is refused outright, key or not
        r = c.post("/v1/fine_tuning/jobs", headers={**tenant.headers, **key},
                   json={"model": "x" * 5000, "training_file": "f"})
        assert_problem(r, 413, "payload_too_large")
