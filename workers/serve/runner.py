"""The engine's step loop in a background thread, with an asyncio front.

Every request of the process goes to this one loop, so rows of all adapters share each decode
step. Torch releases the GIL inside its kernels, so the event loop keeps serving HTTP meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import aclosing

import torch

from workers.serve.engine import Engine, Request, RequestFailed
from workers.serve.lora import LoraAdapter
from workers.serve.sampling import SamplingParams

log = logging.getLogger(__name__)

# What ``stream`` / ``generate`` raise for a request that ended with an error (stable code,
# status and our words; the cause is in the log). The old name stays for importers.
EngineFailed = RequestFailed
# Engine-wide failures in a row before the replica calls itself unhealthy (Ray replaces it).
UNHEALTHY_AFTER_FAILURES = 3


class EngineUnhealthy(RuntimeError):
    """``check_health``: this replica cannot serve (loop gone, device unusable, steps failing)."""


class EngineRunner:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._wake = threading.Event()
        self._closed = False
        self.failures_in_a_row = 0  # engine-wide step failures since the last good step
        self._thread = threading.Thread(target=self._loop, name="lorafleet-engine", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        while not self._closed:
            if not self.engine.has_work():
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            try:
                self.engine.step()
                self.failures_in_a_row = 0
            except Exception as exc:  # engine-wide: fail the running requests, serve the next ones
                self.failures_in_a_row += 1
                log.exception("engine step failed; failing every request of this replica")
                try:
                    self.engine.fail_all(exc)
                except Exception:
                    log.exception("failing the requests after a failed step failed too")

    def check_health(self) -> None:
        """Raises ``EngineUnhealthy`` when the step loop is gone, the last steps all failed, or
        a tiny operation on the engine's device fails (e.g. a dead CUDA context)."""
        if self._closed or not self._thread.is_alive():
            raise EngineUnhealthy("the engine loop is not running")
        if self.failures_in_a_row >= UNHEALTHY_AFTER_FAILURES:
            raise EngineUnhealthy(f"the last {self.failures_in_a_row} engine steps failed")
        try:
            probe = torch.ones(2, device=self.engine.device)
            ok = float((probe + probe).sum().item()) == 4.0  # .item() waits for the device
        except Exception as exc:
            raise EngineUnhealthy("the engine's device is unusable") from exc
        if not ok:
            raise EngineUnhealthy("the engine's device computes wrong results")

    async def stream(self, prompt_ids: list[int], params: SamplingParams,
                     adapter: LoraAdapter | None = None) -> AsyncIterator[tuple[str, Request]]:
        """(new text, request) per generated token; the last one has ``finish_reason`` set.
        Leaving the iteration early (client gone) aborts the request at the next step."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, str | None]] = asyncio.Queue()

        def on_event(req: Request, delta: str) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (delta, req.finish_reason))
            except RuntimeError:  # the caller's event loop is gone
                req.cancelled = True

        req = self.engine.submit(prompt_ids, params, adapter, on_event)
        self._wake.set()
        try:
            while True:
                delta, finish = await queue.get()
                if finish == "error":
                    if isinstance(req.error, RequestFailed):
                        raise req.error
                    raise RequestFailed("generation_failed", "generation failed on this replica")
                yield delta, req
                if finish is not None:
                    return
        finally:
            if req.finish_reason is None:
                self.engine.abort(req)

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       adapter: LoraAdapter | None = None) -> Request:
        req = None
        async with aclosing(self.stream(prompt_ids, params, adapter)) as tokens:
            async for _, req in tokens:
                pass
        return req
