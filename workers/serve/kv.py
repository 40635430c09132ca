"""A paged KV cache: per layer, one pool of fixed-size token blocks; per request, a block list.

Memory is a token budget, whatever ``max_batch`` and ``max_len`` are: a request is admitted when
the blocks for its own length (prompt + max_tokens, rounded up to whole blocks) are free, and it
holds them until it leaves, so concurrency is limited by the tokens in flight and a running row
never waits for memory (no preemption to get wrong). Blocks are taken from the pool as the row
grows, so ``usage`` shows what is really filled beside what is promised.

The engine describes each forward with ``plan``: row r writes ``counts[r]`` tokens at positions
``starts[r]...`` (a prefill chunk, or 1 for decode) and attends to its positions ``0..starts[r] +
counts[r] - 1``. It quacks like a transformers ``Cache`` for the one call the attention layers make
(``update``): the new keys are scattered into their rows' slots, and each row's blocks are gathered
back (whole blocks: as fast as a contiguous copy, where a gather by token is several times slower)
as a ``(rows, kv_heads, span, head_dim)`` view for attention under the engine's 4-D mask. On a
CPU, while a batch keeps the same rows, that gather is kept per layer and each step only writes
its new tokens into it (``staging``).

A masked position must never meet stale data (masked attention over a NaN left by a failed request
is still NaN: 0 × NaN): a block is zeroed when a row takes it, and a row shorter than the batch's
span reads ``NULL`` (all zeros, never written) past its last block. ``TRASH`` (never read) takes
the padding of ragged chunks.
"""

from __future__ import annotations

import torch

NULL, TRASH = 0, 1  # block ids


class PagedKVCache:
    def __init__(self, *, layers: int, kv_heads: int, head_dim: int, tokens: int, block_size: int = 16,
                 dtype: torch.dtype, device: torch.device, staging: bool | None = None):
        self.block_size, self.device = block_size, device
        self.blocks = -(-tokens // block_size)  # usable blocks: the budget, rounded up
        shape = ((self.blocks + 2) * block_size, kv_heads, head_dim)  # + NULL and TRASH
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self._free = list(range(self.blocks + 1, TRASH, -1))  # pop() hands out low ids first
        self._held: dict[object, list[int]] = {}  # request key → its blocks, in position order
        self._promised: dict[object, int] = {}  # request key → blocks reserved for its whole length
        self._reserved = 0
        self._taken: list[int] = []  # blocks handed out since the last zeroing
        self._plan: tuple | None = None
        # Where each layer's blocks are gathered, reused from layer to layer and step to step: a
        # fresh tensor of that size each time costs more in page faults (CPU) than the copy.
        self._gathered = (torch.empty(0, dtype=dtype, device=device), torch.empty(0, dtype=dtype, device=device))
        # On a CPU the per-step gather is a large part of a small model's decode step: while the
        # batch's rows stay the same, each layer keeps its rows' keys/values gathered ("staged",
        # (rows + 1, capacity, heads, dim), the last row takes padding) and each step adds only
        # its new tokens. Bounded by the pool's own size; off on accelerators, where that memory
        # is worth more than the copy.
        self.staging = device.type == "cpu" if staging is None else staging
        self._stage: dict | None = None

    @property
    def tokens(self) -> int:
        return self.blocks * self.block_size

    def _blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def fits(self, tokens: int) -> bool:
        """Whether a request of ``tokens`` positions can be admitted now."""
        return self._reserved + self._blocks_for(tokens) <= self.blocks

    def reserve(self, key: object, tokens: int) -> None:
        need = self._blocks_for(tokens)
        if self._reserved + need > self.blocks:
            raise RuntimeError(f"KV cache: {tokens} tokens do not fit (check fits() first)")
        self._promised[key], self._held[key] = need, []
        self._reserved += need

    def release(self, key: object) -> None:
        self._free.extend(reversed(self._held.pop(key, [])))
        self._reserved -= self._promised.pop(key, 0)

    def _grow(self, key: object, length: int) -> list[int]:
        blocks = self._held[key]
        need = self._blocks_for(length)
        if need > self._promised[key]:
            raise RuntimeError(f"KV cache: row {key!r} grew past its reservation")
        while len(blocks) < need:
            blocks.append(self._free.pop())
            self._taken.append(blocks[-1])
        return blocks

    def _zero_taken(self) -> None:
        if not self._taken:
            return
        taken = torch.tensor(self._taken, device=self.device)
        for pool in self.k + self.v:
            pool.view(-1, self.block_size * pool.shape[1] * pool.shape[2]).index_fill_(0, taken, 0)
        self._taken = []

    def usage(self) -> dict:
        held = sum(len(b) for b in self._held.values()) * self.block_size
        return {"kv_tokens_total": self.tokens, "kv_tokens_reserved": self._reserved * self.block_size,
                "kv_tokens_held": held, "kv_tokens_free": self.tokens - self._reserved * self.block_size}

    def write(self, key: object, start: int, layers_kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Put precomputed keys/values ``(kv_heads, n, head_dim)`` per layer at positions
        ``start..start+n-1`` of a row (prefix tuning's virtual tokens)."""
        n = layers_kv[0][0].shape[1]
        blocks = self._grow(key, start + n)
        self._zero_taken()
        self._stage = None  # the staged rows no longer match the blocks
        pos = torch.arange(start, start + n)
        slots = (torch.tensor(blocks)[pos // self.block_size] * self.block_size + pos % self.block_size
                 ).to(self.device)
        for pool_k, pool_v, (k, v) in zip(self.k, self.v, layers_kv, strict=True):
            pool_k.index_copy_(0, slots, k.transpose(0, 1).to(pool_k))
            pool_v.index_copy_(0, slots, v.transpose(0, 1).to(pool_v))

    def plan(self, keys: list, starts: list[int], counts: list[int]) -> None:
        """The next forward: row r writes ``counts[r]`` tokens at ``starts[r]...`` (padded to the
        longest count) and attends to its first ``starts[r] + counts[r]`` positions."""
        b = self.block_size
        ends = [s + c for s, c in zip(starts, counts)]
        tables = [self._grow(k, e) for k, e in zip(keys, ends)]
        self._zero_taken()
        width = max(len(t) for t in tables)
        # One host→device copy per forward: block tables (padded with NULL), starts, counts.
        packed = torch.tensor([t + [NULL] * (width - len(t)) + [s, c] for t, s, c in zip(tables, starts, counts)],
                              device=self.device)
        table, start, count = packed[:, :width], packed[:, width:width + 1], packed[:, width + 1:]
        t = max(counts)
        pos = start + torch.arange(t, device=self.device)  # (rows, t): the positions written
        written = table.gather(1, (pos // b).clamp(max=width - 1)) * b + pos % b
        write = torch.where(pos < start + count, written, TRASH * b).view(-1)
        # Every row starts empty: attention needs only the new keys. Else whole blocks, NULL past a row's last.
        self._plan = (write, None if not any(starts) else table.reshape(-1), max(ends), None)
        if self._plan[1] is not None and self.staging:
            self._plan = self._plan[:3] + (self._stage_plan(keys, pos, start + count, width),)

    def _stage_plan(self, keys: list, pos: torch.Tensor, end: torch.Tensor, width: int) -> tuple | None:
        """(rebuild?, where the new tokens go in the staged rows) or None (too large to stage)."""
        rows, key = len(keys), tuple(keys)
        cap = max(self._promised[k] for k in keys) * self.block_size  # no row of the batch grows past it
        if (rows + 1) * cap > self.tokens:
            self._stage = None
            return None
        stage = self._stage
        rebuild = stage is None or stage["keys"] != key
        if rebuild:
            shape = (rows + 1, cap, *self.k[0].shape[1:])
            if stage is None or stage["k"][0].shape != shape:
                stage = {"k": [torch.zeros(shape, dtype=self.k[0].dtype, device=self.device) for _ in self.k],
                         "v": [torch.zeros(shape, dtype=self.k[0].dtype, device=self.device) for _ in self.k]}
            stage.update(keys=key, cap=cap, width=width)
            self._stage = stage
        row = torch.arange(rows, device=self.device)[:, None]
        at = torch.where(pos < end, row * cap + pos, rows * cap).view(-1)  # padding: the last row
        return rebuild, at

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        write, blocks, span, staged = self._plan
        rows, heads, t, dim = key.shape
        pool_k, pool_v = self.k[layer_idx], self.v[layer_idx]
        new_k = key.transpose(1, 2).reshape(rows * t, heads, dim)
        new_v = value.transpose(1, 2).reshape(rows * t, heads, dim)
        pool_k.index_copy_(0, write, new_k)
        pool_v.index_copy_(0, write, new_v)
        if blocks is None:
            return key, value
        if staged is not None:
            return self._staged(layer_idx, staged, blocks, new_k, new_v, rows, span)
        per_block = self.block_size * heads * dim  # 2-D: index_select copies whole rows then
        if self._gathered[0].numel() < blocks.numel() * per_block:
            self._gathered = tuple(torch.empty(blocks.numel() * per_block, dtype=pool_k.dtype, device=self.device)
                                   for _ in range(2))
        out = []
        for pool, buf in zip((pool_k, pool_v), self._gathered):
            got = buf[:blocks.numel() * per_block].view(-1, per_block)
            torch.index_select(pool.view(-1, per_block), 0, blocks, out=got)
            out.append(got.view(rows, -1, heads, dim)[:, :span].transpose(1, 2))
        return out[0], out[1]

    def _staged(self, layer: int, staged: tuple, blocks: torch.Tensor, new_k: torch.Tensor,
                new_v: torch.Tensor, rows: int, span: int):
        """The layer's staged rows: gathered whole from the blocks when the batch's rows changed
        (zeros past what was gathered: a masked position never meets stale data), else the new
        tokens written in."""
        rebuild, at = staged
        stage, out = self._stage, []
        for pool, staged_rows, new in ((self.k[layer], stage["k"][layer], new_k), (self.v[layer], stage["v"][layer], new_v)):
            if rebuild:
                per_block = self.block_size * pool.shape[1] * pool.shape[2]
                staged_rows.zero_()
                gathered = torch.index_select(pool.view(-1, per_block), 0, blocks).view(rows, -1, per_block)
                staged_rows[:rows].view(rows, -1, per_block)[:, :stage["width"]].copy_(gathered)
            else:
                staged_rows.view(-1, *staged_rows.shape[2:]).index_copy_(0, at, new)
            out.append(staged_rows[:rows, :span].transpose(1, 2))
        return out[0], out[1]
