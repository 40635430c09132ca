"""Micro-batches without padding to max_length.

``pack``: each micro-batch's examples are packed (balanced, longest first) into rows of at most
max_seq_length, ``position_ids`` restarting at 0 for every example. Passed with
``attention_mask=None`` and no cache, transformers (masking_utils.find_packed_sequence_indices)
turns restarting position ids into a block-diagonal causal mask for sdpa/eager, so no token
attends across examples. Row tails are padded with a "sequence" of their own (positions
restart, labels ignored), which the same mechanism isolates.

``pad``: length-grouped micro-batches (sorted within shuffled mega-batches, as HF's
group_by_length), padded to the longest example with an attention mask.

Either way a micro-batch holds ``batch_size`` examples, so the effective batch in examples is
the reference recipe's.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from workers.data.encode import IGNORE, Encoded

MEGABATCH = 50  # micro-batches per length-sorted group in pad mode (HF's default factor)


@dataclass
class Batch:
    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor | None  # pack
    attention_mask: torch.Tensor | None  # pad
    real_tokens: int  # non-padding tokens

    def label_tokens(self) -> int:
        """Tokens the loss counts: labels after the causal shift."""
        return int((self.labels[:, 1:] != IGNORE).sum())

    def model_inputs(self, device) -> dict:
        out = {"input_ids": self.input_ids.to(device), "labels": self.labels.to(device)}
        if self.position_ids is not None:
            out["position_ids"] = self.position_ids.to(device)
        if self.attention_mask is not None:
            out["attention_mask"] = self.attention_mask.to(device)
        return out


def pack_rows(examples: list[Encoded], max_len: int) -> list[list[Encoded]]:
    """As few rows as fit, balanced: longest example first into the emptiest row with room,
    so padding every row to the longest one wastes little."""
    n_rows = max(1, math.ceil(sum(len(e) for e in examples) / max_len))
    rows: list[list[Encoded]] = [[] for _ in range(n_rows)]
    used = [0] * n_rows
    for ex in sorted(examples, key=len, reverse=True):
        fits = [i for i in range(len(rows)) if used[i] + len(ex) <= max_len]
        if not fits:
            rows.append([])
            used.append(0)
            fits = [len(rows) - 1]
        i = min(fits, key=used.__getitem__)
        rows[i].append(ex)
        used[i] += len(ex)
    return [row for row in rows if row]


def collate_packed(examples: list[Encoded], max_len: int, pad_id: int) -> Batch:
    rows = pack_rows(examples, max_len)
    width = max(sum(len(e) for e in row) for row in rows)
    ids, labels, pos = [], [], []
    for row in rows:
        r_ids = [t for e in row for t in e.input_ids]
        r_lab = [t for e in row for t in e.labels]
        r_pos = [p for e in row for p in range(len(e))]
        tail = width - len(r_ids)
        ids.append(r_ids + [pad_id] * tail)
        labels.append(r_lab + [IGNORE] * tail)
        pos.append(r_pos + list(range(tail)))
    return Batch(torch.tensor(ids), torch.tensor(labels), torch.tensor(pos), None,
                 sum(len(e) for e in examples))


def collate_padded(examples: list[Encoded], pad_id: int) -> Batch:
    width = max(len(e) for e in examples)
    ids = [e.input_ids + [pad_id] * (width - len(e)) for e in examples]
    labels = [e.labels + [IGNORE] * (width - len(e)) for e in examples]
    mask = [[1] * len(e) + [0] * (width - len(e)) for e in examples]
    return Batch(torch.tensor(ids), torch.tensor(labels), None, torch.tensor(mask),
                 sum(len(e) for e in examples))


def epoch_batches(examples: list[Encoded], *, batch_size: int, mode: str, max_len: int, pad_id: int,
                  seed: int, rank: int = 0, world_size: int = 1) -> list[Batch]:
    """One epoch's micro-batches for this rank, in a deterministic order given ``seed``.

    Every rank gets the same number of micro-batches (DDP steps in lockstep): the shuffled
    examples are cut into ``world_size * batch_size`` groups and rank r takes the r-th slice.
    """
    rng = random.Random(seed)
    order = list(range(len(examples)))
    rng.shuffle(order)
    if mode == "pad":
        mega = MEGABATCH * batch_size * world_size
        order = [i for s in range(0, len(order), mega)
                 for i in sorted(order[s:s + mega], key=lambda i: -len(examples[i]))]
    step = batch_size * world_size
    groups = [order[s:s + step] for s in range(0, len(order), step)]
    if mode == "pad":
        rng.shuffle(groups)
    batches = []
    for group in groups:
        mine = group[rank::world_size] or group[:1]  # a short last group still feeds every rank
        chosen = [examples[i] for i in mine]
        batches.append(collate_packed(chosen, max_len, pad_id) if mode == "pack"
                       else collate_padded(chosen, pad_id))
    return batches
