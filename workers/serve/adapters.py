"""Tenants' adapters, loaded on demand from the object store and kept in two LRU tiers.

Host tier (here): parsed adapters in CPU memory, limited in count and bytes, keyed by id and
version prefix, so a new version is a new entry and is served without a restart. Device tier
(``workers.serve.slots.DeviceSlots``): the engine's LoRA page pools, a byte budget. A load reads
``manifest.json``, refuses an adapter trained for another base model, and checks every file the
manifest lists against its sha256 before parsing anything. Concurrent requests for one cold
adapter share one load: a per-key asyncio lock, re-checked after acquiring (as Ray Serve's
multiplexer does).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections import OrderedDict

import torch
from pydantic import ValidationError

from workers.serve.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AdapterFormatError,
    LoraAdapter,
    parse_peft_adapter,
)
from workers.serve.methods import check_manifest_method
from workers.serve.slots import DeviceSlots
from workers.spec import AdapterManifest
from workers.storage import ObjectNotFound, ObjectStore, StorageError, get_bytes

MANIFEST = "manifest.json"

log = logging.getLogger(__name__)


class AdapterError(Exception):
    """An adapter that cannot be served; ``code`` and ``status`` become the problem+json body."""

    code, status = "adapter_invalid", 422

    def __init__(self, adapter_id: str, message: str):
        super().__init__(message)
        self.adapter_id = adapter_id


class AdapterNotFound(AdapterError):
    code, status = "model_not_found", 404


class AdapterChecksumMismatch(AdapterError):
    code = "adapter_checksum_mismatch"


class AdapterBaseMismatch(AdapterError):
    code = "adapter_base_mismatch"


class AdapterStorageError(AdapterError):
    code, status = "storage_error", 503


class AdapterCache:
    def __init__(self, store: ObjectStore, *, base_model_id: str, device: DeviceSlots | None = None,
                 max_host_adapters: int = 256, max_host_bytes: int = 4 << 30,
                 dtype: torch.dtype = torch.float32):
        self.store, self.base_model_id, self.device = store, base_model_id, device
        self.max_host_adapters, self.max_host_bytes, self.dtype = max_host_adapters, max_host_bytes, dtype
        self._host: OrderedDict[str, LoraAdapter] = OrderedDict()  # LRU order, oldest first
        self._locks: dict[str, asyncio.Lock] = {}
        self._pinned: set[str] = set()
        self.metrics = {"hits": 0, "misses": 0, "loads": 0, "load_errors": 0, "evictions": 0,
                        "load_seconds_total": 0.0, "load_seconds_last": 0.0}

    @staticmethod
    def key(adapter_id: str, prefix: str) -> str:
        return f"{adapter_id}@{prefix.rstrip('/')}"

    async def get(self, adapter_id: str, prefix: str) -> LoraAdapter:
        key = self.key(adapter_id, prefix)
        if (hit := self._lookup(key)) is not None:
            return hit
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            if (hit := self._lookup(key)) is not None:  # loaded while we waited for the lock
                return hit
            self.metrics["misses"] += 1
            start = time.perf_counter()
            try:
                adapter = await asyncio.to_thread(self._load, adapter_id, prefix.rstrip("/"), key)
            except AdapterError:
                self.metrics["load_errors"] += 1
                raise
            finally:
                # Waiters hold the lock object and re-check after it; newcomers hit the cache.
                self._locks.pop(key, None)
            elapsed = time.perf_counter() - start
            self.metrics["loads"] += 1
            self.metrics["load_seconds_total"] += elapsed
            self.metrics["load_seconds_last"] = elapsed
            self._insert(adapter)
            return adapter

    def _lookup(self, key: str) -> LoraAdapter | None:
        adapter = self._host.get(key)
        if adapter is not None:
            self._host.move_to_end(key)
            self.metrics["hits"] += 1
        return adapter

    def _insert(self, adapter: LoraAdapter) -> None:
        for key, old in list(self._host.items()):  # a new version replaces the old one
            if old.adapter_id == adapter.adapter_id:
                del self._host[key]
                if self.device is not None:
                    self.device.evict(adapter.adapter_id)
        self._host[adapter.key] = adapter
        self._enforce_limits()

    def _enforce_limits(self) -> None:
        def over() -> bool:
            total = sum(a.nbytes for a in self._host.values())
            return len(self._host) > self.max_host_adapters or total > self.max_host_bytes

        for key in list(self._host):
            if not over():
                break
            victim = self._host[key]
            if victim.adapter_id in self._pinned or key == next(reversed(self._host)):
                continue  # pinned, or the adapter just loaded for a waiting request
            del self._host[key]
            self.metrics["evictions"] += 1

    def evict(self, adapter_id: str) -> bool:
        """Forget every version in both tiers (the adapter was deleted or replaced)."""
        keys = [k for k, a in self._host.items() if a.adapter_id == adapter_id]
        for key in keys:
            del self._host[key]
        on_device = self.device.evict(adapter_id) if self.device is not None else 0
        return bool(keys or on_device)

    def pin(self, adapter_id: str, pinned: bool = True) -> None:
        """A pinned adapter is never evicted for space, from either tier."""
        (self._pinned.add if pinned else self._pinned.discard)(adapter_id)
        if self.device is not None:
            self.device.pin(adapter_id, pinned)

    def stats(self) -> dict:
        out = {"host": {**self.metrics, "adapters": len(self._host),
                        "bytes": sum(a.nbytes for a in self._host.values()),
                        "max_adapters": self.max_host_adapters, "max_bytes": self.max_host_bytes}}
        if self.device is not None:
            out["device"] = {**self.device.stats, **self.device.usage()}
        return out

    # ---- loading (in a worker thread) -----------------------------------------------------------

    def _read(self, adapter_id: str, key: str) -> bytes:
        try:
            return get_bytes(self.store, key)
        except ObjectNotFound:
            # Object-store keys name tenants' prefixes and our layout: our log, not the answer.
            log.warning("adapter %s: %s is missing from the object store", adapter_id, key)
            raise AdapterNotFound(adapter_id, f"adapter {adapter_id!r} was not found; it may have "
                                              f"been deleted") from None
        except StorageError as exc:  # the store's text names hosts and buckets: our log only
            log.warning("adapter %s: reading %s failed: %s", adapter_id, key, exc)
            raise AdapterStorageError(adapter_id, f"adapter {adapter_id!r} could not be read from "
                                                  f"the object store; retry") from None

    def _load(self, adapter_id: str, prefix: str, key: str) -> LoraAdapter:
        try:
            manifest = AdapterManifest.model_validate(json.loads(self._read(adapter_id, f"{prefix}/{MANIFEST}")))
        except (ValidationError, ValueError) as exc:
            log.warning("adapter %s: invalid %s: %s", adapter_id, MANIFEST, exc)
            raise AdapterError(adapter_id, f"adapter {adapter_id!r}: its {MANIFEST} is invalid") from None
        if manifest.adapter_id != adapter_id:
            log.warning("adapter %s: %s/%s describes adapter %r", adapter_id, prefix, MANIFEST,
                        manifest.adapter_id)
            raise AdapterError(adapter_id, f"adapter {adapter_id!r}: its {MANIFEST} describes "
                                           f"another adapter")
        if manifest.base_model.id != self.base_model_id:
            raise AdapterBaseMismatch(
                adapter_id, f"adapter {adapter_id!r} was trained for base model "
                            f"{manifest.base_model.id!r}; this replica serves {self.base_model_id!r}")
        missing = {ADAPTER_CONFIG, ADAPTER_WEIGHTS} - set(manifest.files)
        if missing:
            raise AdapterError(adapter_id, f"adapter {adapter_id!r}: manifest lists no {sorted(missing)}")
        blobs = {}
        for name, digest in manifest.files.items():
            data = self._read(adapter_id, f"{prefix}/{name}")
            actual = hashlib.sha256(data).hexdigest()
            if actual != digest.sha256 or len(data) != digest.bytes:
                raise AdapterChecksumMismatch(
                    adapter_id, f"adapter {adapter_id!r}: {name} has sha256 {actual[:12]}… "
                                f"({len(data)} bytes); the manifest says {digest.sha256[:12]}… "
                                f"({digest.bytes} bytes)")
            blobs[name] = data
        try:
            adapter = parse_peft_adapter(blobs[ADAPTER_CONFIG], blobs[ADAPTER_WEIGHTS], key=key,
                                         adapter_id=adapter_id, dtype=self.dtype)
            check_manifest_method(manifest.method, adapter)
            if self.device is not None:
                self.device.check(adapter)
        except AdapterFormatError as exc:
            raise AdapterError(adapter_id, str(exc)) from None
        return adapter
