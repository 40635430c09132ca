"""POST/GET /v1/fine_tuning/sweeps through the API (both databases): the fan-out into child
jobs, all or none (quota, bad values), the comparison table from what each child's run reports
through the internal result route, the best child, cancel, and tenant isolation."""

from __future__ import annotations

import pytest
from api_helpers import assert_problem, new_tenant, publish_adapter, uploaded_file

from service.db.models import Job
from service.jobs import states
from service.security import job_token


def _sweep(client, tenant, file_id, parameters, **base):
    return client.post("/v1/fine_tuning/sweeps", headers=tenant.headers, json={
        "base": {"model": "lorafleet/tiny-llama", "training_file": file_id, **base}, "parameters": parameters})


def _jobs(client, tenant) -> list[dict]:
    return client.get("/v1/fine_tuning/jobs", headers=tenant.headers, params={"limit": 100}).json()["data"]


def _finish(client, app, job_id: str, metrics: dict) -> None:
    """The child's run: started by the scheduler, then its worker reports the result."""
    with app.state.session_factory() as s:
        states.transition(s, s.get(Job, job_id), states.RUNNING, attempts=1)
        s.commit()
    worker = {"Authorization": f"Bearer {job_token(job_id, 1, app.state.settings, ttl_s=3600)}"}
    r = client.post(f"/internal/v1/jobs/{job_id}/result", headers=worker,
                    json={"manifest_key": publish_adapter(app, job_id), "metrics": metrics})
    assert r.status_code == 200, r.text


def test_a_rank_sweep_fans_out_and_reports_the_comparison_table(client, app, tenant):
    file_id = uploaded_file(client, tenant)
    r = _sweep(client, tenant, file_id, [{"name": "r", "values": [2, 4, 8]}], validation_file=file_id,
               method={"type": "lora", "lora": {"hyperparameters": {"lora_alpha": 16}}})
    assert r.status_code == 201, r.text
    sweep = r.json()
    assert sweep["object"] == "fine_tuning.sweep" and sweep["status"] == "running" and sweep["best"] is None
    assert sweep["metric"] == "eval_loss"
    children = sweep["children"]
    assert [c["values"] for c in children] == [{"r": 2}, {"r": 4}, {"r": 8}]
    assert all(c["status"] == "queued" and c["eval_loss"] is None for c in children)
    # each child is an ordinary job of the tenant, with the base's other values
    jobs = {j["id"]: j for j in _jobs(client, tenant)}
    for child in children:
        hp = jobs[child["job_id"]]["method"]["lora"]["hyperparameters"]
        assert (hp["r"], hp["lora_alpha"]) == (child["values"]["r"], 16)
    for child, loss in zip(children, [1.5, 1.2, 1.3], strict=True):
        r = child["values"]["r"]
        _finish(client, app, child["job_id"], {"eval_loss": loss, "train_loss": loss + 0.1, "trainable_params": 4096.0 * r,
                                               "peak_memory_mb": 100.0 + r, "tokens_per_s": 900.0, "train_runtime_s": 12.5})
    done = client.get(f"/v1/fine_tuning/sweeps/{sweep['id']}", headers=tenant.headers).json()
    assert done["status"] == "succeeded"
    rows = {c["values"]["r"]: c for c in done["children"]}
    assert rows[4]["trainable_params"] == 16384 and rows[8]["peak_memory_mb"] == 108.0
    assert rows[2]["train_time_s"] == 12.5 and rows[2]["tokens_per_s"] == 900.0
    assert all(c["status"] == "succeeded" and c["fine_tuned_model"] for c in done["children"])
    assert done["best"]["values"] == {"r": 4} and done["best"]["eval_loss"] == 1.2
    listed = client.get("/v1/fine_tuning/sweeps", headers=tenant.headers).json()
    assert [s["id"] for s in listed["data"]] == [sweep["id"]] and listed["data"][0]["best"]["values"] == {"r": 4}


@pytest.mark.parametrize("method", [None, {"type": "qlora"}, {"type": "lora", "lora": None},
                                    {"type": "lora", "lora": {"hyperparameters": None}}])
def test_a_base_without_method_hyperparameters_takes_the_varied_ones(client, tenant, method):
    file_id = uploaded_file(client, tenant)
    r = _sweep(client, tenant, file_id, [{"name": "r", "values": [2, 4]}], method=method)
    assert r.status_code == 201, r.text
    kind = (method or {}).get("type", "lora")
    jobs = {j["id"]: j for j in _jobs(client, tenant)}
    assert [jobs[c["job_id"]]["method"][kind]["hyperparameters"]["r"] for c in r.json()["children"]] == [2, 4]


def test_two_parameters_make_every_combination(client, tenant):
    file_id = uploaded_file(client, tenant)
    r = _sweep(client, tenant, file_id, [{"name": "r", "values": [4, 8]},
                                         {"name": "learning_rate", "values": [1e-4, 1e-3]}])
    assert r.status_code == 201, r.text
    assert [c["values"] for c in r.json()["children"]] == [
        {"r": 4, "learning_rate": 1e-4}, {"r": 4, "learning_rate": 1e-3},
        {"r": 8, "learning_rate": 1e-4}, {"r": 8, "learning_rate": 1e-3}]
    assert r.json()["metric"] == "train_loss"  # no validation file


def test_over_quota_is_refused_before_any_child_exists(client):
    tenant = new_tenant(client, max_queued_jobs=4)
    file_id = uploaded_file(client, tenant)
    assert _sweep(client, tenant, file_id, [{"name": "r", "values": [2, 4]}]).status_code == 201
    body = assert_problem(_sweep(client, tenant, file_id, [{"name": "r", "values": [2, 4, 8]}]),
                          422, "sweep_over_quota", "parameters")
    assert "3 jobs" in body["detail"] and "2 are already queued" in body["detail"]
    assert len(_jobs(client, tenant)) == 2
    assert len(client.get("/v1/fine_tuning/sweeps", headers=tenant.headers).json()["data"]) == 1


@pytest.mark.parametrize(("parameters", "code", "param"), [
    ([{"name": "r", "values": [4, "many"]}], "validation_error", "parameters[0].values[1]"),
    ([{"name": "r", "values": [4, 8]}, {"name": "rank", "values": [1, 2]}], "validation_error",
     "parameters[0].values[0], parameters[1].values[0]"),
    ([{"name": "r", "values": [8, 128]}], "invalid_hyperparameters", "parameters[0].values[1]"),  # > max_rank
])
def test_a_bad_child_refuses_the_whole_sweep(client, tenant, parameters, code, param):
    file_id = uploaded_file(client, tenant)
    assert_problem(_sweep(client, tenant, file_id, parameters), 422, code, param)
    assert _jobs(client, tenant) == []
    assert client.get("/v1/fine_tuning/sweeps", headers=tenant.headers).json()["data"] == []


@pytest.mark.parametrize("parameters", [
    [],  # nothing varied
    [{"name": "r", "values": [4]}],  # one value is no comparison
    [{"name": "r", "values": [2, 4]}, {"name": "r", "values": [8, 16]}],
    [{"name": "r", "values": [1, 2, 3, 4, 5, 6]}, {"name": "lora_dropout", "values": [0, 0.1, 0.2, 0.3, 0.4]}],
    [{"name": "r", "values": [2, 4]}, {"name": "n_epochs", "values": [1, 2]}, {"name": "seed", "values": [1, 2]}],
])
def test_malformed_sweeps_are_422(client, tenant, parameters):
    file_id = uploaded_file(client, tenant)
    r = _sweep(client, tenant, file_id, parameters)
    assert r.status_code == 422 and r.headers["content-type"].startswith("application/problem+json"), r.text
    assert _jobs(client, tenant) == []


def test_cancel_and_isolation(client, app, tenant, other_tenant):
    file_id = uploaded_file(client, tenant)
    sweep = _sweep(client, tenant, file_id, [{"name": "r", "values": [2, 4]}]).json()
    path = f"/v1/fine_tuning/sweeps/{sweep['id']}"
    assert_problem(client.get(path, headers=other_tenant.headers), 404, "not_found", "sweep_id")
    assert_problem(client.post(f"{path}/cancel", headers=other_tenant.headers), 404, "not_found", "sweep_id")
    assert client.get("/v1/fine_tuning/sweeps", headers=other_tenant.headers).json()["data"] == []
    assert_problem(_sweep(client, other_tenant, file_id, [{"name": "r", "values": [2, 4]}]), 404, "not_found",
                   "training_file")
    r = client.post(f"{path}/cancel", headers=tenant.headers)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "failed" and {c["status"] for c in r.json()["children"]} == {"cancelled"}
