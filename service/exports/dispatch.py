"""Runs queued exports and blends as Ray Jobs, and keeps their status true to Ray.

Called by the scheduler's leader once per tick (service.scheduler), beside fine-tunes and with
the same rules: committed as running first, then submitted with submission_id = the operation's
id (``-r<n>`` for a retry), so a crash in between is healed by resubmitting the same id, never a
second run; the run reports through the internal routes with a run-scoped token (no database
credentials leave the control plane). An operation is one process on CPUs, outside training's
fair share: at most ``max_running_operations`` run at once.
"""

from __future__ import annotations

import logging
import shlex
import sys

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service.db.models import BaseModelRow, Operation
from service.db.session import session_scope
from service.errors import InvalidTransition
from service.exports import states
from service.launcher import LauncherError, RayUnavailable, RunState, SubmissionRefused, submission_id
from service.settings import Settings
from workers.spec import BaseModelRef, OperationAdapter, OperationSpec

log = logging.getLogger("lorafleet.scheduler")
SPEC_ENV = "LORAFLEET_OP_SPEC"  # workers.ops.ray_job reads it


def build_spec(s: Session, op: Operation, settings: Settings) -> OperationSpec:
    from service.security import job_token

    base = s.get(BaseModelRow, op.base_model_id)
    if base is None:
        raise RuntimeError("the base model no longer exists")
    req = op.request
    if op.kind == "export":
        adapters = [OperationAdapter(id=op.adapter_id, prefix=req["adapter_prefix"])]
    else:
        adapters = [OperationAdapter(id=a["id"], prefix=a["prefix"], weight=float(a["weight"]))
                    for a in req["adapters"]]
    return OperationSpec(
        operation_id=op.id, kind=op.kind, tenant_id=op.tenant_id,
        base_model=BaseModelRef(id=base.id, uri=base.source_uri), method=op.method, adapters=adapters,
        combination=req.get("combination"), density=req.get("density"), output_prefix=op.key_prefix,
        adapter_id=op.result_adapter_id, dtype=req.get("dtype", "float32"),
        max_shard_size=req.get("max_shard_size", "2GB"), control_plane_url=settings.public_url,
        token=job_token(op.id, op.attempts, settings, ttl_s=settings.job_token_ttl_s),
        object_store_url=settings.effective_object_store_url)


class OperationRunner:
    def __init__(self, settings: Settings, sessions: sessionmaker[Session], launcher):
        self.settings, self.sessions, self.launcher = settings, sessions, launcher
        self.entrypoint = settings.ops_entrypoint or f"{shlex.quote(sys.executable)} -m workers.ops.ray_job"

    def tick(self) -> None:
        running = self._reconcile()
        self._start(self.settings.max_running_operations - running)

    def _reconcile(self) -> int:
        """Running operations against Ray; returns how many still run."""
        with session_scope(self.sessions) as s:
            ops = [(o.id, o.attempts) for o in s.scalars(select(Operation).where(Operation.status == states.RUNNING))]
        still = 0
        for op_id, attempts in ops:
            sub = submission_id(op_id, attempts)
            try:
                state = self.launcher.state(sub)
            except RayUnavailable:
                raise
            except LauncherError as exc:
                log.warning("reconciling %s: %s", sub, exc)
                still += 1
                continue
            if state is RunState.UNKNOWN:
                self._submit(op_id)  # committed running, never submitted (or Ray lost it)
                still += 1
            elif state.terminal:
                self._ended_without_result(op_id, sub, state)
            else:
                still += 1
        return still

    def _ended_without_result(self, op_id: str, sub: str, state: RunState) -> None:
        log.warning("run %s ended (%s) without a result: %s", sub, state.value, self.launcher.message(sub)[:2000])
        with session_scope(self.sessions) as s:
            op = s.get(Operation, op_id)
            if op is None or op.status != states.RUNNING:
                return  # the result landed meanwhile
            try:
                if op.attempts < self.settings.max_job_attempts:
                    states.transition(s, op, states.QUEUED, message="The run stopped unexpectedly; requeued")
                else:
                    states.transition(s, op, states.FAILED, error_code="worker_lost",
                                      error_message=f"the run stopped unexpectedly {op.attempts} times")
            except InvalidTransition:
                pass

    def _start(self, slots: int) -> None:
        if slots <= 0:
            return
        with session_scope(self.sessions) as s:
            queued = list(s.scalars(select(Operation).where(Operation.status == states.QUEUED)
                                    .order_by(Operation.id).limit(slots).with_for_update(skip_locked=True)))
            started = []
            for op in queued:
                try:
                    states.transition(s, op, states.RUNNING, attempts=op.attempts + 1,
                                      message=f"{op.kind.capitalize()} started (run {submission_id(op.id, op.attempts + 1)})")
                    started.append(op.id)
                except InvalidTransition:
                    pass
        for op_id in started:
            self._submit(op_id)

    def _submit(self, op_id: str) -> None:
        with session_scope(self.sessions) as s:
            op = s.get(Operation, op_id)
            if op is None or op.status != states.RUNNING:
                return
            sub = submission_id(op.id, op.attempts)
            try:
                spec = build_spec(s, op, self.settings)
            except Exception as exc:  # noqa: BLE001 - reported on the operation, never raised to the loop
                log.exception("preparing %s", op_id)
                states.transition(s, op, states.FAILED, error_code="internal_error",
                                  error_message=f"could not prepare the run: {type(exc).__name__}")
                return
        env = {SPEC_ENV: spec.model_dump_json(), "OMP_NUM_THREADS": str(self.settings.train_threads),
               "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
        if self.settings.s3_endpoint_url:  # an address, not a secret (see service.launcher.job_env)
            env["AWS_ENDPOINT_URL"] = self.settings.s3_endpoint_url
        try:
            self.launcher.submit(sub, env=env, num_cpus=1, entrypoint=self.entrypoint)
            log.info("submitted %s", sub)
        except SubmissionRefused as exc:
            log.warning("submission %s refused: %s", sub, exc)
            with session_scope(self.sessions) as s:
                op = s.get(Operation, op_id)
                if op is not None and op.status == states.RUNNING:
                    states.transition(s, op, states.FAILED, error_code="submission_failed",
                                      error_message="Our cluster would not accept this run; please retry.")
