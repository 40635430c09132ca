"""The device tier of the adapter cache: which adapter occupies which slot of the LoRA stacks.

LRU over a fixed pool of slots (sized by a count and a byte limit). An adapter is referenced by
every running row that uses it and is never evicted while referenced or pinned; ``evict`` of a
busy adapter frees its slot when its last row finishes.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from workers.serve.lora import AdapterFormatError, LoraAdapter, MultiLoraLinear


@dataclass
class _Resident:
    slot: int
    adapter: LoraAdapter
    refs: int = 0
    doomed: bool = False  # evicted while in use: free the slot on the last release


class DeviceSlots:
    def __init__(self, modules: dict[str, MultiLoraLinear], slots: int, max_rank: int):
        self._modules = modules
        self.max_rank = max_rank
        self.capacity = slots - 1  # slot 0 is the all-zero "no adapter" slot
        self._free = list(range(slots - 1, 0, -1))
        self._resident: OrderedDict[str, _Resident] = OrderedDict()  # LRU order, oldest first
        self._pinned: set[str] = set()  # adapter ids
        self._lock = threading.Lock()
        self.stats = {"hits": 0, "misses": 0, "evictions": 0, "load_seconds_total": 0.0}

    def check(self, adapter: LoraAdapter) -> None:
        """Refuse what the stacks cannot hold, at load and again before a request is queued:
        the rank, module names, and every tensor's shape against the base's module."""
        if adapter.rank > self.max_rank:
            raise AdapterFormatError(
                f"adapter {adapter.adapter_id!r} has rank {adapter.rank}; this replica serves "
                f"ranks up to {self.max_rank}")
        unknown = adapter.modules - set(self._modules)
        if unknown:
            raise AdapterFormatError(
                f"adapter {adapter.adapter_id!r} targets modules the base model does not have "
                f"or this replica does not wrap: {sorted(unknown)[:3]}")
        for name, (a, b) in adapter.weights.items():
            module = self._modules[name]
            want_a = (module.in_features, adapter.rank)
            want_b = (adapter.rank, module.out_features)
            if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
                raise AdapterFormatError(
                    f"adapter {adapter.adapter_id!r}: {name} has lora_A {tuple(a.shape[::-1])} and "
                    f"lora_B {tuple(b.shape[::-1])}; the base model's layer needs "
                    f"{want_a[::-1]} and {want_b[::-1]}")
        for name, bias in adapter.biases.items():
            module = self._modules[name]
            if not module.has_bias:
                raise AdapterFormatError(
                    f"adapter {adapter.adapter_id!r}: {name} has a trained bias but the base "
                    f"model's layer has none")
            if tuple(bias.shape) != (module.out_features,):
                raise AdapterFormatError(
                    f"adapter {adapter.adapter_id!r}: {name}.bias has shape {tuple(bias.shape)}; the "
                    f"base model's layer needs ({module.out_features},)")

    def acquire(self, adapter: LoraAdapter) -> int | None:
        """The adapter's slot with one more reference, or None while every slot is busy."""
        with self._lock:
            res = self._resident.get(adapter.key)
            if res is not None:  # a doomed one serves requests queued before its eviction
                self._resident.move_to_end(adapter.key)
                res.refs += 1
                self.stats["hits"] += 1
                return res.slot
            slot = self._free.pop() if self._free else self._evict_lru()
            if slot is None:
                return None
            self.stats["misses"] += 1
            start = time.perf_counter()
            try:
                for name, module in self._modules.items():
                    module.write(slot, *adapter.weights.get(name, (None, None)), adapter.biases.get(name))
            except BaseException:  # leave no half-written slot behind: zero it, free it
                for module in self._modules.values():
                    module.write(slot, None, None)
                self._free.append(slot)
                raise
            self.stats["load_seconds_total"] += time.perf_counter() - start
            self._resident[adapter.key] = _Resident(slot, adapter, refs=1)
            return slot

    def release(self, key: str) -> None:
        with self._lock:
            res = self._resident[key]
            res.refs -= 1
            if res.refs == 0 and res.doomed:
                self._drop(key)

    def evict(self, adapter_id: str) -> int:
        """Evict every version of an adapter (deleted or replaced); busy ones leave when done."""
        with self._lock:
            n = 0
            for key, res in list(self._resident.items()):
                if res.adapter.adapter_id == adapter_id:
                    n += 1
                    if res.refs == 0:
                        self._drop(key)
                    else:
                        res.doomed = True
            return n

    def pin(self, adapter_id: str, pinned: bool = True) -> None:
        with self._lock:
            (self._pinned.add if pinned else self._pinned.discard)(adapter_id)

    def resident(self) -> list[str]:
        with self._lock:
            return [k for k, r in self._resident.items() if not r.doomed]

    def _evict_lru(self) -> int | None:
        for key, res in self._resident.items():
            if res.refs == 0 and res.adapter.adapter_id not in self._pinned:
                self.stats["evictions"] += 1
                return self._drop(key, reuse=True)
        return None

    def _drop(self, key: str, reuse: bool = False) -> int:
        res = self._resident.pop(key)
        for module in self._modules.values():
            module.forget(res.slot)
        if not reuse:
            self._free.append(res.slot)
        return res.slot
