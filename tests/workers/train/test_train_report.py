"""HttpReporter against a real HTTP server speaking the internal routes of docs/API.md."""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from workers.spec import CheckpointReport, JobEvent, TrainResult
from workers.train.report import HttpReporter


class Plane(BaseHTTPRequestHandler):
    log: list[tuple[str, str, dict | None, float]] = []
    status = "running"
    fail_next = 0  # answer this many POSTs with 503 first
    fail_until = 0.0  # answer POSTs with 503 until this monotonic time
    retry_after: str | None = None  # sent with each 503
    status_answer: tuple[int, dict] | None = None  # the status poll's answer, if not 200 {status}

    def _answer(self, code: int, body: dict | None = None, headers: dict | None = None):
        data = json.dumps(body).encode() if body is not None else b""
        self.send_response(code)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if Plane.fail_next or time.monotonic() < Plane.fail_until:
            Plane.fail_next = max(0, Plane.fail_next - 1)
            Plane.log.append((self.path, "503", None, time.monotonic()))
            return self._answer(503, headers={"Retry-After": Plane.retry_after} if Plane.retry_after else None)
        Plane.log.append((self.path, self.headers["Authorization"], body, time.monotonic()))
        self._answer(200 if self.path.endswith("/result") else 204, {"adapter_id": "ft-a"} if self.path.endswith("/result") else None)

    def do_GET(self):
        Plane.log.append((self.path, self.headers["Authorization"], None, time.monotonic()))
        self._answer(*(Plane.status_answer or (200, {"status": Plane.status})))

    def log_message(self, *args):
        pass


@pytest.fixture
def plane():
    Plane.log, Plane.status, Plane.fail_next, Plane.fail_until, Plane.retry_after = [], "running", 0, 0.0, None
    Plane.status_answer = None
    server = ThreadingHTTPServer(("127.0.0.1", 0), Plane)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_events_are_batched_and_delivered_within_seconds(plane):
    reporter = HttpReporter(plane, "ftjob-1", "secret", flush_interval=0.5, backoff=0.05)
    sent = time.monotonic()
    for step in range(5):
        reporter.event(JobEvent(message=f"step {step}", type="metrics", data={"step": step}))
    deadline = time.monotonic() + 5
    while not Plane.log and time.monotonic() < deadline:
        time.sleep(0.05)
    path, auth, body, at = Plane.log[0]
    assert (path, auth) == ("/internal/v1/jobs/ftjob-1/events", "Bearer secret")
    assert [e["data"]["step"] for e in body["events"]] == [0, 1, 2, 3, 4] and at - sent < 2
    reporter.close()


def test_posts_retry_5xx_and_status_poll_notices_cancelling(plane):
    reporter = HttpReporter(plane, "ftjob-2", "t", flush_interval=60, backoff=0.05, status_interval=0)
    Plane.fail_next = 2
    assert reporter.result(TrainResult(manifest_key="k/manifest.json", metrics={"eval_loss": 1.0})) == {"adapter_id": "ft-a"}
    reporter.checkpoint(CheckpointReport(step=4, key_prefix="k/step-000004"))
    assert reporter.flush() is True  # queued for the background flush; sent here at once
    reporter.failure("training_diverged", "loss became nan", "learning_rate")
    posted = [(p.rsplit("/", 1)[1], b) for p, auth, b, _ in Plane.log if auth != "503" and b is not None]
    assert posted[0] == ("result", {"manifest_key": "k/manifest.json", "metrics": {"eval_loss": 1.0}})
    assert posted[1][0] == "checkpoints" and posted[1][1]["step"] == 4
    assert posted[2] == ("failure", {"code": "training_diverged", "message": "loss became nan", "param": "learning_rate"})
    assert reporter.should_stop() is False
    Plane.status = "cancelling"
    assert reporter.should_stop() is True
    reporter.close()


def test_unreachable_control_plane_never_stops_training():
    reporter = HttpReporter("http://127.0.0.1:9", "ftjob-3", "t", flush_interval=60, attempts=2, backoff=0.01)
    started = time.monotonic()
    reporter.checkpoint(CheckpointReport(step=4, key_prefix="k/step-000004"))  # in the store either way
    reporter.event(JobEvent(message="step 1", type="metrics", data={"step": 1}))
    reporter.flush()  # kept for the next flush
    assert time.monotonic() - started < 2  # progress gives up after `attempts` quick tries
    assert reporter.should_stop() is False  # a failing poll never stops training
    reporter.close()


def test_an_outage_never_blocks_the_training_thread_and_order_survives_it(plane):
    """While the flusher is stuck retrying, event() returns at once and checkpoint() after at
    most its short wait; after the outage everything arrives, events before the checkpoint that
    followed them."""
    reporter = HttpReporter(plane, "ftjob-6", "t", flush_interval=0.05, attempts=1000, backoff=0.05,
                            checkpoint_wait_s=0.2)
    Plane.fail_until = time.monotonic() + 2.0
    slowest_event = slowest_checkpoint = 0.0
    for step in range(20):
        started = time.monotonic()
        reporter.event(JobEvent(message=f"step {step}", type="metrics", data={"step": step}))
        slowest_event = max(slowest_event, time.monotonic() - started)
        if step % 5 == 4:
            started = time.monotonic()
            reporter.checkpoint(CheckpointReport(step=step, key_prefix=f"k/step-{step:06d}"))
            slowest_checkpoint = max(slowest_checkpoint, time.monotonic() - started)
        time.sleep(0.05)
    # the old flush held the buffer's lock through its retries, and posted checkpoints inline
    assert slowest_event < 0.02 and slowest_checkpoint < 0.5, (slowest_event, slowest_checkpoint)
    deadline = time.monotonic() + 10
    while reporter.flush() is not True and time.monotonic() < deadline:
        time.sleep(0.1)
    delivered = [(p.rsplit("/", 1)[1], b) for p, auth, b, _ in Plane.log if auth != "503" and b is not None]
    order = [("step", e["data"]["step"]) if kind == "events" else ("checkpoint", b["step"])
             for kind, b in delivered for e in (b["events"] if kind == "events" else [None])]
    assert [x for x in order if x[0] == "step"] == [("step", i) for i in range(20)]
    assert [x[1] for x in order if x[0] == "checkpoint"] == [4, 9, 14, 19]
    for ckpt_step in (4, 9, 14, 19):  # every event up to a checkpoint arrived before it
        assert order.index(("step", ckpt_step)) < order.index(("checkpoint", ckpt_step))
    reporter.close()


def test_a_checkpoint_is_reported_before_training_goes_on_when_the_plane_answers(plane):
    """A run killed right after a checkpoint has reported it: checkpoint() returns once the
    control plane took it (the background flush sends it at once, whatever flush_interval)."""
    reporter = HttpReporter(plane, "ftjob-7", "t", flush_interval=60, backoff=0.05)
    reporter.event(JobEvent(message="step 4", type="metrics", data={"step": 4}))
    reporter.checkpoint(CheckpointReport(step=4, key_prefix="k/step-000004"))
    assert [p.rsplit("/", 1)[1] for p, *_ in Plane.log] == ["events", "checkpoints"]
    reporter.close()


def test_result_outlasts_a_long_outage_and_honours_retry_after(plane, caplog):
    """Far past the 5 quick tries: the result is retried for ``outcome_patience_s``, each wait the
    server's Retry-After, each retry logged without the token."""
    reporter = HttpReporter(plane, "ftjob-4", "sekrit-token", flush_interval=60, attempts=2,
                            backoff=0.05, outcome_patience_s=30)
    Plane.fail_until, Plane.retry_after = time.monotonic() + 3.0, "1"
    started = time.monotonic()
    with caplog.at_level("WARNING", logger="workers.train.report"):
        assert reporter.result(TrainResult(manifest_key="k/manifest.json")) == {"adapter_id": "ft-a"}
    tries = [at for path, auth, _, at in Plane.log if path.endswith("/result")]
    assert time.monotonic() - started >= 3.0 and len(tries) >= 3
    gaps = [b - a for a, b in zip(tries, tries[1:])]
    assert min(gaps) >= 0.9, gaps  # Retry-After: 1, not the 0.05 s backoff
    retries = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert len(retries) == len(tries) - 1 and "HTTP 503" in retries[0]
    assert not any("sekrit" in r.getMessage() for r in caplog.records)
    reporter.close()


def test_failure_report_gives_up_after_its_patience():
    reporter = HttpReporter("http://127.0.0.1:9", "ftjob-5", "t", flush_interval=60, attempts=1,
                            backoff=0.2, outcome_patience_s=2)
    started = time.monotonic()
    with pytest.raises(ConnectionError, match="tries") as raised:
        reporter.failure("internal_error", "x")
    tries = int(re.search(r"\((\d+) tries\)", str(raised.value)).group(1))
    # kept trying past `attempts` (jittered waits, so the time spent varies), within the bound
    assert tries > 1 and time.monotonic() - started <= 2.5, (tries, time.monotonic() - started)
    reporter.close()


def test_only_an_answer_that_the_run_is_over_stops_it(plane):
    """409 run_over, 401 and a status other than running stop the run (tests/service/
    test_worker_stop.py drives the real routes); a busy or failing control plane does not."""
    reporter = HttpReporter(plane, "ftjob-9", "t", flush_interval=60, attempts=1, status_interval=0)
    try:
        for answer in [(503, {}), (429, {}), (409, {"code": "conflict"}), (404, {"code": "not_found"})]:
            Plane.status_answer = answer
            assert reporter.should_stop() is False, answer
        Plane.status_answer = (409, {"code": "run_over"})
        assert reporter.should_stop() is True
    finally:
        reporter.close()
