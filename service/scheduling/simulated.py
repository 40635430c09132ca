"""A simulated Ray cluster on a simulated clock, in place of RayJobLauncher.

Tests and ``bench/scheduler_scale.py`` drive the real scheduler against it: it admits runs by
GPU/CPU count in submission order (a run that does not fit waits, PENDING, as Ray would queue
it), finishes each after the duration ``duration_of`` gives it, and calls ``on_finish`` then
(where a real run would post its result to the control plane). It also accounts GPU-time, so a
benchmark can say how busy the cluster was.
"""

from __future__ import annotations

import heapq
import json
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from service.launcher import ClusterResources, RunState, SubmissionRefused
from service.scheduling.policy import ZERO, Capacity
from service.tenants.limits import demand


@dataclass
class _Run:
    job_id: str
    need: Capacity
    state: RunState = RunState.PENDING
    started_at: float | None = None  # when it was placed (got its GPUs)
    ends_at: float = 0.0


class SimulatedCluster:
    def __init__(self, total: Capacity, *, duration_of: Callable[[str], float],
                 on_finish: Callable[[str], None] | None = None, held_by_serving: Capacity = ZERO):
        self.total, self.serving = total, held_by_serving
        self.now = 0.0
        self.duration_of, self.on_finish = duration_of, on_finish
        self.refuse: set[str] = set()  # job ids whose submissions are refused (a poison job)
        self.runs: dict[str, _Run] = {}
        self._pending: deque[str] = deque()
        self._ends: list[tuple[float, str]] = []
        self._held = held_by_serving
        self.busy_gpu_s = 0.0  # GPU-time held by runs so far
        self.in_flight = 0  # runs submitted and not ended
        self.max_in_flight = 0

    # --- the launcher interface
    def submit(self, sub_id: str, *, env: dict[str, str]) -> None:
        if sub_id in self.runs:
            return  # the same submission id never starts a second run
        spec = json.loads(env["LORAFLEET_JOB_SPEC"])
        if spec["job_id"] in self.refuse:
            raise SubmissionRefused(f"simulated refusal of {sub_id}")
        self.runs[sub_id] = _Run(spec["job_id"], demand(spec.get("resources")))
        self._pending.append(sub_id)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self._admit()

    def state(self, sub_id: str) -> RunState:
        run = self.runs.get(sub_id)
        return run.state if run else RunState.UNKNOWN

    def message(self, sub_id: str) -> str:
        return ""

    def stop(self, sub_id: str) -> None:
        run = self.runs.get(sub_id)
        if run is not None and not run.state.terminal:
            if run.state is RunState.RUNNING:
                self._held -= run.need
                run.ends_at = self.now
            run.state = RunState.STOPPED
            self.in_flight -= 1
            self._admit()

    def resources(self) -> ClusterResources:
        return ClusterResources(total=self.total, available=self.total - self._held)

    # --- the simulation
    @property
    def busy_gpus(self) -> float:
        return self._held.gpus - self.serving.gpus

    def advance(self, to: float) -> None:
        """Move the clock to ``to``, finishing (and admitting) runs in time order on the way."""
        while self._ends and self._ends[0][0] <= to:
            at, sub = heapq.heappop(self._ends)
            run = self.runs[sub]
            if run.state is not RunState.RUNNING or run.ends_at != at:
                continue  # stopped meanwhile
            self._tick_to(at)
            run.state = RunState.SUCCEEDED
            self._held -= run.need
            self.in_flight -= 1
            if self.on_finish:
                self.on_finish(run.job_id)
            self._admit()
        self._tick_to(to)

    def _tick_to(self, t: float) -> None:
        self.busy_gpu_s += self.busy_gpus * (t - self.now)
        self.now = t

    def _admit(self) -> None:
        while self._pending:
            run = self.runs[self._pending[0]]
            if run.state.terminal:
                self._pending.popleft()
                continue
            if not run.need.fits_in(self.total - self._held):
                return  # first come, first placed: Ray's queue is not ours to reorder
            sub = self._pending.popleft()
            run.state, run.started_at = RunState.RUNNING, self.now
            run.ends_at = self.now + self.duration_of(run.job_id)
            self._held += run.need
            heapq.heappush(self._ends, (run.ends_at, sub))
