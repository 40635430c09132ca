"""Blast radius of one: a request's bad adapter, bad sampling or failed slot placement ends that
request alone; adapters are validated at load; a dead loop or device fails ``check_health``; a
huge prompt is refused before the tokenizer runs."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import types

import pytest
import torch
from safetensors.torch import load_file, save, save_file

from workers.serve import synthetic
from workers.serve.adapters import AdapterCache, AdapterError
from workers.serve.engine import Engine, RequestFailed
from workers.serve.front import ServingFront
from workers.serve.lora import LoraAdapter
from workers.serve.runner import EngineRunner, EngineUnhealthy
from workers.serve.sampling import SamplingParams

BASE_ID = "test/tiny-random-llama"
GREEDY = SamplingParams(max_tokens=10, temperature=0)
HOT = SamplingParams(max_tokens=10, temperature=1.0, seed=11)  # seeded: reproducible per row


def poisoned(adapter: LoraAdapter, key: str = "bad") -> LoraAdapter:
    """A copy whose weights turned to inf after it passed load validation (as a bit flip or a
    bug could): the engine must contain it at run time too."""
    weights = {name: (a.clone(), b.clone()) for name, (a, b) in adapter.weights.items()}
    for a, _ in weights.values():
        a.fill_(float("inf"))
    return dataclasses.replace(adapter, key=key, adapter_id=key, weights=weights)


def test_one_poisoned_adapter_and_inf_sampling_fail_alone(tiny, prompts):
    names = ["ad8", "ad16", None, "mlp8"]
    texts = prompts([5, 9, 4, 7, 6, 8], seed=21)
    clean_params = [GREEDY, GREEDY, GREEDY, HOT]
    # Like with like: the clean run and the mixed run go through the same engine path.
    clean = Engine(tiny.base_model(), max_batch=8, max_len=64, adapter_slots=4)
    expected = [r.output_ids for r in clean.generate_batch(
        texts[:4], clean_params, [tiny.adapter(n) if n else None for n in names])]

    engine = Engine(tiny.base_model(), max_batch=8, max_len=64, adapter_slots=4)
    bad = poisoned(tiny.adapter("ad16"))
    reqs = engine.generate_batch(
        texts, clean_params + [GREEDY, SamplingParams(max_tokens=10, temperature=1.0)],
        [tiny.adapter(n) if n else None for n in names] + [bad, bad])
    for req, want in zip(reqs[:4], expected):
        assert req.finish_reason == "length" and req.output_ids == want
    for prompt, name, req in zip(texts[:3], names[:3], reqs[:3]):  # and still PEFT's answer
        assert req.output_ids == tiny.reference(prompt, name, GREEDY.max_tokens)
    for req in reqs[4:]:  # the greedy and the temperature=1 rows of the poisoned adapter
        assert req.finish_reason == "error" and req.output_ids == []
        assert req.error.code == "adapter_numerical_error" and req.error.status == 422
    assert engine.load() == {"running": 0, "waiting": 0}
    assert engine.slots._resident[bad.key].refs == 0  # both rows gave the slot back


def test_a_row_left_by_a_poisoned_request_is_clean_for_the_next(tiny, prompts):
    """The failed row's KV may hold NaN; a newcomer in that row attends over its stale tail
    (masked, but 0 x NaN is NaN) while a longer row keeps the span wide."""
    clean = Engine(tiny.base_model(), max_batch=2, max_len=64, adapter_slots=2)
    short, long_prompt = prompts([4, 30], seed=25)
    long_params = SamplingParams(max_tokens=20, temperature=0)
    expected_short = clean.generate_batch([short], GREEDY, [tiny.adapter("ad8")])[0].output_ids
    expected_long = clean.generate_batch([long_prompt], long_params)[0].output_ids

    engine = Engine(tiny.base_model(), max_batch=2, max_len=64, adapter_slots=2)
    running = engine.submit(long_prompt, long_params)
    bad = engine.submit(prompts([45], seed=26)[0], GREEDY, poisoned(tiny.adapter("ad16")))
    engine.step()
    assert bad.finish_reason == "error"
    newcomer = engine.submit(short, GREEDY, tiny.adapter("ad8"))  # takes the poisoned row
    while engine.has_work():
        engine.step()
    assert newcomer.finish_reason == "length" and newcomer.output_ids == expected_short
    assert running.output_ids == expected_long


def test_through_the_front_the_poisoned_request_gets_a_problem_and_others_answers(tiny, prompts, local_store):
    engine = Engine(tiny.base_model(), tiny.tokenizer, max_batch=8, max_len=64, adapter_slots=4,
                    eos_token_id=[])
    runner = EngineRunner(engine)
    bad = poisoned(tiny.adapter("ad8"))
    text = prompts([6], seed=22)[0]

    async def main():
        clean = runner.generate(text, GREEDY, tiny.adapter("ad16"))
        broken = runner.generate(text, SamplingParams(max_tokens=10, temperature=1.0), bad)
        return await asyncio.wait_for(asyncio.gather(clean, broken, return_exceptions=True), 60)

    try:
        good, failure = asyncio.run(main())
        assert good.output_ids == tiny.reference(text, "ad16", GREEDY.max_tokens)
        assert isinstance(failure, RequestFailed) and failure.code == "adapter_numerical_error"
        runner.check_health()  # one tenant's broken adapter is not the replica's illness
    finally:
        runner.close()


# ---- load validation ------------------------------------------------------------------------------


def _tampered(tiny, tmp_path, name: str, change) -> object:
    """A copy of adapter ``name``'s directory whose tensors ``change(tensors)`` edits."""
    src = tiny.adapter_dirs[name]
    dst = tmp_path / f"{name}-tampered"
    dst.mkdir()
    (dst / "adapter_config.json").write_bytes((src / "adapter_config.json").read_bytes())
    tensors = load_file(src / "adapter_model.safetensors")
    change(tensors)
    save_file(tensors, dst / "adapter_model.safetensors")
    return dst


def _first(tensors: dict, part: str) -> str:
    return sorted(k for k in tensors if f".{part}." in k)[0]


def _inf(t):
    t[_first(t, "lora_B")][0, 0] = float("inf")


def _nan(t):
    t[_first(t, "lora_A")][1, 2] = float("nan")


def _narrow(t):  # consistent rank, wrong in_features for the base's layer
    k = _first(t, "lora_A")
    t[k] = t[k][:, :-8].contiguous()


def _unknown_module(t):
    k = _first(t, "lora_A")
    for part in ("lora_A", "lora_B"):
        src = k.replace("lora_A", part)
        t[src.replace("q_proj", "nope_proj")] = t.pop(src)


def _integers(t):
    k = _first(t, "lora_A")
    t[k] = t[k].to(torch.int32)


@pytest.mark.parametrize("change, words", [
    (_inf, "non-finite"), (_nan, "non-finite"), (_narrow, "the base model's layer needs"),
    (_unknown_module, "targets modules"), (_integers, "must be float16, bfloat16 or float32"),
])
def test_load_validation_refuses_and_caches_nothing(tiny, tmp_path, local_store, change, words):
    engine = Engine(tiny.base_model(), max_batch=2, max_len=64, adapter_slots=2)
    directory = _tampered(tiny, tmp_path, "ad8", change)
    prefix = "tenants/tn_a/adapters/ft-bad/v1"
    synthetic.publish_adapter(local_store, directory, prefix, adapter_id="ft-bad", base_model_id=BASE_ID)
    cache = AdapterCache(local_store, base_model_id=BASE_ID, device=engine.slots)
    with pytest.raises(AdapterError, match=words) as refused:
        asyncio.run(cache.get("ft-bad", prefix))
    assert refused.value.code == "adapter_invalid" and refused.value.status == 422
    assert cache.stats()["host"]["adapters"] == 0 and engine.slots.resident() == []
    assert cache.metrics["load_errors"] == 1


def test_a_corrupt_weights_file_is_refused_in_our_words(tiny):
    from workers.serve.lora import AdapterFormatError, parse_peft_adapter

    config = (tiny.adapter_dirs["ad8"] / "adapter_config.json").read_bytes()
    with pytest.raises(AdapterFormatError) as refused:
        parse_peft_adapter(config, b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage", key="k", adapter_id="ft-junk")
    assert str(refused.value) == "adapter 'ft-junk' is unreadable: adapter_config.json or " \
                                 "adapter_model.safetensors is corrupt"
    with pytest.raises(AdapterFormatError, match="r must be at least 1"):
        bad = json.loads(config)
        bad["r"] = 0
        parse_peft_adapter(json.dumps(bad).encode(),
                           (tiny.adapter_dirs["ad8"] / "adapter_model.safetensors").read_bytes(),
                           key="k", adapter_id="ft-junk")


def test_weights_finite_in_float32_but_not_in_the_serving_dtype_are_refused(tiny):
    """1e6 is a fine float32 and inf in float16: checked after the conversion, not before."""
    from workers.serve.lora import AdapterFormatError, parse_peft_adapter

    src = tiny.adapter_dirs["ad8"]
    tensors = load_file(src / "adapter_model.safetensors")
    tensors[_first(tensors, "lora_B")][0, 0] = 1e6
    args = dict(config_json=(src / "adapter_config.json").read_bytes(), safetensors=save(tensors),
                key="k", adapter_id="ft-big")
    assert parse_peft_adapter(**args, dtype=torch.float32).rank == 8  # servable in float32
    with pytest.raises(AdapterFormatError, match="non-finite values .* in float16"):
        parse_peft_adapter(**args, dtype=torch.float16)


@pytest.mark.parametrize("r", ["1e999", "-1e999", "NaN"])
def test_a_rank_no_integer_holds_is_an_invalid_adapter(tiny, r):
    """``"r": 1e999`` parses as inf; int(inf) raised an uncaught OverflowError (a 500)."""
    from workers.serve.lora import AdapterFormatError, parse_peft_adapter

    src = tiny.adapter_dirs["ad8"]
    config = json.dumps({**json.loads((src / "adapter_config.json").read_text()), "r": 8})
    config = config.replace('"r": 8', f'"r": {r}')
    with pytest.raises(AdapterFormatError, match="needs numbers r and lora_alpha"):
        parse_peft_adapter(config.encode(), (src / "adapter_model.safetensors").read_bytes(),
                           key="k", adapter_id="ft-huge")


# ---- no request lost between queues ----------------------------------------------------------------


def test_a_request_whose_slot_placement_fails_is_answered_and_its_slot_freed(tiny, prompts):
    engine = Engine(tiny.base_model(), max_batch=4, max_len=64, adapter_slots=1)
    text = prompts([5], seed=23)[0]
    broken = tiny.adapter("ad8")
    broken = dataclasses.replace(broken, key="broken", adapter_id="broken", weights=dict(broken.weights))
    events = []
    bad = engine.submit(text, GREEDY, broken, on_event=lambda r, d: events.append(r.finish_reason))
    good = engine.submit(text, GREEDY, tiny.adapter("ad16"))
    # Changed after submit's checks: writing it into the slot stacks raises mid-way.
    name = sorted(broken.weights)[-1]
    broken.weights[name] = (torch.zeros(3, 3), torch.zeros(3, 3))
    while engine.has_work():
        engine.step()
    assert bad.finish_reason == "error" and bad.error.code == "adapter_load_failed"
    assert events == ["error"]  # its caller was told, once
    assert good.output_ids == tiny.reference(text, "ad16", GREEDY.max_tokens)
    # The half-written slot was zeroed and freed: the one slot went to ad16 without an eviction.
    assert engine.slots.stats["evictions"] == 0 and engine.slots.resident() == ["ad16"]


def test_through_the_runner_a_failed_placement_is_answered_not_lost(tiny, prompts):
    runner = EngineRunner(Engine(tiny.base_model(), max_batch=4, max_len=64, adapter_slots=1))
    text = prompts([5], seed=24)[0]

    def explode(adapter):
        raise RuntimeError("CUDA error: out of memory (the library's words)")

    try:
        runner.engine.slots.acquire = explode

        async def main():
            return await asyncio.wait_for(runner.generate(text, GREEDY, tiny.adapter("ad8")), 30)

        with pytest.raises(RequestFailed) as failed:
            asyncio.run(main())
        assert failed.value.code == "adapter_load_failed" and "CUDA" not in str(failed.value)
        assert runner.engine.load() == {"running": 0, "waiting": 0}
    finally:
        runner.close()


# ---- check_health ----------------------------------------------------------------------------------


class _Die(BaseException):
    """Escapes the loop's ``except Exception``: the thread ends, as if killed."""


def test_check_health_fails_when_the_loop_dies_or_the_device_is_unusable(tiny, monkeypatch):
    from workers.serve.app import LoraReplica

    runner = EngineRunner(Engine(tiny.base_model(), max_batch=2, max_len=32, adapter_slots=1))
    front = ServingFront(runner, None, tiny.tokenizer, base_model_id=BASE_ID)
    replica = types.SimpleNamespace(front=front)

    def check(replica):  # the method Ray Serve calls, as it calls it
        asyncio.run(LoraReplica.func_or_class.check_health(replica))

    try:
        check(replica)  # alive and well
        monkeypatch.setattr(runner.engine, "device", torch.device("meta"))  # .item() cannot work
        with pytest.raises(EngineUnhealthy, match="device is unusable"):
            check(replica)
        monkeypatch.undo()
        check(replica)
        monkeypatch.setattr(threading, "excepthook", lambda args: None)  # the expected death
        monkeypatch.setattr(runner.engine, "has_work", lambda: (_ for _ in ()).throw(_Die()))
        runner._wake.set()
        runner._thread.join(timeout=10)
        assert not runner._thread.is_alive()
        with pytest.raises(EngineUnhealthy, match="loop is not running"):
            check(replica)
    finally:
        runner.close()


def test_check_health_fails_after_repeated_engine_wide_failures(tiny, prompts, monkeypatch):
    engine = Engine(tiny.base_model(), max_batch=2, max_len=32, adapter_slots=1)
    monkeypatch.setattr(engine, "_decode", lambda: (_ for _ in ()).throw(RuntimeError("dead")))
    runner = EngineRunner(engine)
    try:
        for _ in range(3):
            with pytest.raises(RequestFailed):
                asyncio.run(asyncio.wait_for(runner.generate(prompts([4])[0], GREEDY), 30))
        with pytest.raises(EngineUnhealthy, match="last 3 engine steps failed"):
            runner.check_health()
    finally:
        runner.close()


# ---- input size before tokenising ---------------------------------------------------------------------


class CountingTokenizer:
    """The real tokenizer, counting every call that tokenises."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)

    def apply_chat_template(self, *args, **kwargs):
        self.calls += 1
        return self.inner.apply_chat_template(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_a_5mb_message_is_refused_without_tokenising(tiny, local_store):
    tokenizer = CountingTokenizer(tiny.tokenizer)
    runner = EngineRunner(Engine(tiny.base_model(), tiny.tokenizer, max_batch=2, max_len=64, adapter_slots=1))
    front = ServingFront(runner, AdapterCache(local_store, base_model_id=BASE_ID), tokenizer,
                         base_model_id=BASE_ID, default_max_tokens=4)

    async def ask(kind, body):
        return [item async for item in front.run(kind, body)]

    try:
        huge = "word " * (1 << 20)  # 5 MiB
        (out,) = asyncio.run(ask("chat", {"model": BASE_ID, "messages": [{"role": "user", "content": huge}]}))
        assert out["problem"]["code"] == "context_length_exceeded" and out["problem"]["param"] == "messages"
        (out,) = asyncio.run(ask("completion", {"model": BASE_ID, "prompt": huge}))
        assert out["problem"]["code"] == "context_length_exceeded" and out["problem"]["param"] == "prompt"
        assert tokenizer.calls == 0
        # A small prompt is tokenised and answered (the counter does count).
        (out,) = asyncio.run(ask("completion", {"model": BASE_ID, "prompt": "Hello, how", "max_tokens": 2,
                                                "temperature": 0}))
        assert "response" in out and tokenizer.calls == 1
        # The bound is safe: a text never has fewer tokens than characters / bound.
        for text in ["The quick brown fox", "aaaa" * 50, "LoRA adapters are small." * 7, "é✓\n\t x"]:
            assert len(tiny.tokenizer(text)["input_ids"]) >= len(text) / front.chars_per_token
    finally:
        runner.close()


# ---- our words, not the libraries' ---------------------------------------------------------------------


def test_store_and_manifest_failures_reach_the_client_in_our_words(tiny, local_store):
    from workers.storage import LocalStore, StorageError, put_bytes

    class Flaky(LocalStore):
        def open(self, key):
            raise StorageError("EndpointConnectionError: http://10.1.2.3:9000/bucket-secret")

    cache = AdapterCache(Flaky(local_store.root), base_model_id=BASE_ID)
    with pytest.raises(AdapterError) as refused:
        asyncio.run(cache.get("ft-x", "tenants/tn_a/adapters/ft-x/v1"))
    assert refused.value.code == "storage_error" and refused.value.status == 503
    assert "10.1.2.3" not in str(refused.value) and "bucket" not in str(refused.value)

    prefix = "tenants/tn_a/adapters/ft-y/v1"
    put_bytes(local_store, f"{prefix}/manifest.json", json.dumps({"adapter_id": 5}).encode())
    with pytest.raises(AdapterError) as refused:
        asyncio.run(AdapterCache(local_store, base_model_id=BASE_ID).get("ft-y", prefix))
    assert str(refused.value) == "adapter 'ft-y': its manifest.json is invalid"
