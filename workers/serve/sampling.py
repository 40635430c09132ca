"""Per-request decoding settings and next-token choice for a batch of rows, in one batched op.

Sampled rows use the Gumbel-max trick: the argmax of ``logits / T + Gumbel noise`` is a draw from
``softmax(logits / T)``. The noise is counter-based, not a stateful generator: the uniform for
vocabulary entry v of a row's n-th token is a hash of (the row's seed, n, v), computed for every
row at once. A row's tokens then depend on its seed and its own logits alone, whatever else shares
the batch, and the whole batch's choice costs one device→host copy per step.
"""

from __future__ import annotations

import secrets
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
        if self.seed is not None and not -(2**63) <= self.seed < 2**63:  # the OpenAI API's int64
            raise ValueError("seed must be a 64-bit signed integer")


def row_seed(params: SamplingParams) -> int:
    """The key of a request's sampling noise: its seed, or a fresh random one."""
    return params.seed if params.seed is not None else secrets.randbits(64) - 2**63


_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor | int, c: int):
    """``x * c mod 2**32`` for ``0 <= x, c < 2**32`` without overflowing int64 (split in 16-bit halves)."""
    return ((x & 0xFFFF) * c + ((((x >> 16) * c) & 0xFFFF) << 16)) & _M32


def _mix(x):
    """lowbias32 (C. Wellons): a 32-bit integer hash with full avalanche; tensors or ints."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _row_keys(seed: int, step: int) -> tuple[int, int]:
    """Two 32-bit keys for the ``step``-th token of the row seeded ``seed`` (host ints)."""
    s = seed & (2**64 - 1)
    k = _mix(_mix(s & _M32) ^ (s >> 32))
    return _mix(k ^ (step & _M32)), _mix(k ^ 0x9E3779B9 ^ (step >> 32))


def gumbel(seeds: list[int], steps: list[int], vocab: int, device: torch.device) -> torch.Tensor:
    """(rows, vocab) float32 Gumbel noise; row i's depends only on (seeds[i], steps[i])."""
    keys = torch.tensor([_row_keys(s, n) for s, n in zip(seeds, steps)], device=device)
    v = torch.arange(vocab, device=device)
    h = _mix(_mix(keys[:, :1] ^ _mix(v)[None, :]) ^ keys[:, 1:])
    u = ((h >> 8).float() + 0.5) * 2.0**-24  # 24 bits: exact in float32, never 0 or 1
    return -torch.log(-torch.log(u))


def choose(logits: torch.Tensor, params: list[SamplingParams], seeds: list[int],
           steps: list[int]) -> tuple[list[int], set[int]]:
    """(next token per row, indices of rows that have no valid next token).

    ``steps[i]``: how many tokens row i has sampled before (its noise counter). One row's broken
    distribution (non-finite logits, e.g. from a poisoned adapter, or non-finite scaled logits at
    a low temperature) marks that row failed and never raises for the batch. Greedy rows take
    the argmax of their logits, sampled rows the Gumbel-max of theirs."""
    bad = ~torch.isfinite(logits).all(-1)
    tokens = logits.argmax(-1)
    sampled = [i for i, p in enumerate(params) if p.temperature > 0]
    if sampled:
        idx = torch.tensor(sampled, device=logits.device)
        temperature = torch.tensor([params[i].temperature for i in sampled], device=logits.device)
        scaled = logits.index_select(0, idx).float() / temperature[:, None]
        bad = bad.index_copy(0, idx, bad.index_select(0, idx) | ~torch.isfinite(scaled).all(-1))
        if any(params[i].top_p < 1 for i in sampled):
            top_p = torch.tensor([params[i].top_p if params[i].top_p < 1 else float("inf") for i in sampled],
                                 device=logits.device)
            sorted_p, order = torch.softmax(scaled, -1).sort(-1, descending=True)
            outside = sorted_p.cumsum(-1) - sorted_p > top_p[:, None]  # keeps the token crossing top_p
            scaled = scaled.masked_fill(torch.zeros_like(outside).scatter(1, order, outside), float("-inf"))
        noise = gumbel([seeds[i] for i in sampled], [steps[i] for i in sampled], logits.shape[-1], logits.device)
        tokens = tokens.index_copy(0, idx, (scaled + noise).argmax(-1))
    out = torch.where(bad, -1, tokens).tolist()  # the one device sync of the step
    return out, {i for i, t in enumerate(out) if t < 0}
