"""The real scheduler, on both databases, against a simulated cluster in place of Ray.

The simulated cluster (service.scheduling.simulated) admits runs by GPU count and finishes them
after a simulated duration, on a simulated clock that starts at the wall clock's now: these
tests are about who starts when, and what happens to a job that cannot or may not run.
"""

from __future__ import annotations

import time
from collections import Counter

import pytest
from sqlalchemy import select, update

from service.catalog.repository import ensure_base_model
from service.db.models import Base, Checkpoint, File, Job, Tenant
from service.db.session import make_engine, make_session_factory, session_scope
from service.errors import QuotaExceeded
from service.ids import new_id, now
from service.jobs import states
from service.jobs.repository import create_job
from service.jobs.submit import submit_job
from service.launcher import RayJobLauncher, RayUnavailable
from service.scheduler import Scheduler
from service.scheduling.policy import Capacity
from service.scheduling.simulated import SimulatedCluster
from service.settings import Settings
from service.tenants.repository import create_tenant
from workers.local_ray import free_port
from workers.spec import Hyperparameters, Resources


class World:
    """A database, a simulated cluster and the scheduler between them."""

    def __init__(self, database_url: str, tmp_path, *, gpus: float = 4, serving_gpus: float = 0,
                 duration=lambda job_id: 100.0, **settings):
        self.engine = make_engine(database_url)
        Base.metadata.create_all(self.engine)
        self.sessions = make_session_factory(self.engine)
        self.settings = Settings(data_dir=tmp_path, database_url=database_url, **settings)
        self.cluster = SimulatedCluster(Capacity(cpus=1024, gpus=gpus), duration_of=duration,
                                        on_finish=self._succeeded, held_by_serving=Capacity(0, serving_gpus))
        self.cluster.now = float(now())
        self.scheduler = Scheduler(self.settings, self.engine, self.cluster, clock=lambda: self.cluster.now)
        self.started: list[str] = []  # job ids in the order the scheduler started them
        with session_scope(self.sessions) as s:
            ensure_base_model(s, id="m", source_uri="builtin://m", architecture="llama",
                              methods=["lora"], max_rank=64, quantization=None)

    def _succeeded(self, job_id: str) -> None:  # what the run's result post would do
        with session_scope(self.sessions) as s:
            job = s.get(Job, job_id)
            if job.status == states.RUNNING:
                states.transition(s, job, states.SUCCEEDED)

    def tenant(self, name: str, *, max_concurrent_jobs: int = 1000, max_queued_jobs: int = 1000, **limits) -> str:
        with session_scope(self.sessions) as s:
            t = create_tenant(s, name=name, max_concurrent_jobs=max_concurrent_jobs,
                              max_queued_jobs=max_queued_jobs, requests_per_minute=100, limits=limits)
            s.add(File(id=f"file-{t.id}", tenant_id=t.id, filename="d.jsonl", purpose="fine-tune",
                       bytes=1, sha256="0" * 64, status="processed", status_details=None, format="text",
                       examples=1, object_key=f"tenants/{t.id}/files/d.jsonl", created_at=now()))
            return t.id

    def queue(self, tenant_id: str, n: int = 1, gpus: float = 1) -> list[str]:
        with session_scope(self.sessions) as s:
            ids = []
            for _ in range(n):
                job = create_job(s, tenant_id=tenant_id, model="m", training_file=f"file-{tenant_id}",
                                 validation_file=None, method="lora", hyperparameters={},
                                 resources={"num_workers": 1, "gpus_per_worker": gpus, "cpus_per_worker": 1},
                                 suffix=None, seed=1, metadata=None)
                states.transition(s, job, states.QUEUED)
                ids.append(job.id)
            return ids

    def tick(self, advance_s: float = 10.0) -> list[str]:
        """Let ``advance_s`` simulated seconds pass, then one scheduler pass; the jobs it started."""
        self.cluster.advance(self.cluster.now + advance_s)
        assert self.scheduler.tick()
        new = [j.id for j in self.scheduler.last_plan.start] if self.scheduler.last_plan else []
        self.started += new
        return new

    def job(self, job_id: str) -> Job:
        with session_scope(self.sessions) as s:
            job = s.get(Job, job_id)
            s.expunge(job)
            return job

    def close(self) -> None:
        self.scheduler.lock.release()
        self.engine.dispose()


@pytest.fixture
def world(database_url, tmp_path):
    worlds: list[World] = []

    def make(**kw) -> World:
        worlds.append(World(database_url, tmp_path, **kw))
        return worlds[-1]

    yield make
    for w in worlds:
        w.close()


def test_twelve_tenants_at_quota_each_start_before_any_third(world):
    """12 tenants × 150 queued (their queue quota): 1,800 jobs, beyond any 'oldest 1,000' window.
    Every tenant gets a job started before any tenant gets its third."""
    w = world(gpus=4)
    tenants = [w.tenant(f"t{i}", max_queued_jobs=150) for i in range(12)]
    for t in tenants:
        w.queue(t, 150)
    with session_scope(w.sessions) as s:  # at quota: the API refuses a 151st
        with pytest.raises(QuotaExceeded):
            submit_job(s, tenant_id=tenants[-1], model="m", training_file=f"file-{tenants[-1]}",
                       validation_file=None, method="lora", hyperparameters=Hyperparameters(),
                       resources=Resources(), suffix=None, metadata=None, method_type="lora",
                       settings=w.settings)
    with session_scope(w.sessions) as s:
        owner = {job_id: tenant_id for job_id, tenant_id in s.execute(select(Job.id, Job.tenant_id))}
    for _ in range(40):
        w.tick(advance_s=60)
        starts = Counter(owner[j] for j in w.started)
        if len(starts) == 12 and max(starts.values()) >= 3:
            break
    order = [owner[j] for j in w.started]
    first = {t: order.index(t) for t in tenants}
    third = [i for i, t in enumerate(order) if order[:i + 1].count(t) == 3]
    assert len(first) == 12 and third, order
    assert max(first.values()) < min(third), order


def test_large_job_not_starved_by_a_stream_of_small_ones(world):
    """4 GPUs, tenant A keeps them busy with 1-GPU jobs of staggered lengths; B's 4-GPU job gets a
    reservation: GPUs freed one by one are held for it, not handed to A's next small job."""
    lengths = iter([30.0, 45.0, 60.0, 75.0] * 100)
    w = world(gpus=4, duration=lambda job_id: next(lengths))
    a, b = w.tenant("A"), w.tenant("B")
    w.queue(a, 60)
    w.tick()
    assert len(w.started) == 4
    big = w.queue(b, 1, gpus=4)[0]
    for i in range(20):
        w.tick(advance_s=10)
        if big in w.started:
            break
        assert w.scheduler.last_plan.reserved.id == big
    assert big in w.started, "the 4-GPU job never started"
    assert i <= 8  # within the longest small run (75 s) plus a tick or two
    assert w.job(big).status == states.RUNNING


def test_poison_job_fails_alone(world):
    w = world(gpus=8, max_submission_attempts=3)
    tenants = [w.tenant(n) for n in "ABC"]
    jobs = [w.queue(t, 2)[0] for t in tenants]
    poison = jobs[1]
    w.cluster.refuse.add(poison)
    for _ in range(4):
        w.tick()
    failed = w.job(poison)
    assert failed.status == states.FAILED and failed.error_code == "submission_failed"
    assert "simulated" not in failed.error_message  # Ray's words stay in our log
    ok = [w.job(j) for j in w.started if j != poison]
    assert len(ok) == 5 and all(j.status == states.RUNNING for j in ok)  # the other five started


def test_wall_clock_limit_stops_the_run_and_fails_timeout_keeping_checkpoints(world):
    w = world(gpus=2, duration=lambda job_id: 10_000.0)
    t = w.tenant("A", max_job_wall_clock_s=120)
    job_id = w.queue(t)[0]
    w.tick()
    with session_scope(w.sessions) as s:
        s.add(Checkpoint(id=new_id("ftckpt-"), job_id=job_id, step_number=7, metrics={},
                         key_prefix="tenants/x/checkpoints/7", created_at=now()))
        s.execute(update(Job).where(Job.id == job_id).values(last_checkpoint_step=7))
    w.tick(advance_s=60)
    assert w.job(job_id).status == states.RUNNING
    w.tick(advance_s=120)
    job = w.job(job_id)
    assert job.status == states.FAILED and job.error_code == "timeout"
    assert "120 s" in job.error_message and "step 7" in job.error_message
    assert w.cluster.state(job_id).value == "STOPPED"
    with session_scope(w.sessions) as s:
        assert s.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id)).all()


def test_queued_past_max_wait_fails_insufficient_resources(world):
    w = world(gpus=1, duration=lambda job_id: 10_000.0, max_queue_wait_s=300)
    t = w.tenant("A")
    first, waiting = w.queue(t, 2)
    w.tick()
    assert w.job(first).status == states.RUNNING
    w.tick(advance_s=200)
    assert w.job(waiting).status == states.QUEUED
    w.tick(advance_s=200)
    job = w.job(waiting)
    assert job.status == states.FAILED and job.error_code == "insufficient_resources"
    assert job.error_param == "resources" and "300 s" in job.error_message
    assert w.job(first).status == states.RUNNING


def test_ray_jobs_in_flight_stay_bounded(world):
    w = world(gpus=64, max_ray_jobs_in_flight=5)
    for n in range(4):
        w.queue(w.tenant(f"t{n}"), 10)
    for _ in range(30):
        w.tick(advance_s=30)
    assert w.cluster.max_in_flight == 5
    assert len(w.started) > 5  # jobs went on starting as others finished


def test_fair_share_counts_gpus_and_serving_share_is_not_ours(world):
    """8 GPUs, serving holds 2: training gets 6. Tenant A's jobs take 4 GPUs each, B's take 1:
    with one A job running, B gets the other two GPUs, not A its second (GPU units, not jobs)."""
    w = world(gpus=8, serving_gpus=2, duration=lambda job_id: 10_000.0)
    a, b = w.tenant("A"), w.tenant("B")
    w.queue(a, 3, gpus=4)
    w.queue(b, 5, gpus=1)
    w.tick()
    w.tick()
    held = Counter()
    with session_scope(w.sessions) as s:
        for tenant_id, status in s.execute(select(Job.tenant_id, Job.status)):
            if status == states.RUNNING:
                held[tenant_id] += 1
    assert held == {a: 1, b: 2}
    assert w.cluster.busy_gpus == 6


def test_tenant_gpu_share_cap_and_a_lowered_per_job_limit(world):
    w = world(gpus=16, duration=lambda job_id: 10_000.0)
    capped = w.tenant("A", max_concurrent_gpus=2)
    jobs = w.queue(capped, 4, gpus=1)
    w.tick()
    assert sorted(w.started) == jobs[:2]
    big = w.queue(capped, 1, gpus=2)[0]
    with session_scope(w.sessions) as s:  # the admin lowers the per-job limit after it queued
        s.execute(update(Tenant).where(Tenant.id == capped).values(max_gpus_per_job=1))
    w.tick()
    job = w.job(big)
    assert job.status == states.FAILED and job.error_code == "insufficient_resources"
    assert "max_gpus_per_job" in job.error_message


def test_history_rebuilds_fair_share_after_a_leader_change(world):
    """A new leader starts from the jobs table: the tenant that used the cluster goes last."""
    w = world(gpus=1, duration=lambda job_id: 10_000.0)
    heavy, light = w.tenant("heavy"), w.tenant("light")
    done = w.queue(heavy, 1)[0]
    w.tick()
    w.cluster.stop(done)
    with session_scope(w.sessions) as s:  # it ran an hour on one GPU
        s.execute(update(Job).where(Job.id == done).values(
            status=states.SUCCEEDED, started_at=int(w.cluster.now) - 3600, finished_at=int(w.cluster.now)))
    h = w.queue(heavy, 1)[0]
    time.sleep(0.002)
    lt = w.queue(light, 1)[0]
    w.scheduler.lock.release()
    w.scheduler = Scheduler(w.settings, w.engine, w.cluster, clock=lambda: w.cluster.now)
    started = w.tick()
    assert started == [lt] and w.job(h).status == states.QUEUED


def test_unreachable_ray_ends_the_tick_and_fails_no_job(world):
    """Ray's dashboard down is nobody's job's fault: the pass stops, every job keeps its state."""
    w = world(gpus=1, max_submission_attempts=1, duration=lambda job_id: 10_000.0)
    t = w.tenant("A")
    running, queued = w.queue(t, 2)
    w.tick()
    w.scheduler.launcher = RayJobLauncher(f"http://127.0.0.1:{free_port()}", timeout=1.0)
    for _ in range(3):
        with pytest.raises(RayUnavailable):
            w.scheduler.tick()
    assert w.job(running).status == states.RUNNING and w.job(queued).status == states.QUEUED
