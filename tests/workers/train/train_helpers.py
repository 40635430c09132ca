"""Building TrainJobSpecs over the shipped demo data for the train tests."""

from __future__ import annotations

import hashlib
from pathlib import Path

from workers.spec import BaseModelRef, Hyperparameters, TrainJobSpec
from workers.storage import put_bytes

DEMO = Path(__file__).resolve().parents[3] / "workers" / "data" / "demo"


def put_dataset(store, key: str, lines: list[bytes] | None = None, n: int = 32,
                name: str = "pirate_chat.jsonl") -> str:
    data = b"".join(lines) if lines is not None else b"".join((DEMO / name).read_bytes().splitlines(True)[:n])
    put_bytes(store, key, data)
    return hashlib.sha256(data).hexdigest()


def make_spec(store, job: str, *, method="lora", data_key=None, validation=True, base_uri=None,
              hp: dict | None = None, hyperparameters=None, **kw) -> TrainJobSpec:
    data_key = data_key or f"tenants/tn_a/files/{job}.jsonl"
    sha = kw.pop("sha", None) or put_dataset(store, data_key)
    if validation:
        put_dataset(store, f"tenants/tn_a/files/{job}-val.jsonl", n=16)
    hp = {"n_epochs": 2, "batch_size": 8, "gradient_accumulation_steps": 1, "learning_rate": 5e-3, "r": 16,
          "target_modules": "all-linear", **(hp or {})}
    return TrainJobSpec(
        job_id=job, tenant_id="tn_a",
        base_model=BaseModelRef(id="lorafleet/tiny-llama", uri=base_uri or "builtin://lorafleet/tiny-llama"),
        method=method, hyperparameters=hyperparameters or Hyperparameters(**hp),
        training_file=data_key, training_file_sha256=sha,
        validation_file=f"tenants/tn_a/files/{job}-val.jsonl" if validation else None,
        output_prefix=f"tenants/tn_a/adapters/ft-{job}/v1", adapter_id=f"ft-{job}",
        checkpoint_prefix=f"tenants/tn_a/jobs/{job}/checkpoints", object_store_url=store.url, **kw)
