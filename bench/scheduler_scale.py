"""Scheduler at fleet scale, simulated: the real scheduler against PostgreSQL, a simulated cluster.

``service.scheduler.Scheduler`` runs unchanged against a fresh PostgreSQL database holding the
whole queue; ``service.scheduling.simulated.SimulatedCluster`` stands in for Ray: it admits runs
by GPU count and finishes each after its simulated duration, on a simulated clock that the
database timestamps follow too. One scheduler pass every ``tick_s`` simulated seconds.

Workload (seeded, the same for both rows): 512 GPUs, 1,000 tenants, 100,000 queued jobs,
submitted in one random interleaved order; backlogs differ: 70 % of tenants have 1-5 jobs, the
others share the rest by a Zipf law (the largest ~20,000 jobs, the smallest 20); sizes 1, 2, 4
or 8 GPUs (50/25/15/10 %); durations log-normal (median 3 min, σ 1.0, 30 s to 2 h: heavy-tailed).

Rows (same workload, same process):
  baseline   the scheduler as it was before issue 9: the oldest 1,000 queued rows, tenants
             taking turns by job count, a job too big for the free GPUs skipped (no reservation)
  ours       service.scheduler today

Figures: ``tick_p99_ms`` (wall time of one scheduler pass, including the starts it submits),
``gpu_utilization`` (busy GPU-time ÷ GPU-time available while work is queued),
``fairness_jain`` (Jain's index of GPU-time among tenants that kept a backlog to the end),
``small_tenant_wait_p99_s`` (simulated wait from submission to start of the jobs of tenants with
1-5 jobs; a job never started counts the whole horizon). Targets: tick p99 ≤ 100 ms,
utilisation ≥ 0.9, Jain ≥ 0.9.

Like ``python -m service.scheduler``, each row freezes the heap it was set up with
(``service.scheduler.freeze_startup_heap``) before its first pass, so a full garbage collection
walks what the passes made, not the workload's bookkeeping; ``--no-freeze`` measures without.

    python bench/scheduler_scale.py [--quick] [--json PATH] [--database-url URL]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.db.models import Base, BaseModelRow, File, Job, Tenant  # noqa: E402
from service.db.session import make_engine, make_session_factory, session_scope  # noqa: E402
from service.ids import new_id  # noqa: E402
from service.jobs import states  # noqa: E402
from service.scheduler import Scheduler, freeze_startup_heap  # noqa: E402
from service.scheduling.policy import Capacity  # noqa: E402
from service.scheduling.simulated import SimulatedCluster  # noqa: E402
from service.settings import Settings  # noqa: E402
from service.tenants.limits import demand  # noqa: E402

PG_URL = os.environ.get("LORAFLEET_TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
T0 = 1_800_000_000.0  # the simulated clock's start (Unix seconds)
SMALL_SHARE = 0.7  # tenants with 1-5 jobs; the others share the rest of the queue


@dataclass(frozen=True)
class Scale:
    gpus: int
    tenants: int
    jobs: int
    horizon_s: float
    tick_s: float = 10.0


FULL = Scale(gpus=512, tenants=1000, jobs=100_000, horizon_s=4 * 3600, tick_s=20.0)
QUICK = Scale(gpus=64, tenants=100, jobs=10_000, horizon_s=2 * 3600, tick_s=20.0)


# ------------------------------------------------------------------------------------ workload
@dataclass
class Workload:
    tenants: list[str]
    jobs: list[tuple[str, str, int, float]]  # (job id, tenant, GPUs, duration s) in submission order
    backlog: dict[str, int]


def make_workload(scale: Scale, seed: int = 7) -> Workload:
    rng = random.Random(seed)
    tenants = [f"tn_bench{i:04d}" for i in range(scale.tenants)]
    n_small = int(scale.tenants * SMALL_SHARE)
    backlog = {t: rng.randint(1, 5) for t in tenants[:n_small]}
    big = tenants[n_small:]
    weights = [1 / (i + 1) for i in range(len(big))]
    rest, total = scale.jobs - sum(backlog.values()), sum(weights)
    backlog |= {t: max(20, round(rest * w / total)) for t, w in zip(big, weights)}
    order = [t for t, n in backlog.items() for _ in range(n)]
    rng.shuffle(order)
    jobs = []
    for tenant in order:
        gpus = rng.choices((1, 2, 4, 8), weights=(50, 25, 15, 10))[0]
        duration = min(2 * 3600, max(30.0, 180.0 * math.exp(rng.gauss(0.0, 1.0))))
        jobs.append((new_id("ftjob-"), tenant, gpus, duration))  # ids sort in submission order
    return Workload(tenants, jobs, backlog)


def load(engine: sa.Engine, w: Workload) -> None:
    Base.metadata.create_all(engine)
    ts = int(T0)
    with engine.begin() as conn:
        conn.execute(sa.insert(BaseModelRow), [dict(id="m", source_uri="builtin://m", architecture="llama",
                                                     methods=["lora"], max_rank=64, quantization=None, created_at=ts)])
        conn.execute(sa.insert(Tenant), [dict(id=t, name=t, status="active", max_concurrent_jobs=1_000_000,
                                              max_queued_jobs=1_000_000, requests_per_minute=100, created_at=ts)
                                         for t in w.tenants])
        conn.execute(sa.insert(File), [dict(id=f"file-{t}", tenant_id=t, filename="d.jsonl", purpose="fine-tune",
                                            bytes=1, sha256="0" * 64, status="processed", status_details=None,
                                            format="text", examples=1, object_key=f"tenants/{t}/files/d.jsonl",
                                            created_at=ts) for t in w.tenants])
        rows = [dict(id=j, tenant_id=t, model="m", training_file=f"file-{t}", validation_file=None,
                     status=states.QUEUED, method="lora", hyperparameters={},
                     resources={"num_workers": 1, "gpus_per_worker": g, "cpus_per_worker": 1},
                     suffix=None, seed=1, user_metadata=None, attempts=0, created_at=ts, updated_at=ts)
                for j, t, g, _ in w.jobs]
        for i in range(0, len(rows), 10_000):
            conn.execute(sa.insert(Job), rows[i:i + 10_000])
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("ANALYZE"))


# ------------------------------------------------------------------------------------ baseline
class BaselineScheduler(Scheduler):
    """service.scheduler's dispatch before issue 9 (git 6cba497), against the same cluster."""

    def _dispatch(self, _active, now: float) -> None:
        total = self.launcher.resources().total
        with session_scope(self.sessions) as s:
            active = s.scalars(sa.select(Job).where(Job.status.in_(states.ACTIVE))).all()
            used_cpu = sum(demand(j.resources).cpus for j in active)
            used_gpu = sum(demand(j.resources).gpus for j in active)
            slots = self.settings.max_ray_jobs_in_flight - len(active)
            queued = s.scalars(sa.select(Job).where(Job.status == states.QUEUED).order_by(Job.id)
                               .limit(1000).with_for_update(skip_locked=True)).all()
            if not queued:
                return
            load = self._load(s, {j.tenant_id for j in queued}, now)
            started: list[str] = []
            for job in _fair_order(queued, load):
                if len(started) >= slots:
                    break
                need = demand(job.resources)
                if used_cpu + need.cpus > total.cpus or used_gpu + need.gpus > total.gpus:
                    continue
                states.transition(s, job, states.RUNNING, attempts=job.attempts + 1)
                used_cpu += need.cpus
                used_gpu += need.gpus
                started.append(job.id)
        for job_id in started:
            self._submit(job_id)

    def _load(self, s, tenant_ids, now):
        load = {t.id: [0, 0, t.max_concurrent_jobs] for t in s.scalars(sa.select(Tenant).where(Tenant.id.in_(tenant_ids)))}
        for tenant_id, n in s.execute(sa.select(Job.tenant_id, sa.func.count()).where(
                Job.tenant_id.in_(tenant_ids), Job.status.in_(states.ACTIVE)).group_by(Job.tenant_id)):
            load[tenant_id][0] = n
        for tenant_id, n in s.execute(sa.select(Job.tenant_id, sa.func.count()).where(
                Job.tenant_id.in_(tenant_ids), Job.started_at >= now - 3600).group_by(Job.tenant_id)):
            load[tenant_id][1] = n
        return load


def _fair_order(queued, load):
    by_tenant = defaultdict(list)
    for job in queued:
        by_tenant[job.tenant_id].append(job)
    order = []
    while True:
        ready = [t for t, jobs in by_tenant.items() if jobs and load[t][0] < load[t][2]]
        if not ready:
            return order
        ready.sort(key=lambda t: (load[t][0], load[t][1], by_tenant[t][0].id))
        for t in ready:
            order.append(by_tenant[t].pop(0))
            load[t][0] += 1
            load[t][1] += 1


# ------------------------------------------------------------------------------------ one run
def run(name: str, scheduler_cls: type[Scheduler], scale: Scale, w: Workload, database_url: str,
        freeze: bool = True) -> dict:
    db = f"lf_bench_sched_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(database_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{db}"'))
    url = database_url.rsplit("/", 1)[0] + f"/{db}"
    engine = make_engine(url)
    try:
        t_load = time.perf_counter()
        load(engine, w)
        load_s = time.perf_counter() - t_load
        return _simulate(name, scheduler_cls, scale, w, engine, url, freeze) | {"load_s": round(load_s, 1)}
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
        admin.dispose()


def _simulate(name, scheduler_cls, scale, w, engine, url, freeze) -> dict:
    duration = {j: d for j, _, _, d in w.jobs}
    tenant_of = {j: t for j, t, _, _ in w.jobs}
    sessions = make_session_factory(engine)

    def finished(job_id: str) -> None:  # what the run's result post does
        with session_scope(sessions) as s:
            job = s.get(Job, job_id)
            if job.status == states.RUNNING:
                states.transition(s, job, states.SUCCEEDED)

    cluster = SimulatedCluster(Capacity(cpus=scale.gpus * 8, gpus=scale.gpus),
                               duration_of=duration.__getitem__, on_finish=finished)
    cluster.now = T0
    real_now = states.now
    states.now = lambda: int(cluster.now)  # the database's timestamps follow the simulated clock
    settings = Settings(database_url=url, scheduler_interval_s=scale.tick_s, max_ray_jobs_in_flight=scale.gpus,
                        max_queue_wait_s=None)
    sched = scheduler_cls(settings, engine, cluster, clock=lambda: cluster.now)
    if freeze:
        freeze_startup_heap()  # as service.scheduler.main does once it is set up
    ticks_ms = []
    t_wall = time.perf_counter()
    try:
        steps = int(scale.horizon_s / scale.tick_s)
        for k in range(steps):
            cluster.advance(T0 + k * scale.tick_s)
            t = time.perf_counter()
            assert sched.tick()
            ticks_ms.append((time.perf_counter() - t) * 1000)
            if k % max(1, steps // 10) == 0:
                print(f"  {name}: {k}/{steps} ticks, {cluster.busy_gpus:.0f}/{scale.gpus} GPUs busy, "
                      f"tick {ticks_ms[-1]:.0f} ms", flush=True)
        cluster.advance(T0 + scale.horizon_s)
    finally:
        states.now = real_now
        sched.lock.release()
    wall_s = time.perf_counter() - t_wall

    end = T0 + scale.horizon_s
    gpu_time = defaultdict(float)
    started_at = {}
    for run_ in cluster.runs.values():
        if run_.started_at is None:
            continue
        started_at[run_.job_id] = run_.started_at
        stop = min(end, run_.ends_at if run_.state.terminal else end)
        gpu_time[tenant_of[run_.job_id]] += run_.need.gpus * max(0.0, stop - run_.started_at)
    with engine.connect() as conn:
        still = {t for (t,) in conn.execute(sa.select(Job.tenant_id).where(Job.status == states.QUEUED).distinct())}
    backlogged = [gpu_time[t] for t in w.tenants if t in still]
    jain = sum(backlogged) ** 2 / (len(backlogged) * sum(x * x for x in backlogged)) if backlogged else float("nan")
    small = [started_at.get(j, end) - T0 for j, t, _, _ in w.jobs if w.backlog[t] <= 5]
    ticks_sorted = sorted(ticks_ms)
    return {
        "policy": name,
        "ticks": len(ticks_ms),
        "tick_p50_ms": round(statistics.median(ticks_ms), 1),
        "tick_p99_ms": round(ticks_sorted[int(0.99 * (len(ticks_sorted) - 1))], 1),
        "gpu_utilization": round(cluster.busy_gpu_s / (scale.gpus * scale.horizon_s), 3),
        "fairness_jain": round(jain, 3),
        "backlogged_tenants": len(backlogged),
        "small_tenant_wait_p50_s": round(statistics.median(small)),
        "small_tenant_wait_p99_s": round(_p99(small)),
        "jobs_started": len(started_at),
        "max_ray_jobs_in_flight": cluster.max_in_flight,
        "wall_s": round(wall_s, 1),
    }


def _p99(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[int(0.99 * (len(xs) - 1))] if xs else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK} instead of {FULL}")
    parser.add_argument("--json", help="write results to this path")
    parser.add_argument("--database-url", default=PG_URL, help="a PostgreSQL server (a database is created per row)")
    parser.add_argument("--only", choices=("baseline", "ours"), help="run one row (no ratios)")
    parser.add_argument("--no-freeze", action="store_true",
                        help="leave the setup's objects to the garbage collector (service.scheduler.main freezes them)")
    args = parser.parse_args()
    scale = QUICK if args.quick else FULL
    w = make_workload(scale)
    print(f"scheduler_scale: {scale.gpus} GPUs, {scale.tenants} tenants, {len(w.jobs)} queued jobs, "
          f"{scale.horizon_s / 3600:.0f} h simulated, a pass every {scale.tick_s:.0f} s", flush=True)
    policies = {"baseline": BaselineScheduler, "ours": Scheduler}
    rows = [run(name, cls, scale, w, args.database_url, not args.no_freeze) for name, cls in policies.items()
            if args.only in (None, name)]
    base, ours = (rows * 2)[:2] if args.only else rows
    keys = ("tick_p50_ms", "tick_p99_ms", "gpu_utilization", "fairness_jain", "small_tenant_wait_p50_s",
            "small_tenant_wait_p99_s", "jobs_started", "max_ray_jobs_in_flight")
    heads = ("tick p50 ms", "tick p99 ms", "GPU util", "Jain", "small wait p50 s", "small wait p99 s",
             "jobs started", "max in flight")
    print(f"\n| policy | {' | '.join(heads)} |\n|---|{'---:|' * len(heads)}")
    for r in rows:
        print(f"| {r['policy']} | " + " | ".join(str(r[k]) for k in keys) + " |")
    print("| ours / baseline | " + " | ".join(_ratio(ours[k], base[k]) for k in keys) + " |")
    figures = {k: ours[k] for k in ("tick_p99_ms", "gpu_utilization", "fairness_jain", "small_tenant_wait_p99_s")}
    targets = {"tick_p99_ms": figures["tick_p99_ms"] <= 100, "gpu_utilization": figures["gpu_utilization"] >= 0.9,
               "fairness_jain": figures["fairness_jain"] >= 0.9}
    print("figures:", json.dumps(figures), "targets met:", json.dumps(targets))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"bench": "scheduler_scale", "quick": args.quick,
                                               "scale": scale.__dict__, "gc_frozen": not args.no_freeze,
                                               "rows": rows, "figures": figures,
                                               "targets_met": targets}, indent=2))


def _ratio(a, b) -> str:
    return f"{a / b:.2f}" if isinstance(a, int | float) and b else "-"


if __name__ == "__main__":
    main()
