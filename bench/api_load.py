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

Each row also reports the CPU used in its measured window, in cores: the client process, the
API server, PostgreSQL and the whole machine (other work on it included), and the 1-minute load
average, so that a run on a shared or saturated machine shows it.

The server command is the Helm chart's (one uvicorn process, uvloop + httptools, which uvicorn
picks by itself when installed; named here explicitly).

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

import psutil
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
                 warmup: float, rate: float | None, window_events=None) -> dict:
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

    async def cpu_window() -> tuple[float, float]:
        # This process's CPU time over the measured window: the client's own share of the cores.
        await asyncio.sleep(max(0.0, measure_from - time.perf_counter()))
        start = time.process_time()
        if window_events:
            window_events[0].set()  # the parent samples the server's and PostgreSQL's CPU now
        await asyncio.sleep(max(0.0, stop_at - time.perf_counter()))
        end = time.process_time()
        if window_events:
            window_events[1].set()
        return start, end

    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector) as session:
        window = asyncio.ensure_future(cpu_window())
        await asyncio.gather(*(client(i, session) for i in range(CONCURRENCY)))
        cpu_start, cpu_end = await window
    return {"latencies": latencies, "statuses": statuses, "client_cpu_s": cpu_end - cpu_start}


def _client_process(base, mix, job_ids, duration, warmup, rate, queue, window_events) -> None:
    queue.put(asyncio.run(_drive(base, mix, job_ids, duration, warmup, rate, window_events)))


def _cpu_seconds(procs: list) -> dict[int, float]:
    """CPU seconds by pid (a process gone by the second sample drops out of the difference)."""
    seconds = {}
    for p in procs:
        try:
            t = p.cpu_times()
            seconds[p.pid] = t.user + t.system
        except psutil.Error:
            pass
    return seconds


def _cpu_used(before: dict[int, float], after: dict[int, float]) -> float:
    return sum(after[pid] - before[pid] for pid in before.keys() & after.keys())


def _server_procs(server: subprocess.Popen) -> list:
    root = psutil.Process(server.pid)
    return [root, *root.children(recursive=True)]


def _postgres_procs() -> list:
    return [p for p in psutil.process_iter(["name"]) if (p.info["name"] or "").startswith("postgres")]


def measure(base: str, mix: str, job_ids: dict[str, list[str]], duration: float, warmup: float,
            server: subprocess.Popen, rate: float | None = None) -> dict:
    """One row. Besides latency: CPU used in the measured window, in cores (1.0 = one core
    busy), by the client process, the API server (all uvicorn workers), PostgreSQL (all its
    backends, other databases included) and the whole machine (the other tenants of it too)."""
    # The client runs in its own process; it shares the machine's cores with the server and
    # PostgreSQL, so its CPU share is reported: a saturated client inflates latency.
    ctx = mp.get_context("spawn")
    queue: mp.Queue = ctx.Queue()
    started, stopped = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_client_process,
                       args=(base, mix, job_ids, duration, warmup, rate, queue, (started, stopped)))
    proc.start()
    started.wait()
    servers, postgres = _server_procs(server), _postgres_procs()  # backends opened in warmup included
    load1 = os.getloadavg()[0]
    srv0, pg0, sys0, t0 = _cpu_seconds(servers), _cpu_seconds(postgres), psutil.cpu_times(), time.perf_counter()
    stopped.wait()
    srv1, pg1, sys1, t1 = _cpu_seconds(servers), _cpu_seconds(postgres), psutil.cpu_times(), time.perf_counter()
    result = queue.get()
    proc.join()
    busy = (sum(sys1) - sys1.idle - sys1.iowait) - (sum(sys0) - sys0.idle - sys0.iowait)
    window = t1 - t0
    lat = sorted(result["latencies"])
    ok = sum(n for s, n in result["statuses"].items() if s == 200)
    return {
        "requests": len(lat), "ok": ok, "errors": len(lat) - ok,
        "req_per_s": round(len(lat) / duration, 1),
        "p50_ms": round(statistics.median(lat) * 1000, 2),
        "p90_ms": round(lat[int(0.90 * (len(lat) - 1))] * 1000, 2),
        "p99_ms": round(lat[int(0.99 * (len(lat) - 1))] * 1000, 2),
        "max_ms": round(lat[-1] * 1000, 2),
        # The client signals the measured window's start and end; the parent samples then.
        "client_cpu": round(result["client_cpu_s"] / duration, 2),
        "server_cpu": round(_cpu_used(srv0, srv1) / window, 2),
        "postgres_cpu": round(_cpu_used(pg0, pg1) / window, 2),
        "machine_cpu": round(busy / window, 2),
        "load1": round(load1, 2),
    }


# ---------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1,000 jobs, 5 s per row")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--database-url", default=PG_URL, help="a Postgres server to create the bench database on")
    # One uvicorn process, as the Helm chart deploys it (one per pod; scale out with replicas).
    # With several workers on one listening socket, uvicorn lets whichever worker wakes first
    # accept a burst of connections, so the 64 keep-alive connections split unevenly (48/16
    # measured) and the busier worker queues: that, not the route's cost, made the p99.
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes (default 1, as deployed)")
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
                    rows.append({"row": label, **measure(base, mix, job_ids, duration, warmup, server)})
                    if label == "ours":
                        paced = measure(base, mix, job_ids, duration, warmup, server, rate=TARGET_RATE)
                        rows.append({"row": f"ours @{TARGET_RATE:.0f}/s", **paced})
                finally:
                    stop_server(server)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    header = (f"{'row':<15} {'req/s':>9} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8} {'requests':>9} "
              f"{'errors':>7} {'cpu: client':>11} {'server':>6} {'pg':>5} {'machine':>7} {'load1':>5}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['row']:<15} {r['req_per_s']:>9.1f} {r['p50_ms']:>8.2f} {r['p90_ms']:>8.2f} {r['p99_ms']:>8.2f} "
              f"{r['max_ms']:>8.2f} {r['requests']:>9} {r['errors']:>7} {r['client_cpu']:>11.2f} "
              f"{r['server_cpu']:>6.2f} {r['postgres_cpu']:>5.2f} {r['machine_cpu']:>7.2f} {r['load1']:>5.2f}")
    print(f"cpu columns: cores busy in the measured window ({os.cpu_count()} on this machine); "
          "machine = all processes, other work on the machine included")
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
