"""A live weighted blend (several adapters on one request, composed on the host) against the
offline ``cat`` blend PEFT's add_weighted_adapter writes, and against PEFT itself."""

from __future__ import annotations

import pytest
import torch

from workers.ops.blend import blend_local
from workers.serve.blend import BlendCache, compose
from workers.serve.engine import Engine
from workers.serve.lora import AdapterFormatError, load_peft_adapter
from workers.serve.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=10, temperature=0)
WEIGHTS = {"ad8": 0.7, "mlp8": -0.4}  # different target modules: one zero-padded per module


@pytest.fixture(scope="module")
def offline(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("blend")
    config = blend_local(tiny.base_dir, [(tiny.adapter_dirs[n], w) for n, w in WEIGHTS.items()], out,
                         combination="cat")
    assert (config["r"], config["lora_alpha"]) == (16, 16)
    return load_peft_adapter(out, key="offline", adapter_id="offline")


def test_live_blend_is_the_offline_cat_blend(tiny, offline):
    live = compose([(tiny.adapter(n), w) for n, w in WEIGHTS.items()], adapter_id="ad8+mlp8")
    assert (live.rank, live.scale, offline.scale) == (16, 1.0, 1.0)
    assert live.weights.keys() == offline.weights.keys()
    for module, (a, b) in live.weights.items():  # the same floats, not merely close ones
        assert torch.equal(a, offline.weights[module][0]) and torch.equal(b, offline.weights[module][1]), module


def test_live_blend_in_a_mixed_batch_answers_like_offline_and_peft(tiny, prompts, offline):
    engine = Engine(tiny.base_model(), max_batch=8, max_len=64, adapter_slots=4)
    cache = BlendCache()
    parts = [(tiny.adapter(n), w) for n, w in WEIGHTS.items()]
    live = cache.get(parts, adapter_id="ad8+mlp8")
    assert cache.get([(tiny.adapter(n), w) for n, w in WEIGHTS.items()], adapter_id="ad8+mlp8") is live
    text = prompts([7], seed=3)[0]
    names = ["ad8", "blend", None, "mlp8", "offline"]
    adapters = {"ad8": tiny.adapter("ad8"), "mlp8": tiny.adapter("mlp8"), "blend": live, "offline": offline}
    outs = engine.generate_batch([text] * len(names), GREEDY, [adapters.get(n) for n in names])
    got = dict(zip(names, (r.output_ids for r in outs), strict=True))
    tiny.peft.add_weighted_adapter(list(WEIGHTS), list(WEIGHTS.values()), "ref_blend", combination_type="cat")
    assert got["blend"] == got["offline"] == tiny.reference(text, "ref_blend", GREEDY.max_tokens)
    assert got["ad8"] == tiny.reference(text, "ad8", GREEDY.max_tokens)
    # The blend is neither adapter alone, nor the base.
    assert len({tuple(got[n]) for n in ("ad8", "blend", None, "mlp8")}) == 4


def test_weights_change_the_blend_and_its_identity(tiny):
    cache = BlendCache(max_blends=1)
    one = cache.get([(tiny.adapter("ad8"), 0.5), (tiny.adapter("mlp8"), 0.5)], adapter_id="ad8+mlp8")
    two = cache.get([(tiny.adapter("ad8"), 0.6), (tiny.adapter("mlp8"), 0.5)], adapter_id="ad8+mlp8")
    assert one.key != two.key and not torch.equal(one.weights["model.layers.0.self_attn.q_proj"][0],
                                                  two.weights["model.layers.0.self_attn.q_proj"][0])
    assert cache.evict("mlp8") == ["ad8+mlp8"] and cache.evict("mlp8") == []


def test_a_blend_past_the_replicas_rank_is_refused(tiny):
    engine = Engine(tiny.base_model(), max_batch=2, max_len=64, adapter_slots=2, max_rank=16)
    blend = compose([(tiny.adapter("ad8"), 1.0), (tiny.adapter("ad16"), 1.0)], adapter_id="ad8+ad16")
    with pytest.raises(AdapterFormatError, match="rank 24"):
        engine.slots.check(blend)


def test_serving_front_answers_a_live_blend_like_the_published_offline_blend(tiny, offline, local_store, tmp_path):
    import asyncio

    from workers.serve import synthetic
    from workers.serve.adapters import AdapterCache
    from workers.serve.front import ServingFront
    from workers.serve.runner import EngineRunner

    base_id = "test/tiny-random-llama"
    prefixes = {}
    for name in (*WEIGHTS, "ad16"):
        prefixes[name] = f"tenants/t/adapters/{name}/v1"
        synthetic.publish_adapter(local_store, tiny.adapter_dirs[name], prefixes[name], adapter_id=name,
                                  base_model_id=base_id)
    out = tmp_path / "offline"
    blend_local(tiny.base_dir, [(tiny.adapter_dirs[n], w) for n, w in WEIGHTS.items()], out, combination="cat")
    synthetic.publish_adapter(local_store, out, "tenants/t/adapters/bl/v1", adapter_id="bl", base_model_id=base_id)
    engine = Engine(tiny.base_model(), tiny.tokenizer, max_batch=4, max_len=64, adapter_slots=4, max_rank=16)
    front = ServingFront(EngineRunner(engine), AdapterCache(local_store, base_model_id=base_id, device=engine.slots),
                         tiny.tokenizer, base_model_id=base_id, default_max_tokens=8)

    def ask(adapter: str, blend: list[tuple[str, float]] | None = None) -> dict:
        routing = {"adapter": {"id": adapter, "prefix": prefixes.get(adapter, "tenants/t/adapters/bl/v1"),
                               "base_model_id": base_id},
                   "blend": [{"id": n, "prefix": prefixes[n], "weight": w} for n, w in blend] if blend else None}
        body = {"model": adapter, "messages": [{"role": "user", "content": "Hello there"}], "temperature": 0,
                "lorafleet": routing}

        async def run():
            return [item async for item in front.run("chat", body)]

        return asyncio.run(asyncio.wait_for(run(), 60))[0]

    try:
        live = ask("ad8", list(WEIGHTS.items()))["response"]["choices"][0]["message"]["content"]
        assert live == ask("bl")["response"]["choices"][0]["message"]["content"]
        assert live != ask("ad8")["response"]["choices"][0]["message"]["content"]
        # 8 + 16 is past this replica's rank 16: that request's 422, in our words.
        refused = ask("ad8", [("ad8", 1.0), ("ad16", 1.0)])["problem"]
        assert (refused["status"], refused["code"], refused["param"]) == (422, "adapter_invalid", "model")
        assert "rank 24" in refused["detail"]
    finally:
        front.close()
