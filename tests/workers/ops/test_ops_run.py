"""Export and blend runs (workers.ops.run) against the object store, without Ray: the merged
model loads with plain AutoModelForCausalLM and answers like base + adapter through PEFT."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from workers.ops.ray_job import LogReporter
from workers.ops.run import OperationFailed, run_operation
from workers.spec import (
    AdapterManifest,
    BaseModelRef,
    ExportManifest,
    FileDigest,
    Hyperparameters,
    OperationAdapter,
    OperationSpec,
)
from workers.storage import download_prefix, get_bytes, put_bytes

BASE = BaseModelRef(id="lorafleet/tiny-llama", uri="builtin://lorafleet/tiny-llama")
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_llama_dir):
    from workers.models.registry import ensure_builtin
    from workers.storage import LocalStore

    s = LocalStore(tmp_path_factory.mktemp("objects"))
    ensure_builtin(BASE.id, s)
    return s


def _random_adapter(base_dir: Path, out: Path, *, seed: int, targets: list[str], r: int = 8) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False))
    for name, p in peft.named_parameters():  # PEFT's non-default init is tiny; this one changes answers
        if "lora_B" in name:
            p.data.normal_(0, 0.3)
    peft.save_pretrained(out)
    return out


def _publish(store, directory: Path, adapter_id: str, *, quantization: str = "none") -> str:
    prefix = f"tenants/tn1/adapters/{adapter_id}/v1"
    files = {}
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        data = (directory / name).read_bytes()
        put_bytes(store, f"{prefix}/{name}", data)
        files[name] = FileDigest(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    manifest = AdapterManifest(adapter_id=adapter_id, job_id="ftjob-1", tenant_id="tn1", base_model=BASE,
                               method="qlora" if quantization == "nf4" else "lora", quantization=quantization,
                               hyperparameters=Hyperparameters(), dataset_sha256="0" * 64, files=files)
    put_bytes(store, f"{prefix}/manifest.json", manifest.model_dump_json().encode())
    return prefix


def _spec(store, kind: str, adapters: list[OperationAdapter], **kw) -> OperationSpec:
    return OperationSpec(operation_id=f"{kind}-1", kind=kind, tenant_id="tn1", base_model=BASE, method="lora",
                         adapters=adapters, object_store_url=store.root.as_uri(), **kw)


def _greedy(model, tokenizer) -> list[int]:
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    return model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_exported_model_answers_like_base_plus_adapter(store, tiny_llama_dir, tmp_path, quantization):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    adapter = _random_adapter(tiny_llama_dir, tmp_path / "adapter", seed=1, targets=["q_proj", "v_proj", "down_proj"])
    prefix = _publish(store, adapter, f"ft-{quantization}", quantization=quantization)
    out = f"tenants/tn1/exports/export-{quantization}"
    spec = _spec(store, "export", [OperationAdapter(id=f"ft-{quantization}", prefix=prefix)],
                 output_prefix=out, max_shard_size="4MB")
    result = run_operation(spec, store, LogReporter())
    manifest = ExportManifest.model_validate_json(get_bytes(store, result.manifest_key))
    assert sum(name.endswith(".safetensors") for name in manifest.files) > 1  # sharded
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json"} <= manifest.files.keys()
    local = download_prefix(store, out, tmp_path / "merged")
    for name, digest in manifest.files.items():
        assert hashlib.sha256((local / name).read_bytes()).hexdigest() == digest.sha256

    merged = AutoModelForCausalLM.from_pretrained(local)
    assert not hasattr(merged.config, "quantization_config") and merged.dtype == torch.float32
    tokenizer = AutoTokenizer.from_pretrained(local)
    if quantization == "nf4":  # the 4-bit base the adapter was trained on, computing in float32
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.float32)
        base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=quant, device_map={"": "cpu"})
    else:
        base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    reference = PeftModel.from_pretrained(base, adapter)
    expected = _greedy(reference, tokenizer)
    assert _greedy(merged, tokenizer) == expected
    with reference.disable_adapter():  # the adapter matters: the base alone answers otherwise
        assert _greedy(reference, tokenizer) != expected


def test_virtual_token_adapters_are_not_merged(store, tmp_path):
    directory = tmp_path / "prefix"
    directory.mkdir()
    (directory / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 8}))
    (directory / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    prefix = _publish(store, directory, "ft-prefix")
    spec = _spec(store, "export", [OperationAdapter(id="ft-prefix", prefix=prefix)],
                 output_prefix="tenants/tn1/exports/export-prefix")
    with pytest.raises(OperationFailed, match="virtual tokens") as err:
        run_operation(spec, store, LogReporter())
    assert err.value.code == "invalid_adapter"
    assert not store.list("tenants/tn1/exports/export-prefix/")


def test_cat_blend_publishes_a_servable_adapter(store, tiny_llama_dir, tmp_path):
    from workers.serve.lora import parse_peft_adapter

    refs = []
    for i, targets in enumerate((["q_proj", "v_proj"], ["gate_proj", "up_proj"])):
        directory = _random_adapter(tiny_llama_dir, tmp_path / f"a{i}", seed=10 + i, targets=targets)
        refs.append(OperationAdapter(id=f"ft-b{i}", prefix=_publish(store, directory, f"ft-b{i}"), weight=0.5 + i))
    out = "tenants/tn1/adapters/bl-tiny-llama-mix-0123/v1"
    spec = _spec(store, "blend", refs, combination="cat", output_prefix=out, adapter_id="bl-tiny-llama-mix-0123")
    manifest = AdapterManifest.model_validate_json(get_bytes(store, run_operation(spec, store, LogReporter()).manifest_key))
    assert (manifest.adapter_id, manifest.job_id, manifest.hyperparameters.r) == ("bl-tiny-llama-mix-0123", "blend-1", 16)
    adapter = parse_peft_adapter(get_bytes(store, f"{out}/adapter_config.json"),
                                 get_bytes(store, f"{out}/adapter_model.safetensors"), key="k", adapter_id="bl")
    assert adapter.rank == 16 and adapter.scale == 1.0
    assert {m.rsplit(".", 1)[-1] for m in adapter.weights} == {"q_proj", "v_proj", "gate_proj", "up_proj"}


def test_linear_blend_of_different_ranks_fails_in_the_tenants_words(store, tiny_llama_dir, tmp_path):
    refs = [OperationAdapter(id=f"ft-r{r}", prefix=_publish(store, _random_adapter(
        tiny_llama_dir, tmp_path / f"r{r}", seed=r, targets=["q_proj"], r=r), f"ft-r{r}")) for r in (4, 8)]
    spec = _spec(store, "blend", refs, combination="linear", output_prefix="tenants/tn1/adapters/bl-x/v1",
                 adapter_id="bl-x")
    with pytest.raises(OperationFailed, match="same r") as err:
        run_operation(spec, store, LogReporter())
    assert err.value.code == "invalid_adapter"
