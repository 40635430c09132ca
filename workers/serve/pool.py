"""Device memory for LoRA weights, paged by rank (S-LoRA's unified memory pool, one per layer shape).

A page is one rank of one layer: row ``p`` of ``a`` (``in`` wide) is a row of ``A`` and row ``p``
of ``b`` (``out`` wide) the matching column of ``B`` times the adapter's scale. One pool serves every
wrapped layer of the same ``(in, out)`` shape, across all decoder layers, so an adapter takes
exactly ``rank`` pages per layer it targets (plus one per trained bias) and nothing for the layers it
leaves alone: no padding to a maximum rank, no per-slot reservation. An adapter's pages in a pool
form one contiguous range, so a batch's page lists are a few integer ops away from its ranks and
starts (``LoraBatch``). Page 0 stays zero: rows without a bias read it.

Pools grow geometrically while the owner's byte budget allows; when it does not, the owner
compacts them (``compact``), which moves ranges towards the start and shrinks each pool to what it
uses. Growing or compacting re-creates the tensors, so batches prepared before are stale:
``DeviceSlots.generation`` tells the engine.
"""

from __future__ import annotations

import bisect

import torch


class PagePool:
    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, device: torch.device):
        self.in_features, self.out_features = in_features, out_features
        self.dtype, self.device = dtype, device
        self.page_bytes = (in_features + out_features) * torch.finfo(dtype).bits // 8
        self.a = torch.zeros(1, in_features, dtype=dtype, device=device)
        self.b = torch.zeros(1, out_features, dtype=dtype, device=device)
        self._free: list[tuple[int, int]] = []  # (start, pages), sorted, never adjacent
        self.used = 0  # pages held by adapters (page 0 not counted)

    @property
    def pages(self) -> int:
        return self.a.shape[0]

    @property
    def allocated_bytes(self) -> int:
        return self.pages * self.page_bytes

    def alloc(self, n: int) -> int | None:
        """The start of ``n`` free contiguous pages (first fit), or None."""
        for i, (start, size) in enumerate(self._free):
            if size >= n:
                self._free[i:i + 1] = [(start + n, size - n)] if size > n else []
                self.used += n
                return start
        return None

    def free(self, start: int, n: int) -> None:
        i = bisect.bisect(self._free, (start, n))
        self._free.insert(i, (start, n))
        for j in (i, i - 1):  # merge with the right neighbour, then the left one
            if 0 <= j < len(self._free) - 1 and sum(self._free[j]) == self._free[j + 1][0]:
                self._free[j:j + 2] = [(self._free[j][0], self._free[j][1] + self._free[j + 1][1])]
        self.used -= n

    def grow(self, pages: int) -> None:
        """Capacity to ``pages`` (page 0 included); what is in use keeps its place."""
        old = self.pages
        a = torch.zeros(pages, self.in_features, dtype=self.dtype, device=self.device)
        b = torch.zeros(pages, self.out_features, dtype=self.dtype, device=self.device)
        a[:old].copy_(self.a)
        b[:old].copy_(self.b)
        self.a, self.b = a, b
        self.free(old, pages - old)
        self.used += pages - old  # free() counted the new pages as given back

    def compact(self, ranges: dict[object, tuple[int, int]]) -> dict[object, int]:
        """Move the given ranges (every range in use: owner → (start, pages)) to the front, in
        order, and shrink the pool to them; returns each owner's new start."""
        order = sorted(ranges.items(), key=lambda kv: kv[1][0])
        total = 1 + sum(n for _, (_, n) in order)
        index = torch.cat([torch.zeros(1, dtype=torch.long)] +
                          [torch.arange(s, s + n) for _, (s, n) in order]).to(self.device)
        self.a, self.b = self.a.index_select(0, index), self.b.index_select(0, index)
        starts, at = {}, 1
        for owner, (_, n) in order:
            starts[owner] = at
            at += n
        self._free, self.used = [], total - 1
        return starts

    def write(self, start: int, a_t: torch.Tensor, b_t: torch.Tensor, scale: float) -> None:
        """``a_t`` (in, r) and ``b_t`` (r, out) as PEFT's A^T and B^T; B carries the scale."""
        r = a_t.shape[1]
        self.a[start:start + r].copy_(a_t.t())
        self.b[start:start + r].copy_(b_t.to(self.dtype) * scale)

    def write_bias(self, page: int, delta: torch.Tensor) -> None:
        self.a[page].zero_()
        self.b[page].copy_(delta)
