"""Examples → token ids and labels; loss only on what the model should learn to write.

chat: assistant turns (via the base model's own chat template); completion: the completion;
alpaca: the output after the chapter's prompt; text: everything. Each example starts a fresh
sequence, so its first label is always masked: in a packed row it would otherwise be predicted
from the previous example.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from workers.data.textgen import alpaca_prompt
from workers.spec import AlpacaExample, ChatExample, CompletionExample, DatasetFormat, Example, TextExample

IGNORE = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class EncodeStats:
    examples: int = 0
    truncated: int = 0
    dropped: int = 0  # nothing left to learn after truncation
    tokens: int = 0
    label_tokens: int = 0
    longest: int = 0
    formats: set[str] = field(default_factory=set)


def _with_bos(tokenizer, ids: list[int]) -> list[int]:
    bos = tokenizer.bos_token_id
    return ids if bos is None or (ids and ids[0] == bos) else [bos, *ids]


def _prompt_answer(tokenizer, prompt: str, answer: str) -> Encoded:
    prompt_ids = _with_bos(tokenizer, tokenizer(prompt, add_special_tokens=False)["input_ids"])
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return Encoded(prompt_ids + answer_ids, [IGNORE] * len(prompt_ids) + answer_ids)


def _render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _chat(tokenizer, example: ChatExample) -> Encoded:
    """Label the characters each assistant turn adds to the rendered conversation, then map
    them to tokens through the offsets: works for any prefix-stable chat template."""
    messages = [{"role": m.role, "content": m.content} for m in example.messages]
    text = _render(tokenizer, messages)
    spans = []
    for k, message in enumerate(example.messages):
        if message.role != "assistant" or message.weight == 0:
            continue
        start = len(_render(tokenizer, messages[:k], generation_prompt=True)) if k else 0
        end = len(_render(tokenizer, messages[: k + 1]))
        spans.append((start, end))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [tok if any(s <= off[0] < e for s, e in spans) else IGNORE
              for tok, off in zip(ids, enc["offset_mapping"])]
    return Encoded(ids, labels)


def encode_example(tokenizer, fmt: DatasetFormat, example: Example) -> Encoded:
    if isinstance(example, ChatExample):
        enc = _chat(tokenizer, example)
    elif isinstance(example, CompletionExample):
        enc = _prompt_answer(tokenizer, example.prompt, example.completion)
    elif isinstance(example, AlpacaExample):
        enc = _prompt_answer(tokenizer, alpaca_prompt(example.instruction, example.input), example.output)
    elif isinstance(example, TextExample):
        ids = _with_bos(tokenizer, tokenizer(example.text, add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
        enc = Encoded(ids, list(ids))
    else:
        raise TypeError(f"unsupported example type {type(example).__name__} ({fmt})")
    if enc.labels:
        enc.labels[0] = IGNORE
    return enc


def encode_dataset(tokenizer, examples: Iterable[tuple[DatasetFormat, Example]],
                   max_seq_length: int) -> tuple[list[Encoded], EncodeStats]:
    """Encode, truncate to ``max_seq_length`` and drop examples left with no label tokens."""
    out: list[Encoded] = []
    stats = EncodeStats()
    for fmt, example in examples:
        stats.examples += 1
        stats.formats.add(fmt)
        enc = encode_example(tokenizer, fmt, example)
        if len(enc) > max_seq_length:
            stats.truncated += 1
            enc = Encoded(enc.input_ids[:max_seq_length], enc.labels[:max_seq_length])
        n_labels = sum(1 for t in enc.labels if t != IGNORE)
        if n_labels == 0:
            stats.dropped += 1
            continue
        stats.tokens += len(enc)
        stats.label_tokens += n_labels
        stats.longest = max(stats.longest, len(enc))
        out.append(enc)
    return out, stats
