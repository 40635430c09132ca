"""`auto` hyperparameters (the default): chosen from the training file's size at job creation,
stored on the job, shown by GET with the names chosen, and never over a value the request gave.
Whether the defaults learn is tests/workers/train/test_train_auto.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from api_helpers import create_job, upload

from service.jobs.auto import auto_batch_size, auto_epochs, auto_multiplier, optimizer_steps, resolve_auto
from workers.spec import MAX_EFFECTIVE_BATCH, Hyperparameters

DEMO = Path(__file__).resolve().parents[2] / "workers" / "data" / "demo"


@pytest.mark.parametrize(("examples", "epochs"), [(1, 25), (40, 25), (150, 10), (200, 8), (500, 3),
                                                  (8_333, 3), (8_334, 2), (20_000, 1), (100_000, 1)])
def test_epochs_put_the_examples_seen_in_the_target_range(examples, epochs):
    assert auto_epochs(examples) == epochs


def test_batch_size_keeps_eight_steps_an_epoch_and_fits_the_tokens():
    # 150 short examples, accumulation 4: 150 // 32 = 4 per micro-batch
    assert auto_batch_size(150, 17_174, max_seq_length=512, accumulation=4) == 4
    assert auto_batch_size(10, 1_000, max_seq_length=512, accumulation=4) == 1  # never 0
    # many long examples: the token budget (4,096 a micro-batch) decides: 4096 / 500 -> 8
    assert auto_batch_size(100_000, 100_000 * 2_000, max_seq_length=512, accumulation=4) == 8
    # many short ones: at most 16, and a power of two
    assert auto_batch_size(1_000_000, 10**8, max_seq_length=512, accumulation=1) == 16
    assert auto_batch_size(100, 100 * 40, max_seq_length=512, accumulation=1) == 8  # 100 // 8 = 12 -> 8
    # never over the effective-batch limit
    assert auto_batch_size(10**7, 10**9, max_seq_length=64, accumulation=256) * 256 <= MAX_EFFECTIVE_BATCH


def test_short_runs_get_a_larger_rate_within_bounds():
    assert optimizer_steps(150, batch_size=4, accumulation=4, epochs=10) == 100  # ceil(ceil(150/4)/4) x 10
    assert auto_multiplier(100) == 10.0
    assert auto_multiplier(50) == 10.0  # at most 10x
    assert auto_multiplier(400) == 2.5
    assert auto_multiplier(5_000) == 1.0  # a long run keeps the chapter's rate


def test_only_the_auto_fields_change():
    hp = Hyperparameters(n_epochs=7, batch_size=2, learning_rate=1e-3)
    out = resolve_auto(hp, frozenset({"n_epochs"}), examples=150, file_bytes=17_174)
    assert (out.n_epochs, out.batch_size, out.learning_rate) == (10, 2, 1e-3)
    out = resolve_auto(hp, frozenset({"learning_rate_multiplier"}), examples=150, file_bytes=17_174)
    steps = optimizer_steps(150, batch_size=2, accumulation=4, epochs=7)  # 133
    assert out.learning_rate == pytest.approx(Hyperparameters().learning_rate * 1_000 / steps, rel=1e-3)


def _events(client, tenant, job_id):
    return client.get(f"/v1/fine_tuning/jobs/{job_id}/events", headers=tenant.headers,
                      params={"order": "asc"}).json()["data"]


def test_a_job_with_defaults_gets_values_chosen_from_its_file(client, tenant):
    data = (DEMO / "answer_format.jsonl").read_bytes()
    file_id = upload(client, tenant, data, name="answer_format.jsonl").json()["id"]
    r = create_job(client, tenant, file_id)
    assert r.status_code == 201, r.text
    job = r.json()
    expected = resolve_auto(Hyperparameters(), frozenset({"n_epochs", "batch_size", "learning_rate_multiplier"}),
                            examples=150, file_bytes=len(data))
    assert job["hyperparameters"] == {"n_epochs": expected.n_epochs, "batch_size": expected.batch_size,
                                      "learning_rate_multiplier": pytest.approx(
                                          expected.learning_rate / Hyperparameters().learning_rate)}
    assert expected.n_epochs == 10
    assert job["auto_hyperparameters"] == ["batch_size", "learning_rate_multiplier", "n_epochs"]
    assert job["method"]["lora"]["hyperparameters"]["n_epochs"] == expected.n_epochs  # what the worker gets
    again = client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=tenant.headers).json()
    assert again["hyperparameters"] == job["hyperparameters"] and again["auto_hyperparameters"] == job["auto_hyperparameters"]
    (chosen,) = [e for e in _events(client, tenant, job["id"]) if e["data"] and "auto" in e["data"]]
    assert chosen["message"].startswith("Chosen for 150 training examples (auto): n_epochs=10, batch_size=")


def test_values_given_anywhere_are_kept(client, tenant):
    data = (DEMO / "answer_format.jsonl").read_bytes()
    file_id = upload(client, tenant, data, name="answer_format.jsonl").json()["id"]
    top = create_job(client, tenant, file_id, hyperparameters={"n_epochs": 2, "batch_size": "auto"}).json()
    assert top["hyperparameters"]["n_epochs"] == 2
    assert top["auto_hyperparameters"] == ["batch_size", "learning_rate_multiplier"]
    own = create_job(client, tenant, file_id, method={"type": "lora", "lora": {"hyperparameters": {
        "n_epochs": 1, "batch_size": 2, "learning_rate": 1e-3}}}).json()
    assert (own["hyperparameters"]["n_epochs"], own["hyperparameters"]["batch_size"]) == (1, 2)
    assert own["hyperparameters"]["learning_rate_multiplier"] == pytest.approx(5.0)
    assert own["auto_hyperparameters"] == []
    assert not [e for e in _events(client, tenant, own["id"]) if e["data"] and "auto" in e["data"]]
