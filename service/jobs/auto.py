"""Hyperparameters chosen from the dataset when a request leaves them `auto` (the default).

OpenAI's published rule is the model for the epochs: train on a number of examples in a target
range, 3 epochs when that already holds, clamped. Ours raises the range's floor and adds a rate
for short runs, for a measured reason (workers/data/demo/answer_format.jsonl, 150 examples,
tests/workers/train/test_train_auto.py): at the old fixed defaults (3 epochs, batch 4 x 4, 2e-4:
30 optimizer steps) the adapter learned nothing; with the values below (10 epochs, 100 steps at
2e-3) it answers 5 of 5 new prompts in the format. The rule (docs/API.md, "Defaults that learn"):

- n_epochs: 3, unless examples x 3 falls outside [1,500, 25,000] examples seen; then
  ceil(1,500 / examples) (at most 25) or floor(25,000 / examples) (at least 1).
- batch_size (examples per micro-batch): as many as fit in 4,096 tokens at the dataset's mean
  example length, but small enough that an epoch has at least 8 optimizer steps; rounded down to a
  power of two, between 1 and 16 and within the limits on micro-batch tokens and effective batch.
- learning_rate_multiplier: 1,000 / the run's optimizer steps, between 1 and 10. The chapter's
  rate (2e-4) suits runs of a thousand steps or more; a short run at that rate ends before the
  adapter has moved (B starts at zero), so a run of 100 steps gets 10x. Never above the method's
  own bound on the rate.

Token counts are estimated from the file's size (4 bytes of JSONL per token: the keys and quoting
of each line make this an overestimate of text tokens, so the batch errs small). Pure functions:
the service has no tokenizer, and the same file always gets the same values.
"""

from __future__ import annotations

import math
from typing import TypeVar

from pydantic import BaseModel

from workers.spec import MAX_EFFECTIVE_BATCH, MAX_MICRO_BATCH_TOKENS

H = TypeVar("H", bound=BaseModel)  # any method's hyperparameters (all have the training fields)

AUTO_FIELDS = ("n_epochs", "batch_size", "learning_rate_multiplier")

BYTES_PER_TOKEN = 4
TARGET_EPOCHS = 3
MIN_EXAMPLES_SEEN = 1_500
MAX_EXAMPLES_SEEN = 25_000
MAX_AUTO_EPOCHS = 25
TOKENS_PER_MICRO_BATCH = 4_096
MIN_STEPS_PER_EPOCH = 8
MAX_AUTO_BATCH = 16
TARGET_STEPS = 1_000
MAX_AUTO_MULTIPLIER = 10.0


def auto_epochs(examples: int) -> int:
    if examples * TARGET_EPOCHS < MIN_EXAMPLES_SEEN:
        return min(MAX_AUTO_EPOCHS, math.ceil(MIN_EXAMPLES_SEEN / examples))
    if examples * TARGET_EPOCHS > MAX_EXAMPLES_SEEN:
        return max(1, MAX_EXAMPLES_SEEN // examples)
    return TARGET_EPOCHS


def auto_batch_size(examples: int, file_bytes: int, *, max_seq_length: int, accumulation: int) -> int:
    mean_tokens = min(max_seq_length, max(1.0, file_bytes / BYTES_PER_TOKEN / examples))
    by_tokens = int(TOKENS_PER_MICRO_BATCH // mean_tokens)
    by_steps = examples // (MIN_STEPS_PER_EPOCH * accumulation)
    ceiling = min(MAX_AUTO_BATCH, MAX_MICRO_BATCH_TOKENS // max_seq_length, MAX_EFFECTIVE_BATCH // accumulation)
    size = max(1, min(by_tokens, by_steps, ceiling))
    return 1 << (size.bit_length() - 1)  # the power of two at or below


def optimizer_steps(examples: int, *, batch_size: int, accumulation: int, epochs: int) -> int:
    """The train loop's count (workers.train.loop: micro-batches per epoch over accumulation)."""
    return math.ceil(math.ceil(examples / batch_size) / accumulation) * epochs


def auto_multiplier(steps: int) -> float:
    return round(min(MAX_AUTO_MULTIPLIER, max(1.0, TARGET_STEPS / steps)), 4)


def resolve_auto(hp: H, auto: frozenset[str], *, examples: int, file_bytes: int) -> H:
    """``hp`` with each field named in ``auto`` (of AUTO_FIELDS) chosen for this training file.
    The multiplier scales the method's own default rate (what OpenAI's multiplier scales)."""
    update: dict[str, float | int] = {}
    if "n_epochs" in auto:
        update["n_epochs"] = auto_epochs(examples)
    batch_size = hp.batch_size
    if "batch_size" in auto:
        batch_size = update["batch_size"] = auto_batch_size(
            examples, file_bytes, max_seq_length=hp.max_seq_length, accumulation=hp.gradient_accumulation_steps)
    if "learning_rate_multiplier" in auto:
        base_rate = type(hp).model_fields["learning_rate"].default
        steps = optimizer_steps(examples, batch_size=batch_size, accumulation=hp.gradient_accumulation_steps,
                                epochs=update.get("n_epochs", hp.n_epochs))
        update["learning_rate"] = min(base_rate * auto_multiplier(steps), _upper_bound(type(hp), "learning_rate"))
    return hp.model_copy(update=update)


def _upper_bound(model: type[BaseModel], field: str) -> float:
    """The field's declared maximum (``le``), so a chosen value is always one the job may hold."""
    return min((m.le for m in model.model_fields[field].metadata if getattr(m, "le", None) is not None),
               default=math.inf)


def auto_message(hp: BaseModel, auto: frozenset[str], examples: int) -> str:
    """The creation event's words: what `auto` chose, and from what."""
    shown = {"n_epochs": f"n_epochs={hp.n_epochs}", "batch_size": f"batch_size={hp.batch_size}",
             "learning_rate_multiplier": f"learning_rate={hp.learning_rate:g}"}
    return (f"Chosen for {examples} training examples (auto): "
            + ", ".join(shown[name] for name in AUTO_FIELDS if name in auto))
