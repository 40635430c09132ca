"""Per-request decoding settings and next-token choice for a batch of rows."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if not 0 <= self.temperature <= 2:
            raise ValueError("temperature must be between 0 and 2")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.seed is not None and not -(2**63) <= self.seed < 2**63:  # torch's generators: 64 bits
            raise ValueError("seed must be a 64-bit signed integer")


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.temperature == 0:
        return None
    gen = torch.Generator(device=device)
    if params.seed is None:
        gen.seed()
    else:
        gen.manual_seed(params.seed)
    return gen


def choose(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> tuple[list[int], set[int]]:
    """(next token per row, indices of rows that have no valid next token).

    One row's broken distribution (non-finite logits, e.g. from a poisoned adapter, or
    probabilities that underflow to nothing) marks that row failed and never raises for the
    batch. Greedy rows in one argmax; sampled rows each with their own generator (reproducible
    by seed whatever else shares the batch)."""
    finite = torch.isfinite(logits).all(-1)
    out = logits.argmax(-1).tolist()
    bad = {i for i, ok in enumerate(finite.tolist()) if not ok}
    for i, (p, gen) in enumerate(zip(params, generators)):
        if p.temperature == 0 or i in bad:
            continue
        probs = torch.softmax(logits[i].float() / p.temperature, dim=-1)
        if p.top_p < 1:
            sorted_p, order = probs.sort(descending=True)
            outside = sorted_p.cumsum(-1) - sorted_p > p.top_p  # keeps the token crossing top_p
            sorted_p[outside] = 0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        total = float(probs.sum())
        if not math.isfinite(total) or total <= 0 or not bool(torch.isfinite(probs).all()):
            bad.add(i)  # multinomial would raise for the whole batch
            continue
        out[i] = int(torch.multinomial(probs, 1, generator=gen))
    return out, bad
