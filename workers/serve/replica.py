"""One serving replica, assembled: settings → base model → engine + step loop → adapter cache →
OpenAI front. The same assembly runs under uvicorn and inside a Ray Serve replica."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from workers.serve.adapters import AdapterCache
from workers.serve.front import ServingFront
from workers.storage import ObjectStore, open_store

ENV_PREFIX = "LORAFLEET_SERVE_"


@dataclass
class ServeConfig:
    """Tunables, read in this one place: a field ``max_batch`` comes from ``max_batch=`` (Ray
    Serve app args, CLI) or else the environment variable ``LORAFLEET_SERVE_MAX_BATCH``."""

    base_model_id: str = "lorafleet/tiny-llama"
    base_model_uri: str = "builtin://lorafleet/tiny-llama"
    object_store_url: str = "file://" + os.path.abspath(".lorafleet/objects")
    quantization: str = "none"  # "nf4": bitsandbytes 4-bit base (QLoRA-style serving)
    device: str = ""  # "" → cuda when present, else cpu
    max_batch: int = 32  # most rows decoded together per step (KV memory: kv_cache_tokens)
    max_len: int = 1024  # prompt + completion tokens per request
    kv_cache_tokens: int = 32768  # KV cache memory, in tokens, shared by the requests in flight
    max_prefill_tokens: int = 512  # prompt tokens prefilled per step; longer prompts go in chunks
    max_rank: int = 64
    adapter_slots: int = 256  # device tier: most adapters resident at once (bookkeeping bound)
    # Device tier memory for LoRA weights, a byte budget each adapter takes its ranks' pages of;
    # 0: device_adapter_fraction of the GPU's memory (no byte limit on a CPU).
    device_adapter_bytes: int = 0
    device_adapter_fraction: float = 0.1
    host_adapters: int = 256  # host tier: parsed adapters kept in CPU memory
    host_adapter_bytes: int = 4 << 30
    default_max_tokens: int = 256

    @classmethod
    def load(cls, **overrides) -> ServeConfig:
        values = {}
        for f in dataclasses.fields(cls):
            raw = overrides.get(f.name, os.environ.get(ENV_PREFIX + f.name.upper()))
            if raw is not None:
                values[f.name] = {"int": int, "float": float}.get(f.type, str)(raw)
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown serving settings: {sorted(unknown)}")
        return cls(**values)


def adapter_budget(config: ServeConfig, device) -> int | None:
    """Bytes of device memory for resident adapters' LoRA weights."""
    if config.device_adapter_bytes:
        return config.device_adapter_bytes
    if device.type == "cuda":
        import torch

        return int(config.device_adapter_fraction * torch.cuda.get_device_properties(device).total_memory)
    return None  # CPU: host memory; the count (adapter_slots) and host tier bound it


def build_front(config: ServeConfig, store: ObjectStore | None = None) -> ServingFront:
    from workers.models.registry import resolve_base_model
    from workers.serve.base import load_serving_base
    from workers.serve.engine import Engine
    from workers.serve.runner import EngineRunner
    from workers.spec import BaseModelRef

    store = store or open_store(config.object_store_url)
    path = resolve_base_model(BaseModelRef(id=config.base_model_id, uri=config.base_model_uri), store)
    model, tokenizer = load_serving_base(path, quantization=config.quantization, device=config.device or None)
    engine = Engine(model, tokenizer, max_batch=config.max_batch,
                    max_len=min(config.max_len, model.config.max_position_embeddings),
                    kv_tokens=config.kv_cache_tokens, max_prefill_tokens=config.max_prefill_tokens,
                    adapter_slots=config.adapter_slots, max_rank=config.max_rank,
                    max_adapter_bytes=adapter_budget(config, model.get_input_embeddings().weight.device))
    # Host copies in the pools' dtype (bf16 on a GPU): half the host memory, no cast per placement.
    cache = AdapterCache(store, base_model_id=config.base_model_id, device=engine.slots,
                         max_host_adapters=config.host_adapters, max_host_bytes=config.host_adapter_bytes,
                         dtype=engine.slots.dtype)
    return ServingFront(EngineRunner(engine), cache, tokenizer, base_model_id=config.base_model_id,
                        default_max_tokens=config.default_max_tokens)
