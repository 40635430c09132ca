"""A preallocated KV cache with one row per running request and per-row lengths.

Rows are the batch: row i of every forward is row i of the cache, so a decode step attends to a
view of the buffers, never a concatenation. Each request's keys start at position 0 of its row
(no left padding): a new request is prefilled straight into a free row while others run, and a
finished one is replaced by moving the last row into its place. It quacks like a transformers
``Cache`` for the one call the attention layers make (``update``); the engine passes explicit
position ids and a 4-D mask, so nothing else is asked of it.
"""

from __future__ import annotations

import torch


class RowKVCache:
    def __init__(self, *, layers: int, rows: int, kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (rows, kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.max_len = max_len
        self._mode: tuple = ()

    def prefill(self, start: int, count: int) -> None:
        """The next forward writes prompts (positions 0..T-1) into rows start..start+count-1."""
        self._mode = ("prefill", start, count)

    def decode(self, rows: int, positions: torch.Tensor, span: int) -> None:
        """The next forward writes one token per row 0..rows-1 at ``positions`` and attends to
        the first ``span`` positions (the caller's mask hides each row's unused tail)."""
        self._mode = ("decode", rows, positions, torch.arange(rows, device=positions.device), span)

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        k, v = self.k[layer_idx], self.v[layer_idx]
        if self._mode[0] == "prefill":
            _, start, count = self._mode
            t = key.shape[2]
            k[start:start + count, :, :t] = key
            v[start:start + count, :, :t] = value
            return key, value
        _, rows, positions, arange, span = self._mode
        k[arange, :, positions] = key[:, :, 0]
        v[arange, :, positions] = value[:, :, 0]
        return k[:rows, :, :span], v[:rows, :, :span]

    def clear(self, row: int) -> None:
        """Zero a row. A request that failed may have left inf/NaN in it; whoever gets the row
        next attends over its stale tail with a mask, and a masked weight of 0 times NaN is NaN."""
        for k, v in zip(self.k, self.v):
            k[row].zero_()
            v[row].zero_()

    def move(self, src: int, dst: int, length: int) -> None:
        for k, v in zip(self.k, self.v):
            k[dst, :, :length] = k[src, :, :length]
            v[dst, :, :length] = v[src, :, :length]
