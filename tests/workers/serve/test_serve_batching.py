"""The engine's batching machinery: KV memory by tokens in flight, chunked prefill, the
virtual-token hooks, batched sampling, incremental detokenising."""

from __future__ import annotations

import pytest
import torch

from workers.serve.engine import Engine, Request
from workers.serve.sampling import SamplingParams, choose

GREEDY = SamplingParams(max_tokens=6, temperature=0)


def test_concurrency_is_limited_by_tokens_in_flight_not_rows(tiny, prompts):
    # 4 blocks of 16 tokens; 8 rows allowed. A 10-token prompt + 6 new tokens holds 15 positions.
    engine = Engine(tiny.base_model(), max_batch=8, max_len=64, adapter_slots=2, kv_tokens=64, kv_block=16)
    assert engine.kv.k[0].shape[0] == (4 + 2) * 16  # the budget (+ the NULL and TRASH blocks), not 8 x 64
    texts = prompts([10] * 6, seed=31)
    names = ["ad8", None, "ad16", None, "ad8", "mlp8"]
    reqs = [engine.submit(t, GREEDY, tiny.adapter(n) if n else None) for t, n in zip(texts, names)]
    engine.step()
    assert engine.load() == {"running": 4, "waiting": 2}
    assert (engine.stats["kv_tokens_reserved"], engine.stats["kv_tokens_free"]) == (64, 0)
    assert engine.stats["kv_tokens_held"] == 64  # 12 positions each, in one block each
    # A long request needs the whole budget: it waits for every short one to leave, and the
    # short ones submitted after it wait behind it (nobody overtakes the oldest).
    long_req = engine.submit(prompts([40], seed=32)[0], SamplingParams(max_tokens=10, temperature=0))
    late = engine.submit(texts[0], GREEDY, tiny.adapter("ad8"))
    while engine.has_work():
        engine.step()
        running = engine._running
        assert long_req not in running or running == [long_req]
        assert late not in running or long_req.finish_reason is not None
    for prompt, name, req in zip(texts + [texts[0]], names + ["ad8"], reqs + [late]):
        assert req.output_ids == tiny.reference(prompt, name, GREEDY.max_tokens), name
    assert long_req.output_ids == tiny.reference(long_req.prompt_ids, None, 10)
    assert (engine.stats["kv_tokens_free"], engine.stats["kv_tokens_held"]) == (64, 0)
    with pytest.raises(ValueError, match="must hold one request"):
        Engine(tiny.base_model(), max_batch=2, max_len=64, kv_tokens=32)


def test_long_prompts_are_prefilled_in_chunks_while_running_rows_decode(tiny, prompts):
    engine = Engine(tiny.base_model(), max_batch=4, max_len=96, adapter_slots=2, max_prefill_tokens=8)
    first, long_prompt, short = prompts([5, 37, 7], seed=33)
    running = engine.submit(first, SamplingParams(max_tokens=20, temperature=0), tiny.adapter("ad16"))
    engine.step()
    assert len(running.output_ids) == 2
    # 37 + 7 prompt tokens at 8 a step: 6 steps; chunks end mid-block and mid-row, two rows share one.
    long_req = engine.submit(long_prompt, GREEDY, tiny.adapter("ad8"))
    short_req = engine.submit(short, GREEDY)
    for step in range(1, 7):
        before, prefilled = engine.stats["prefill_tokens"], len(running.output_ids)
        engine.step()
        assert engine.stats["prefill_tokens"] - before <= 8
        assert len(running.output_ids) == prefilled + 1  # the running row never skips a step
        assert (long_req.output_ids != []) == (step >= 5)  # its first token only after its last chunk
        assert (short_req.output_ids != []) == (step >= 6)
    while engine.has_work():
        engine.step()
    assert running.output_ids == tiny.reference(first, "ad16", 20)
    assert long_req.output_ids == tiny.reference(long_prompt, "ad8", GREEDY.max_tokens)
    assert short_req.output_ids == tiny.reference(short, None, GREEDY.max_tokens)


def test_virtual_token_hooks_equal_the_same_tokens_in_the_prompt(tiny, prompts):
    """Prompt tuning's input embeddings and prefix tuning's keys/values, here those of real
    tokens, give what those tokens give as the prompt's start; across chunk boundaries too."""
    model = tiny.base_model()
    (prompt,) = prompts([12], seed=34)
    k = 5
    with torch.no_grad():
        embeds = model.get_input_embeddings()(torch.tensor(prompt[:k]))
        cache = model(input_ids=torch.tensor([prompt[:k]]), use_cache=True).cache
        prefix_kv = [(layer.keys[0], layer.values[0]) for layer in cache.layers]
    engine = Engine(model, max_batch=4, max_len=64, adapter_slots=1, max_prefill_tokens=3)
    want = tiny.reference(prompt, None, GREEDY.max_tokens)
    plain = engine.submit(prompt, GREEDY)
    embedded = engine.submit(prompt[k:], GREEDY, prompt_embeds=embeds)
    prefixed = engine.submit(prompt[k:], GREEDY, prefix_kv=prefix_kv)
    with torch.no_grad():  # the first 2 tokens as keys/values, the next k as embeddings
        middle = model.get_input_embeddings()(torch.tensor(prompt[2:k + 2]))
    both = engine.submit(prompt[k + 2:], GREEDY, prefix_kv=[(a[:, :2], b[:, :2]) for a, b in prefix_kv],
                         prompt_embeds=middle)
    while engine.has_work():
        engine.step()
    for req in (plain, embedded, prefixed, both):
        assert req.output_ids == want
    with pytest.raises(ValueError, match="prompt_embeds must be shaped"):
        engine.submit(prompt, GREEDY, prompt_embeds=torch.zeros(3, 7))
    with pytest.raises(ValueError, match="prefix_kv must be"):
        engine.submit(prompt, GREEDY, prefix_kv=prefix_kv[:1])
    with pytest.raises(ValueError, match="5 virtual"):
        engine.submit(prompt[k:] * 5, SamplingParams(max_tokens=30), prompt_embeds=embeds)


def test_sampled_rows_depend_on_their_seed_alone_whatever_shares_the_batch(tiny, prompts):
    engine = Engine(tiny.base_model(), max_batch=8, max_len=64, adapter_slots=2)
    text, other = prompts([6, 9], seed=35)
    hot = SamplingParams(max_tokens=12, temperature=1.3, top_p=0.9, seed=11)
    (alone,) = engine.generate_batch([text], hot)
    crowd = engine.generate_batch(
        [other, text, other, text, text],
        [SamplingParams(max_tokens=5, temperature=0.7, seed=3), hot, GREEDY,
         SamplingParams(max_tokens=12, temperature=1.3, top_p=0.9, seed=12), hot],
        [tiny.adapter("ad8"), None, tiny.adapter("ad8"), None, None])
    assert crowd[1].output_ids == crowd[4].output_ids == alone.output_ids
    assert crowd[3].output_ids != alone.output_ids  # another seed, another draw
    unseeded = engine.generate_batch([text] * 2, SamplingParams(max_tokens=12, temperature=1.3))
    assert unseeded[0].output_ids != unseeded[1].output_ids


def test_batched_draws_follow_the_distribution_with_one_host_sync(monkeypatch):
    logits = torch.tensor([0.0, 1.0, 2.0, 3.0, -1e4])
    rows = 4000
    params = [SamplingParams(temperature=1.0)] * rows
    syncs = {"n": 0}
    real = torch.Tensor.tolist

    def counting(self):
        syncs["n"] += 1
        return real(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counting)
    tokens, bad = choose(logits.expand(rows, 5), params, [5] * rows, list(range(rows)))
    assert syncs["n"] == 1 and not bad
    monkeypatch.undo()
    counts = torch.bincount(torch.tensor(tokens), minlength=5).double()
    p = torch.softmax(logits.double(), 0)
    sigma = (rows * p * (1 - p)).sqrt()
    assert ((counts - rows * p).abs() <= 5 * sigma + 1).all(), counts  # 5 sigma: fails ~1 in 10^6
    # top_p: the nucleus of {3, 2} (0.64 + 0.24 crosses 0.8); a cold temperature is near-greedy.
    nucleus, _ = choose(logits.expand(rows, 5), [SamplingParams(top_p=0.8)] * rows, [6] * rows,
                        list(range(rows)))
    assert set(nucleus) == {2, 3}
    cold, _ = choose(logits.expand(100, 5), [SamplingParams(temperature=0.05)] * 100, [7] * 100, list(range(100)))
    assert set(cold) == {3}


def test_a_broken_row_fails_alone_in_the_batched_choice():
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=1),
              SamplingParams(temperature=0.5, top_p=0.5), SamplingParams(temperature=0.01),
              SamplingParams(temperature=1.0)]
    clean, bad = choose(logits, params, [1, 2, 3, 4, 5], [0] * 5)
    assert not bad
    broken = logits.clone()
    broken[1, 3] = float("nan")  # a poisoned row
    broken[3] = 1e37  # finite logits whose scaling by 1 / 0.01 overflows
    got, bad = choose(broken, params, [1, 2, 3, 4, 5], [0] * 5)
    assert bad == {1, 3}
    assert [got[i] for i in (0, 2, 4)] == [clean[i] for i in (0, 2, 4)]


class RecordingTokenizer:
    """The real tokenizer, recording how many ids each decode is given."""

    def __init__(self, inner):
        self.inner, self.sizes = inner, []

    def decode(self, ids, **kwargs):
        self.sizes.append(len(ids))
        return self.inner.decode(ids, **kwargs)


def test_incremental_detokenising_equals_decoding_the_whole_output(tiny):
    """Multi-byte characters split over byte tokens, merged tokens and special tokens: every
    event's text is whole characters, the events add up to the full decode, and each token
    decodes a window of a few ids, not the output so far."""
    tok = tiny.tokenizer
    text = "héllo ✓ 日本語 — The quick brown fox. LoRA adapters é🙂ü! " * 6
    ids = tok(text, add_special_tokens=False)["input_ids"]
    ids = ids[:40] + [tok.eos_token_id] + ids[40:]  # a special token, skipped by decode
    engine = Engine(tiny.base_model(), tok, max_batch=1, max_len=64, adapter_slots=1)
    recording = RecordingTokenizer(tok)
    engine.tokenizer = recording
    req = Request(0, [1], SamplingParams(max_tokens=len(ids)), None, None)
    deltas = []
    for i, token in enumerate(ids):
        req.output_ids.append(token)
        if i == len(ids) - 1:
            req.finish_reason = "length"
        deltas.append(engine._detokenize(req))
    assert "".join(deltas) == req.text == tok.decode(ids, skip_special_tokens=True)
    assert not any("\ufffd" in d for d in deltas)
    assert max(recording.sizes) <= 8 and len(ids) > 100
    # An output that ends inside a character is sent whole at the end, as the full decode has it.
    cut = tok("é", add_special_tokens=False)["input_ids"][:1]
    req = Request(1, [1], SamplingParams(max_tokens=1), None, None, output_ids=list(cut))
    assert engine._detokenize(req) == ""
    req.finish_reason = "length"
    assert engine._detokenize(req) == tok.decode(cut) == "\ufffd"


def test_staged_rows_equal_the_per_step_gather(tiny, prompts):
    """On a CPU each layer keeps a batch's rows gathered while the rows stay the same and adds
    each step's tokens: rows joining and leaving, prompts prefilled in chunks, the same tokens
    as gathering every row's blocks at every step, and as PEFT."""
    outs = {}
    for staging in (True, False):
        engine = Engine(tiny.base_model(), max_batch=4, max_len=64, adapter_slots=2, max_prefill_tokens=8)
        engine.kv.staging = staging
        texts = prompts([12, 5, 9, 17, 6], seed=41)
        names = ["ad8", None, "ad16", "ad8", None]
        params = [SamplingParams(max_tokens=m, temperature=0) for m in (7, 3, 9, 5, 8)]
        reqs = [engine.submit(t, p, tiny.adapter(n) if n else None) for t, p, n in zip(texts[:3], params, names)]
        staged = 0
        for _ in range(3):
            engine.step()
            staged += engine.kv._stage is not None
        reqs += [engine.submit(t, p, tiny.adapter(n) if n else None) for t, p, n in zip(texts[3:], params[3:], names[3:])]
        while engine.has_work():
            engine.step()
            staged += engine.kv._stage is not None
        assert (staged > 0) == staging
        outs[staging] = [r.output_ids for r in reqs]
        for prompt, name, p, req in zip(texts, names, params, reqs):
            assert req.output_ids == tiny.reference(prompt, name, p.max_tokens), name
    assert outs[True] == outs[False]
