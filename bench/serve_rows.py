"""The serving benchmark's rows beyond the PEFT comparison (``bench/serve_throughput.py``): the
wide shape, many adapters under Zipf popularity, and the device bytes one adapter takes.

Adapters here are random PEFT files made directly (no PeftModel): a thousand of them, or a few
on a 2048-wide model, would otherwise take minutes to build.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from pathlib import Path

import torch

from workers.serve import synthetic
from workers.serve.engine import Engine
from workers.serve.lora import LoraAdapter, parse_peft_adapter
from workers.serve.sampling import SamplingParams

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
BASE_ID = "bench/tiny"


def peft_files(config, rank: int, *, seed: int, targets=TARGETS) -> tuple[bytes, bytes]:
    """(adapter_config.json, adapter_model.safetensors) of a random LoRA adapter, as PEFT names them."""
    from safetensors.torch import save

    gen = torch.Generator().manual_seed(seed)
    hidden = config.hidden_size
    head_dim = hidden // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    width = {"q_proj": (hidden, hidden), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (hidden, hidden)}
    tensors = {}
    for layer in range(config.num_hidden_layers):
        for module in targets:
            fan_in, fan_out = width[module]
            name = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{name}.lora_A.weight"] = torch.randn(rank, fan_in, generator=gen) / fan_in ** 0.5
            tensors[f"{name}.lora_B.weight"] = torch.randn(fan_out, rank, generator=gen) / rank ** 0.5
    cfg = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(targets), "bias": "none"}
    return json.dumps(cfg).encode(), save(tensors)


def random_adapter(config, rank: int, *, seed: int, name: str) -> LoraAdapter:
    return parse_peft_adapter(*peft_files(config, rank, seed=seed), key=name, adapter_id=name)


def publish(store, prefix: str, adapter_id: str, files: tuple[bytes, bytes]) -> None:
    """The two PEFT files and a manifest, as a finished training job leaves them."""
    from workers.spec import AdapterManifest, BaseModelRef, FileDigest, Hyperparameters
    from workers.storage import put_bytes

    config, weights = files
    digests = {}
    for name, data in (("adapter_model.safetensors", weights), ("adapter_config.json", config)):
        put = put_bytes(store, f"{prefix}/{name}", data)
        digests[name] = FileDigest(sha256=put.sha256, bytes=put.bytes)
    cfg = json.loads(config)
    manifest = AdapterManifest(
        adapter_id=adapter_id, job_id="ftjob-bench", tenant_id="tn_bench",
        base_model=BaseModelRef(id=BASE_ID, uri=f"models/{BASE_ID}"), method="lora", quantization="none",
        dataset_sha256="0" * 64, files=digests,
        hyperparameters=Hyperparameters(r=cfg["r"], lora_alpha=cfg["lora_alpha"], target_modules=sorted(cfg["target_modules"])))
    put_bytes(store, f"{prefix}/manifest.json", manifest.model_dump_json().encode())


# ---- wide: matmuls dominate ------------------------------------------------------------------

def wide_rows(measure, *, quick: bool) -> tuple[list[dict], dict]:
    """(d) and (d0) at 32 adapters on a 2048-wide, 4-layer model; ``measure(engine, prompts,
    adapters, rounds, reps)`` is the caller's interleaved best-of loop."""
    n, new_tokens, prompt_len = 32, 16, 16
    cfg = synthetic.tiny_llama_config(vocab_size=2048, hidden=2048, layers=4, heads=16, kv_heads=16,
                                      intermediate=5504, init_range=0.02)
    engine = Engine(synthetic.random_llama(cfg), max_batch=n, max_len=prompt_len + new_tokens + 8,
                    adapter_slots=n, max_rank=16, eos_token_id=[])
    adapters = [random_adapter(cfg, 8 if i % 2 else 16, seed=i, name=f"w{i}") for i in range(n)]
    prompts = torch.randint(3, cfg.vocab_size, (n, prompt_len), generator=torch.Generator().manual_seed(1)).tolist()
    rows = measure(engine, prompts, adapters, 1, 2 if quick else 3)
    for r in rows:
        r["column"] += "_wide"
    by = {r["column"]: r["tokens_per_s"] for r in rows}
    return rows, {"vs_own_base_wide": by["d_ours_wide"] / by["d0_ours_no_adapter_wide"]}


# ---- Zipf: a thousand adapters through the two cache tiers -----------------------------------

def _zipf(n: int, draws: int, seed: int) -> list[int]:
    weights = 1.0 / torch.arange(1, n + 1, dtype=torch.float64)
    return torch.multinomial(weights, draws, replacement=True, generator=torch.Generator().manual_seed(seed)).tolist()


async def _clients(runner, cache, prompts, choices, params) -> int:
    """len(prompts) closed-loop clients working through ``choices`` (adapter numbers)."""
    queue = iter(choices)
    tokens = 0

    async def client(i: int) -> None:
        nonlocal tokens
        for k in queue:
            adapter = await cache.get(f"z{k}", f"tenants/tn_bench/adapters/z{k}/v1")
            req = await runner.generate(prompts[i], params, adapter)
            tokens += len(req.output_ids)

    await asyncio.gather(*(client(i) for i in range(len(prompts))))
    return tokens


async def _preload(cache, slots, count: int, *, device: int) -> None:
    for k in reversed(range(count)):  # the most popular last: most recently used
        adapter = await cache.get(f"z{k}", f"tenants/tn_bench/adapters/z{k}/v1")
        if k < device:
            slots.acquire(adapter)
            slots.release(adapter.key)


def zipf_rows(*, quick: bool, adapters: int = 1000, clients: int = 32) -> tuple[list[dict], dict]:
    from workers.serve.adapters import AdapterCache
    from workers.serve.runner import EngineRunner
    from workers.storage import LocalStore

    cfg = synthetic.tiny_llama_config(vocab_size=2048, hidden=256, layers=4, heads=4, kv_heads=4,
                                      intermediate=688, init_range=0.1)
    params = SamplingParams(max_tokens=16, temperature=0)
    prompts = torch.randint(3, cfg.vocab_size, (clients, 16), generator=torch.Generator().manual_seed(2)).tolist()
    draws = 4 * clients if quick else 12 * clients
    with tempfile.TemporaryDirectory() as tmp:
        store = LocalStore(Path(tmp))
        for k in range(adapters):
            publish(store, f"tenants/tn_bench/adapters/z{k}/v1", f"z{k}", peft_files(cfg, 8, seed=1000 + k))
        engines, caches = {}, {}
        for name in ("cached", "resident"):
            engines[name] = Engine(synthetic.random_llama(cfg), max_batch=clients, max_len=48,
                                   adapter_slots=adapters, max_rank=8, eos_token_id=[])
        one = engines["cached"].slots.bytes_needed(random_adapter(cfg, 8, seed=0, name="size"))
        engines["cached"].slots.max_bytes = 32 * one  # the device budget: 32 adapters' pages
        caches["cached"] = AdapterCache(store, base_model_id=BASE_ID, device=engines["cached"].slots,
                                        max_host_adapters=256)
        caches["resident"] = AdapterCache(store, base_model_id=BASE_ID, device=engines["resident"].slots,
                                          max_host_adapters=adapters, max_host_bytes=1 << 40)
        runners = {name: EngineRunner(e) for name, e in engines.items()}
        try:
            # Every adapter parsed and on the device for "resident"; the cached tiers start near
            # their steady state (the most popular 256 on the host, 32 on the device), then a
            # warm-up on draws of the same popularity.
            for name, count in (("resident", adapters), ("cached", 256)):
                asyncio.run(_preload(caches[name], engines[name].slots, count, device=adapters if name == "resident" else 32))
            asyncio.run(_clients(runners["cached"], caches["cached"], prompts, _zipf(adapters, 2 * clients, 0), params))
            best, counts = {}, {"host": [0, 0], "device": [0, 0]}  # [hits, lookups] while timed
            for rep in range(2 if quick else 3):
                choices = _zipf(adapters, draws, 1 + rep)
                for name in ("cached", "resident"):
                    host, device = dict(caches[name].metrics), dict(engines[name].slots.stats)
                    start = time.perf_counter()
                    tokens = asyncio.run(_clients(runners[name], caches[name], prompts, choices, params))
                    rate = tokens / (time.perf_counter() - start)
                    if rate > best.get(name, 0):
                        best[name] = rate
                    if name == "cached":
                        for tier, before, now in (("host", host, caches[name].metrics),
                                                  ("device", device, engines[name].slots.stats)):
                            hits, misses = now["hits"] - before["hits"], now["misses"] - before["misses"]
                            counts[tier][0] += hits
                            counts[tier][1] += hits + misses
        finally:
            for runner in runners.values():
                runner.close()
    rows = [{"column": f"zipf_{name}", "adapters": adapters, "tokens_per_s": rate, "ttft_p50_ms": None,
             "ttft_p99_ms": None} for name, rate in best.items()]
    return rows, {"zipf_vs_resident": best["cached"] / best["resident"],
                  "zipf_host_hit_rate": counts["host"][0] / counts["host"][1],
                  "zipf_device_hit_rate": counts["device"][0] / counts["device"][1]}


# ---- bytes ---------------------------------------------------------------------------------------

LLAMA2_7B = dict(vocab_size=32000, hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008)


def lora_bytes_overhead(dtype: torch.dtype = torch.bfloat16) -> dict:
    """One r=8 q,k,v,o adapter placed into the production replica's engine (every projection
    wrapped, max_rank 64) on a 7B-shaped model on the meta device: the bytes its pools grew by,
    over the adapter's own size in the same dtype."""
    cfg = synthetic.tiny_llama_config(max_len=4096, **LLAMA2_7B)
    engine = Engine(synthetic.random_llama(cfg, dtype=dtype, device="meta"), max_batch=32, max_len=1024,
                    adapter_slots=32, max_rank=64, lora_dtype=dtype)
    meta = dict(device="meta", dtype=dtype)
    weights = {name: (torch.empty(m.in_features, 8, **meta), torch.empty(8, m.out_features, **meta))
               for name, m in engine.modules.items() if name.rsplit(".", 1)[-1] in TARGETS}
    adapter = LoraAdapter(key="one", adapter_id="one", rank=8, scale=2.0, weights=weights)
    before = engine.slots.usage()["bytes_allocated"]
    engine.slots.check(adapter)
    engine.slots.acquire(adapter)
    took = engine.slots.usage()["bytes_allocated"] - before
    size = sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in weights.values())
    return {"lora_bytes_overhead": took / size, "lora_adapter_mb": size / 2**20}
