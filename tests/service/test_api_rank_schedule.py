"""``rank_schedule`` at job creation (both databases): a bad schedule is a 422 naming
``method.<type>.hyperparameters.rank_schedule`` (or ``r``) and creates nothing; a good one is
stored with r = its final rank, the rank the adapter is published at."""

from __future__ import annotations

import pytest
from api_helpers import assert_problem, create_job, new_tenant, uploaded_file

HP = "method.lora.hyperparameters"
GROW = [[0, 4], [1, 8], [2, 16]]


def method(type_: str = "lora", **hp) -> dict:
    return {"method": {"type": type_, type_: {"hyperparameters": hp}}}


@pytest.mark.parametrize("body,code,param,words", [
    # the schedule alone (workers.spec)
    (method(rank_schedule=[[1, 4], [2, 8]]), "validation_error", f"{HP}.rank_schedule", "epoch 0"),
    (method(rank_schedule=[[0, 4], [2, 8], [1, 16]]), "validation_error", f"{HP}.rank_schedule", "increasing"),
    (method(rank_schedule=[[0, 8], [1, 8]]), "validation_error", f"{HP}.rank_schedule", "increasing"),
    (method(rank_schedule=[[0, 8], [1, 4]]), "validation_error", f"{HP}.rank_schedule", "increasing"),
    (method(rank_schedule=[[0, 0], [1, 4]]), "validation_error", f"{HP}.rank_schedule", "rank in 1-256"),
    (method(rank_schedule=[[0, 4], [50, 8]]), "validation_error", f"{HP}.rank_schedule", "epoch in 0-49"),
    (method(rank_schedule=[[0, 4, 8]]), "validation_error", f"{HP}.rank_schedule.0", "at most 2"),
    (method(rank_schedule=[]), "validation_error", f"{HP}.rank_schedule", "at least 1"),
    (method(rank_schedule=[[0, "4"]]), "validation_error", f"{HP}.rank_schedule.0.1", "integer"),
    # against the base model and the other fields (service.catalog.limits)
    (method(rank_schedule=[[0, 16], [1, 128]]), "invalid_hyperparameters", f"{HP}.rank_schedule", "maximum rank 64"),
    (method(rank_schedule=GROW, r=8), "invalid_hyperparameters", f"{HP}.r", "final"),
    (method(rank_schedule=GROW, n_epochs=2), "invalid_hyperparameters", f"{HP}.rank_schedule", "trains 2 epochs"),
    ({**method(rank_schedule=GROW), "hyperparameters": {"n_epochs": 2}}, "invalid_hyperparameters",
     f"{HP}.rank_schedule", "trains 2 epochs"),
    # n_epochs left `auto`: chosen from the (small) file at create, at most 25 epochs
    (method(rank_schedule=[[0, 4], [30, 8]]), "invalid_hyperparameters", f"{HP}.rank_schedule", "auto"),
    (method(rank_schedule=GROW, n_epochs=3, init_lora_weights="pissa"), "invalid_hyperparameters",
     f"{HP}.rank_schedule", "B non-zero"),
    (method(rank_schedule=GROW, n_epochs=3, init_lora_weights="orthogonal"), "invalid_hyperparameters",
     f"{HP}.rank_schedule", "B non-zero"),
    (method("qlora", rank_schedule=[[0, 4], [2, 8]], n_epochs=2), "invalid_hyperparameters",
     "method.qlora.hyperparameters.rank_schedule", "trains 2 epochs"),
    # not a hyperparameter of AdaLoRA (whose ranks shrink by its own budget) nor of the others
    (method("adalora", rank_schedule=GROW), "validation_error", "method.adalora.hyperparameters.rank_schedule",
     "Extra inputs"),
    (method("ia3", rank_schedule=GROW), "validation_error", "method.ia3.hyperparameters.rank_schedule",
     "Extra inputs"),
])
def test_a_bad_schedule_is_a_422_naming_the_field(client, body, code, param, words):
    t = new_tenant(client)
    file_id = uploaded_file(client, t)
    got = assert_problem(create_job(client, t, file_id, **body), 422, code, param)
    assert words in got["detail"], got["detail"]
    assert client.get("/v1/fine_tuning/jobs", headers=t.headers).json()["data"] == []


@pytest.mark.parametrize("extra", [{}, {"r": 16, "lora_alpha": 8, "use_dora": True}, {"use_rslora": True}])
def test_a_schedule_is_stored_with_r_its_final_rank(client, tenant, extra):
    file_id = uploaded_file(client, tenant)
    r = create_job(client, tenant, file_id, **method("qlora", rank_schedule=GROW, n_epochs=3, **extra))
    assert r.status_code == 201, r.text
    hp = client.get(f"/v1/fine_tuning/jobs/{r.json()['id']}", headers=tenant.headers).json()["method"]["qlora"]["hyperparameters"]
    assert hp["rank_schedule"] == GROW and hp["r"] == 16
    assert hp["lora_alpha"] == extra.get("lora_alpha", 32)  # the default, 2r, of the final rank


def test_a_schedule_within_the_auto_epochs_is_accepted(client, tenant):
    file_id = uploaded_file(client, tenant)
    r = create_job(client, tenant, file_id, **method(rank_schedule=[[0, 4], [1, 8]]))
    assert r.status_code == 201, r.text
    job = r.json()
    assert "n_epochs" in job["auto_hyperparameters"] and job["hyperparameters"]["n_epochs"] > 1
