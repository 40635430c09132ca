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

from workers.serve.engine import Engine, Request
from workers.serve.lora import LoraAdapter
from workers.serve.sampling import SamplingParams

log = logging.getLogger(__name__)


class EngineFailed(RuntimeError):
    """The step loop raised while this request was running."""


class EngineRunner:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._wake = threading.Event()
        self._closed = False
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
            except Exception as exc:  # fail the running requests, keep serving the next ones
                log.exception("engine step failed")
                self.engine.fail_all(exc)

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
                    raise EngineFailed(f"generation failed: {req.error}") from req.error
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
