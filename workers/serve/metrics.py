"""Prometheus gauges of a serving replica's adapter memory, set through Ray Serve's metrics API
(Ray exports them, prefixed ``ray_``, on every node's metrics port that Prometheus scrapes)."""

from __future__ import annotations

# name → (help, (tier, key) in AdapterCache.stats())
GAUGES = {
    "lorafleet_serve_adapters_resident": ("Adapters resident on the device", ("device", "adapters")),
    "lorafleet_serve_adapter_bytes_used": ("Device bytes of resident adapters' LoRA pages", ("device", "bytes_used")),
    "lorafleet_serve_adapter_bytes_free": ("Device bytes of the adapter budget still free", ("device", "bytes_free")),
    "lorafleet_serve_adapter_bytes_allocated": ("Device bytes the LoRA page pools hold", ("device", "bytes_allocated")),
    "lorafleet_serve_host_adapters": ("Adapters parsed in host memory", ("host", "adapters")),
    "lorafleet_serve_host_adapter_bytes": ("Host bytes of parsed adapters", ("host", "bytes")),
}


def gauge_values(adapter_stats: dict) -> dict[str, float]:
    """The gauges' values in ``AdapterCache.stats()``; a budget-less device reports no free bytes."""
    out = {}
    for name, (_, (tier, key)) in GAUGES.items():
        value = adapter_stats.get(tier, {}).get(key)
        if value is not None:
            out[name] = float(value)
    return out


class AdapterGauges:
    def __init__(self):
        from ray.serve.metrics import Gauge

        self._gauges = {name: Gauge(name, description=doc) for name, (doc, _) in GAUGES.items()}

    def update(self, adapter_stats: dict) -> None:
        for name, value in gauge_values(adapter_stats).items():
            self._gauges[name].set(value)
