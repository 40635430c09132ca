"""Every chapter method through `POST /v1/fine_tuning/jobs`: defaults, accepted configurations,
the combinations we cannot train or serve (a 422 naming the field, nothing created), and the
method with its config on the published adapter (`GET /v1/models/{id}`)."""

from __future__ import annotations

import pytest
from api_helpers import ADMIN, assert_problem, create_job, new_tenant, publish_adapter, running_job, uploaded_file

from service.catalog.repository import DEFAULT_BASE_MODEL, ensure_base_model
from service.db.models import BaseModelRow
from workers.spec import METHODS

# What a job with only method.type gets (docs/API.md, "Methods"); its learning rate is the
# method's own (BASE_RATES) times the multiplier `auto` chose for the file.
BASE_RATES = {"lora": 2e-4, "qlora": 2e-4, "ia3": 1e-1, "adalora": 1e-2, "prefix_tuning": 1e-2,
              "prompt_tuning": 3e-2, "p_tuning": 3e-4}
DEFAULTS = {
    "lora": {"r": 8, "lora_alpha": 16.0, "use_dora": False, "use_rslora": False,
             "init_lora_weights": "default", "batching": "pack"},
    "qlora": {"r": 8, "lora_alpha": 16.0},
    "ia3": {"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"],
            "quantization": "none"},
    "adalora": {"init_r": 12, "target_r": 8, "lora_alpha": 24.0, "tinit": 0, "tfinal": 0, "delta_t": 1,
                "beta1": 0.85, "beta2": 0.85, "orth_reg_weight": 0.5},
    "prefix_tuning": {"num_virtual_tokens": 20, "prefix_projection": False, "encoder_hidden_size": None,
                      "batching": "pad"},
    "prompt_tuning": {"num_virtual_tokens": 50, "init": "random", "init_text": None, "batching": "pad"},
    "p_tuning": {"num_virtual_tokens": 50, "encoder_reparameterization_type": "LSTM",
                 "encoder_hidden_size": 256, "encoder_num_layers": 2, "encoder_dropout": 0.0,
                 "batching": "pad"},
}


def method(type_: str, **hp) -> dict:
    return {"type": type_, **({type_: {"hyperparameters": hp}} if hp else {})}


@pytest.mark.parametrize("type_", METHODS)
def test_each_method_with_defaults(client, tenant, type_):
    r = create_job(client, tenant, uploaded_file(client, tenant), method=method(type_))
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["method"]["type"] == type_ and job["status"] == "queued"
    hp = job["method"][type_]["hyperparameters"]
    assert {k: hp[k] for k in DEFAULTS[type_]} == DEFAULTS[type_]
    multiplier = job["hyperparameters"]["learning_rate_multiplier"]
    assert hp["learning_rate"] == pytest.approx(BASE_RATES[type_] * multiplier) and multiplier > 0
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=tenant.headers).json()["method"] == job["method"]


@pytest.mark.parametrize("type_,hp", [
    ("lora", {"use_dora": True, "use_rslora": True, "bias": "all", "target_modules": "all-linear"}),
    ("lora", {"init_lora_weights": "pissa", "r": 16}),
    ("lora", {"init_lora_weights": "olora"}),
    ("lora", {"init_lora_weights": "gaussian"}),
    ("lora", {"init_lora_weights": "orthogonal", "r": 4}),
    ("qlora", {"use_dora": True, "init_lora_weights": "gaussian"}),
    ("ia3", {"target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"],
             "feedforward_modules": ["up_proj", "down_proj"], "quantization": "nf4"}),
    ("ia3", {"target_modules": "all-linear", "feedforward_modules": ["mlp.down_proj"]}),
    ("adalora", {"init_r": 16, "target_r": 4, "tinit": 2, "tfinal": 2, "delta_t": 2, "lora_alpha": 8.0,
                 "quantization": "nf4"}),
    ("prefix_tuning", {"num_virtual_tokens": 8, "prefix_projection": True, "encoder_hidden_size": 64}),
    ("prompt_tuning", {"init": "text", "init_text": "Answer like a pirate."}),
    ("p_tuning", {"encoder_reparameterization_type": "LSTM", "encoder_hidden_size": 32,
                  "encoder_num_layers": 1, "encoder_dropout": 0.1}),
])
def test_method_configurations_accepted_as_given(client, tenant, type_, hp):
    r = create_job(client, tenant, uploaded_file(client, tenant), method=method(type_, **hp))
    assert r.status_code == 201, r.text
    stored = r.json()["method"][type_]["hyperparameters"]
    assert {k: stored[k] for k in hp} == hp


def test_learning_rate_multiplier_scales_the_methods_own_rate(client, tenant):
    r = create_job(client, tenant, uploaded_file(client, tenant), method=method("prompt_tuning"),
                   hyperparameters={"learning_rate_multiplier": 0.5})
    assert r.status_code == 201, r.text
    assert r.json()["method"]["prompt_tuning"]["hyperparameters"]["learning_rate"] == pytest.approx(1.5e-2)
    assert r.json()["hyperparameters"]["learning_rate_multiplier"] == pytest.approx(0.5)


P = "method.{}.hyperparameters.{}"


@pytest.mark.parametrize("body_method,code,param", [
    # Shapes: each method takes its own fields only, within its own bounds.
    (method("ia3", r=8), "validation_error", P.format("ia3", "r")),
    (method("prefix_tuning", batching="pack"), "validation_error", P.format("prefix_tuning", "batching")),
    (method("prompt_tuning", learning_rate=1.5), "validation_error", P.format("prompt_tuning", "learning_rate")),
    (method("adalora", learning_rate=0.1), "validation_error", P.format("adalora", "learning_rate")),
    (method("p_tuning", encoder_reparameterization_type="GRU"), "validation_error",
     P.format("p_tuning", "encoder_reparameterization_type")),
    (method("lora", init_lora_weights="loftq"), "validation_error", P.format("lora", "init_lora_weights")),
    (method("lora", quantization="nf4"), "validation_error", P.format("lora", "quantization")),
    (method("prompt_tuning", num_virtual_tokens=0), "validation_error",
     P.format("prompt_tuning", "num_virtual_tokens")),
    ({"type": "lora", "ia3": {}}, "validation_error", "method"),
    # Combinations we cannot train or serve.
    (method("qlora", init_lora_weights="pissa"), "invalid_hyperparameters", P.format("qlora", "init_lora_weights")),
    (method("qlora", init_lora_weights="olora"), "invalid_hyperparameters", P.format("qlora", "init_lora_weights")),
    (method("lora", init_lora_weights="pissa", r=64), "invalid_hyperparameters", P.format("lora", "r")),
    (method("lora", init_lora_weights="orthogonal", r=3), "invalid_hyperparameters", P.format("lora", "r")),
    (method("lora", modules_to_save=["lm_head"]), "invalid_hyperparameters", P.format("lora", "modules_to_save")),
    (method("ia3", feedforward_modules=["up_proj"]), "invalid_hyperparameters",
     P.format("ia3", "feedforward_modules")),
    (method("ia3", target_modules=["embed_tokens"]), "invalid_hyperparameters", P.format("ia3", "target_modules")),
    (method("ia3", target_modules="all-linear", feedforward_modules=["lm_head"]), "invalid_hyperparameters",
     P.format("ia3", "feedforward_modules")),
    (method("adalora", init_r=128), "invalid_hyperparameters", P.format("adalora", "init_r")),
    (method("adalora", init_r=4, target_r=8), "invalid_hyperparameters", P.format("adalora", "target_r")),
    (method("adalora", target_modules=["lm_head"]), "invalid_hyperparameters", P.format("adalora", "target_modules")),
    (method("prefix_tuning", encoder_hidden_size=64), "invalid_hyperparameters",
     P.format("prefix_tuning", "encoder_hidden_size")),
    (method("prompt_tuning", init="text"), "invalid_hyperparameters", P.format("prompt_tuning", "init_text")),
    (method("prompt_tuning", init_text="hello"), "invalid_hyperparameters", P.format("prompt_tuning", "init_text")),
    (method("p_tuning", encoder_reparameterization_type="MLP", encoder_num_layers=3), "invalid_hyperparameters",
     P.format("p_tuning", "encoder_num_layers")),
    # tiny-llama's context is 2,048 positions; the virtual tokens take some of them.
    (method("p_tuning", max_seq_length=2040, num_virtual_tokens=20), "invalid_hyperparameters",
     P.format("p_tuning", "max_seq_length")),
])
def test_combinations_we_cannot_train_or_serve_are_refused(client, body_method, code, param):
    t = new_tenant(client)
    assert_problem(create_job(client, t, uploaded_file(client, t), method=body_method), 422, code, param)
    assert client.get("/v1/fine_tuning/jobs", headers=t.headers).json()["data"] == []


def test_a_base_model_allows_only_its_methods(client, tenant):
    r = client.post("/v1/admin/models", json={"id": "acme/ia3-only", "source_uri": "s3://m/ia3",
                                              "architecture": "llama", "methods": ["ia3"], "max_rank": 8},
                    headers=ADMIN)
    assert r.status_code == 201, r.text
    file_id = uploaded_file(client, tenant)
    assert create_job(client, tenant, file_id, model="acme/ia3-only", method=method("ia3")).status_code == 201
    assert_problem(create_job(client, tenant, file_id, model="acme/ia3-only", method=method("prefix_tuning")),
                   422, "validation_error", "method.type")
    listed = client.get("/v1/admin/models", headers=ADMIN).json()["data"]
    assert next(m for m in listed if m["id"] == "lorafleet/tiny-llama")["methods"] == list(METHODS)


def test_default_base_registered_by_an_older_release_gains_the_new_methods(session):
    ensure_base_model(session, **{**DEFAULT_BASE_MODEL, "methods": ["qlora", "lora"]})
    ensure_base_model(session, **DEFAULT_BASE_MODEL)
    row = session.get(BaseModelRow, DEFAULT_BASE_MODEL["id"])
    assert row.methods == ["qlora", "lora", *(m for m in METHODS if m not in ("lora", "qlora"))]


@pytest.mark.parametrize("type_", ["adalora", "prefix_tuning"])
def test_published_adapter_records_its_method_and_config(client, app, tenant, other_tenant, type_):
    job_id, token = running_job(client, app, tenant, method=method(type_, n_epochs=2))
    r = client.post(f"/internal/v1/jobs/{job_id}/result", headers={"Authorization": f"Bearer {token}"},
                    json={"manifest_key": publish_adapter(app, job_id, method=type_)})
    assert r.status_code == 200, r.text
    adapter_id = r.json()["adapter_id"]
    model = client.get(f"/v1/models/{adapter_id}", headers=tenant.headers).json()
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=tenant.headers).json()
    assert model["method"] == job["method"] and model["method"][type_]["hyperparameters"]["n_epochs"] == 2
    listed = client.get("/v1/models", headers=tenant.headers).json()["data"]
    assert next(m for m in listed if m["id"] == adapter_id)["method"] == {"type": type_}
    assert next(m for m in listed if m["id"] == "lorafleet/tiny-llama")["method"] is None
    assert client.get(f"/v1/adapters/{adapter_id}", headers=tenant.headers).json()["method"] == type_
    assert_problem(client.get(f"/v1/models/{adapter_id}", headers=other_tenant.headers), 404, "model_not_found")
