"""Where a run's progress goes: the control plane's internal routes, or memory (tests, benches).

Workers hold no database credentials: HttpReporter speaks only to /internal/v1/jobs/{id}/...
with the job-scoped token. Events are buffered and flushed by a background thread every
``flush_interval`` seconds (progress shows within the 5 s the API promises) and retried with
backoff; a control plane that stays down never stops the training itself.

The result and a failure are what a run exists for: they are retried for ``outcome_patience_s``
(10 minutes by default), through an API restart, a database failover or a store blip answered
503, instead of the run exiting and the job being retrained from scratch.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from typing import Protocol

from workers.spec import CheckpointReport, JobEvent, TrainResult

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 15.0  # between two tries of one request, jitter and Retry-After included
MAX_EVENT_BATCH = 1000  # what POST /internal/v1/jobs/{id}/events takes at once


class Reporter(Protocol):
    def event(self, event: JobEvent) -> None: ...
    def checkpoint(self, report: CheckpointReport) -> None: ...
    def should_stop(self) -> bool: ...
    def pause_requested(self) -> bool: ...  # asked once should_stop() said True


class MemoryReporter:
    def __init__(self):
        self.events: list[JobEvent] = []
        self.checkpoints: list[CheckpointReport] = []
        self.results: list[TrainResult] = []
        self.failures: list[dict] = []
        self.stop = False
        self.pause = False  # a pause is a stop that checkpoints first

    def event(self, event: JobEvent) -> None:
        self.events.append(event)

    def checkpoint(self, report: CheckpointReport) -> None:
        self.checkpoints.append(report)

    def result(self, result: TrainResult) -> dict:
        self.results.append(result)
        return {}

    def failure(self, code: str, message: str, param: str | None = None) -> None:
        self.failures.append({"code": code, "message": message, "param": param})

    def should_stop(self) -> bool:
        return self.stop or self.pause

    def pause_requested(self) -> bool:
        return self.pause

    def metrics(self, key: str = "train_loss") -> list[dict]:
        return [e.data for e in self.events if e.type == "metrics" and e.data and key in e.data]


class NullReporter(MemoryReporter):
    """Non-zero DDP ranks: they train, rank 0 speaks."""

    def event(self, event: JobEvent) -> None:
        pass

    def checkpoint(self, report: CheckpointReport) -> None:
        pass


class HttpReporter:
    def __init__(self, control_plane_url: str, job_id: str, job_token: str, *,
                 flush_interval: float = 1.0, attempts: int = 5, backoff: float = 0.5,
                 status_interval: float = 2.0, timeout: float = 10.0, outcome_patience_s: float = 600.0,
                 checkpoint_wait_s: float = 2.0):
        import httpx

        self._client = httpx.Client(base_url=f"{control_plane_url.rstrip('/')}/internal/v1/jobs/{job_id}",
                                    headers={"Authorization": f"Bearer {job_token}"}, timeout=timeout)
        self._attempts, self._backoff, self._patience = attempts, backoff, outcome_patience_s
        self._status_interval, self._last_status, self._stopping = status_interval, 0.0, False
        self._pausing = False
        # ("event" | "checkpoint", body) not yet delivered, in the order the run made them
        self._queue: list[tuple[str, dict]] = []
        self._lock = threading.Lock()  # guards the queue; never held while sending
        self._sending = threading.Lock()  # one sender at a time, so the order holds
        self._delivered = threading.Condition(self._lock)  # a checkpoint report was settled
        self._checkpoints_queued = self._checkpoints_settled = self._failed_flushes = 0
        self._checkpoint_wait_s = checkpoint_wait_s
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._flusher = threading.Thread(target=self._flush_loop, args=(flush_interval,), daemon=True)
        self._flusher.start()

    def _request(self, method: str, path: str, json: dict | None = None, *,
                 for_s: float | None = None):
        """Sends until the control plane answers: ``attempts`` tries, or as many as fit in
        ``for_s`` seconds when given. Connection errors, 5xx and 429 are retried after a jittered,
        doubling backoff (a Retry-After header wins); any other status is the control plane's
        answer and is returned. Raises ConnectionError when out of tries or time."""
        import httpx

        deadline = None if for_s is None else time.monotonic() + for_s
        delay, tries = self._backoff, 0
        while True:
            tries += 1
            retry_after = None
            try:
                resp = self._client.request(method, path, json=json)
                if resp.status_code < 500 and resp.status_code != 429:
                    return resp
                last, retry_after = f"HTTP {resp.status_code}", _retry_after(resp)
            except httpx.HTTPError as exc:  # its text names the URL, never our headers (the token)
                last = f"{type(exc).__name__}: {exc}"
            wait = min(retry_after if retry_after is not None else random.uniform(delay / 2, delay),
                       MAX_BACKOFF_S)
            delay = min(delay * 2, MAX_BACKOFF_S)
            if deadline is None:
                give_up = tries >= self._attempts
            else:
                give_up = time.monotonic() + wait > deadline
            if give_up:
                raise ConnectionError(f"control plane unreachable: {method} {path}: {last} ({tries} tries)")
            if deadline is not None:
                log.warning("%s %s: %s; retry %d in %.1f s (giving up in %.0f s)", method, path, last,
                            tries, wait, deadline - time.monotonic())
            time.sleep(wait)

    def _flush_loop(self, interval: float) -> None:
        while not self._closed.is_set():
            self._wake.wait(interval)
            self._wake.clear()
            if not self._closed.is_set():
                self.flush()

    def flush(self, for_s: float | None = None) -> bool:
        """Delivers what is queued, in order: runs of events as one batch each, checkpoint
        reports one by one. Never holds the queue's lock while sending: a control plane that is
        down must not block the training thread's event() or checkpoint() (the checkpoint itself
        is in the store either way). True when nothing is left to deliver."""
        with self._sending:
            while True:
                with self._lock:
                    if not self._queue:
                        return True
                    kind = self._queue[0][0]
                    count = 1
                    if kind == "event":
                        while (count < len(self._queue) and count < MAX_EVENT_BATCH
                               and self._queue[count][0] == "event"):
                            count += 1
                    bodies = [body for _, body in self._queue[:count]]
                try:  # any answer settles it (a 409 for a run that is over included)
                    if kind == "event":
                        self._request("POST", "/events", {"events": bodies}, for_s=for_s)
                    else:
                        self._request("POST", "/checkpoints", bodies[0], for_s=for_s)
                except ConnectionError as exc:
                    log.warning("progress not delivered yet (kept for the next flush): %s", exc)
                    with self._lock:
                        self._failed_flushes += 1
                        self._delivered.notify_all()
                    return False
                with self._lock:
                    del self._queue[:count]
                    if kind == "checkpoint":
                        self._checkpoints_settled += 1
                        self._delivered.notify_all()

    def event(self, event: JobEvent) -> None:
        with self._lock:
            self._queue.append(("event", event.model_dump(mode="json", exclude_none=True)))

    def checkpoint(self, report: CheckpointReport) -> None:
        """Queued after the events before it and sent by the background flush at once; waits up
        to ``checkpoint_wait_s`` for the control plane to take it (so a run killed right after a
        checkpoint has reported it), less when a flush gives up: an outage must not stall training."""
        with self._lock:
            self._queue.append(("checkpoint", report.model_dump(mode="json")))
            self._checkpoints_queued += 1
            mine, failed = self._checkpoints_queued, self._failed_flushes
        self._wake.set()
        with self._delivered:  # until it is taken, or a flush gave up, or the wait is over
            self._delivered.wait_for(lambda: self._checkpoints_settled >= mine or self._failed_flushes > failed,
                                     timeout=self._checkpoint_wait_s)

    def result(self, result: TrainResult) -> dict:
        self.flush(for_s=self._patience)  # progress and checkpoints before the result that ends them
        resp = self._request("POST", "/result", result.model_dump(mode="json"), for_s=self._patience)
        resp.raise_for_status()
        return resp.json()

    def failure(self, code: str, message: str, param: str | None = None) -> None:
        self.flush(for_s=self._patience)
        body = {"code": code, "message": message} | ({"param": param} if param else {})
        self._request("POST", "/failure", body, for_s=self._patience)

    def should_stop(self) -> bool:
        """Polls the job status at most every ``status_interval`` seconds. Stops once this run is
        over: the job is no longer running (cancelled, requeued, timed out...), the control plane
        says so (409 ``run_over``: a newer run replaced this one), or it no longer takes our token
        (401: expired or not ours). Anything else (5xx, 429, no answer) keeps training."""
        now = time.monotonic()
        if not self._stopping and now - self._last_status >= self._status_interval:
            self._last_status = now
            try:
                resp = self._client.get("/status")
                self._stopping = _run_is_over(resp)
                self._pausing = self._stopping and resp.is_success and resp.json().get("status") == "pausing"
            except Exception as exc:  # noqa: BLE001 - a status poll failing must not stop training
                log.warning("status poll failed: %s", exc)
            if self._stopping:
                log.warning("stopping: this run is over (status poll: HTTP %s %s)", resp.status_code,
                            resp.text[:200])
        return self._stopping

    def pause_requested(self) -> bool:
        """The job is ``pausing``: the run checkpoints before it stops."""
        return self._pausing

    def close(self) -> None:
        self._closed.set()
        self._wake.set()
        self._flusher.join(timeout=5)
        self.flush()
        self._client.close()


def _run_is_over(resp) -> bool:
    """What a status poll's answer says about this run (see HttpReporter.should_stop)."""
    if resp.is_success:
        # Only "running" lets a run go on: a run requeued (queued), or of a job that ended, is
        # over; a later run of the job gets a new token.
        return resp.json().get("status") != "running"
    if resp.status_code == 401:
        return True
    if resp.status_code == 409:
        try:
            return resp.json().get("code") == "run_over"
        except ValueError:
            return False
    return False


def _retry_after(resp) -> float | None:
    """Retry-After in seconds (the delta-seconds form our API sends), or None."""
    try:
        return max(0.0, float(resp.headers["Retry-After"]))
    except (KeyError, ValueError):
        return None
