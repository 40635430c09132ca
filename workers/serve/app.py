"""The Ray Serve application: an HTTP ingress and autoscaled engine replicas with adapter affinity.

Routing vs batching: the ingress calls the replica deployment with
``handle.options(multiplexed_model_id="<adapter id>@<prefix>")``, so Ray's router prefers a
replica that already holds the adapter (the replica registers it through ``@serve.multiplexed``).
Inside a replica every request, whatever its adapter, goes to the ONE engine step loop, which
batches all adapters together: no ``@serve.batch``, which would split batches by model id.
Deleting an adapter is broadcast to every replica.

The ingress verifies the control plane's signature on every request (``workers.signing``). Its
keys come from LORAFLEET_SERVE_SIGNING_KEY[_PREVIOUS] in the environment of whoever runs
``build_app`` (the driver, or on KubeRay the Serve controller on the head pod, whose env has
them from the chart's Secret), passed to the ingress replica as init arguments: a local Ray
started before the key existed has no such env in its workers.

    serve run workers.serve.app:build_app base_model_uri=builtin://lorafleet/tiny-llama \\
        object_store_url=file:///abs/objects
    python -m workers.serve.app --port 8001 base_model_uri=... object_store_url=...
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import AsyncIterator
from contextlib import aclosing

from ray import serve
from ray.serve.handle import DeploymentHandle

from workers.serve.adapters import AdapterError
from workers.serve.front import problem
from workers.serve.http import create_app
from workers.serve.metrics import AdapterGauges
from workers.serve.replica import ServeConfig, build_front
from workers.signing import KEY_ENV, PREVIOUS_KEY_ENV, Claims, Verifier

log = logging.getLogger("lorafleet.serve.app")

# Adapters a replica reports to Ray's router as loaded: as many as its device tier holds.
MULTIPLEX_MAX = int(os.environ.get("LORAFLEET_SERVE_ADAPTER_SLOTS", str(ServeConfig.adapter_slots)))
APP_ARGS = ("min_replicas", "max_replicas", "target_ongoing_requests", "num_cpus", "num_gpus")


def multiplex_id(body: dict) -> str:
    adapter = ((body.get("lorafleet") or {}).get("adapter")) or {}
    if not isinstance(adapter, dict) or not adapter.get("id") or not adapter.get("prefix"):
        return ""
    return f"{adapter['id']}@{adapter['prefix'].rstrip('/')}"


@serve.deployment(max_ongoing_requests=256)
class LoraReplica:
    """One shared base model, its engine loop and adapter cache."""

    def __init__(self, settings: dict):
        self.front = build_front(ServeConfig.load(**settings))
        self.gauges = AdapterGauges()

    @serve.multiplexed(max_num_models_per_replica=MULTIPLEX_MAX)
    async def adapter(self, model_id: str) -> str:
        """Loads into the cache; Ray's LRU keeps only the key, so the cache's limits hold."""
        adapter_id, _, prefix = model_id.partition("@")
        return (await self.front.cache.get(adapter_id, prefix)).key

    async def run(self, kind: str, body: dict) -> AsyncIterator[dict]:
        model_id = serve.get_multiplexed_model_id()
        if model_id:
            try:  # loads through the cache and tells Ray's router this replica holds it
                await self.adapter(model_id)
            except AdapterError as exc:
                yield {"problem": problem(exc.status, exc.code, str(exc), "model")}
                return
        try:
            async with aclosing(self.front.run(kind, body)) as items:  # a cancel aborts generation
                async for item in items:
                    yield item
        finally:  # the adapter memory gauges follow what requests loaded and placed
            self.gauges.update(self.front.cache.stats())

    async def evict(self, adapter_id: str) -> bool:
        return await self.front.evict(adapter_id)

    async def stats(self) -> dict:
        stats = await self.front.stats()
        self.gauges.update(stats["adapters"])
        return stats

    async def check_health(self) -> None:
        """Ray Serve calls this periodically; raising marks the replica unhealthy and Ray
        replaces it (engine loop dead, steps failing, device unusable)."""
        await self.front.health()

    def __del__(self):
        front = getattr(self, "front", None)
        if front is not None:
            front.close()


class _HandleBackend:
    """``workers.serve.http.Backend`` over the replica deployment's handle.

    Ray pickles the ingress's FastAPI app, and this instance with it, by value; the class is
    pickled by reference, so the handle lives on the class, set by ``Ingress.__init__``."""

    handle: DeploymentHandle | None = None

    async def run(self, kind: str, body: dict) -> AsyncIterator[dict]:
        gen = self.handle.options(multiplexed_model_id=multiplex_id(body), stream=True).run.remote(kind, body)
        finished = False
        try:
            async for item in gen:
                yield item
            finished = True
        except Exception:  # noqa: BLE001 - any Ray failure (replica died, rejected) → 503
            # Ray's text names actors, nodes and addresses: for our log, not the tenant.
            log.exception("no replica answered")
            yield {"problem": problem(503, "serving_unavailable", "no serving replica answered; retry")}
            finished = True
        finally:
            if not finished:
                gen.cancel()

    async def evict(self, adapter_id: str) -> bool:
        results = await self.handle.broadcast("evict", adapter_id).results_async()
        return any(results)

    async def stats(self) -> dict:
        return await self.handle.stats.remote()


class _IngressVerifier:
    """The ingress replica's ``Verifier``, installed by ``Ingress.__init__`` (pickled like
    ``_HandleBackend``: the instance by value, the class, where the verifier lives, by reference).
    Until then it knows no key and refuses everything."""

    current: Verifier = Verifier([])

    def check_headers(self, headers) -> Claims:
        return self.current.check_headers(headers)

    def verify(self, claims: Claims, method: str, path: str, body: bytes) -> Claims:
        return self.current.verify(claims, method, path, body)


_backend = _HandleBackend()


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(create_app(_backend, _IngressVerifier()))
class Ingress:
    def __init__(self, replica: DeploymentHandle, signing_keys: list[str]):
        _HandleBackend.handle = replica  # one ingress replica per process
        _IngressVerifier.current = Verifier(signing_keys)
        if not _IngressVerifier.current.configured:
            log.warning("no signing key (%s): every request will be refused", KEY_ENV)


def signing_keys_from_env() -> list[str]:
    return [k for k in (os.environ.get(KEY_ENV), os.environ.get(PREVIOUS_KEY_ENV)) if k]


def build_app(args: dict) -> serve.Application:
    """``serve run workers.serve.app:build_app key=value ...``: ServeConfig fields plus
    min_replicas, max_replicas, target_ongoing_requests, num_cpus, num_gpus."""
    args = {k: str(v) for k, v in args.items()}
    settings = {k: v for k, v in args.items() if k not in APP_ARGS}
    ServeConfig.load(**settings)  # fail at deploy time on a bad setting, not in every replica
    max_batch = int(settings.get("max_batch", os.environ.get("LORAFLEET_SERVE_MAX_BATCH", "32")))
    replica = LoraReplica.options(
        autoscaling_config={
            "min_replicas": int(args.get("min_replicas", 1)),
            "max_replicas": int(args.get("max_replicas", 4)),
            # A replica is "busy" when it holds about a full decode batch.
            "target_ongoing_requests": int(args.get("target_ongoing_requests", max_batch)),
        },
        ray_actor_options={"num_cpus": float(args.get("num_cpus", 1)),
                           "num_gpus": float(args.get("num_gpus", 0))},
    ).bind(settings)
    return Ingress.bind(replica, signing_keys_from_env())


def main() -> None:
    import ray

    ap = argparse.ArgumentParser(description="Run the serving app on a local (or RAY_ADDRESS) Ray.")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8001)
    ap.add_argument("settings", nargs="*", help="key=value: ServeConfig fields and app options")
    ns = ap.parse_args()
    settings = dict(kv.split("=", 1) for kv in ns.settings)
    ray.init(address=os.environ.get("RAY_ADDRESS"))
    try:
        serve.start(http_options={"host": ns.host, "port": ns.port})
        serve.run(build_app(settings), name="lorafleet-serve", route_prefix="/", blocking=True)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
