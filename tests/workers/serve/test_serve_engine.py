"""The batched multi-LoRA engine against plain PEFT, row by row."""

from __future__ import annotations

import time

import pytest
import torch

from workers.serve.engine import Engine
from workers.serve.lora import AdapterFormatError
from workers.serve.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=10, temperature=0)


def test_mixed_batch_equals_each_request_alone_with_peft(tiny, prompts):
    engine = Engine(tiny.base_model(), max_batch=8, max_len=64, adapter_slots=4)
    names = ["ad8", "ad16", None, "mlp8", "ad8"]
    texts = prompts([5, 11, 3, 8, 7])
    adapters = {n: tiny.adapter(n) for n in names if n}
    # Continuous batching: two requests run for a few steps before the others join.
    first = [engine.submit(texts[i], GREEDY, adapters.get(names[i])) for i in (0, 1)]
    for _ in range(3):
        engine.step()
    assert len(first[0].output_ids) == 4  # step 1 prefills and decodes: 2 tokens, then 1 a step
    rest = [engine.submit(texts[i], GREEDY, adapters.get(names[i])) for i in (2, 3, 4)]
    while engine.has_work():
        engine.step()
    got = first + rest
    for prompt, name, req in zip(texts, names, got):
        assert req.finish_reason == "length"
        assert req.output_ids == tiny.reference(prompt, name, GREEDY.max_tokens), name
    # Adapters change the answer: the same prompt under each adapter and none.
    same = prompts([6], seed=5) * 4
    outs = engine.generate_batch(same, GREEDY, [None, adapters["ad8"], adapters["ad16"], adapters["mlp8"]])
    assert len({tuple(r.output_ids) for r in outs}) == 4
    assert engine.slots.stats["misses"] == 3


def test_nf4_base_mixed_batch_equals_peft_alone(tiny, prompts):
    """The replica's 4-bit NF4 base (bitsandbytes Linear4bit) under the batched LoRA layers."""
    from peft import PeftModel

    from workers.serve.base import load_serving_base

    ref_base, _ = load_serving_base(tiny.base_dir, quantization="nf4", device="cpu")
    ref = PeftModel.from_pretrained(ref_base, tiny.adapter_dirs["ad8"], adapter_name="ad8")
    ref.load_adapter(tiny.adapter_dirs["ad16"], adapter_name="ad16")
    model, _ = load_serving_base(tiny.base_dir, quantization="nf4", device="cpu")
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    engine = Engine(model, max_batch=4, max_len=64, adapter_slots=2)
    names = ["ad16", None, "ad8"]
    texts = prompts([6, 4, 9], seed=2)
    outs = engine.generate_batch(texts, GREEDY, [tiny.adapter(n) if n else None for n in names])
    for prompt, name, req in zip(texts, names, outs):
        if name is None:
            with ref.disable_adapter():
                expected = ref.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False)
        else:
            ref.set_adapter(name)
            expected = ref.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False)
        assert req.output_ids == expected[0, len(prompt):].tolist(), name


def test_device_slots_evict_at_the_limit_and_reload_unchanged(tiny, prompts):
    engine = Engine(tiny.base_model(), max_batch=2, max_len=64, adapter_slots=2)
    text = prompts([7], seed=3)[0]
    order = ["ad8", "ad16", "mlp8", "ad8", "ad16"]  # 3 adapters through 2 slots
    for name in order:
        (req,) = engine.generate_batch([text], GREEDY, [tiny.adapter(name)])
        assert req.output_ids == tiny.reference(text, name, GREEDY.max_tokens), name
    assert engine.slots.stats["evictions"] == 3
    assert len(engine.slots.resident()) == 2
    # The byte budget limits the device tier too: each adapter takes what its ranks and layers
    # need: ad16 + mlp8 + half of ad8 holds two of them, never more bytes than the budget.
    need = {n: engine.slots.bytes_needed(tiny.adapter(n)) for n in ("ad8", "ad16", "mlp8")}
    budget = need["ad16"] + need["mlp8"] + need["ad8"] // 2
    small = Engine(tiny.base_model(), max_batch=2, max_len=64, adapter_slots=8, max_adapter_bytes=budget)
    for name in ("ad8", "ad16", "mlp8"):
        (req,) = small.generate_batch([text], GREEDY, [tiny.adapter(name)])
        assert req.output_ids == tiny.reference(text, name, GREEDY.max_tokens), name
    usage = small.slots.usage()
    assert small.slots.resident() == ["ad16", "mlp8"] and small.slots.stats["evictions"] == 1
    assert usage["bytes_used"] == need["ad16"] + need["mlp8"] <= budget == usage["bytes_budget"]
    assert usage["bytes_allocated"] - sum(p.page_bytes for p in small.slots.pools.values()) <= budget


def test_requests_wait_while_every_slot_is_busy(tiny, prompts):
    """More distinct adapters than slots in flight: the extra ones queue, none fails."""
    engine = Engine(tiny.base_model(), max_batch=4, max_len=64, adapter_slots=1)
    names = ["ad8", "ad16", "mlp8"]
    texts = prompts([5, 6, 7], seed=4)
    outs = engine.generate_batch(texts, GREEDY, [tiny.adapter(n) for n in names])
    for prompt, name, req in zip(texts, names, outs):
        assert req.output_ids == tiny.reference(prompt, name, GREEDY.max_tokens)


def test_sampling_is_reproducible_by_seed_and_stops_on_strings(tiny, prompts):
    engine = Engine(tiny.base_model(), tiny.tokenizer, max_batch=4, max_len=64, adapter_slots=1,
                    eos_token_id=[])  # a random model emits </s> early; never stop on it here
    text = prompts([5], seed=6)[0]
    hot = SamplingParams(max_tokens=12, temperature=1.5, top_p=0.9, seed=7)
    a, b, c = engine.generate_batch([text] * 3, [hot, hot, SamplingParams(max_tokens=12, temperature=1.5, seed=8)])
    assert a.output_ids == b.output_ids != c.output_ids
    full = a.text
    stop = full[3:5]
    (d,) = engine.generate_batch([text], SamplingParams(max_tokens=12, temperature=1.5, top_p=0.9,
                                                         seed=7, stop=(stop,)))
    assert d.finish_reason == "stop" and d.text == full[: full.index(stop)]


def test_streamed_deltas_add_up_to_the_text(tiny, prompts):
    engine = Engine(tiny.base_model(), tiny.tokenizer, max_batch=2, max_len=64, adapter_slots=1,
                    eos_token_id=[])
    deltas = []
    req = engine.submit(prompts([4], seed=9)[0], SamplingParams(max_tokens=15, temperature=0),
                        tiny.adapter("ad8"), on_event=lambda r, d: deltas.append(d))
    while engine.has_work():
        engine.step()
    assert "".join(deltas) == req.text and len(deltas) == 15


def test_unservable_requests_are_refused_up_front(tiny):
    engine = Engine(tiny.base_model(), max_batch=2, max_len=16, adapter_slots=1, max_rank=8)
    with pytest.raises(AdapterFormatError, match="rank 16"):
        engine.submit([5, 6], GREEDY, tiny.adapter("ad16"))
    with pytest.raises(ValueError, match="exceeds this replica's context"):
        engine.submit([5] * 10, GREEDY)
    narrow = Engine(tiny.base_model(), max_batch=2, max_len=64, adapter_slots=1, wrap=["q_proj"])
    with pytest.raises(AdapterFormatError, match="targets modules"):
        narrow.submit([5, 6], GREEDY, tiny.adapter("ad8"))


def test_evicting_a_busy_adapter_frees_its_slot_when_its_rows_finish(tiny, prompts):
    engine = Engine(tiny.base_model(), max_batch=2, max_len=64, adapter_slots=1)
    adapter = tiny.adapter("ad8")
    req = engine.submit(prompts([5], seed=13)[0], GREEDY, adapter)
    engine.step()
    assert engine.slots.evict("ad8") == 1 and engine.slots.resident() == []
    while engine.has_work():
        engine.step()
    assert req.output_ids == tiny.reference(req.prompt_ids, "ad8", GREEDY.max_tokens)
    # The slot is free again: another adapter loads without evicting anything.
    engine.generate_batch([req.prompt_ids], GREEDY, [tiny.adapter("ad16")])
    assert engine.slots.stats["evictions"] == 0 and len(engine.slots.resident()) == 1


def test_async_runner_batches_concurrent_requests_and_aborts_abandoned_streams(tiny, prompts):
    import asyncio

    from workers.serve.runner import EngineRunner

    runner = EngineRunner(Engine(tiny.base_model(), max_batch=8, max_len=64, adapter_slots=2))
    names = ["ad8", "ad16", None, "ad8"]
    texts = prompts([5, 6, 7, 8], seed=14)

    async def main():
        done = await asyncio.gather(*(runner.generate(t, GREEDY, tiny.adapter(n) if n else None)
                                      for t, n in zip(texts, names)))
        stream = runner.stream(texts[0], SamplingParams(max_tokens=40, temperature=0))
        async for _ in stream:
            break  # the client went away after one token
        await stream.aclose()
        return done

    try:
        done = asyncio.run(main())
        for prompt, name, req in zip(texts, names, done):
            assert req.output_ids == tiny.reference(prompt, name, GREEDY.max_tokens)
        # Four requests of 10 tokens in far fewer than 40 steps: they shared decode steps.
        assert runner.engine.stats["steps"] < 20
        deadline = time.monotonic() + 5
        while runner.engine.has_work():
            assert time.monotonic() < deadline, "the abandoned request kept running"
            time.sleep(0.01)
        assert runner.engine.stats["requests_finished"] == 5
    finally:
        runner.close()


def test_a_failing_step_fails_its_requests_and_the_loop_goes_on(tiny, prompts, monkeypatch):
    """A failed prefill ends only its newcomers; a failed decode (engine-wide) ends every row;
    both in our words, never the exception's text; the loop then serves the next requests."""
    import asyncio

    from workers.serve.runner import EngineFailed, EngineRunner

    engine = Engine(tiny.base_model(), max_batch=4, max_len=64, adapter_slots=1)
    real_forward = engine._forward
    fail_on = {1, 3}  # the first prefill; then the decode after the second request's prefill
    calls = {"n": 0}

    def flaky(*args):
        calls["n"] += 1
        if calls["n"] in fail_on:
            raise RuntimeError("device fell over")
        return real_forward(*args)

    monkeypatch.setattr(engine, "_forward", flaky)
    runner = EngineRunner(engine)
    text = prompts([5], seed=15)[0]
    try:
        with pytest.raises(EngineFailed) as failed:
            asyncio.run(runner.generate(text, GREEDY, tiny.adapter("ad8")))
        assert failed.value.code == "generation_failed" and "fell over" not in str(failed.value)
        with pytest.raises(EngineFailed) as failed:
            asyncio.run(runner.generate(text, GREEDY, tiny.adapter("ad8")))
        assert failed.value.code == "engine_failed" and failed.value.status == 503
        assert "fell over" not in str(failed.value)
        # The failed requests gave their slot back: the only slot takes another adapter.
        done = asyncio.run(asyncio.wait_for(runner.generate(text, GREEDY, tiny.adapter("ad16")), 60))
        assert done.output_ids == tiny.reference(text, "ad16", GREEDY.max_tokens)
        assert engine.load() == {"running": 0, "waiting": 0}
        runner.check_health()  # a good step since: healthy
    finally:
        runner.close()
