"""The scheduler: turns queued jobs into Ray runs, fairly, and keeps the database true to Ray.

One leader at a time (a Postgres advisory lock; a file lock on SQLite). Every tick it
1. stops the runs of jobs being cancelled,
2. reconciles running jobs with what Ray says (after any restart this is what recovers them),
3. starts queued jobs while the cluster and each tenant's quota have room, tenants taking turns.

Run it inside the embedded server (a thread) or alone: ``python -m service.scheduler``.
"""

from __future__ import annotations

import fcntl
import logging
import threading
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine, func, select, text
from sqlalchemy.orm import Session, sessionmaker

from service.db.models import BaseModelRow, File, Job, Tenant
from service.db.session import make_session_factory, session_scope
from service.errors import InvalidTransition
from service.ids import now
from service.jobs import states
from service.jobs.naming import adapter_id_for, adapter_prefix, checkpoint_prefix
from service.jobs.public_errors import tenant_failure_message
from service.launcher import Capacity, LauncherError, RayJobLauncher, RunState, job_env, submission_id
from service.settings import Settings
from workers.spec import BaseModelRef, Hyperparameters, Resources, TrainJobSpec

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


# ------------------------------------------------------------------------------------ fairness
@dataclass
class TenantLoad:
    running: int = 0
    recent_starts: int = 0  # runs started in the fairness window
    limit: int = 0


def fair_order(queued: list[Job], load: dict[str, TenantLoad]) -> list[Job]:
    """Queued jobs in the order to start them: tenants take turns.

    Round after round, each tenant under its concurrency limit offers its oldest job; within a
    round the tenant with fewer running, then fewer recently started, jobs goes first. A tenant
    with 50 queued jobs therefore gets one start per round, like a tenant with one.
    """
    by_tenant: dict[str, list[Job]] = defaultdict(list)
    for job in sorted(queued, key=lambda j: j.id):
        by_tenant[job.tenant_id].append(job)
    load = {t: TenantLoad(l.running, l.recent_starts, l.limit) for t, l in load.items()}
    order: list[Job] = []
    while True:
        ready = [t for t, jobs in by_tenant.items() if jobs and load[t].running < load[t].limit]
        if not ready:
            return order
        ready.sort(key=lambda t: (load[t].running, load[t].recent_starts, by_tenant[t][0].id))
        for t in ready:
            order.append(by_tenant[t].pop(0))
            load[t].running += 1
            load[t].recent_starts += 1


def _demand(job: Job) -> Capacity:
    res = Resources.model_validate(job.resources or {})
    return Capacity(cpus=res.num_workers * res.cpus_per_worker, gpus=res.num_workers * res.gpus_per_worker)


# ------------------------------------------------------------------------------------ scheduler
class Scheduler:
    def __init__(self, settings: Settings, engine: Engine, launcher: RayJobLauncher,
                 *, fairness_window_s: int = 3600):
        self.settings = settings
        self.engine = engine
        self.sessions: sessionmaker[Session] = make_session_factory(engine)
        self.launcher = launcher
        self.lock = LeaderLock(engine)
        self.fairness_window_s = fairness_window_s

    # One pass. Returns False when another process leads.
    def tick(self) -> bool:
        if not self.lock.acquire():
            return False
        self._cancel()
        self._reconcile()
        self._dispatch()
        return True

    def run_forever(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.tick()
            except LauncherError as exc:
                log.warning("scheduler: %s", exc)
            except Exception:  # keep leading through one bad tick; the next retries
                log.exception("scheduler tick failed")
            stop.wait(self.settings.scheduler_interval_s)
        self.lock.release()

    # --- 1. cancellations
    def _cancel(self) -> None:
        with session_scope(self.sessions) as s:
            jobs = s.scalars(select(Job).where(Job.status == states.CANCELLING)).all()
        for job in jobs:
            sub = submission_id(job.id, job.attempts)
            state = self.launcher.state(sub)
            if not state.terminal:
                self.launcher.stop(sub)
                state = self.launcher.state(sub)
            if state.terminal:
                self._move(job.id, states.CANCELLING, states.CANCELLED, message="Job cancelled")

    # --- 2. reconcile running jobs with Ray
    def _reconcile(self) -> None:
        with session_scope(self.sessions) as s:
            jobs = s.scalars(select(Job).where(Job.status == states.RUNNING)).all()
        for job in jobs:
            sub = submission_id(job.id, job.attempts)
            state = self.launcher.state(sub)
            if state is RunState.UNKNOWN:
                # We crashed between committing `running` and submitting, or Ray lost the run
                # (a restarted cluster): submit the same submission id; it resumes from its
                # last checkpoint.
                log.info("resubmitting %s (unknown to Ray)", sub)
                self._submit(job.id)
            elif state.terminal:
                self._run_ended_without_result(job.id, sub, state)

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
                if job.attempts < self.settings.max_job_attempts:
                    states.transition(s, job, states.QUEUED, message=(
                        f"The training run stopped unexpectedly; requeued, resuming from step "
                        f"{job.last_checkpoint_step or 0}"))
                else:
                    states.transition(s, job, states.FAILED, error_code="worker_lost",
                                      error_message=f"the training run stopped unexpectedly "
                                      f"{job.attempts} times",
                                      message="Job failed: training runs kept crashing")
            except InvalidTransition:
                pass

    # --- 3. start queued jobs
    def _dispatch(self) -> None:
        if self.settings.ray_autoscaling:
            total = Capacity(cpus=float("inf"), gpus=float("inf"))
        else:
            total = self.launcher.capacity()
            if total.cpus <= 0 and total.gpus <= 0:
                return  # a starting cluster reports no resources yet; the next tick will
        with session_scope(self.sessions) as s:
            active = s.scalars(select(Job).where(Job.status.in_(states.ACTIVE))).all()
            used_cpu = sum(_demand(j).cpus for j in active)
            used_gpu = sum(_demand(j).gpus for j in active)
            slots = None if self.settings.max_running_jobs is None else self.settings.max_running_jobs - len(active)
            # FOR UPDATE SKIP LOCKED: a second scheduler (during a leader hand-over) or an API
            # cancel holding a row never blocks us, and never gets the same row.
            queued = s.scalars(select(Job).where(Job.status == states.QUEUED).order_by(Job.id)
                               .limit(1000).with_for_update(skip_locked=True)).all()
            if not queued:
                return
            load = self._tenant_load(s, {j.tenant_id for j in queued})
            started: list[str] = []
            for job in fair_order(queued, load):
                if slots is not None and len(started) >= slots:
                    break
                need = _demand(job)
                if used_cpu + need.cpus > total.cpus or used_gpu + need.gpus > total.gpus:
                    continue
                states.transition(s, job, states.RUNNING, attempts=job.attempts + 1,
                                  message=f"Job started (run {submission_id(job.id, job.attempts + 1)})")
                used_cpu += need.cpus
                used_gpu += need.gpus
                started.append(job.id)
        # Committed as running first, then submitted: a crash in between is healed by
        # _reconcile (unknown to Ray → submitted with the same id), never a double run.
        for job_id in started:
            self._submit(job_id)

    def _tenant_load(self, s: Session, tenant_ids: set[str]) -> dict[str, TenantLoad]:
        load = {t.id: TenantLoad(limit=t.max_concurrent_jobs if t.status == "active" else 0)
                for t in s.scalars(select(Tenant).where(Tenant.id.in_(tenant_ids)))}
        running = s.execute(select(Job.tenant_id, func.count()).where(
            Job.tenant_id.in_(tenant_ids), Job.status.in_(states.ACTIVE)).group_by(Job.tenant_id))
        for tenant_id, n in running:
            load[tenant_id].running = n
        recent = s.execute(select(Job.tenant_id, func.count()).where(
            Job.tenant_id.in_(tenant_ids), Job.started_at >= now() - self.fairness_window_s)
            .group_by(Job.tenant_id))
        for tenant_id, n in recent:
            load[tenant_id].recent_starts = n
        return load

    def _submit(self, job_id: str) -> None:
        with session_scope(self.sessions) as s:
            job = s.get(Job, job_id)
            if job is None or job.status != states.RUNNING:
                return
            try:
                spec = build_spec(s, job, self.settings)
            except Exception as exc:  # noqa: BLE001 - reported on the job, never raised to the loop
                states.transition(s, job, states.FAILED, error_code="internal_error",
                                  error_message=tenant_failure_message(
                                      job.id, "internal_error", f"could not prepare the run: {exc!r}"))
                return
            sub = submission_id(job.id, job.attempts)
            demand = _demand(job)
        st = self.settings
        # No credentials in the Ray Job: the Ray pods hold the object store's (see job_env).
        env = job_env(spec.model_dump_json(), threads=st.train_threads, s3_endpoint_url=st.s3_endpoint_url)
        # The driver reserves nothing: the Train workers it starts hold the job's resources.
        self.launcher.submit(sub, env=env)
        log.info("submitted %s (%.1f CPU, %.1f GPU)", sub, demand.cpus, demand.gpus)

    def _move(self, job_id: str, from_status: str, to_status: str, **kw) -> None:
        with session_scope(self.sessions) as s:
            job = s.get(Job, job_id)
            if job is not None and job.status == from_status:
                try:
                    states.transition(s, job, to_status, **kw)
                except InvalidTransition:
                    pass


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
        method=job.method, hyperparameters=Hyperparameters.model_validate(job.hyperparameters),
        resources=Resources.model_validate(job.resources or {}),
        training_file=train.object_key, training_file_sha256=train.sha256,
        validation_file=valid.object_key if valid else None,
        output_prefix=adapter_prefix(job), adapter_id=adapter_id_for(job),
        checkpoint_prefix=checkpoint_prefix(job),
        control_plane_url=settings.public_url,
        job_token=job_token(job.id, job.attempts, settings, ttl_s=settings.job_token_ttl_s),
        object_store_url=settings.effective_object_store_url,
    )


def main() -> None:  # pragma: no cover - the process entry point; tests drive Scheduler.tick
    from service.db.session import engine_from_settings
    from service.settings import get_settings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = get_settings()
    if not settings.ray_address:
        raise SystemExit("LORAFLEET_RAY_ADDRESS (the Ray dashboard URL) is required for the scheduler")
    launcher = RayJobLauncher(settings.ray_address, entrypoint=settings.train_entrypoint)
    scheduler = Scheduler(settings, engine_from_settings(settings), launcher)
    stop = threading.Event()
    try:
        scheduler.run_forever(stop)
    except KeyboardInterrupt:
        stop.set()


if __name__ == "__main__":
    main()
