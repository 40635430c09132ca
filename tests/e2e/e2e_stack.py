"""The embedded stack as a real subprocess (API + scheduler), on the session's local Ray."""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
from pathlib import Path

import httpx


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    """Starts / kills / restarts `python -m service.embedded` on one data dir and port."""

    def __init__(self, data_dir: Path, ray_dashboard: str, serving: bool = False):
        self.data_dir, self.port = data_dir, _free_port()
        self.serving = serving
        self.env = {**os.environ, "LORAFLEET_RAY_ADDRESS": ray_dashboard,
                    "LORAFLEET_DATA_DIR": str(data_dir), "LORAFLEET_SCHEDULER_INTERVAL_S": "0.5",
                    "LORAFLEET_TENANT_MAX_CONCURRENT_JOBS": "2", "PYTHONUNBUFFERED": "1"}
        self.proc: subprocess.Popen | None = None
        self.info: dict = {}

    def start(self, timeout: float = 120) -> None:
        cmd = [sys.executable, "-m", "service.embedded", "--port", str(self.port)]
        if not self.serving:
            cmd.append("--no-serving")
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=subprocess.PIPE,
                                     stderr=open(self.data_dir / "server.log", "ab"), text=True)
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.stop()
            raise RuntimeError("the embedded stack did not start:\n"
                               + (self.data_dir / "server.log").read_text()[-3000:])
        self.info = json.loads(line)

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    @property
    def url(self) -> str:
        return self.info["url"]

    def admin(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60,
                            headers={"Authorization": f"Bearer {self.info['admin_token']}"})

    def tenant(self, name: str) -> httpx.Client:
        with self.admin() as admin:
            tenant = admin.post("/v1/admin/tenants", json={"name": name}).raise_for_status().json()
            key = admin.post(f"/v1/admin/tenants/{tenant['id']}/api_keys", json={}).raise_for_status().json()
        client = httpx.Client(base_url=self.url, timeout=60, headers={"Authorization": f"Bearer {key['key']}"})
        client.tenant_id = tenant["id"]  # type: ignore[attr-defined]
        return client
