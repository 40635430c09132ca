"""Which queued jobs start now: the scheduling policy, a pure function of the state it is given.

No database, no Ray, no clock: ``plan`` takes the cluster's free capacity, each tenant's usage
and limits, every tenant's oldest queued jobs and the runs in flight, and returns the jobs to
start and the one job capacity is being held for. ``service.scheduler`` drives it against
Postgres and Ray; tests and ``bench/scheduler_scale.py`` drive it against a simulated cluster.

Fair share is counted in GPUs (CPUs on a cluster without GPUs), not jobs: the tenant that holds
and has recently used the least goes next, so an 8-GPU job costs its tenant eight 1-GPU turns.
When the most deserving tenant's next job does not fit, capacity is held for it (a reservation,
EASY backfilling): other jobs start only where they cannot delay it, i.e. they use capacity the
reserved job will not need, or their wall-clock limit ends them before it could start.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field

_EPS = 1e-9

# A start is charged as if the job had already run this long, so one tick never hands every free
# GPU to the tenant that happens to be first; cumulative usage takes over as jobs run.
LOOKAHEAD_S = 600.0


@dataclass(frozen=True)
class Capacity:
    cpus: float
    gpus: float

    def __add__(self, other: Capacity) -> Capacity:
        return Capacity(self.cpus + other.cpus, self.gpus + other.gpus)

    def __sub__(self, other: Capacity) -> Capacity:
        return Capacity(self.cpus - other.cpus, self.gpus - other.gpus)

    def fits_in(self, room: Capacity) -> bool:
        """Every dimension this needs is within ``room`` (a dimension it does not use never blocks)."""
        return ((self.cpus <= _EPS or self.cpus <= room.cpus + _EPS)
                and (self.gpus <= _EPS or self.gpus <= room.gpus + _EPS))

    def min(self, other: Capacity) -> Capacity:
        return Capacity(min(self.cpus, other.cpus), min(self.gpus, other.gpus))


ZERO = Capacity(0.0, 0.0)


@dataclass(slots=True)
class QueuedJob:
    id: str
    tenant_id: str
    need: Capacity
    wall_clock_s: float | None  # its limit: how long it may hold what it takes (None: no limit)


@dataclass(slots=True)
class RunningJob:
    tenant_id: str
    need: Capacity
    deadline: float | None  # when its wall-clock limit stops it at the latest


@dataclass(slots=True)
class TenantState:
    id: str
    usage: float = 0.0  # decayed share-unit-seconds used (GPU-seconds on a GPU cluster)
    max_concurrent_jobs: int | None = None
    max_concurrent: Capacity | None = None  # GPU / CPU share it may hold at once (None: no cap)


@dataclass(frozen=True)
class ClusterView:
    free: Capacity  # what training may take right now
    budget: Capacity  # the most training could hold with all its runs ended (total less serving)
    slots: int  # Ray Jobs that may still be submitted (the head pod's bound)
    now: float


@dataclass
class Plan:
    start: list[QueuedJob] = field(default_factory=list)
    reserved: QueuedJob | None = None  # the job capacity is held for


def share_of(need: Capacity, cluster: ClusterView) -> float:
    """A job's size in fair-share units: GPUs, or CPUs when the cluster has no GPUs."""
    return need.gpus if cluster.budget.gpus > 0 else need.cpus


def plan(cluster: ClusterView, tenants: dict[str, TenantState], heads: dict[str, list[QueuedJob]],
         running: list[RunningJob]) -> Plan:
    """The jobs to start now, in start order, taking each tenant's queue in its own order."""
    held: dict[str, Capacity] = defaultdict(lambda: ZERO)
    count: Counter[str] = Counter()
    for run in running:
        held[run.tenant_id] += run.need
        count[run.tenant_id] += 1

    def key(t: str) -> float:
        return tenants[t].usage + share_of(held[t], cluster) * LOOKAHEAD_S

    queue = [(key(t), jobs[0].id, t) for t, jobs in heads.items() if jobs and t in tenants]
    heapq.heapify(queue)
    nxt: Counter[str] = Counter()
    free, slots, out = cluster.free, cluster.slots, Plan()
    in_flight = list(running)
    shadow, extra = math.inf, ZERO  # the reservation: when it can start, and what it leaves spare
    while queue and slots > 0:
        _, _, t = heapq.heappop(queue)
        job, tenant = heads[t][nxt[t]], tenants[t]
        if not _within_tenant_limits(job, tenant, held[t], count[t]):
            continue  # this tenant waits for its own runs to end
        if not job.need.fits_in(cluster.budget):
            continue  # serving holds too much for it now; the queue-wait limit ends a long wait
        fits = job.need.fits_in(free)
        if fits and out.reserved is not None:
            ends_in_time = job.wall_clock_s is not None and cluster.now + job.wall_clock_s <= shadow
            if not ends_in_time:
                if not job.need.fits_in(extra):
                    continue  # it would delay the reserved job
                extra -= job.need
        if fits:
            out.start.append(job)
            free -= job.need
            slots -= 1
            held[t] += job.need
            count[t] += 1
            deadline = None if job.wall_clock_s is None else cluster.now + job.wall_clock_s
            in_flight.append(RunningJob(t, job.need, deadline))
            nxt[t] += 1
            if nxt[t] < len(heads[t]):
                heapq.heappush(queue, (key(t), heads[t][nxt[t]].id, t))
        elif out.reserved is None:
            out.reserved = job
            shadow, extra = _shadow(free, job.need, in_flight)
    return out


def _within_tenant_limits(job: QueuedJob, tenant: TenantState, held: Capacity, count: int) -> bool:
    if tenant.max_concurrent_jobs is not None and count >= tenant.max_concurrent_jobs:
        return False
    return tenant.max_concurrent is None or (held + job.need).fits_in(tenant.max_concurrent)


def _shadow(free: Capacity, need: Capacity, running: list[RunningJob]) -> tuple[float, Capacity]:
    """When the reserved job can start at the latest (runs end by their deadlines), and what is
    spare then beyond its need: a backfilled job confined to that spare can never delay it."""
    room = free
    for run in sorted((r for r in running if r.deadline is not None), key=lambda r: r.deadline):
        room += run.need
        if need.fits_in(room):
            return run.deadline, room - need
    return math.inf, free - need  # no deadline frees enough: only what it cannot use is spare
