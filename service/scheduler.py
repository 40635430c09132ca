"""The scheduler: turns queued jobs into Ray runs, fairly, and keeps the database true to Ray.

One leader at a time (a Postgres advisory lock; a file lock on SQLite). Every tick it
1. stops the runs of jobs being cancelled, and marks paused those whose run stopped at a pause,
2. reconciles running jobs with what Ray says (after any restart this is what recovers them) and
   stops those past their wall-clock limit (`timeout`),
3. fails jobs queued longer than LORAFLEET_MAX_QUEUE_WAIT_S (`insufficient_resources`),
4. starts queued jobs as ``service.scheduling.policy.plan`` decides (fair share in GPUs, a
   reservation for a large job, tenant limits, a bound on Ray Jobs in flight),
5. runs queued exports and blends and reconciles running ones (service.exports.dispatch).
One job's trouble with Ray is that job's: it is logged and the tick goes on; a job whose
submission Ray keeps refusing fails `submission_failed`. Only an unreachable Ray ends a tick.

Run it inside the embedded server (a thread) or alone: ``python -m service.scheduler``.
"""

from __future__ import annotations

import fcntl
import gc
import logging
import math
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple, Protocol

from sqlalchemy import Engine, func, or_, select, text, true
from sqlalchemy.orm import Session, sessionmaker

from service.db.models import BaseModelRow, File, Job, Tenant
from service.db.session import make_session_factory, session_scope
from service.errors import InvalidTransition
from service.exports.dispatch import OperationRunner
from service.jobs import states
from service.jobs.naming import adapter_id_for, adapter_prefix, checkpoint_prefix
from service.jobs.public_errors import tenant_failure_message
from service.launcher import (
    ClusterResources,
    LauncherError,
    RayJobLauncher,
    RayUnavailable,
    RunState,
    SubmissionRefused,
    job_env,
    submission_id,
)
from service.scheduling.observed import ClusterRecorder
from service.scheduling.policy import (
    ZERO,
    Capacity,
    ClusterView,
    Plan,
    QueuedJob,
    RunningJob,
    TenantState,
    plan,
    share_of,
)
from service.settings import Settings
from service.tenants.limits import INSUFFICIENT_RESOURCES, demand, limit_violation
from workers.spec import BaseModelRef, Resources, TrainJobSpec, hyperparameters_for

log = logging.getLogger("lorafleet.scheduler")

LOCK_KEY = 0x10AF1EE7  # pg advisory lock id of the scheduler leader


# ------------------------------------------------------------------------------------ leader lock
class LeaderLock:
    """Held for as long as this process leads. Postgres: a session-level advisory lock on a
    dedicated connection (dies with the process). SQLite: an flock beside the database file."""

    def __init__(self, engine: Engine):
        self._engine, self._conn, self._fd = engine, None, None

    def acquire(self) -> bool:
        if self._fd is not None:
            return True
        if self._conn is not None:
            try:  # the lock lives as long as this connection: a dropped one means we lost it
                self._conn.execute(text("SELECT 1"))
                self._conn.commit()
                return True
            except Exception:  # noqa: BLE001 - any failure: stop leading, try again below
                log.warning("scheduler lost its database connection; leadership released")
                self._conn.invalidate()
                self._conn = None
        if self._engine.dialect.name == "postgresql":
            conn = self._engine.connect()
            if conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": LOCK_KEY}).scalar():
                conn.commit()
                self._conn = conn
                return True
            conn.close()
            return False
        path = Path(self._engine.url.database or "lorafleet.db").with_suffix(".scheduler.lock")
        fd = open(path, "w")  # noqa: SIM115 - held open as the lock
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fd.close()
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        if self._conn is not None:
            # Unlock explicitly: close() only returns the connection to the pool, lock held.
            self._conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": LOCK_KEY})
            self._conn.commit()
            self._conn.close()
            self._conn = None
        if self._fd is not None:
            self._fd.close()
            self._fd = None


# ------------------------------------------------------------------------------------ scheduler
class Launcher(Protocol):
    """What the scheduler needs of Ray: RayJobLauncher, or the simulated cluster of tests and benches."""

    def submit(self, sub_id: str, *, env: dict[str, str]) -> None: ...
    def state(self, sub_id: str) -> RunState: ...
    def message(self, sub_id: str) -> str: ...
    def stop(self, sub_id: str) -> None: ...
    def resources(self) -> ClusterResources: ...


# Queued jobs read per tenant per tick: bounds one tick's reads at this many × tenants, however
# long the queues; a tenant that could start more this tick gets them on the next.
MAX_HEADS_PER_TENANT = 8
HEADS_ROW_BUDGET = 1000
# How long a pausing run may take to write its checkpoint and stop (it polls its status every
# 2 s and checkpoints in seconds) before the scheduler stops it.
PAUSE_GRACE_S = 300
# How often queued jobs are checked against max_queue_wait_s (a scan of the whole queue).
EXPIRY_INTERVAL_S = 60.0


class Scheduler:
    def __init__(self, settings: Settings, engine: Engine, launcher: Launcher,
                 *, clock: Callable[[], float] = time.time):
        self.settings = settings
        self.engine = engine
        self.sessions: sessionmaker[Session] = make_session_factory(engine)
        self.launcher = launcher
        self.lock = LeaderLock(engine)
        self.clock = clock  # the same clock as the database's timestamps (a simulated one in benches)
        # Fair-share ledger: decayed GPU- (or CPU-) seconds per tenant. Kept by the leader, rebuilt
        # from the jobs table whenever it (re)gains leadership.
        self._usage: dict[str, float] | None = None
        self._accrued_at = 0.0
        self._refusals: Counter[str] = Counter()  # Ray's refusals of each running job's submission
        self._next_expiry = 0.0
        self.last_plan: Plan | None = None  # what the last dispatch decided (logs, tests, benches)
        self.operations = OperationRunner(settings, self.sessions, launcher)
        self.observed = ClusterRecorder(self.sessions)  # what the admin API shows of the cluster

    # One pass. Returns False when another process leads.
    def tick(self) -> bool:
        if not self.lock.acquire():
            self._usage = None
            return False
        now = self.clock()
        active = self._active()
        # One read of the runs in flight serves the whole pass unless a step below moved one.
        if self._cancel(active) | self._pause(active, now) | self._reconcile(active, now):
            active = self._active()
        if now >= self._next_expiry:
            self._expire_queued(now)
            self._next_expiry = now + EXPIRY_INTERVAL_S
        self._dispatch(active, now)
        self.operations.tick()
        return True

    def _active(self) -> list[_Active]:
        r = Job.resources  # its numbers read by the database: no JSON parsing here per run per tick
        with session_scope(self.sessions) as s:
            rows = s.execute(select(Job.id, Job.tenant_id, Job.status, Job.attempts, Job.started_at, Job.updated_at,
                                    Tenant.max_job_wall_clock_s, r["num_workers"].as_float(),
                                    r["gpus_per_worker"].as_float(), r["cpus_per_worker"].as_float())
                             .join(Tenant, Tenant.id == Job.tenant_id).where(Job.status.in_(states.ACTIVE)))
            return [_Active(job_id, tenant_id, status, attempts, started_at, updated_at,
                            tenant_limit or self.settings.max_job_wall_clock_s, _need(workers, gpus, cpus))
                    for job_id, tenant_id, status, attempts, started_at, updated_at, tenant_limit, workers, gpus, cpus
                    in rows]

    def run_forever(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.tick()
            except RayUnavailable as exc:
                log.warning("scheduler: %s", exc)
            except Exception:  # keep leading through one bad tick; the next retries
                log.exception("scheduler tick failed")
            stop.wait(self.settings.scheduler_interval_s)
        self.lock.release()

    # --- 1. cancellations
    def _cancel(self, active: list[_Active]) -> bool:
        """Stop the runs of cancelling jobs; True if a job changed status."""
        changed = False
        for job in active:
            if job.status != states.CANCELLING:
                continue
            job_id, sub = job.id, submission_id(job.id, job.attempts)
            try:
                state = self.launcher.state(sub)
                if not state.terminal:
                    self.launcher.stop(sub)
                    state = self.launcher.state(sub)
            except RayUnavailable:
                raise
            except LauncherError as exc:  # this job's trouble: the others go on
                log.warning("cancelling %s: %s", sub, exc)
                continue
            if state.terminal:
                self._move(job_id, states.CANCELLING, states.CANCELLED, message="Job cancelled")
                changed = True
        return changed

    # --- 1b. pauses
    def _pause(self, active: list[_Active], now: float) -> bool:
        """Pausing jobs whose run has ended become paused; True if a job changed status. The
        worker stops by itself once it has written its checkpoint (its status poll sees
        `pausing`); a run still going PAUSE_GRACE_S after the request is stopped, and resumes
        from its last checkpoint instead."""
        changed = False
        for job in active:
            if job.status != states.PAUSING:
                continue
            sub = submission_id(job.id, job.attempts)
            try:
                state = self.launcher.state(sub)
                if not state.terminal and now - job.updated_at > PAUSE_GRACE_S:
                    log.warning("pausing %s: no checkpoint within %d s; stopping the run", sub, PAUSE_GRACE_S)
                    self.launcher.stop(sub)
                    state = self.launcher.state(sub)
            except RayUnavailable:
                raise
            except LauncherError as exc:  # this job's trouble: the others go on
                log.warning("pausing %s: %s", sub, exc)
                continue
            if state.terminal or state is RunState.UNKNOWN:
                with session_scope(self.sessions) as s:
                    row = s.get(Job, job.id)
                    if row is not None and row.status == states.PAUSING:
                        step = row.last_checkpoint_step or 0
                        try:
                            states.transition(s, row, states.PAUSED, message=f"Job paused at step {step}",
                                              paused_runs=row.paused_runs + 1)
                        except InvalidTransition:
                            pass
                changed = True
        return changed

    # --- 2. reconcile running jobs with Ray; stop those past their wall-clock limit
    def _reconcile(self, active: list[_Active], now: float) -> bool:
        """Running jobs against Ray; True if a job may have changed status."""
        changed = False
        for job in active:
            if job.status != states.RUNNING:
                continue
            job_id, sub, limit = job.id, submission_id(job.id, job.attempts), job.wall_clock_s
            try:
                if limit and job.started_at is not None and now - job.started_at > limit:
                    self._time_out(job_id, sub, limit)
                    changed = True
                    continue
                state = self.launcher.state(sub)
                if state is RunState.UNKNOWN:
                    # We crashed between committing `running` and submitting, Ray lost the run
                    # (a restarted cluster) or refused it last time: submit the same submission
                    # id; it resumes from its last checkpoint.
                    log.info("submitting %s (unknown to Ray)", sub)
                    self._submit(job_id)
                    changed = True
                elif state.terminal:
                    self._run_ended_without_result(job_id, sub, state)
                    changed = True
            except RayUnavailable:
                raise
            except LauncherError as exc:  # this job's trouble: the others go on
                log.warning("reconciling %s: %s", sub, exc)
        return changed

    def _time_out(self, job_id: str, sub: str, limit: int) -> None:
        self.launcher.stop(sub)  # raises if Ray could not stop it: the next tick tries again
        with session_scope(self.sessions) as s:
            job = s.get(Job, job_id)
            if job is None or job.status != states.RUNNING:
                return
            kept = (f" Its checkpoints are kept (the last at step {job.last_checkpoint_step})."
                    if job.last_checkpoint_step else "")
            try:
                states.transition(s, job, states.FAILED, error_code="timeout", error_message=(
                    f"The job ran longer than its wall-clock limit of {limit} s and was stopped.{kept}"),
                    message="Job failed: wall-clock limit reached")
            except InvalidTransition:
                pass

    def _run_ended_without_result(self, job_id: str, sub: str, state: RunState) -> None:
        # The worker reports success or failure to the control plane before it exits; a run that
        # ended without doing so crashed (driver killed, node lost, Train retries exhausted).
        # Ray's message can carry the driver's log tail (paths, tracebacks): ours only, not the tenant's.
        log.warning("run %s ended (%s) without a result: %s", sub, state.value,
                    self.launcher.message(sub)[:2000])
        with session_scope(self.sessions) as s:
            job = s.get(Job, job_id)
            if job is None or job.status != states.RUNNING:
                return  # the result landed meanwhile
            try:
                if job.attempts - job.paused_runs < self.settings.max_job_attempts:
                    states.transition(s, job, states.QUEUED, message=(
                        f"The training run stopped unexpectedly; requeued, resuming from step "
                        f"{job.last_checkpoint_step or 0}"))
                else:
                    states.transition(s, job, states.FAILED, error_code="worker_lost",
                                      error_message=f"the training run stopped unexpectedly "
                                      f"{job.attempts - job.paused_runs} times",
                                      message="Job failed: training runs kept crashing")
            except InvalidTransition:
                pass

    # --- 3. queued jobs that waited too long
    def _expire_queued(self, now: float) -> None:
        wait = self.settings.max_queue_wait_s
        if wait is None:
            return
        with session_scope(self.sessions) as s:
            # Never-started jobs only: a requeued run already had its turn and is resuming.
            jobs = s.scalars(select(Job).where(Job.status == states.QUEUED, Job.attempts == 0,
                                               Job.created_at < now - wait)
                             .order_by(Job.id).limit(500).with_for_update(skip_locked=True)).all()
            # One batched move per job size (the message names it), not a move per job.
            by_need: dict[Capacity, list[Job]] = defaultdict(list)
            for job in jobs:
                by_need[demand(job.resources)].append(job)
            for need, batch in by_need.items():
                states.transition_many(
                    s, batch, states.FAILED, error_code=INSUFFICIENT_RESOURCES, error_param="resources",
                    error_message=f"The job waited longer than {wait} s (LORAFLEET_MAX_QUEUE_WAIT_S) "
                                  f"for {need.gpus:g} GPUs and {need.cpus:g} CPUs.",
                    message="Job failed: it waited too long for compute")

    # --- 4. start queued jobs
    def _dispatch(self, active: list[_Active], now: float) -> None:
        running = [RunningJob(a.tenant_id, a.need, None if not a.wall_clock_s else (a.started_at or now) + a.wall_clock_s)
                   for a in active]
        with session_scope(self.sessions) as s:
            cluster = self._cluster_view(running, now)
            if cluster is None:
                return  # a starting cluster reports no resources yet; the next tick will
            self._accrue(s, running, cluster, now)
            tenants, heads = self._queue(s, cluster)
            decided = plan(cluster, tenants, heads, running)
            self.last_plan = decided
            runs = []
            # SKIP LOCKED: a second scheduler (during a leader hand-over) or an API cancel holding
            # a row never blocks us, and never gets the same row. One query for all of them.
            claimed = {job.id: job for job in s.scalars(
                select(Job).where(Job.id.in_([q.id for q in decided.start]), Job.status == states.QUEUED)
                .with_for_update(skip_locked=True))} if decided.start else {}
            # What build_spec looks up, loaded in three queries and held here: the session's
            # identity map keeps objects only while something references them.
            inputs = [*s.scalars(select(BaseModelRow).where(BaseModelRow.id.in_({j.model for j in claimed.values()}))),
                      *s.scalars(select(Tenant).where(Tenant.id.in_({j.tenant_id for j in claimed.values()}))),
                      *s.scalars(select(File).where(File.id.in_(
                          {j.training_file for j in claimed.values()}
                          | {j.validation_file for j in claimed.values() if j.validation_file})))] if claimed else []
            # All of them move in one UPDATE and one INSERT of events, in the plan's order.
            need = {q.id: q.need for q in decided.start}
            started = states.transition_many(
                s, [claimed[q.id] for q in decided.start if q.id in claimed], states.RUNNING,
                attempts=Job.attempts + 1,
                message=lambda job: f"Job started (run {submission_id(job.id, job.attempts)})")
            for job in started:
                # Usage is sampled once a tick: a run is charged at least one interval, so one
                # that ends before the next tick still costs its tenant its turn.
                self._usage[job.tenant_id] = (self._usage.get(job.tenant_id, 0.0) + share_of(need[job.id], cluster)
                                              * self.settings.scheduler_interval_s)
                if (run := self._prepare(s, job)) is not None:
                    runs.append(run)
        del inputs
        # Committed as running first, then submitted: a crash in between is healed by
        # _reconcile (unknown to Ray → submitted with the same id), never a double run.
        for run in runs:
            self._launch(*run)

    def _cluster_view(self, running: list[RunningJob], now: float) -> ClusterView | None:
        """What training may take now, and at most. Ray's own count of free resources covers
        what serving and anything else hold; our runs count from the moment they are committed,
        before Ray has placed them."""
        st = self.settings
        ours = sum((r.need for r in running), ZERO)
        cluster_max = Capacity(cpus=math.inf if st.cluster_max_cpus is None else st.cluster_max_cpus,
                               gpus=math.inf if st.cluster_max_gpus is None else st.cluster_max_gpus)
        res = self.launcher.resources()
        self.observed.record(res, training=ours, now=now)
        if st.ray_autoscaling and math.isfinite(cluster_max.cpus + cluster_max.gpus):
            # The autoscaler adds nodes up to the cluster's maximum: plan against that, not today's size.
            budget, free = cluster_max, _floor(cluster_max - ours)
        else:
            total = res.total.min(cluster_max)
            if total.cpus <= 0 and total.gpus <= 0:
                return None
            others = _floor(res.total - res.available - ours)  # serving replicas and the like
            budget = _floor(total - others)
            free = _floor(budget - ours).min(res.available)
        slots = st.max_ray_jobs_in_flight - len(running)
        if st.max_running_jobs is not None:
            slots = min(slots, st.max_running_jobs - len(running))
        return ClusterView(free=free, budget=budget, slots=max(0, slots), now=now)

    def _accrue(self, s: Session, running: list[RunningJob], cluster: ClusterView, now: float) -> None:
        """Charge each tenant for what its runs held since the last tick, older use decaying."""
        if self._usage is None:
            self._usage, self._accrued_at = self._usage_from_history(s, cluster, now), now
            return
        dt = max(0.0, now - self._accrued_at)
        decay = 0.5 ** (dt / self.settings.fair_share_half_life_s)
        self._usage = {t: u * decay for t, u in self._usage.items() if u * decay > 1e-3}
        for run in running:
            self._usage[run.tenant_id] = self._usage.get(run.tenant_id, 0.0) + share_of(run.need, cluster) * dt
        self._accrued_at = now

    def _usage_from_history(self, s: Session, cluster: ClusterView, now: float) -> dict[str, float]:
        half_life = self.settings.fair_share_half_life_s
        rows = s.execute(select(Job.tenant_id, Job.resources, Job.status, Job.started_at, Job.finished_at)
                         .where(Job.started_at.is_not(None),
                                or_(Job.status.in_(states.ACTIVE), Job.finished_at >= now - 5 * half_life)))
        usage: dict[str, float] = {}
        for tenant_id, resources, status, started_at, finished_at in rows:
            end = now if status in states.ACTIVE else finished_at
            if end is None:
                continue  # requeued: its run's time is unknown, and short
            used = share_of(demand(resources), cluster) * max(0.0, end - started_at)
            usage[tenant_id] = usage.get(tenant_id, 0.0) + used * 0.5 ** ((now - end) / half_life)
        return usage

    def _queue(self, s: Session, cluster: ClusterView) -> tuple[dict[str, TenantState], dict[str, list[QueuedJob]]]:
        """Every active tenant's limits and oldest queued jobs; jobs that can never run fail here."""
        rows = s.execute(select(Tenant.id, Tenant.max_concurrent_jobs, Tenant.max_gpus_per_job,
                                Tenant.max_cpus_per_job, Tenant.max_concurrent_gpus,
                                Tenant.max_concurrent_cpus, Tenant.max_job_wall_clock_s)
                         .where(Tenant.status == "active")).all()
        limits = {r.id: r for r in rows}
        usage = self._usage or {}
        tenants = {r.id: TenantState(
            r.id, usage=usage.get(r.id, 0.0), max_concurrent_jobs=r.max_concurrent_jobs,
            max_concurrent=None if r.max_concurrent_gpus is None and r.max_concurrent_cpus is None else Capacity(
                cpus=math.inf if r.max_concurrent_cpus is None else r.max_concurrent_cpus,
                gpus=math.inf if r.max_concurrent_gpus is None else r.max_concurrent_gpus)) for r in rows}
        ceiling = {r.id: _ceiling(r, self.settings) for r in rows}  # the most one job may need
        heads: dict[str, list[QueuedJob]] = defaultdict(list)
        never: list[tuple[str, str]] = []
        # Enough heads per tenant to fill what is free if every tenant took an equal part, and
        # more while the tenants are few; at most HEADS_ROW_BUDGET rows when they are many.
        n = max(1, len(rows))
        per_tenant = min(MAX_HEADS_PER_TENANT, max(1 + math.ceil(share_of(cluster.free, cluster) / n),
                                                   HEADS_ROW_BUDGET // n))
        for job_id, tenant_id, workers, gpus, cpus in _queued_heads(s, per_tenant):
            tenant = limits.get(tenant_id)
            if tenant is None:
                continue  # a disabled tenant's jobs wait
            need = _need(workers, gpus, cpus)
            if not need.fits_in(ceiling[tenant_id]):
                never.append((job_id, limit_violation(need, tenant=tenant, settings=self.settings)))
                continue
            heads[tenant_id].append(QueuedJob(job_id, tenant_id, need,
                                              tenant.max_job_wall_clock_s or self.settings.max_job_wall_clock_s))
        if never:  # a limit lowered since these jobs were queued
            self._fail_never_runnable(s, dict(never))
        return tenants, heads

    @staticmethod
    def _fail_never_runnable(s: Session, reasons: dict[str, str]) -> None:
        """Fail each job of ``reasons`` (job id → why it can never run): one read, one batched move per reason."""
        by_reason: dict[str, list[Job]] = defaultdict(list)
        for job in s.scalars(select(Job).where(Job.id.in_(reasons), Job.status == states.QUEUED)):
            by_reason[reasons[job.id]].append(job)
        for reason, batch in by_reason.items():
            states.transition_many(s, batch, states.FAILED, error_code=INSUFFICIENT_RESOURCES,
                                   error_param="resources", error_message=f"The job can never run: {reason}.",
                                   message="Job failed: it asks for more compute than it may have")

    def _submit(self, job_id: str) -> None:
        with session_scope(self.sessions) as s:
            job = s.get(Job, job_id)
            if job is None or job.status != states.RUNNING:
                return
            run = self._prepare(s, job)
        if run is not None:
            self._launch(*run)

    def _prepare(self, s: Session, job: Job) -> tuple[str, str, dict[str, str], Capacity] | None:
        """A running job's Ray submission (job id, submission id, env, need); None if it failed."""
        try:
            spec = build_spec(s, job, self.settings)
        except Exception as exc:  # noqa: BLE001 - reported on the job, never raised to the loop
            states.transition(s, job, states.FAILED, error_code="internal_error",
                              error_message=tenant_failure_message(
                                  job.id, "internal_error", f"could not prepare the run: {exc!r}"))
            return None
        st = self.settings
        # No credentials in the Ray Job: the Ray pods hold the object store's (see job_env).
        env = job_env(spec.model_dump_json(), threads=st.train_threads, s3_endpoint_url=st.s3_endpoint_url)
        return job.id, submission_id(job.id, job.attempts), env, demand(job.resources)

    def _launch(self, job_id: str, sub: str, env: dict[str, str], need: Capacity) -> None:
        # The driver reserves nothing: the Train workers it starts hold the job's resources.
        try:
            self.launcher.submit(sub, env=env)
        except SubmissionRefused as exc:
            self._refused(job_id, sub, exc)
            return
        self._refusals.pop(job_id, None)
        log.info("submitted %s (%.1f CPU, %.1f GPU)", sub, need.cpus, need.gpus)

    def _refused(self, job_id: str, sub: str, exc: SubmissionRefused) -> None:
        """Ray would not take this run: retried on the next ticks (the job stays `running`, unknown
        to Ray), and failed after max_submission_attempts. Ray's words stay in our log."""
        self._refusals[job_id] += 1
        tries = self._refusals[job_id]
        log.warning("submission %s refused (%d/%d): %s", sub, tries, self.settings.max_submission_attempts, exc)
        if tries < self.settings.max_submission_attempts:
            return
        del self._refusals[job_id]
        with session_scope(self.sessions) as s:
            job = s.get(Job, job_id)
            if job is None or job.status != states.RUNNING:
                return
            try:
                states.transition(s, job, states.FAILED, error_code="submission_failed", error_message=(
                    f"Our cluster would not accept this job's run after {tries} attempts. This is a "
                    f"problem on our side; please retry the job."), message="Job failed: it could not be started")
            except InvalidTransition:
                pass

    def _move(self, job_id: str, from_status: str, to_status: str, **kw) -> None:
        with session_scope(self.sessions) as s:
            job = s.get(Job, job_id)
            if job is not None and job.status == from_status:
                try:
                    states.transition(s, job, to_status, **kw)
                except InvalidTransition:
                    pass


class _Active(NamedTuple):
    """A job in flight (running, cancelling or pausing), as one tick sees it."""

    id: str
    tenant_id: str
    status: str
    attempts: int
    started_at: int | None
    updated_at: int  # for a pausing job: when the pause was asked
    wall_clock_s: int | None  # its tenant's limit, else the service's
    need: Capacity


def _need(workers: float | None, gpus: float | None, cpus: float | None) -> Capacity:
    """A job's demand from its resources' numbers (None: Resources' default)."""
    w = 1 if workers is None else workers
    return Capacity(cpus=w * (1 if cpus is None else cpus), gpus=w * (gpus or 0))


def _ceiling(tenant, settings: Settings) -> Capacity:
    """The most one job of ``tenant`` may need (service.tenants.limits says why, when it is passed)."""
    def least(*limits: float | None) -> float:
        return min((x for x in limits if x is not None), default=math.inf)
    return Capacity(cpus=least(settings.cluster_max_cpus, tenant.max_cpus_per_job, tenant.max_concurrent_cpus),
                    gpus=least(settings.cluster_max_gpus, tenant.max_gpus_per_job, tenant.max_concurrent_gpus))


def _floor(c: Capacity) -> Capacity:
    return Capacity(cpus=max(0.0, c.cpus), gpus=max(0.0, c.gpus))


def _queued_heads(s: Session, per_tenant: int):
    """(id, tenant_id, num_workers, gpus_per_worker, cpus_per_worker) of each tenant's oldest
    queued jobs, ``per_tenant`` at most.

    Postgres: one index probe per active tenant (a LATERAL join on (tenant_id, status, id)), so
    100,000 queued jobs cost what 1,000 tenants × a few rows cost. SQLite (one machine, small
    queues): a window function over the queue.
    """
    r = Job.resources
    numbers = (r["num_workers"].as_float(), r["gpus_per_worker"].as_float(), r["cpus_per_worker"].as_float())
    if s.get_bind().dialect.name == "postgresql":
        tenant = select(Tenant.id).where(Tenant.status == "active").subquery()
        head = (select(Job.id, Job.tenant_id, *(n.label(f"n{i}") for i, n in enumerate(numbers)))
                .where(Job.tenant_id == tenant.c.id, Job.status == states.QUEUED)
                .order_by(Job.id).limit(per_tenant).lateral())
        return s.execute(select(head.c.id, head.c.tenant_id, head.c.n0, head.c.n1, head.c.n2)
                         .select_from(tenant.join(head, true()))).all()
    rank = func.row_number().over(partition_by=Job.tenant_id, order_by=Job.id).label("rank")
    ranked = (select(Job.id, Job.tenant_id, *(n.label(f"n{i}") for i, n in enumerate(numbers)), rank)
              .where(Job.status == states.QUEUED).subquery())
    return s.execute(select(ranked.c.id, ranked.c.tenant_id, ranked.c.n0, ranked.c.n1, ranked.c.n2)
                     .where(ranked.c.rank <= per_tenant)).all()


def build_spec(s: Session, job: Job, settings: Settings) -> TrainJobSpec:
    from service.security import job_token

    base = s.get(BaseModelRow, job.model)
    train = s.get(File, job.training_file)
    if base is None or train is None:
        raise RuntimeError("the base model or training file no longer exists")
    valid = s.get(File, job.validation_file) if job.validation_file else None
    return TrainJobSpec(
        job_id=job.id, tenant_id=job.tenant_id,
        base_model=BaseModelRef(id=base.id, uri=base.source_uri),
        method=job.method, hyperparameters=hyperparameters_for(job.method, job.hyperparameters),
        resources=Resources.model_validate(job.resources or {}),
        training_file=train.object_key, training_file_sha256=train.sha256,
        validation_file=valid.object_key if valid else None,
        output_prefix=adapter_prefix(job), adapter_id=adapter_id_for(job),
        checkpoint_prefix=checkpoint_prefix(job),
        control_plane_url=settings.public_url,
        job_token=job_token(job.id, job.attempts, settings, ttl_s=settings.job_token_ttl_s, wall_clock_s=s.get(Tenant, job.tenant_id).max_job_wall_clock_s or settings.max_job_wall_clock_s),
        object_store_url=settings.effective_object_store_url,
    )


def freeze_startup_heap() -> None:
    """Put what the process holds now (modules, settings, the engine: what startup made) out of
    the garbage collector's reach. A full collection walks every tracked object: at 1,000
    tenants it paused a pass ~50 ms (the slowest 1 % of passes were all such pauses); after
    this it walks only what the passes made since (a few ms). The cost: a reference cycle among
    these objects is never freed, which startup objects, alive for good, do not form."""
    gc.collect()
    gc.freeze()


def main() -> None:  # pragma: no cover - the process entry point; tests drive Scheduler.tick
    from service.db.session import engine_from_settings
    from service.settings import get_settings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = get_settings()
    if not settings.ray_address:
        raise SystemExit("LORAFLEET_RAY_ADDRESS (the Ray dashboard URL) is required for the scheduler")
    launcher = RayJobLauncher(settings.ray_address, entrypoint=settings.train_entrypoint)
    scheduler = Scheduler(settings, engine_from_settings(settings), launcher)
    freeze_startup_heap()
    stop = threading.Event()
    try:
        scheduler.run_forever(stop)
    except KeyboardInterrupt:
        stop.set()


if __name__ == "__main__":
    main()
