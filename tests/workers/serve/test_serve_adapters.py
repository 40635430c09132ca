"""The adapter cache over a real object store (local folder and the S3 endpoint)."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from workers.serve import synthetic
from workers.serve.adapters import (
    AdapterBaseMismatch,
    AdapterCache,
    AdapterChecksumMismatch,
    AdapterError,
    AdapterNotFound,
)
from workers.serve.engine import Engine
from workers.serve.sampling import SamplingParams
from workers.storage import put_bytes

BASE_ID = "test/tiny-random-llama"  # the base the tiny fixture's adapters are published for


def publish(tiny, store, name: str, *, version: int = 1, base: str = BASE_ID, source: str | None = None):
    prefix = f"tenants/tn_a/adapters/{name}/v{version}"
    synthetic.publish_adapter(store, tiny.adapter_dirs[source or name], prefix, adapter_id=name,
                              base_model_id=base)
    return prefix


def same_weights(a, b) -> bool:
    return a.weights.keys() == b.weights.keys() and all(
        torch.equal(a.weights[k][0], b.weights[k][0]) and torch.equal(a.weights[k][1], b.weights[k][1])
        for k in a.weights)


def test_loads_verifies_and_matches_the_peft_files(tiny, object_store):
    prefix = publish(tiny, object_store, "ad16")
    cache = AdapterCache(object_store, base_model_id=BASE_ID)
    adapter = asyncio.run(cache.get("ad16", prefix))
    assert same_weights(adapter, tiny.adapter("ad16")) and adapter.scale == tiny.adapter("ad16").scale
    assert cache.metrics["misses"] == 1 and cache.metrics["loads"] == 1
    assert cache.metrics["load_seconds_last"] > 0


def test_ten_concurrent_requests_for_a_cold_adapter_cause_one_load(tiny, s3_store):
    prefix = publish(tiny, s3_store, "ad8")
    cache = AdapterCache(s3_store, base_model_id=BASE_ID)

    async def main():
        return await asyncio.gather(*(cache.get("ad8", prefix) for _ in range(10)))

    adapters = asyncio.run(main())
    assert all(a is adapters[0] for a in adapters)
    assert cache.metrics["loads"] == 1 and cache.metrics["misses"] == 1 and cache.metrics["hits"] == 9


def test_checksum_mismatch_is_refused(tiny, local_store):
    prefix = publish(tiny, local_store, "ad8")
    raw = json.loads((tiny.adapter_dirs["ad8"] / "adapter_config.json").read_text())
    raw["lora_alpha"] = 1000  # a tampered file: same name, other bytes
    put_bytes(local_store, f"{prefix}/adapter_config.json", json.dumps(raw).encode())
    cache = AdapterCache(local_store, base_model_id=BASE_ID)
    with pytest.raises(AdapterChecksumMismatch, match="adapter_config.json has sha256"):
        asyncio.run(cache.get("ad8", prefix))
    assert cache.metrics["load_errors"] == 1 and cache.stats()["host"]["adapters"] == 0


def test_an_adapter_for_another_base_is_refused(tiny, local_store):
    prefix = publish(tiny, local_store, "ad8", base="someone/else-7b")
    cache = AdapterCache(local_store, base_model_id=BASE_ID)
    with pytest.raises(AdapterBaseMismatch, match="trained for base model 'someone/else-7b'"):
        asyncio.run(cache.get("ad8", prefix))


def test_a_missing_adapter_is_not_found(local_store, caplog):
    cache = AdapterCache(local_store, base_model_id=BASE_ID)
    with pytest.raises(AdapterNotFound) as missing:
        asyncio.run(cache.get("ft-nope", "tenants/tn_a/adapters/ft-nope/v1"))
    # The tenant reads our words and the id; the object-store key is for our log only.
    assert str(missing.value) == "adapter 'ft-nope' was not found; it may have been deleted"
    assert "tenants/tn_a/adapters/ft-nope/v1/manifest.json" in caplog.text


def test_a_manifest_for_another_adapter_names_no_storage_path(tiny, local_store, caplog):
    prefix = publish(tiny, local_store, "ad8")
    cache = AdapterCache(local_store, base_model_id=BASE_ID)
    with pytest.raises(AdapterError) as refused:
        asyncio.run(cache.get("ft-other", prefix))
    assert refused.value.code == "adapter_invalid"
    assert "tenants/" not in str(refused.value) and "'ad8'" not in str(refused.value)
    assert str(refused.value) == "adapter 'ft-other': its manifest.json describes another adapter"
    assert prefix in caplog.text


def test_host_tier_evicts_at_count_and_bytes_and_reloads_correctly(tiny, local_store, prompts):
    prefixes = {n: publish(tiny, local_store, n) for n in ("ad8", "ad16", "mlp8")}
    engine = Engine(tiny.base_model(), max_batch=2, max_len=64, adapter_slots=1)
    cache = AdapterCache(local_store, base_model_id=BASE_ID, device=engine.slots, max_host_adapters=2)
    text = prompts([6], seed=11)[0]
    greedy = SamplingParams(max_tokens=8, temperature=0)

    def answer(name):
        adapter = asyncio.run(cache.get(name, prefixes[name]))
        return engine.generate_batch([text], greedy, [adapter])[0].output_ids

    first = {n: answer(n) for n in ("ad8", "ad16", "mlp8")}  # ad8 leaves the host tier
    assert cache.metrics["evictions"] == 1 and cache.stats()["host"]["adapters"] == 2
    assert answer("ad8") == first["ad8"] == tiny.reference(text, "ad8", 8)  # reloaded, unchanged
    assert cache.metrics["loads"] == 4
    # Bytes: room for about one rank-16 adapter only; a pinned adapter stays regardless.
    small = AdapterCache(local_store, base_model_id=BASE_ID, max_host_bytes=tiny.adapter("ad16").nbytes)
    small.pin("ad8")
    for name in ("ad8", "ad16", "mlp8"):
        asyncio.run(small.get(name, prefixes[name]))
    resident = {a.split("@")[0] for a in small._host}
    assert resident == {"ad8", "mlp8"} and small.metrics["evictions"] == 1


def test_new_version_replaces_the_old_and_evict_forgets(tiny, local_store, prompts):
    engine = Engine(tiny.base_model(), max_batch=2, max_len=64, adapter_slots=2)
    cache = AdapterCache(local_store, base_model_id=BASE_ID, device=engine.slots)
    text = prompts([5], seed=12)[0]
    greedy = SamplingParams(max_tokens=8, temperature=0)
    v1 = publish(tiny, local_store, "ft-x", version=1, source="ad8")
    v2 = publish(tiny, local_store, "ft-x", version=2, source="ad16")
    old = engine.generate_batch([text], greedy, [asyncio.run(cache.get("ft-x", v1))])[0].output_ids
    new = engine.generate_batch([text], greedy, [asyncio.run(cache.get("ft-x", v2))])[0].output_ids
    assert old == tiny.reference(text, "ad8", 8) and new == tiny.reference(text, "ad16", 8)
    assert cache.stats()["host"]["adapters"] == 1 and engine.slots.resident() == [f"ft-x@{v2}"]
    assert cache.evict("ft-x") and cache.stats()["host"]["adapters"] == 0 and engine.slots.resident() == []
    assert not cache.evict("ft-x")
