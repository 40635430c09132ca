"""The Ray Train wrapper on a real local Ray: a job runs end to end, reports to an HTTP control
plane, and survives kill -9 of its training worker by resuming from the last checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from train_helpers import make_spec
from workers.models.registry import ensure_builtin
from workers.storage import LocalStore

pytestmark = [pytest.mark.ray, pytest.mark.slow]


class ControlPlane(BaseHTTPRequestHandler):
    """The internal worker routes of docs/API.md, recording what the job sends."""

    received: list[tuple[str, str, dict | None]] = []

    def _answer(self, status: int, body: dict | None = None):
        data = json.dumps(body).encode() if body is not None else b""
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.received.append((self.path, self.headers["Authorization"], body))
        route = self.path.rsplit("/", 1)[1]
        self._answer({"events": 204, "checkpoints": 201, "result": 200, "failure": 204}[route],
                     {"adapter_id": "ft-x"} if route == "result" else None)

    def do_GET(self):
        self._answer(200, {"status": "running"})

    def log_message(self, *args):
        pass


@pytest.fixture
def control_plane():
    ControlPlane.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), ControlPlane)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", ControlPlane.received
    server.shutdown()


def test_ray_job_survives_kill_9_of_its_worker(ray_cluster, control_plane, tiny_llama_dir, tmp_path):
    url, received = control_plane
    store = LocalStore(tmp_path / "objects")
    ensure_builtin("lorafleet/tiny-llama", store)
    spec = make_spec(store, "ftjob-ray", validation=False, control_plane_url=url, job_token="tok-1",
                     hp={"batch_size": 2, "n_epochs": 3, "checkpoint_steps": 4, "learning_rate": 2e-3})
    (tmp_path / "spec.json").write_text(spec.model_dump_json())
    pids = tmp_path / "pids"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster["address"], "LORAFLEET_TRAIN_PID_DIR": str(pids),
           "LORAFLEET_RAY_STORAGE_PATH": str(tmp_path / "ray-train")}
    proc = subprocess.Popen([sys.executable, "-m", "workers.train.ray_job", "--spec", str(tmp_path / "spec.json")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        first_checkpoint = store.root / spec.checkpoint_prefix / "step-000004" / "trainer_state.pt"
        deadline = time.monotonic() + 240
        while not first_checkpoint.exists():
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.2)
        (victim,) = [int(p.read_text()) for p in pids.iterdir()]
        os.kill(victim, signal.SIGKILL)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    assert json.loads(out.strip().splitlines()[-1])["status"] == "succeeded"
    assert len(list(pids.iterdir())) == 2  # Ray Train started a second worker process
    events = [e for path, auth, body in received if path.endswith("/events") for e in body["events"]]
    assert all(auth == "Bearer tok-1" for _, auth, _ in received)
    assert all(path.startswith("/internal/v1/jobs/ftjob-ray/") for path, _, _ in received)
    (resume_at,) = [i for i, e in enumerate(events) if e["message"].startswith("resumed from checkpoint at step")]
    at = events[resume_at]["data"]["step"]
    assert at >= 4 and at % 4 == 0
    total = 3 * 16  # 32 examples / batch 2, 3 epochs
    after = [e["data"]["step"] for e in events[resume_at:] if e["type"] == "metrics" and "train_loss" in e["data"]]
    assert after[0] > at and after == sorted(after) and after[-1] == total  # step numbers continue
    checkpoints = [body["step"] for path, _, body in received if path.endswith("/checkpoints")]
    assert set(checkpoints) == set(range(4, total + 1, 4))  # every 4 steps; epoch ends 16, 32, 48 among them
    (result,) = [body for path, _, body in received if path.endswith("/result")]  # from rank 0, once
    assert result["manifest_key"] == f"{spec.output_prefix}/manifest.json" and result["metrics"]["steps"] == total
    assert store.exists(result["manifest_key"])
