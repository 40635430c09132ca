"""The device tier of the adapter cache: which adapters are resident, and where their pages are.

Capacity is a byte budget: an adapter takes the pages its ranks and target layers need
(``workers.serve.pool``) and the bytes of its (IA)3/DoRA vectors (``vector_bytes``), so one device
holds many small adapters or fewer large ones. A count
limit (``slots``) bounds the bookkeeping tables; a resident adapter's number (its "slot", 1..)
names it in those tables and in each row of a batch (0: no adapter). LRU eviction; an adapter
is referenced by every running row that uses it and is never evicted while referenced or
pinned; ``evict`` of a busy adapter frees it when its last row finishes.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch

from workers.serve.lora import (SPARSE_DTYPES, AdapterFormatError, LoraAdapter, LoraBatch, MultiLoraLinear,
                                fuse_bases, sibling_units)
from workers.serve.pool import PagePool

Shape = tuple[int, int]


@dataclass
class _Resident:
    slot: int
    adapter: LoraAdapter
    ranges: dict[Shape, tuple[int, int]]  # pool → (start, pages)
    refs: int = 0
    doomed: bool = False  # evicted while in use: free it on the last release
    vector_bytes: int = 0  # DeviceSlots.vector_bytes, counted in the budget while resident


class DeviceSlots:
    def __init__(self, modules: dict[str, MultiLoraLinear], slots: int, max_rank: int, *,
                 max_bytes: int | None = None, dtype: torch.dtype = torch.float32):
        self._modules = modules
        self.max_rank, self.max_bytes, self.dtype = max_rank, max_bytes, dtype
        self.capacity = slots - 1  # slot 0 is "no adapter"
        device = next(iter(modules.values())).base.weight.device if modules else torch.device("cpu")
        self.pools: dict[Shape, PagePool] = {}
        for i, module in enumerate(modules.values()):
            shape = (module.in_features, module.out_features)
            if shape not in self.pools:
                self.pools[shape] = PagePool(*shape, dtype, device)
            module.attach(self, i, self.pools[shape])
        # Layers computed together (q/k/v, gate/up): the sparse path only (the dense one masks per row).
        self.dense = dtype not in SPARSE_DTYPES
        self.units = [[i] for i in range(len(modules))] if self.dense else sibling_units(modules)
        listed = list(modules.values())
        for unit in self.units:
            fuse_bases([listed[i] for i in unit])
        self._index = {name: i for i, name in enumerate(modules)}
        self._layouts: dict = {}  # LoraBatch._layout, per units and token rows
        # Per wrapped layer and slot: where the adapter's pages start, its rank, its bias page.
        self._starts = torch.zeros(len(modules), slots, dtype=torch.long)
        self._ranks = torch.zeros(len(modules), slots, dtype=torch.long)
        self._bias = torch.zeros(len(modules), slots, dtype=torch.long)
        self.current: LoraBatch | None = None  # what the wrapped layers apply (Engine._prepare)
        self.generation = 0  # bumped when pools move: batches built before are stale
        self._free = list(range(slots - 1, 0, -1))
        self._resident: OrderedDict[str, _Resident] = OrderedDict()  # LRU order, oldest first
        self._pinned: set[str] = set()  # adapter ids
        self._vector_bytes = 0  # of the resident adapters: (IA)3/DoRA vectors
        self.checks: list = []  # more refusals, e.g. workers.serve.methods.RowMethods.check
        self._lock = threading.Lock()
        self.stats = {"hits": 0, "misses": 0, "evictions": 0, "load_seconds_total": 0.0}

    # ---- sizing -------------------------------------------------------------------------------

    def pages_needed(self, adapter: LoraAdapter) -> dict[Shape, int]:
        """Pages per pool: the rank of every wrapped layer the adapter targets, one per bias."""
        need: dict[Shape, int] = {}
        for name, module in self._modules.items():
            n = (adapter.weights[name][0].shape[1] if name in adapter.weights else 0) + (name in adapter.biases)
            if n:
                shape = (module.in_features, module.out_features)
                need[shape] = need.get(shape, 0) + n
        return need

    def vector_bytes(self, adapter: LoraAdapter) -> int:
        """(IA)3 scales and DoRA factors (plus, on layers with a bias, DoRA's bias term) the
        adapter's slot holds on the device: ``workers.serve.methods.RowScaled`` keeps them in
        float32 whatever the pools' dtype."""
        parts = adapter.parts
        if parts is None:
            return 0
        widths = [v.numel() for v in (*parts.ia3_in.values(), *parts.ia3_out.values(), *parts.dora.values())]
        widths += [v.numel() for name, v in parts.dora.items()
                   if name in self._modules and self._modules[name].has_bias]
        return 4 * sum(widths)

    def bytes_needed(self, adapter: LoraAdapter) -> int:
        return sum(n * self.pools[shape].page_bytes
                   for shape, n in self.pages_needed(adapter).items()) + self.vector_bytes(adapter)

    def usage(self) -> dict:
        """Bytes of the budget in use and free, bytes the pools hold, adapters resident."""
        with self._lock:
            used = self._used()
            return {"adapters": sum(not r.doomed for r in self._resident.values()),
                    "max_adapters": self.capacity, "bytes_used": used,
                    "bytes_budget": self.max_bytes,
                    "bytes_free": None if self.max_bytes is None else self.max_bytes - used,
                    "bytes_allocated": sum(p.allocated_bytes for p in self.pools.values())}

    # ---- admission ----------------------------------------------------------------------------

    def check(self, adapter: LoraAdapter) -> None:
        """Refuse what the pools cannot hold, at load and again before a request is queued:
        the rank, module names, every tensor's shape against the base's module, the budget."""
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
            r = min(a.shape[1], adapter.rank)  # AdaLoRA: each module its own rank, up to the adapter's
            want_a = (module.in_features, r)
            want_b = (r, module.out_features)
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
        if self.max_bytes is not None and (need := self.bytes_needed(adapter)) > self.max_bytes:
            raise AdapterFormatError(
                f"adapter {adapter.adapter_id!r} needs {need} bytes of device memory; this "
                f"replica's adapter budget is {self.max_bytes} bytes")
        for check in self.checks:
            check(adapter)

    def acquire(self, adapter: LoraAdapter) -> int | None:
        """The adapter's slot with one more reference, or None while the slots or the bytes it
        needs are all held by running rows."""
        with self._lock:
            res = self._resident.get(adapter.key)
            if res is not None:  # a doomed one serves requests queued before its eviction
                self._resident.move_to_end(adapter.key)
                res.refs += 1
                self.stats["hits"] += 1
                return res.slot
            need = self.pages_needed(adapter)
            size = sum(n * self.pools[shape].page_bytes for shape, n in need.items()) + self.vector_bytes(adapter)
            slot = self._free.pop() if self._free else self._evict_lru()
            if slot is None:
                return None
            while self.max_bytes is not None and self._used() + size > self.max_bytes:
                freed = self._evict_lru()
                if freed is None:
                    self._free.append(slot)
                    return None
                self._free.append(freed)
            self.stats["misses"] += 1
            start = time.perf_counter()
            res = _Resident(slot, adapter, {}, refs=1, vector_bytes=self.vector_bytes(adapter))
            try:
                for shape, n in need.items():
                    res.ranges[shape] = (self._alloc(shape, n, res), n)
                self._write(res)
            except BaseException:  # leave nothing half-placed behind
                self._release_pages(res)
                self._free.append(slot)
                raise
            self.stats["load_seconds_total"] += time.perf_counter() - start
            self._vector_bytes += res.vector_bytes
            self._resident[adapter.key] = res
            return slot

    def batch(self, slots: list[int], alone: set[str] = frozenset()) -> LoraBatch:
        """What the wrapped layers need for rows using these slots (0: no adapter). ``alone``:
        wrapped layers whose input this batch changes (an (IA)3 input scale): out of their unit."""
        index = torch.tensor(slots, dtype=torch.long)
        units = self.units
        if alone:
            split = {self._index[name] for name in alone}
            units = [part for unit in units
                     for part in ([[i] for i in unit] if split.intersection(unit) else [unit])]
        with self._lock:
            return LoraBatch(list(self._modules.values()), self._starts[:, index], self._ranks[:, index],
                             self._bias[:, index], dense=self.dense, units=units, layouts=self._layouts)

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

    # ---- pages (under the lock) ---------------------------------------------------------------

    def _used(self) -> int:
        return sum(p.used * p.page_bytes for p in self.pools.values()) + self._vector_bytes

    def _alloc(self, shape: Shape, n: int, placing: _Resident) -> int:
        """``n`` contiguous pages of one pool: free ones, else the pool grows (by half, within
        the budget), else every pool is compacted first (the budget has room: ``acquire``)."""
        pool = self.pools[shape]
        start = pool.alloc(n)
        if start is not None:
            return start
        room = None
        if self.max_bytes is not None:
            allocated = sum(p.allocated_bytes - p.page_bytes for p in self.pools.values())
            vectors = self._vector_bytes + placing.vector_bytes  # the budget's part that is not pages
            room = (self.max_bytes - vectors - allocated) // pool.page_bytes
            if room < n:
                self._compact(placing)
                allocated = sum(p.allocated_bytes - p.page_bytes for p in self.pools.values())
                room = (self.max_bytes - vectors - allocated) // pool.page_bytes
        grow = max(n, pool.pages // 2)
        pool.grow(pool.pages + (grow if room is None else min(grow, room)))
        self.generation += 1
        start = pool.alloc(n)
        assert start is not None, "a grown pool has the pages"
        return start

    def _compact(self, placing: _Resident) -> None:
        """Every pool down to the pages in use, ranges moved to the front (tables follow)."""
        owners = [*self._resident.values(), placing]
        for shape, pool in self.pools.items():
            ranges = {id(r): r.ranges[shape] for r in owners if shape in r.ranges}
            starts = pool.compact(ranges)
            for r in owners:
                if shape in r.ranges:
                    old, n = r.ranges[shape]
                    r.ranges[shape] = (starts[id(r)], n)
                    self._shift(r.slot, shape, starts[id(r)] - old)
        self.generation += 1

    def _shift(self, slot: int, shape: Shape, delta: int) -> None:
        for i, module in enumerate(self._modules.values()):
            if (module.in_features, module.out_features) == shape:
                if self._ranks[i, slot]:
                    self._starts[i, slot] += delta
                if self._bias[i, slot]:
                    self._bias[i, slot] += delta

    def _write(self, res: _Resident) -> None:
        """The adapter's weights (scale folded into B) and biases (minus the base's) into its
        pages, in the order ``pages_needed`` counted them."""
        adapter, slot = res.adapter, res.slot
        at = {shape: start for shape, (start, _) in res.ranges.items()}
        # The slot's column of each table, written at once (an element write is a torch op each).
        starts, ranks, bias = ([0] * len(self._modules) for _ in range(3))
        for i, (name, module) in enumerate(self._modules.items()):
            shape = (module.in_features, module.out_features)
            pool = self.pools[shape]
            if name in adapter.weights:
                a, b = adapter.weights[name]
                pool.write(at[shape], a.to(pool.device), b.to(pool.device), adapter.scale)
                starts[i], ranks[i] = at[shape], a.shape[1]
                at[shape] += a.shape[1]
            if name in adapter.biases:  # DeviceSlots.check refused a bias for a layer without one
                base = module.base.bias.detach().to(device=pool.device, dtype=pool.dtype)
                pool.write_bias(at[shape], adapter.biases[name].to(device=pool.device, dtype=pool.dtype) - base)
                bias[i] = at[shape]
                at[shape] += 1
        self._starts[:, slot] = torch.tensor(starts)
        self._ranks[:, slot] = torch.tensor(ranks)
        self._bias[:, slot] = torch.tensor(bias)

    def _release_pages(self, res: _Resident) -> None:
        for shape, (start, n) in res.ranges.items():
            self.pools[shape].free(start, n)
        res.ranges = {}
        self._starts[:, res.slot] = 0
        self._ranks[:, res.slot] = 0
        self._bias[:, res.slot] = 0

    def _evict_lru(self) -> int | None:
        for key, res in self._resident.items():
            if res.refs == 0 and res.adapter.adapter_id not in self._pinned:
                self.stats["evictions"] += 1
                return self._drop(key, reuse=True)
        return None

    def _drop(self, key: str, reuse: bool = False) -> int:
        res = self._resident.pop(key)
        self._release_pages(res)
        self._vector_bytes -= res.vector_bytes
        if not reuse:
            self._free.append(res.slot)
        return res.slot
