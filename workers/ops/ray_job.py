"""The Ray Job entrypoint of an export or blend: ``python -m workers.ops.ray_job`` with the spec in
env LORAFLEET_OP_SPEC (or ``--spec PATH``). The control plane submits it with submission_id =
the operation's id (+ ``-r<n>`` for a retry), as fine-tunes are submitted.

The driver does the work itself (a merge is one process' job), with the CPUs the submission
reserved. It reports to the control plane's internal routes with its run-scoped token, never
to the database. Exit 0 only once the control plane has the outcome: otherwise the scheduler
sees a failed Ray Job and retries the run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import time
from pathlib import Path

from workers.spec import OperationResult, OperationSpec

log = logging.getLogger("lorafleet.ops")
SPEC_ENV = "LORAFLEET_OP_SPEC"


class OperationReporter:
    """Posts to /internal/v1/operations/{id}/...; retries what the control plane did not answer."""

    def __init__(self, spec: OperationSpec, *, patience_s: float = 600.0):
        import httpx

        self._http = httpx.Client(
            base_url=f"{spec.control_plane_url.rstrip('/')}/internal/v1/operations/{spec.operation_id}",
            headers={"Authorization": f"Bearer {spec.token}"}, timeout=30)
        self._patience = patience_s

    def _post(self, path: str, body: dict, *, for_s: float):
        import httpx

        deadline, delay = time.monotonic() + for_s, 0.5
        while True:
            try:
                resp = self._http.post(path, json=body)
                if resp.status_code < 500 and resp.status_code != 429:
                    return resp
                last = f"HTTP {resp.status_code}"
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() + delay > deadline:
                raise ConnectionError(f"control plane unreachable: POST {path}: {last}")
            time.sleep(random.uniform(delay / 2, delay))
            delay = min(delay * 2, 15.0)

    def event(self, message: str, data: dict | None = None) -> None:
        try:  # progress is best effort: it never fails the run
            self._post("/events", {"events": [{"message": message, "data": data}]}, for_s=30)
        except ConnectionError as exc:
            log.warning("event not delivered: %s", exc)

    def result(self, result: OperationResult) -> None:
        self._post("/result", result.model_dump(), for_s=self._patience).raise_for_status()

    def failure(self, code: str, message: str) -> None:
        self._post("/failure", {"code": code, "message": message[:10_000]}, for_s=self._patience).raise_for_status()

    def close(self) -> None:
        self._http.close()


class LogReporter:
    """Without a control plane (a run by hand): progress to the log."""

    def event(self, message: str, data: dict | None = None) -> None:
        log.info("%s %s", message, data or "")

    def result(self, result: OperationResult) -> None:
        log.info("result: %s", result.manifest_key)

    def failure(self, code: str, message: str) -> None:
        log.error("failed (%s): %s", code, message)

    def close(self) -> None:
        pass


def execute(spec: OperationSpec) -> bool:
    """Run ``spec`` and deliver its outcome; True once the control plane has it."""
    from workers.ops.run import OperationFailed, run_operation
    from workers.storage import open_store

    reporter = OperationReporter(spec) if spec.control_plane_url and spec.token else LogReporter()
    try:
        try:
            result = run_operation(spec, open_store(spec.object_store_url), reporter)
        except OperationFailed as exc:
            reporter.failure(exc.code, exc.message)
            return True
        except Exception as exc:  # noqa: BLE001 - the text stays in our log; the tenant reads ours
            log.exception("%s %s failed", spec.kind, spec.operation_id)
            reporter.failure("internal_error", f"{type(exc).__name__}: {exc}")
            return True
        reporter.result(result)
        return True
    except Exception:  # noqa: BLE001 - the outcome was not delivered: exit non-zero, the run is retried
        log.exception("the control plane did not take the outcome of %s", spec.operation_id)
        return False
    finally:
        reporter.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run one LoRA Fleet export or blend")
    parser.add_argument("--spec", help=f"an OperationSpec JSON file (default: env {SPEC_ENV})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raw = Path(args.spec).read_text() if args.spec else os.environ.get(SPEC_ENV)
    if not raw:
        raise SystemExit(f"no spec: pass --spec PATH or set {SPEC_ENV}")
    spec = OperationSpec.model_validate_json(raw)
    delivered = execute(spec)
    print(json.dumps({"operation_id": spec.operation_id, "delivered": delivered}), flush=True)
    return 0 if delivered else 1


if __name__ == "__main__":
    sys.exit(main())
