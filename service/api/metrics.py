"""Prometheus metrics, one registry per app (tests build several apps in one process)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from service.jobs.states import JOB_STATUSES


class JobsByStatus(Collector):
    """Read at scrape time, so the gauge is right whichever process changed a job."""

    def __init__(self, count: Callable[[], dict[str, int]]):
        self._count = count

    def collect(self) -> Iterable[GaugeMetricFamily]:
        counts = self._count()
        family = GaugeMetricFamily("lorafleet_jobs", "Fine-tuning jobs by status", labels=["status"])
        for status in JOB_STATUSES:
            family.add_metric([status], counts.get(status, 0))
        yield family


class ApiMetrics:
    def __init__(self, count_jobs: Callable[[], dict[str, int]]):
        self.registry = CollectorRegistry()
        self.requests = Counter("lorafleet_http_requests", "HTTP requests by route template and status",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("lorafleet_http_request_duration_seconds", "HTTP request latency",
                                 ["method", "route"], registry=self.registry,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10))
        self.registry.register(JobsByStatus(count_jobs))

        # Children by label values: ``labels()`` validates and locks on every call, and the
        # label sets are few (routes × methods × statuses), so each is looked up once.
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, status)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (self.requests.labels(method, route, str(status)),
                                              self.latency.labels(method, route))
        children[0].inc()
        children[1].observe(seconds)
