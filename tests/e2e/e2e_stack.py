"""The embedded stack as a real subprocess (API + scheduler), on the session's local Ray."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
from pathlib import Path

import httpx

from workers.local_ray import free_port



class Stack:
    """Starts / kills / restarts `python -m service.embedded` on one data dir and port.

    With ``ray_dashboard`` it submits to that (shared) Ray and serves nothing; without, it starts
    its own local Ray and deploys the serving application on it, exactly as `lorafleet up`.
    """

    def __init__(self, data_dir: Path, ray_dashboard: str | None = None):
        self.data_dir, self.port, self.serve_port = data_dir, free_port(), free_port()
        self.serving = ray_dashboard is None
        self.env = {**os.environ, "LORAFLEET_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1",
                    "LORAFLEET_SCHEDULER_INTERVAL_S": "0.5", "LORAFLEET_TENANT_MAX_CONCURRENT_JOBS": "2"}
        if ray_dashboard:
            self.env["LORAFLEET_RAY_ADDRESS"] = ray_dashboard
        else:  # its own Ray: not the session's one
            for key in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"):
                self.env.pop(key, None)
        self.proc: subprocess.Popen | None = None
        self.info: dict = {}

    def start(self, timeout: float = 600) -> None:
        cmd = [sys.executable, "-m", "service.embedded", "--port", str(self.port)]
        if self.serving:
            cmd += ["--serve-port", str(self.serve_port), "--num-cpus", "4"]
        else:
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
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if self.serving:  # it started its own Ray: stop that too
            from service.embedded import embedded_settings, shutdown_local_ray

            shutdown_local_ray(embedded_settings(data_dir=self.data_dir))

    @property
    def url(self) -> str:
        return self.info["url"]

    def admin(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60,
                            headers={"Authorization": f"Bearer {self.info['admin_token']}"})

    def tenant(self, name: str, **limits) -> httpx.Client:
        with self.admin() as admin:
            tenant = admin.post("/v1/admin/tenants", json={"name": name, **limits}).raise_for_status().json()
            key = admin.post(f"/v1/admin/tenants/{tenant['id']}/api_keys", json={}).raise_for_status().json()
        client = httpx.Client(base_url=self.url, timeout=60, headers={"Authorization": f"Bearer {key['key']}"})
        client.tenant_id = tenant["id"]  # type: ignore[attr-defined]
        return client
