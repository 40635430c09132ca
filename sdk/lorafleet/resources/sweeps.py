from __future__ import annotations

import time
from typing import Any

from .._core import Call, Sleep
from ..errors import WaitTimeoutError
from ..types import FineTuningSweep
from ._base import Resource, drop_none
from .fine_tuning import method_body

_PATH = "/v1/fine_tuning/sweeps"


class Sweeps(Resource):
    """Sweeps: one child job per combination of one or two varied hyperparameters, compared."""

    def create(self, *, model: str, training_file: str, parameters: dict[str, list[Any]],
               method: str | dict[str, Any] = "lora", hyperparameters: dict[str, Any] | None = None,
               validation_file: str | None = None, suffix: str | None = None, seed: int | None = None,
               metadata: dict[str, str] | None = None, resources: dict[str, Any] | None = None,
               idempotency_key: str | None = None) -> FineTuningSweep:
        """``parameters``: ``{"r": [2, 4, 8, 16, 32]}`` (one or two names). The other arguments
        describe the base job, as in ``fine_tuning.jobs.create``."""
        base = drop_none(model=model, training_file=training_file, validation_file=validation_file,
                         suffix=suffix, seed=seed, resources=resources)
        base["method"] = method_body(method, hyperparameters)
        body = drop_none(base=base, metadata=metadata)
        body["parameters"] = [{"name": name, "values": list(values)} for name, values in parameters.items()]
        return self._client._run(self._core.request("POST", _PATH, json=body, cast=FineTuningSweep.model_validate,
                                                    idempotency_key=idempotency_key))

    def retrieve(self, sweep_id: str) -> FineTuningSweep:
        return self._client._run(self._core.request("GET", f"{_PATH}/{sweep_id}",
                                                    cast=FineTuningSweep.model_validate))

    def list(self, *, limit: int | None = None, after: str | None = None):
        return self._client._paginate(_PATH, FineTuningSweep.model_validate, {"limit": limit, "after": after})

    def cancel(self, sweep_id: str) -> FineTuningSweep:
        return self._client._run(self._core.request("POST", f"{_PATH}/{sweep_id}/cancel",
                                                    cast=FineTuningSweep.model_validate))

    def wait(self, sweep_id: str, *, poll_interval: float = 5.0, timeout: float | None = None) -> FineTuningSweep:
        """Poll until every child has finished; return the sweep (its table and best child).
        Raises WaitTimeoutError after ``timeout`` seconds."""
        return self._client._run(self._wait(sweep_id, poll_interval, timeout))

    def _wait(self, sweep_id: str, poll_interval: float, timeout: float | None) -> Call[FineTuningSweep]:
        start = time.monotonic()
        while True:
            sweep = yield from self._core.request("GET", f"{_PATH}/{sweep_id}", cast=FineTuningSweep.model_validate)
            if sweep.done:
                return sweep
            if timeout is not None and time.monotonic() - start >= timeout:
                raise WaitTimeoutError(sweep, timeout)
            yield Sleep(poll_interval)
