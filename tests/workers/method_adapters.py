"""Published adapters of every training method, trained for real in a few seconds, for tests that
need one (serving, parity, loading): ``publish_method_adapter(store, "ia3")``.

Each is a genuine run of ``workers.train.loop.run_training`` on the shipped demo data: one
optimizer step of 8 short examples, with a learning rate large enough that every adapter moves
away from its (often identity) initialisation. ``store`` must already hold tiny-llama
(the ``store_with_tiny_llama`` fixture, or ``workers.models.registry.ensure_builtin``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from workers.spec import AdapterManifest, BaseModelRef, TrainJobSpec, hyperparameters_for
from workers.storage import get_bytes, put_bytes

DEMO = Path(__file__).resolve().parents[2] / "workers" / "data" / "demo"
BASE_MODEL_ID = "lorafleet/tiny-llama"
FAST = {"n_epochs": 1, "batch_size": 8, "gradient_accumulation_steps": 1, "max_seq_length": 64,
        "warmup_ratio": 0.0, "lr_scheduler": "constant"}
# One case per method and per LoRA variant the service accepts: name → (method, hyperparameters).
CASES: dict[str, tuple[str, dict]] = {
    "lora": ("lora", {"learning_rate": 5e-3}),
    "lora_dora": ("lora", {"learning_rate": 5e-3, "use_dora": True}),
    "lora_rslora": ("lora", {"learning_rate": 5e-3, "use_rslora": True, "r": 4}),
    "lora_pissa": ("lora", {"learning_rate": 5e-3, "init_lora_weights": "pissa", "r": 4}),
    "lora_olora": ("lora", {"learning_rate": 5e-3, "init_lora_weights": "olora", "r": 4}),
    "qlora": ("qlora", {"learning_rate": 5e-3}),
    "ia3": ("ia3", {"learning_rate": 5e-2}),
    "adalora": ("adalora", {"learning_rate": 1e-2, "init_r": 6, "target_r": 2}),
    "prefix_tuning": ("prefix_tuning", {"num_virtual_tokens": 6}),
    "prompt_tuning": ("prompt_tuning", {"num_virtual_tokens": 6, "init": "text",
                                        "init_text": "Answer like a pirate."}),
    "p_tuning": ("p_tuning", {"num_virtual_tokens": 6, "encoder_hidden_size": 32}),
}
def method_spec(store, case: str, *, tenant_id: str = "tn_methods", examples: int = 8,
                dataset: str = "pirate_chat.jsonl", hp: dict | None = None, validation: bool = False) -> TrainJobSpec:
    """The job spec of ``case``: ``examples`` demo lines, one optimizer step by default;
    ``validation``: the next 8 lines as its validation file (the manifest then has eval_loss)."""
    method, overrides = CASES[case]
    lines = (DEMO / dataset).read_bytes().splitlines(True)
    data = b"".join(lines[:examples])
    job = f"ftjob-{case}-{hashlib.sha256(data).hexdigest()[:8]}"
    key = f"tenants/{tenant_id}/files/{job}.jsonl"
    put_bytes(store, key, data)
    if validation:
        put_bytes(store, f"{key}.val", b"".join(lines[examples:examples + 8]))
    return TrainJobSpec(
        job_id=job, tenant_id=tenant_id, base_model=BaseModelRef(id=BASE_MODEL_ID, uri=f"builtin://{BASE_MODEL_ID}"),
        method=method, hyperparameters=hyperparameters_for(method, {**FAST, **overrides, **(hp or {})}),
        training_file=key, training_file_sha256=hashlib.sha256(data).hexdigest(),
        validation_file=f"{key}.val" if validation else None,
        output_prefix=f"tenants/{tenant_id}/adapters/ft-{case}/v1", adapter_id=f"ft-{case}",
        checkpoint_prefix=f"tenants/{tenant_id}/jobs/{job}/checkpoints", object_store_url=store.url)


def publish_method_adapter(store, case: str, **kw) -> tuple[str, AdapterManifest]:
    """Train and publish ``case``'s adapter (once per store: a second call finds it published).
    Returns (adapter prefix in ``store``, its manifest)."""
    from workers.train.loop import run_training
    from workers.train.report import MemoryReporter

    spec = method_spec(store, case, **kw)
    result = run_training(spec, store=store, reporter=MemoryReporter(), device="cpu")
    manifest = AdapterManifest.model_validate_json(get_bytes(store, result.manifest_key))
    return spec.output_prefix, manifest
