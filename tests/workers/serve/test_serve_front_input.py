"""Tenant input the serving front must answer as the caller's error, in our words: never a
TypeError or a library's text turned into a 500 (or, under Ray, a retryable 503); and stop strings
whose cost on the shared engine thread stays bounded."""

from __future__ import annotations

import asyncio
import copy
import time

import pytest

from workers.serve.engine import Engine, Request
from workers.serve.front import MAX_STOP_CHARS, ServingFront
from workers.serve.runner import EngineRunner
from workers.serve.sampling import SamplingParams

BASE_ID = "test/tiny-random-llama"
USER = [{"role": "user", "content": "Hello there"}]
# A template that, like many real ones, refuses a conversation in an order it does not expect.
STRICT_TEMPLATE = (
    "{% if messages[0]['role'] == 'assistant' %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


class BrokenTokenizer:
    """The real tokenizer, except that tokenising raises what a library bug would."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, *args, **kwargs):
        raise RuntimeError("tokenizers panicked at /home/builder/src/secret.rs:42")

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.fixture(scope="module")
def engine(tiny):
    return Engine(tiny.base_model(), tiny.tokenizer, max_batch=2, max_len=64, adapter_slots=1)


@pytest.fixture(scope="module")
def ask(tiny, engine):
    """ask(kind, body, tokenizer=None) -> the items ServingFront.run yields."""
    runner = EngineRunner(engine)

    def call(kind: str, body: dict, tokenizer=None) -> list[dict]:
        front = ServingFront(runner, None, tokenizer or tiny.tokenizer, base_model_id=BASE_ID,
                             default_max_tokens=4)

        async def run():
            return [item async for item in front.run(kind, body)]

        return asyncio.run(asyncio.wait_for(run(), 60))

    yield call
    runner.close()


def _problem(items: list[dict]) -> dict:
    assert len(items) == 1 and "problem" in items[0], items
    return items[0]["problem"]


@pytest.mark.parametrize("text", [5, None, ["a"], {"t": "x"}])
def test_a_text_part_whose_text_is_not_a_string_is_a_422(ask, text):
    body = {"model": BASE_ID, "messages": [{"role": "user", "content": [{"type": "text", "text": text}]}]}
    p = _problem(ask("chat", body))
    assert (p["status"], p["code"]) == (422, "validation_error"), p
    assert p["param"] == "messages.0.content"


def test_text_parts_and_ignored_parts_still_serve(ask):
    content = [{"type": "text", "text": "Hello "}, {"type": "image_url", "image_url": {"url": "x"}},
               {"type": "text", "text": "there"}]
    (item,) = ask("chat", {"model": BASE_ID, "messages": [{"role": "user", "content": content}],
                           "max_tokens": 2})
    assert item["response"]["usage"]["completion_tokens"] >= 1


def test_a_chat_template_refusing_the_messages_is_a_400_in_our_words(tiny, ask):
    strict = copy.deepcopy(tiny.tokenizer)
    strict.chat_template = STRICT_TEMPLATE
    body = {"model": BASE_ID, "messages": [{"role": "assistant", "content": "I start"}, *USER]}
    p = _problem(ask("chat", body, strict))
    assert (p["status"], p["code"], p["param"]) == (400, "invalid_request", "messages"), p
    assert "alternate" not in p["detail"] and "roles and order" in p["detail"]
    assert "response" in ask("chat", {"model": BASE_ID, "messages": USER, "max_tokens": 2}, strict)[0]


def test_a_library_failure_is_our_500_never_its_text_nor_a_retryable_503(tiny, ask):
    p = _problem(ask("completion", {"model": BASE_ID, "prompt": "Hi"}, BrokenTokenizer(tiny.tokenizer)))
    assert (p["status"], p["code"]) == (500, "internal_error"), p
    assert "secret" not in p["detail"] and "panicked" not in p["detail"]


def test_a_library_valueerror_is_a_400_in_our_words(ask, monkeypatch):
    """What PyTorch said for seed=2**64 (before seeds were bounded) reached the tenant verbatim."""
    from workers.serve import engine as engine_module

    def refuse(params):
        raise ValueError("Overflow when unpacking long long")

    monkeypatch.setattr(engine_module, "row_seed", refuse)
    p = _problem(ask("completion", {"model": BASE_ID, "prompt": "Hi", "temperature": 1}))
    assert (p["status"], p["code"]) == (400, "invalid_request"), p
    assert "Overflow" not in p["detail"] and p["param"] is None


@pytest.mark.parametrize("seed", [2**64, 2**63, -(2**63) - 1])
def test_a_seed_beyond_64_bits_is_a_422_on_seed(ask, seed):
    p = _problem(ask("completion", {"model": BASE_ID, "prompt": "Hi", "seed": seed, "temperature": 1}))
    assert (p["status"], p["code"], p["param"]) == (422, "validation_error", "seed"), p
    assert "Overflow" not in p["detail"]


@pytest.mark.parametrize("seed", [2**63 - 1, -(2**63), 2**64 - 1 - 2**63])
def test_seeds_at_the_64_bit_bounds_sample(ask, seed):
    (item,) = ask("completion", {"model": BASE_ID, "prompt": "Hi", "seed": seed, "temperature": 1,
                                 "max_tokens": 2})
    assert item["response"]["usage"]["completion_tokens"] >= 1


def test_stop_strings_are_bounded_in_length(ask):
    for stop in ("x" * (MAX_STOP_CHARS + 1), ["ok", "y" * (MAX_STOP_CHARS + 1)]):
        p = _problem(ask("completion", {"model": BASE_ID, "prompt": "Hi", "stop": stop}))
        assert (p["status"], p["param"]) == (422, "stop"), p
    (item,) = ask("completion", {"model": BASE_ID, "prompt": "Hi", "max_tokens": 2,
                                 "stop": ["x" * MAX_STOP_CHARS] * 4})
    assert "response" in item


class FixedText:
    """A tokenizer whose token 1 decodes to one long text (token 2 to ``tail``) at no cost: what
    is measured below is the engine's stop-string work alone."""

    def __init__(self, text: str, tail: str = ""):
        self.pieces = {1: text, 2: tail}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.pieces[i] for i in ids)


def test_stop_work_per_token_does_not_grow_with_the_output(engine):
    """4 stops of 256 characters over 1M characters of output: the held-back search looks at the
    last 255 characters, not at (a copy of) the whole output once per prefix length of each stop
    (~25 ms per token here, for every row of the batch, before)."""
    stops = tuple("a" + "b" * (MAX_STOP_CHARS - 2) + str(i) for i in range(4))
    text = "a" * 1_000_000
    saved = engine.tokenizer

    def steps(output: str):
        """Seconds for 50 tokens' worth of detokenise steps over ``output``, best of 3."""
        engine.tokenizer = FixedText(output)
        req = Request(0, [1], SamplingParams(max_tokens=10**6, stop=stops), None, None, output_ids=[1])
        first = engine._detokenize(req)
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            later = [engine._detokenize(req) for _ in range(50)]
            best = min(best, time.perf_counter() - started)
        return best, first, later, req

    try:  # like with like on this machine: a 1,000× longer output must not cost ~1,000× per step
        short = steps("a" * 1_000)[0]
        elapsed, first, later, req = steps(text)
    finally:
        engine.tokenizer = saved
    assert elapsed < 20 * short + 0.02, f"{elapsed:.4f}s vs {short:.4f}s for 50 steps over 1M vs 1k chars"
    assert first == text[:-1] and later == [""] * 50  # the last "a" may start a stop: held back
    engine.tokenizer = FixedText(text, "b" * (MAX_STOP_CHARS - 2) + "2!")
    req.output_ids.append(2)  # the next token completes a stop
    try:  # the stop completed: the text ends where it began, and nothing of it was ever sent
        assert engine._detokenize(req) == ""
        assert req.finish_reason == "stop" and req.text == text[:-1]
    finally:
        engine.tokenizer = saved
