"""The progress display of ``jobs.wait``: a rich bar when rich is installed, else stderr lines."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from .types import FineTuningJob, FineTuningJobEvent


def format_eta(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return "--:--"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


class _Metrics:
    """Step, total, loss and ETA from metrics events (our own ETA when the worker gives none)."""

    def __init__(self) -> None:
        self.step = 0
        self.total: int | None = None
        self.loss: float | None = None
        self.eta: float | None = None
        self._first: tuple[float, int] | None = None

    def update(self, data: dict[str, Any]) -> bool:
        if "step" not in data or "train_loss" not in data and "total_steps" not in data:
            return False  # eval metrics: no progress to show
        self.step = int(data["step"])
        self.total = int(data["total_steps"]) if data.get("total_steps") else self.total
        if data.get("train_loss") is not None:
            self.loss = float(data["train_loss"])
        now = time.monotonic()
        if self._first is None:
            self._first = (now, self.step)
        if data.get("eta_s") is not None:
            self.eta = float(data["eta_s"])
        elif self.total and self.step > self._first[1]:
            rate = (now - self._first[0]) / (self.step - self._first[1])
            self.eta = rate * (self.total - self.step)
        return True

    def line(self) -> str:
        total = self.total if self.total is not None else "?"
        loss = f"{self.loss:.4f}" if self.loss is not None else "-"
        return f"step {self.step}/{total}  loss {loss}  eta {format_eta(self.eta)}"


class PlainProgress:
    def __init__(self, job_id: str, stream: TextIO | None = None):
        self.job_id = job_id
        self.stream = stream or sys.stderr
        self.metrics = _Metrics()
        self._status: str | None = None

    def _print(self, text: str) -> None:
        print(f"[{self.job_id}] {text}", file=self.stream, flush=True)

    def on_job(self, job: FineTuningJob) -> None:
        if job.status != self._status:
            self._status = job.status
            self._print(f"status {job.status}")

    def on_event(self, event: FineTuningJobEvent) -> None:
        if event.type == "metrics" and event.data and self.metrics.update(event.data):
            self._print(self.metrics.line())
        elif event.type != "metrics" and (event.level != "info" or event.type == "checkpoint"):
            self._print(f"{event.level}: {event.message}")

    def close(self) -> None:
        pass


class RichProgress(PlainProgress):
    def __init__(self, job_id: str):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        super().__init__(job_id)
        self.console = Console(stderr=True)
        self.bar = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("eta {task.fields[eta]}"),
            console=self.console,
        )
        self.task = self.bar.add_task(job_id, total=None, loss="-", eta="--:--")
        self.bar.start()

    def _print(self, text: str) -> None:
        self.bar.console.print(f"[{self.job_id}] {text}", markup=False, highlight=False, soft_wrap=True)

    def on_job(self, job: FineTuningJob) -> None:
        super().on_job(job)
        self.bar.update(self.task, description=f"{self.job_id} {job.status}")

    def on_event(self, event: FineTuningJobEvent) -> None:
        if event.type == "metrics" and event.data and self.metrics.update(event.data):
            m = self.metrics
            self.bar.update(self.task, completed=m.step, total=m.total,
                            loss=f"{m.loss:.4f}" if m.loss is not None else "-", eta=format_eta(m.eta))
        elif event.type != "metrics":
            super().on_event(event)

    def close(self) -> None:
        self.bar.stop()


def make_progress(job_id: str) -> PlainProgress:
    try:
        import rich  # noqa: F401  (optional: the SDK itself only needs httpx and pydantic)
    except ImportError:
        return PlainProgress(job_id)
    return RichProgress(job_id)
