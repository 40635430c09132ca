"""Failures a training run ends with: a code from workers.spec and a message for the tenant."""

from __future__ import annotations

from workers.spec import PLATFORM_ERROR_CODES, USER_ERROR_CODES


class TrainingError(Exception):
    def __init__(self, code: str, message: str, param: str | None = None):
        if code not in USER_ERROR_CODES | PLATFORM_ERROR_CODES:
            raise ValueError(f"unknown error code {code!r}")
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.param = code, message, param


class TrainingCancelled(Exception):
    """The control plane asked the job to stop (status ``cancelling``)."""


class TrainingPaused(TrainingCancelled):
    """The control plane asked the job to pause (status ``pausing``); its checkpoint is written.
    A kind of cancellation to the Ray wrapper: the run ends and reports no outcome of its own."""
