"""Tenant isolation: every resource of tenant A answers 404 to tenant B, exactly like a missing one."""

from __future__ import annotations

from api_helpers import assert_problem, create_job, publish_adapter, uploaded_file

from service.db.models import Job
from service.jobs import states
from service.security import job_token


def test_every_resource_of_a_is_a_404_for_b(client, app, tenant, other_tenant):
    a, b = tenant, other_tenant
    file_id = uploaded_file(client, a)
    job_id = create_job(client, a, file_id).json()["id"]
    with app.state.session_factory() as s:
        states.transition(s, s.get(Job, job_id), states.RUNNING)
        s.commit()
    worker = {"Authorization": f"Bearer {job_token(job_id, 0, app.state.settings, ttl_s=3600)}"}
    adapter_id = client.post(f"/internal/v1/jobs/{job_id}/result", headers=worker,
                             json={"manifest_key": publish_adapter(app, job_id)}).json()["adapter_id"]

    reads = [f"/v1/files/{file_id}", f"/v1/files/{file_id}/content", f"/v1/fine_tuning/jobs/{job_id}",
             f"/v1/fine_tuning/jobs/{job_id}/events", f"/v1/fine_tuning/jobs/{job_id}/checkpoints",
             f"/v1/adapters/{adapter_id}", f"/v1/adapters/{adapter_id}/files/manifest.json",
             f"/v1/models/{adapter_id}"]
    for url in reads:
        assert client.get(url, headers=a.headers).status_code == 200, url
        missing = url.replace(file_id, "file-missing").replace(job_id, "ftjob-missing").replace(
            adapter_id, "ft-missing")
        theirs, absent = client.get(url, headers=b.headers), client.get(missing, headers=b.headers)
        assert theirs.status_code == absent.status_code == 404, url
        assert theirs.json()["code"] == absent.json()["code"], url

    assert_problem(client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=b.headers), 404, "not_found")
    assert_problem(client.delete(f"/v1/files/{file_id}", headers=b.headers), 404, "not_found")
    assert_problem(client.delete(f"/v1/models/{adapter_id}", headers=b.headers), 404, "model_not_found")
    assert_problem(create_job(client, b, file_id), 404, "not_found", "training_file")
    for listing in ("/v1/files", "/v1/fine_tuning/jobs"):
        assert client.get(listing, headers=b.headers).json()["data"] == []
    assert adapter_id not in [m["id"] for m in client.get("/v1/models", headers=b.headers).json()["data"]]
    # and A's resources are all still there
    assert client.get(f"/v1/adapters/{adapter_id}", headers=a.headers).status_code == 200
    assert client.get(f"/v1/files/{file_id}", headers=a.headers).status_code == 200
