"""Tokenisation, label masking and batching: packed rows must not leak attention across examples."""

from __future__ import annotations

import pytest
import torch

from workers.data.batching import collate_packed, collate_padded, epoch_batches, pack_rows
from workers.data.encode import IGNORE, encode_dataset, encode_example
from workers.models.loading import load_tokenizer
from workers.spec import parse_example


@pytest.fixture(scope="module")
def tok(tiny_llama_dir):
    return load_tokenizer(tiny_llama_dir)


@pytest.fixture(scope="module")
def model(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, attn_implementation="sdpa").eval()


def labelled_text(tok, obj) -> str:
    enc = encode_example(tok, *parse_example(obj))
    assert len(enc.labels) == len(enc.input_ids) and enc.labels[0] == IGNORE
    return tok.decode([t for t, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE])


def test_labels_cover_only_what_the_model_should_write(tok):
    chat = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                         {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "And?"},
                         {"role": "assistant", "content": "Bye.", "weight": 0},
                         {"role": "user", "content": "Last?"}, {"role": "assistant", "content": "Yes."}]}
    assert labelled_text(tok, chat) == "Hello.<|end|>\nYes.<|end|>\n"
    assert labelled_text(tok, {"prompt": "The sky is", "completion": " blue."}) == " blue.</s>"
    assert labelled_text(tok, {"instruction": "Name a color.", "input": "", "output": "Red."}) == "Red.</s>"
    alpaca = encode_example(tok, *parse_example({"instruction": "Add.", "input": "2 and 3", "output": "5"}))
    assert "### Input:\n2 and 3\n\n### Response:\n5" in tok.decode(alpaca.input_ids)
    # raw text: everything but the first token (no previous token predicts it)
    assert labelled_text(tok, {"text": "One and two make 3."}) == "One and two make 3.</s>"


def test_truncation_is_counted_and_unlearnable_examples_dropped(tok):
    rows = [("completion", parse_example({"prompt": "word " * 40, "completion": "end"})[1]),
            ("text", parse_example({"text": "short"})[1]),
            ("text", parse_example({"text": "long " * 40})[1])]
    data, stats = encode_dataset(tok, rows, max_seq_length=16)
    assert (stats.examples, stats.truncated, stats.dropped, len(data)) == (3, 2, 1, 2)
    assert all(len(e) <= 16 for e in data)


def _examples(tok, n=7):
    texts = [f"{'The sky is blue. ' * (i + 1)}Ben ran to the river." for i in range(n)]
    return encode_dataset(tok, [("text", parse_example({"text": t})[1]) for t in texts], 512)[0]


def _alone(model, ex):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ex.input_ids]), use_cache=False).logits[0]


def test_packed_rows_do_not_leak_attention(tok, model):
    examples = _examples(tok)
    batch = collate_packed(examples, max_len=64, pad_id=tok.pad_token_id)
    assert batch.input_ids.shape[0] > 1 and batch.attention_mask is None
    assert batch.real_tokens == sum(len(e) for e in examples)
    with torch.no_grad():
        packed = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits
        leaky = model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                      attention_mask=torch.ones_like(batch.input_ids), use_cache=False).logits
    found, leaked = 0, False
    for r, row in enumerate(pack_rows(examples, 64)):
        offset = 0
        for ex in row:
            span = slice(offset, offset + len(ex))
            assert batch.input_ids[r, span].tolist() == ex.input_ids
            torch.testing.assert_close(packed[r, span], _alone(model, ex), atol=1e-4, rtol=1e-4)
            leaked |= offset > 0 and not torch.allclose(leaky[r, span], _alone(model, ex), atol=1e-4)
            offset += len(ex)
            found += 1
    assert found == len(examples)
    assert leaked  # the same rows under a plain causal mask do mix examples: the check has teeth


def test_padded_batches_match_per_example_logits_and_group_by_length(tok, model):
    examples = _examples(tok, 5)
    batch = collate_padded(examples, tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    for i, ex in enumerate(examples):
        torch.testing.assert_close(logits[i, :len(ex)], _alone(model, ex), atol=1e-4, rtol=1e-4)
    many = _examples(tok, 16)
    padded = epoch_batches(many, batch_size=4, mode="pad", max_len=512, pad_id=tok.pad_token_id, seed=0)
    waste = sum(b.input_ids.numel() - b.real_tokens for b in padded)
    assert waste < 0.2 * sum(b.real_tokens for b in padded)


def test_epoch_batches_shard_examples_across_ranks(tok):
    examples = _examples(tok, 10)
    shards = [epoch_batches(examples, batch_size=2, mode="pack", max_len=512, pad_id=0, seed=3, rank=r,
                            world_size=2) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 3
    seen = sorted(b.real_tokens for s in shards for b in s)
    assert sum(seen) >= sum(len(e) for e in examples)
