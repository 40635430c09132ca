"""API load: 10,000 jobs across 50 tenants in Postgres, 64 concurrent clients polling jobs.

The API runs as a real uvicorn subprocess on loopback; the clients (aiohttp, one asyncio
process) mix ``GET /v1/fine_tuning/jobs/{id}`` polls (90%) with list pages (10%) for a fixed
duration. Rows, all measured in this run against the same database:

  healthz floor   ``GET /healthz``: no auth, no database: what uvicorn + FastAPI + the client
                  cost on this machine; the ceiling for any route.
  no auth cache   the job mix with the key → tenant cache off (a key lookup per request).
  ours            the job mix as deployed (auth cached by key hash, indexed tenant-scoped reads).
  ours @1000/s    the same server with the 64 clients paced to 1,000 req/s in total (each polls
                  on a fixed schedule; latency counts from the scheduled send time).

The first three rows are closed-loop (back to back): they measure saturation throughput, and
their latency is mostly queueing (64 in flight / throughput). Figures: ``req_per_s`` = ours at
saturation; ``p50_ms`` / ``p99_ms`` = ours at the paced 1,000 req/s; ``p99_ms_saturated``;
``vs_floor`` = ours / healthz floor; ``vs_no_auth_cache``.

    python bench/api_load.py [--quick] [--json PATH] [--database-url URL] [--workers N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.catalog.repository import DEFAULT_BASE_MODEL  # noqa: E402
from service.db.migrate import upgrade_to_head  # noqa: E402
from service.db.models import ApiKey, BaseModelRow, Job, Tenant  # noqa: E402
from service.ids import new_id, now  # noqa: E402
from service.tenants.repository import hash_key  # noqa: E402
from workers.spec import Hyperparameters, Resources  # noqa: E402

PG_URL = os.environ.get("LORAFLEET_TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
CONCURRENCY = 64
TARGET_RATE = 1000.0  # req/s offered in the paced row (the throughput target)


# ------------------------------------------------------------------------------- the data set
def seed(url: str, tenants: int, jobs: int) -> tuple[list[str], dict[str, list[str]]]:
    """Bulk-insert tenants, keys and jobs. Returns (api keys, job ids by key)."""
    engine = sa.create_engine(url)
    hp = Hyperparameters().model_dump(mode="json")
    res = Resources().model_dump(mode="json")
    keys, job_ids = [], {}
    ts = now()
    with engine.begin() as conn:
        conn.execute(sa.insert(BaseModelRow), [{**DEFAULT_BASE_MODEL, "created_at": ts}])
        tenant_rows, key_rows, job_rows = [], [], []
        for t in range(tenants):
            tid = new_id("tn_")
            secret = "lf-" + secrets.token_urlsafe(32)
            keys.append(secret)
            tenant_rows.append({"id": tid, "name": f"bench-{t}", "status": "active",
                                "max_concurrent_jobs": 2, "max_queued_jobs": 10**6,
                                "requests_per_minute": 10**7, "created_at": ts})
            key_rows.append({"id": new_id("key_"), "tenant_id": tid, "name": "bench",
                             "key_hash": hash_key(secret), "prefix": secret[:10], "created_at": ts,
                             "revoked_at": None})
            job_ids[secret] = []
        for n in range(jobs):
            secret = keys[n % tenants]
            jid = new_id("ftjob-")
            job_ids[secret].append(jid)
            status = random.choice(["queued", "running", "succeeded", "failed", "cancelled"])
            job_rows.append({
                "id": jid, "tenant_id": tenant_rows[n % tenants]["id"], "model": DEFAULT_BASE_MODEL["id"],
                "training_file": "file-bench", "validation_file": None, "status": status,
                "method": "lora", "hyperparameters": hp, "resources": res, "suffix": None, "seed": 42,
                "metadata": None, "attempts": 0, "created_at": ts, "updated_at": ts})
        conn.execute(sa.insert(Tenant), tenant_rows)
        conn.execute(sa.insert(ApiKey), key_rows)
        for i in range(0, len(job_rows), 2000):
            conn.execute(sa.insert(Job), job_rows[i:i + 2000])
    engine.dispose()
    return keys, job_ids


# ----------------------------------------------------------------------------------- the server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(url: str, port: int, workers: int, data_dir: str, auth_cache_ttl_s: float) -> subprocess.Popen:
    env = {**os.environ, "LORAFLEET_DATABASE_URL": url, "LORAFLEET_AUTO_MIGRATE": "false",
           "LORAFLEET_DATA_DIR": data_dir, "LORAFLEET_AUTH_CACHE_TTL_S": str(auth_cache_ttl_s),
           "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "uvicorn", "--factory", "service.main:create_app", "--host", "127.0.0.1",
           "--port", str(port), "--workers", str(workers), "--no-access-log", "--log-level", "warning",
           "--loop", "uvloop", "--http", "httptools"]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT)
    deadline = time.monotonic() + 60
    import httpx

    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("the API server did not become ready")
        time.sleep(0.2)


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ----------------------------------------------------------------------------------- the clients
async def _drive(base: str, mix: str, job_ids: dict[str, list[str]], duration: float,
                 warmup: float, rate: float | None) -> dict:
    import aiohttp

    keys = list(job_ids)
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    stop_at = time.perf_counter() + warmup + duration
    measure_from = time.perf_counter() + warmup

    async def client(i: int, session: aiohttp.ClientSession) -> None:
        rnd = random.Random(i)
        key = keys[i % len(keys)]
        headers = {"Authorization": f"Bearer {key}"}
        mine = job_ids[key]
        # Paced: each client polls on a fixed schedule (rate / CONCURRENCY per second), and
        # latency counts from the scheduled time, so falling behind shows up as latency
        # (no coordinated omission). Unpaced: back to back, which measures saturation.
        interval = CONCURRENCY / rate if rate else 0.0
        scheduled = time.perf_counter() + rnd.random() * interval
        while scheduled < stop_at:
            if interval:
                await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
                start = scheduled
                scheduled += interval
            else:
                start = scheduled = time.perf_counter()
            if mix == "healthz":
                url = f"{base}/healthz"
            elif rnd.random() < 0.9:
                url = f"{base}/v1/fine_tuning/jobs/{rnd.choice(mine)}"
            else:
                url = f"{base}/v1/fine_tuning/jobs?limit=20"
            async with session.get(url, headers=headers) as resp:
                await resp.read()
                status = resp.status
            if start >= measure_from:
                latencies.append(time.perf_counter() - start)
                statuses[status] = statuses.get(status, 0) + 1

    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(client(i, session) for i in range(CONCURRENCY)))
    return {"latencies": latencies, "statuses": statuses}


def _client_process(base, mix, job_ids, duration, warmup, rate, queue) -> None:
    queue.put(asyncio.run(_drive(base, mix, job_ids, duration, warmup, rate)))


def measure(base: str, mix: str, job_ids: dict[str, list[str]], duration: float, warmup: float,
            rate: float | None = None) -> dict:
    # The client runs in its own process so that it and the server each get a core.
    queue: mp.Queue = mp.get_context("spawn").Queue()
    proc = mp.get_context("spawn").Process(target=_client_process,
                                           args=(base, mix, job_ids, duration, warmup, rate, queue))
    proc.start()
    result = queue.get()
    proc.join()
    lat = sorted(result["latencies"])
    ok = sum(n for s, n in result["statuses"].items() if s == 200)
    return {
        "requests": len(lat), "ok": ok, "errors": len(lat) - ok,
        "req_per_s": round(len(lat) / duration, 1),
        "p50_ms": round(statistics.median(lat) * 1000, 2),
        "p99_ms": round(lat[int(0.99 * (len(lat) - 1))] * 1000, 2),
    }


# ---------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1,000 jobs, 5 s per row")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--database-url", default=PG_URL, help="a Postgres server to create the bench database on")
    parser.add_argument("--workers", type=int, default=2, help="uvicorn worker processes")
    args = parser.parse_args()
    jobs, duration, warmup = (1_000, 5.0, 1.0) if args.quick else (10_000, 20.0, 3.0)
    tenants = 50

    name = f"lf_bench_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(args.database_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = args.database_url.rsplit("/", 1)[0] + f"/{name}"
    rows = []
    try:
        upgrade_to_head(url)
        t0 = time.perf_counter()
        keys, job_ids = seed(url, tenants, jobs)
        seed_s = time.perf_counter() - t0
        print(f"seeded {jobs} jobs across {tenants} tenants in {seed_s:.1f} s; "
              f"{CONCURRENCY} clients, {duration:.0f} s per row, {args.workers} uvicorn worker(s)")
        with tempfile.TemporaryDirectory() as data_dir:
            for label, mix, ttl in (("healthz floor", "healthz", 5.0), ("no auth cache", "jobs", 0.0),
                                    ("ours", "jobs", 5.0)):
                port = free_port()
                server = start_server(url, port, args.workers, data_dir, ttl)
                try:
                    base = f"http://127.0.0.1:{port}"
                    rows.append({"row": label, **measure(base, mix, job_ids, duration, warmup)})
                    if label == "ours":
                        paced = measure(base, mix, job_ids, duration, warmup, rate=TARGET_RATE)
                        rows.append({"row": f"ours @{TARGET_RATE:.0f}/s", **paced})
                finally:
                    stop_server(server)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    header = f"{'row':<15} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'requests':>9} {'errors':>7}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['row']:<15} {r['req_per_s']:>9.1f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} "
              f"{r['requests']:>9} {r['errors']:>7}")
    floor, no_cache, ours, paced = rows
    figures = {"req_per_s": ours["req_per_s"], "p99_ms": paced["p99_ms"], "p50_ms": paced["p50_ms"],
               "p99_ms_saturated": ours["p99_ms"], "paced_req_per_s": paced["req_per_s"],
               "vs_floor": round(ours["req_per_s"] / floor["req_per_s"], 3),
               "vs_no_auth_cache": round(ours["req_per_s"] / no_cache["req_per_s"], 3)}
    print("figures:", json.dumps(figures))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"bench": "api_load", "quick": args.quick, "rows": rows,
                                         "figures": figures}, indent=2))


if __name__ == "__main__":
    main()
