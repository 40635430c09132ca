"""Hyperparameter limits at job creation: each bound is a 422 naming its field, nothing is
created; what the base model cannot train or serving cannot apply is refused now, not later."""

from __future__ import annotations

import pytest
from api_helpers import ADMIN, assert_problem, create_job, new_tenant, uploaded_file

HP = "method.lora.hyperparameters"


def lora(**hp) -> dict:
    return {"method": {"type": "lora", "lora": {"hyperparameters": hp}}}


@pytest.mark.parametrize("body,code,param", [
    # single-field bounds (workers.spec.Hyperparameters)
    (lora(learning_rate=1.0), "validation_error", f"{HP}.learning_rate"),
    (lora(learning_rate=0.0101), "validation_error", f"{HP}.learning_rate"),
    (lora(max_seq_length=131072), "validation_error", f"{HP}.max_seq_length"),
    (lora(batch_size=1024), "validation_error", f"{HP}.batch_size"),
    (lora(gradient_accumulation_steps=1024), "validation_error", f"{HP}.gradient_accumulation_steps"),
    (lora(n_epochs=51), "validation_error", f"{HP}.n_epochs"),
    (lora(r=257), "validation_error", f"{HP}.r"),
    (lora(lora_alpha=4096), "validation_error", f"{HP}.lora_alpha"),
    (lora(lora_dropout=0.6), "validation_error", f"{HP}.lora_dropout"),
    (lora(warmup_ratio=0.9), "validation_error", f"{HP}.warmup_ratio"),
    (lora(eval_steps=10**7), "validation_error", f"{HP}.eval_steps"),
    (lora(checkpoint_steps=10**7), "validation_error", f"{HP}.checkpoint_steps"),
    (lora(target_modules=["q_proj"] * 100_000), "validation_error", f"{HP}.target_modules"),
    (lora(target_modules="x" * 201), "validation_error", f"{HP}.target_modules"),
    ({"hyperparameters": {"learning_rate_multiplier": 51}}, "validation_error",
     "hyperparameters.learning_rate_multiplier"),
    ({"hyperparameters": {"n_epochs": 51}}, "validation_error", "hyperparameters.n_epochs"),
    ({"hyperparameters": {"batch_size": 257}}, "validation_error", "hyperparameters.batch_size"),
    # against the base model and across fields (service.catalog.limits)
    (lora(max_seq_length=4096), "invalid_hyperparameters", f"{HP}.max_seq_length"),  # context 2048
    (lora(batch_size=256, gradient_accumulation_steps=8), "invalid_hyperparameters",
     f"{HP}.gradient_accumulation_steps"),
    (lora(batch_size=256, max_seq_length=2048), "invalid_hyperparameters", f"{HP}.batch_size"),
    (lora(r=128), "invalid_hyperparameters", f"{HP}.r"),  # the base's max_rank is 64
    (lora(target_modules=["does_not_exist"]), "invalid_hyperparameters", f"{HP}.target_modules"),
    (lora(target_modules=["q_proj", "lm_head"]), "invalid_hyperparameters", f"{HP}.target_modules"),
    (lora(target_modules=["model.layers.4.self_attn.q_proj"]), "invalid_hyperparameters",
     f"{HP}.target_modules"),  # the model has layers 0-3
    (lora(target_modules=["mlp.q_proj"]), "invalid_hyperparameters", f"{HP}.target_modules"),
    (lora(target_modules=".*"), "invalid_hyperparameters", f"{HP}.target_modules"),  # norms, lm_head…
    (lora(target_modules="nothing_matches"), "invalid_hyperparameters", f"{HP}.target_modules"),
])
def test_each_limit_is_a_422_naming_its_field(client, body, code, param):
    t = new_tenant(client)
    file_id = uploaded_file(client, t)
    got = assert_problem(create_job(client, t, file_id, **body), 422, code)
    # ``int | "auto"`` fields: pydantic adds the union member's tag (".constrained-int") today.
    assert got["param"] == param or got["param"].startswith(param + ".constrained-"), got
    assert client.get("/v1/fine_tuning/jobs", headers=t.headers).json()["data"] == []


def test_the_bad_target_modules_are_named(client, tenant):
    file_id = uploaded_file(client, tenant)
    r = create_job(client, tenant, file_id, **lora(target_modules=["q_proj", "does_not_exist", "qkv_proj"]))
    detail = assert_problem(r, 422, "invalid_hyperparameters", f"{HP}.target_modules")["detail"]
    assert "'does_not_exist'" in detail and "'qkv_proj'" in detail and "'q_proj'" not in detail


@pytest.mark.parametrize("hp", [
    dict(learning_rate=0.01, max_seq_length=2048, batch_size=128, gradient_accumulation_steps=8),
    dict(target_modules=["self_attn.q_proj", "model.layers.3.mlp.down_proj", "3.mlp.up_proj", "v_proj"]),
    dict(target_modules=r"model\.layers\.[0-3]\.self_attn\.(q|v)_proj"),
    dict(target_modules="all-linear", r=64, lora_alpha=2048, n_epochs=50, lora_dropout=0.5),
    dict(bias="all"), dict(bias="lora_only"),  # served (tests/workers/serve/test_serve_bias.py)
])
def test_values_at_the_limits_are_accepted(client, tenant, hp):
    file_id = uploaded_file(client, tenant)
    r = create_job(client, tenant, file_id, **lora(**hp))
    assert r.status_code == 201, r.text


def test_a_catastrophic_regex_is_refused_quickly(client, tenant):
    """A regex that would backtrack for seconds per module name in the worker's ``re`` is
    refused by its shape; on a registered llama base of unknown depth, names may use any layer."""
    client.post("/v1/admin/models", json={"id": "acme/llama-x", "source_uri": "s3://m/x",
                                          "architecture": "LlamaForCausalLM", "max_rank": 64}, headers=ADMIN)
    file_id = uploaded_file(client, tenant)
    r = create_job(client, tenant, file_id, model="acme/llama-x",
                   **lora(target_modules=r"(model|\w+|\.|\d+)*_projx"))
    body = assert_problem(r, 422, "invalid_hyperparameters", f"{HP}.target_modules")
    assert "exponential time" in body["detail"]
    # The same base takes ordinary names, any layer index (its depth is unknown).
    r = create_job(client, tenant, file_id, model="acme/llama-x",
                   **lora(target_modules=["layers.70.self_attn.q_proj"], max_seq_length=8192))
    assert r.status_code == 201, r.text


def test_static_metadata_matches_the_real_models():
    """The control plane's torch-free module list and built-in facts against the real thing."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from service.catalog.architectures import BUILTIN, SERVABLE_LINEAR, full_names
    from workers.models.tiny_llama import ARCH
    from workers.serve.lora import DEFAULT_WRAPPED

    assert tuple(SERVABLE_LINEAR) == DEFAULT_WRAPPED
    facts = BUILTIN["builtin://lorafleet/tiny-llama"]
    assert (facts.layers, facts.context) == (ARCH["num_hidden_layers"], ARCH["max_position_embeddings"])
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(vocab_size=64, **ARCH))
    modules = dict(model.named_modules())
    servable, others = full_names(facts.layers)
    linear = {n for n, m in modules.items() if isinstance(m, torch.nn.Linear)}
    assert linear == set(servable) | {"lm_head"}
    assert set(modules) - {""} == set(servable) | set(others)


def test_bias_is_refused_on_a_base_of_unknown_architecture(client, tenant):
    """Serving applies trained biases of the layers it wraps; on an architecture we do not know,
    bias="all" could train others."""
    client.post("/v1/admin/models", json={"id": "acme/mystery", "source_uri": "s3://m/y", "max_rank": 64},
                headers=ADMIN)
    file_id = uploaded_file(client, tenant)
    for bias in ("all", "lora_only"):
        r = create_job(client, tenant, file_id, model="acme/mystery", **lora(bias=bias))
        assert_problem(r, 422, "invalid_hyperparameters", f"{HP}.bias")
    r = create_job(client, tenant, file_id, model="acme/mystery", **lora(bias="none"))
    assert r.status_code == 201, r.text
