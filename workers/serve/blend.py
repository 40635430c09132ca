"""A live weighted blend: several LoRA adapters applied to one request, W x + Σ wᵢ·sᵢ·Bᵢ Aᵢ x.

Composed on the host into one ``LoraAdapter`` that the engine serves like any other, in the same
mixed batch, with no engine change: A stacks the adapters' A along the rank (each scaled by
wᵢ·sᵢ), B stacks their B, and the scale is 1 (rank Σ rᵢ). This is exactly what PEFT's
``add_weighted_adapter(..., combination_type="cat")`` stores, in the same order and the same
float operations, so a live blend answers like the offline ``cat`` blend of the same adapters.
A module an adapter does not target gets no columns from it; the rank it leaves is zero-padded
at the end, as PEFT pads it.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch

from workers.serve.lora import AdapterFormatError, LoraAdapter


def blend_key(parts: list[tuple[LoraAdapter, float]]) -> str:
    """The blend's identity: its adapters' versions and weights, in order (cache and slot key)."""
    text = "\n".join(f"{a.key}\t{w!r}" for a, w in parts)
    return "blend:" + hashlib.sha256(text.encode()).hexdigest()[:32]


def compose(parts: list[tuple[LoraAdapter, float]], *, adapter_id: str) -> LoraAdapter:
    for adapter, _ in parts:
        if getattr(adapter, "parts", None) is not None or getattr(adapter, "method", "lora") != "lora":
            raise AdapterFormatError(f"adapter {adapter.adapter_id!r} is not a plain LoRA adapter; only "
                                     f"LoRA and QLoRA adapters can be blended per request")
        if adapter.biases:
            raise AdapterFormatError(f"adapter {adapter.adapter_id!r} trained biases; adapters that did "
                                     f"cannot be blended per request")
    rank = sum(a.rank for a, _ in parts)
    weights = {}
    for module in sorted(set().union(*(a.weights for a, _ in parts))):
        cols, rows = [], []
        for adapter, weight in parts:
            if module in adapter.weights:
                a_t, b_t = adapter.weights[module]  # (in, r), (r, out)
                cols.append(a_t * weight * adapter.scale)  # PEFT's order: (A · w) · s
                rows.append(b_t)
        a_cat, b_cat = torch.cat(cols, dim=1), torch.cat(rows, dim=0)
        pad = rank - a_cat.shape[1]
        if pad:
            a_cat = torch.cat([a_cat, a_cat.new_zeros(a_cat.shape[0], pad)], dim=1)
            b_cat = torch.cat([b_cat, b_cat.new_zeros(pad, b_cat.shape[1])], dim=0)
        weights[module] = (a_cat.contiguous(), b_cat.contiguous())
    return LoraAdapter(key=blend_key(parts), adapter_id=adapter_id, rank=rank, scale=1.0, weights=weights)


class BlendCache:
    """Composed blends by key, least recently used out first: a blend asked again reuses its
    host tensors (and, through its key, its device slot)."""

    def __init__(self, max_blends: int = 32):
        self.max_blends = max_blends
        self._blends: OrderedDict[str, LoraAdapter] = OrderedDict()

    def get(self, parts: list[tuple[LoraAdapter, float]], *, adapter_id: str) -> LoraAdapter:
        key = blend_key(parts)
        if (hit := self._blends.get(key)) is not None:
            self._blends.move_to_end(key)
            return hit
        blend = compose(parts, adapter_id=adapter_id)
        self._blends[key] = blend
        while len(self._blends) > self.max_blends:
            self._blends.popitem(last=False)
        return blend

    def evict(self, adapter_id: str) -> list[str]:
        """Forget the blends that use ``adapter_id``; returns their adapter ids (to free their slots)."""
        gone = [k for k, b in self._blends.items() if adapter_id in b.adapter_id.split("+")]
        return [self._blends.pop(k).adapter_id for k in gone]
