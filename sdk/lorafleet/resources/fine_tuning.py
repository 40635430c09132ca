from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from .._core import Call, Sleep
from .._progress import PlainProgress, make_progress
from ..errors import JobCancelledError, JobFailedError, WaitTimeoutError
from ..types import FineTuningJob, FineTuningJobCheckpoint, FineTuningJobEvent
from ._base import Resource, drop_none

_PATH = "/v1/fine_tuning/jobs"


def method_body(method: str | dict[str, Any], hyperparameters: dict[str, Any] | None) -> dict[str, Any]:
    """``"qlora"`` + hyperparameters -> ``{"type": "qlora", "qlora": {"hyperparameters": {...}}}``."""
    if isinstance(method, dict):
        if hyperparameters:
            raise ValueError("pass hyperparameters inside the method dict, not both")
        return method
    return {"type": method, method: {"hyperparameters": dict(hyperparameters or {})}}


class Checkpoints(Resource):
    def list(self, job_id: str, *, limit: int | None = None, after: str | None = None):
        return self._client._paginate(f"{_PATH}/{job_id}/checkpoints",
                                      FineTuningJobCheckpoint.model_validate,
                                      {"limit": limit, "after": after})


class Jobs(Resource):
    def __init__(self, client):
        super().__init__(client)
        self.checkpoints = Checkpoints(client)

    def create(self, *, model: str, training_file: str, method: str | dict[str, Any] = "lora",
               hyperparameters: dict[str, Any] | None = None, validation_file: str | None = None,
               suffix: str | None = None, seed: int | None = None,
               metadata: dict[str, str] | None = None, resources: dict[str, Any] | None = None,
               idempotency_key: str | None = None):
        """Submit a fine-tune; ``method``: one of ``lorafleet.types.METHODS`` (or a whole method
        dict). ``hyperparameters`` are the method's (r, num_virtual_tokens, n_epochs, ...)."""
        body = drop_none(model=model, training_file=training_file, validation_file=validation_file,
                         suffix=suffix, seed=seed, metadata=metadata, resources=resources)
        body["method"] = method_body(method, hyperparameters)
        return self._client._run(self._core.request("POST", _PATH, json=body,
                                                    cast=FineTuningJob.model_validate,
                                                    idempotency_key=idempotency_key))

    def retrieve(self, job_id: str):
        return self._client._run(self._core.request("GET", f"{_PATH}/{job_id}",
                                                    cast=FineTuningJob.model_validate))

    def list(self, *, status: str | None = None, limit: int | None = None, after: str | None = None):
        return self._client._paginate(_PATH, FineTuningJob.model_validate,
                                      {"status": status, "limit": limit, "after": after})

    def cancel(self, job_id: str):
        return self._client._run(self._core.request("POST", f"{_PATH}/{job_id}/cancel",
                                                    cast=FineTuningJob.model_validate))

    def pause(self, job_id: str):
        """Ask a running job to checkpoint and stop (``pausing``, then ``paused``); 409 otherwise."""
        return self._client._run(self._core.request("POST", f"{_PATH}/{job_id}/pause",
                                                    cast=FineTuningJob.model_validate))

    def resume(self, job_id: str):
        """Requeue a paused job; it continues from the step it was paused at."""
        return self._client._run(self._core.request("POST", f"{_PATH}/{job_id}/resume",
                                                    cast=FineTuningJob.model_validate))

    def list_events(self, job_id: str, *, limit: int | None = None, after: str | None = None,
                    order: str | None = None):
        return self._client._paginate(f"{_PATH}/{job_id}/events", FineTuningJobEvent.model_validate,
                                      {"limit": limit, "after": after, "order": order})

    def wait(self, job_id: str, *, progress: bool = True, poll_interval: float = 2.0,
             timeout: float | None = None,
             on_event: Callable[[FineTuningJobEvent], None] | None = None):
        """Follow the job's events until it ends; return the succeeded job.

        Raises JobFailedError (with the job's error code and message), JobCancelledError, or
        WaitTimeoutError after ``timeout`` seconds.
        """
        reporter = make_progress(job_id) if progress else None
        return self._client._run(self._wait(job_id, poll_interval, timeout, reporter, on_event))

    def _wait(self, job_id: str, poll_interval: float, timeout: float | None,
              reporter: PlainProgress | None,
              on_event: Callable[[FineTuningJobEvent], None] | None) -> Call[FineTuningJob]:
        start = time.monotonic()
        after: str | None = None
        try:
            while True:
                # The job first, then every event up to now: none is missed before a terminal status.
                job = yield from self._core.request("GET", f"{_PATH}/{job_id}",
                                                    cast=FineTuningJob.model_validate)
                if reporter:
                    reporter.on_job(job)
                while True:
                    body = yield from self._core.request(
                        "GET", f"{_PATH}/{job_id}/events", cast=dict,
                        params={"order": "asc", "after": after, "limit": 100})
                    events = [FineTuningJobEvent.model_validate(x) for x in body.get("data", [])]
                    for event in events:
                        after = event.id
                        if reporter:
                            reporter.on_event(event)
                        if on_event:
                            on_event(event)
                    if not events or not body.get("has_more"):
                        break
                if job.done:
                    break
                if timeout is not None and time.monotonic() - start >= timeout:
                    raise WaitTimeoutError(job, timeout)
                yield Sleep(poll_interval)
        finally:
            if reporter:
                reporter.close()
        if job.status == "failed":
            raise JobFailedError(job)
        if job.status == "cancelled":
            raise JobCancelledError(job)
        return job


class FineTuning(Resource):
    def __init__(self, client):
        from .sweeps import Sweeps  # it builds its base job with method_body above

        super().__init__(client)
        self.jobs = Jobs(client)
        self.sweeps = Sweeps(client)
