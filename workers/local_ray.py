"""Start and stop a local single-node Ray (head + dashboard) for the embedded stack and tests.

A `ray start` daemon rather than an in-process `ray.init()`: it outlives the process that
started it, so training runs survive a restart of the embedded server, and the scheduler can
submit Ray Jobs to its dashboard. Torch-free; shells out to the `ray` CLI of this interpreter.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_cli() -> str:
    return str(Path(sys.executable).with_name("ray"))


def auth_env(token_path: Path) -> dict[str, str]:
    """What a process needs to join or call this Ray: token authentication, token from a file."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path)}


def ensure_token(path: Path) -> str:
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path.read_text().strip()


def _get(url: str, token: str | None, timeout: float = 2.0):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def dashboard_alive(url: str, token: str | None = None, timeout: float = 2.0) -> bool:
    try:
        with _get(f"{url}/api/version", token, timeout) as resp:
            return resp.status == 200
    except OSError:
        return False


def _reports_resources(url: str, token: str | None) -> bool:
    """True once the autoscaler has published the node's resources (the scheduler needs them)."""
    try:
        with _get(f"{url}/api/cluster_status", token) as resp:
            usage = json.load(resp)["data"]["clusterStatus"]["loadMetricsReport"]["usage"]
            return usage.get("CPU", [0, 0])[1] > 0
    except (OSError, KeyError, TypeError, ValueError):
        return False


def start_local_ray(state_dir: Path, *, num_cpus: int | None = None, reuse: bool = False) -> dict:
    """Start a head node with Ray's token authentication on (the token in ``state_dir``).

    With ``reuse``, join the node recorded in ``state_dir/ray.json`` if it is alive. Returns
    {"address", "dashboard", "temp_dir", "token_path"}; callers send the token as a bearer token.
    """
    state_dir = Path(state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    token_path = state_dir / "auth_token"
    token = ensure_token(token_path)
    record = state_dir / "ray.json"
    if reuse and record.exists():
        info = json.loads(record.read_text())
        if dashboard_alive(info["dashboard"], token):
            return info
    gcs_port, dash_port = free_port(), free_port()
    # Ray's session dir holds sockets whose paths must stay short: keep it under /tmp.
    temp_dir = f"/tmp/lf-ray-{os.getpid()}-{gcs_port}"
    cmd = [_ray_cli(), "start", "--head", f"--port={gcs_port}", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dash_port}", "--include-dashboard=true", "--disable-usage-stats",
           f"--temp-dir={temp_dir}"]
    # Every port Ray would otherwise take from a fixed default, so that several nodes (tests,
    # a developer's own Ray) can live on one machine.
    for flag in ("ray-client-server-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                 "runtime-env-agent-port", "metrics-export-port", "node-manager-port",
                 "object-manager-port"):
        cmd.append(f"--{flag}={free_port()}")
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus}")
    # The node inherits this environment: keep the control plane's secrets out of it.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LORAFLEET_", "RAY_AUTH_"))}
    env |= {"RAY_USAGE_STATS_ENABLED": "0", **auth_env(token_path)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    if proc.returncode != 0:
        raise RuntimeError(f"ray start failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    info = {"address": f"127.0.0.1:{gcs_port}", "dashboard": f"http://127.0.0.1:{dash_port}",
            "temp_dir": temp_dir, "token_path": str(token_path)}
    deadline = time.monotonic() + 180  # a busy 2-core machine can take minutes
    while not (dashboard_alive(info["dashboard"], token) and _reports_resources(info["dashboard"], token)):
        if time.monotonic() > deadline:
            stop_local_ray(info)
            raise RuntimeError(f"Ray dashboard did not come up; logs in {temp_dir}")
        time.sleep(0.5)
    record.write_text(json.dumps(info))
    return info


def _node_processes(info: dict) -> list:
    """The node's processes: those naming its temp dir or GCS port, and all their children."""
    import psutil

    port = info["address"].rsplit(":", 1)[1]
    marks = (info["temp_dir"], f":{port} ", f":{port}\0")
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["cmdline"]):
        cmd = "\0".join(proc.info["cmdline"] or []) + "\0"
        if proc.pid != os.getpid() and any(m.replace(" ", "\0") in cmd for m in marks):
            for p in [proc, *proc.children(recursive=True)]:
                found[p.pid] = p
    return list(found.values())


def stop_local_ray(info: dict, timeout: float = 5.0) -> None:
    """Stop exactly the Ray node of ``info`` (not `ray stop`, which stops every local node)."""
    import psutil

    procs = _node_processes(info)
    for proc in procs:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
