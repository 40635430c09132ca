"""The paged LoRA memory: adapters take what their ranks and layers need, the pools move (grow,
compact) under running adapters without changing any row's tokens, both kernels equal PEFT."""

from __future__ import annotations

import asyncio

import pytest

from workers.serve import slots as slots_module
from workers.serve import synthetic
from workers.serve.adapters import AdapterCache, AdapterError
from workers.serve.engine import Engine
from workers.serve.metrics import gauge_values
from workers.serve.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=8, temperature=0)
BASE_ID = "test/tiny-random-llama"


def test_an_adapter_takes_exactly_its_ranks_of_the_layers_it_targets(tiny):
    engine = Engine(tiny.base_model(), max_batch=2, max_len=64, adapter_slots=4, max_rank=64)
    for name in ("ad8", "ad16", "mlp8"):
        adapter = tiny.adapter(name)
        real = sum((a.numel() + b.numel()) * 4 for a, b in adapter.weights.values())  # float32 pages
        assert engine.slots.bytes_needed(adapter) == real, name
    # Placing one grows the pools by what it needs, whatever max_rank says.
    before = engine.slots.usage()["bytes_allocated"]
    engine.generate_batch([[5, 6, 7]], GREEDY, [tiny.adapter("ad16")])
    usage = engine.slots.usage()
    assert usage["bytes_allocated"] - before == usage["bytes_used"] == engine.slots.bytes_needed(tiny.adapter("ad16"))
    assert usage["adapters"] == 1 and usage["bytes_budget"] is None


def test_compacting_the_pools_under_a_resident_adapter_keeps_every_row_exact(tiny, prompts):
    probe = Engine(tiny.base_model(), max_batch=4, max_len=64, adapter_slots=4)
    need = {n: probe.slots.bytes_needed(tiny.adapter(n)) for n in ("ad8", "ad16", "mlp8")}
    # ad8 and ad16 fit; mlp8 then needs ad8's bytes back, and (its own layers' pools being
    # empty) the pools compacted before they can grow within the budget.
    engine = Engine(tiny.base_model(), max_batch=4, max_len=64, adapter_slots=4,
                    max_adapter_bytes=need["ad16"] + need["mlp8"])
    texts = prompts([6, 9, 5], seed=21)
    for name in ("ad8", "ad16"):
        (req,) = engine.generate_batch([texts[0]], GREEDY, [tiny.adapter(name)])
        assert req.output_ids == tiny.reference(texts[0], name, GREEDY.max_tokens)
    generation = engine.slots.generation
    names = ["mlp8", "ad16", None]
    outs = engine.generate_batch(texts, GREEDY, [tiny.adapter(n) if n else None for n in names])
    assert engine.slots.generation > generation and engine.slots.stats["evictions"] == 1
    for prompt, name, req in zip(texts, names, outs):
        assert req.output_ids == tiny.reference(prompt, name, GREEDY.max_tokens), name
    usage = engine.slots.usage()
    zero_pages = sum(p.page_bytes for p in engine.slots.pools.values())
    assert usage["bytes_used"] == need["ad16"] + need["mlp8"] == usage["bytes_budget"]
    assert usage["bytes_free"] == 0 and usage["bytes_allocated"] - zero_pages <= usage["bytes_budget"]
    assert all(p.pages == p.used + 1 for p in engine.slots.pools.values())  # compacted: no holes


def test_the_dense_kernel_for_half_precision_pools_equals_peft(tiny, prompts, monkeypatch):
    """Torch's sparse kernels take no bf16/fp16: such pools gather the batch's distinct pages
    once per composition. Forced here on float32 to compare with PEFT exactly."""
    monkeypatch.setattr(slots_module, "SPARSE_DTYPES", ())
    engine = Engine(tiny.base_model(), max_batch=8, max_len=64, adapter_slots=4)
    names = ["ad16", "ad8", None, "mlp8", "ad8"]
    texts = prompts([5, 7, 4, 9, 6], seed=22)
    outs = engine.generate_batch(texts, GREEDY, [tiny.adapter(n) if n else None for n in names])
    assert engine.slots.current.plan(1)[0][1][0] == "dense"
    for prompt, name, req in zip(texts, names, outs):
        assert req.output_ids == tiny.reference(prompt, name, GREEDY.max_tokens), name


def test_adapters_too_large_for_the_budget_are_refused_at_load(tiny, local_store):
    engine = Engine(tiny.base_model(), max_batch=2, max_len=64, adapter_slots=4,
                    max_adapter_bytes=Engine(tiny.base_model(), max_batch=1, max_len=16).slots.bytes_needed(tiny.adapter("ad8")))
    prefix = "tenants/tn_a/adapters/ad16/v1"
    synthetic.publish_adapter(local_store, tiny.adapter_dirs["ad16"], prefix, adapter_id="ad16", base_model_id=BASE_ID)
    cache = AdapterCache(local_store, base_model_id=BASE_ID, device=engine.slots)
    with pytest.raises(AdapterError, match="adapter budget is") as refused:
        asyncio.run(cache.get("ad16", prefix))
    assert refused.value.code == "adapter_invalid"


def test_stats_and_gauges_report_bytes_and_adapters_resident(tiny, local_store, prompts):
    probe = Engine(tiny.base_model(), max_batch=1, max_len=16)
    budget = 2 * probe.slots.bytes_needed(tiny.adapter("ad16"))
    engine = Engine(tiny.base_model(), max_batch=2, max_len=64, adapter_slots=4, max_adapter_bytes=budget)
    cache = AdapterCache(local_store, base_model_id=BASE_ID, device=engine.slots)
    prefix = "tenants/tn_a/adapters/ad8/v1"
    synthetic.publish_adapter(local_store, tiny.adapter_dirs["ad8"], prefix, adapter_id="ad8", base_model_id=BASE_ID)
    engine.generate_batch(prompts([5]), GREEDY, [asyncio.run(cache.get("ad8", prefix))])
    device = cache.stats()["device"]
    used = probe.slots.bytes_needed(tiny.adapter("ad8"))
    assert (device["adapters"], device["bytes_used"], device["bytes_free"]) == (1, used, budget - used)
    gauges = gauge_values(cache.stats())
    assert gauges["lorafleet_serve_adapters_resident"] == 1
    assert gauges["lorafleet_serve_adapter_bytes_used"] == used
    assert gauges["lorafleet_serve_adapter_bytes_free"] == budget - used
    assert gauges["lorafleet_serve_host_adapters"] == 1
