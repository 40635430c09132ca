"""Start and stop a local Ray (head + dashboard) for the embedded stack and tests, and join
worker nodes to it (the multi-node tests: a node with a filesystem of its own, as a pod has).

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


def _port_flags(*flags: str) -> list[str]:
    # Every port Ray would otherwise take from a fixed default, so that several nodes (tests,
    # a developer's own Ray) can live on one machine.
    return [f"--{flag}={free_port()}" for flag in flags]


_NODE_PORTS = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
               "metrics-export-port", "node-manager-port", "object-manager-port")


def node_env(token_path: Path, env: dict[str, str] | None) -> dict[str, str]:
    """The environment of a node's processes (raylet, Ray workers, Ray Job drivers).

    ``env`` is for what the workers need and nobody else may read, e.g. the object store's
    credentials: a Ray Job's runtime_env and a trainer's config are kept in Ray's GCS, readable
    by anyone holding the Ray token; a node's own environment is not. The control plane's
    secrets (LORAFLEET_*) stay out unless ``env`` names them.
    """
    base = {k: v for k, v in os.environ.items() if not k.startswith(("LORAFLEET_", "RAY_AUTH_"))}
    return base | {"RAY_USAGE_STATS_ENABLED": "0", **auth_env(token_path), **(env or {})}


def start_local_ray(state_dir: Path, *, num_cpus: int | None = None, reuse: bool = False,
                    env: dict[str, str] | None = None) -> dict:
    """Start a head node with Ray's token authentication on (the token in ``state_dir``).

    With ``reuse``, join the node recorded in ``state_dir/ray.json`` if it is alive. ``env`` is
    added to the node's environment (see node_env). Returns {"address", "dashboard", "temp_dir",
    "token_path"}; callers send the token as a bearer token.
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
    cmd += _port_flags("ray-client-server-port", *_NODE_PORTS)
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus}")
    proc = subprocess.run(cmd, env=node_env(token_path, env), capture_output=True, text=True, timeout=180)
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


def _cluster_cpus(url: str, token: str | None) -> float:
    try:
        with _get(f"{url}/api/cluster_status", token) as resp:
            return json.load(resp)["data"]["clusterStatus"]["loadMetricsReport"]["usage"]["CPU"][1]
    except (OSError, KeyError, TypeError, ValueError):
        return 0.0


# Run as `sh -c _PRIVATE_FS sh ROOT N KEEP1..KEEPN [ROOT N KEEP...] -- CMD...` in a new mount
# namespace: an empty tmpfs over each ROOT (HOME, /tmp), except its top folders KEEP bound back
# (the Python install and this code, where they live under a ROOT — a CI clone may sit in /tmp).
_PRIVATE_FS = """set -e
while [ "$1" != "--" ]; do
  root=$1; n=$2; shift 2
  old=$(mktemp -d /dev/shm/lf-keep-XXXXXX)
  mount --bind "$root" "$old"
  mount -t tmpfs lf-private "$root"
  while [ "$n" -gt 0 ]; do
    mkdir -p "$root/$1"; mount --bind "$old/$1" "$root/$1"; shift; n=$((n - 1))
  done
  umount -l "$old"; rmdir "$old"
done
shift
exec "$@"
"""


def _kept_top_folders(root: Path) -> list[str]:
    """The top folders under ``root`` that hold this interpreter (pyenv's install, a venv) or
    this code (an editable install's source tree)."""
    root = root.resolve()
    code = Path(__file__).resolve().parents[1]
    paths = {Path(sys.base_prefix).resolve(), Path(sys.prefix).resolve(), Path(sys.executable).resolve(), code}
    return sorted({p.relative_to(root).parts[0] for p in paths if p.is_relative_to(root) and p != root})


def _private_fs_args() -> list[str]:
    args: list[str] = []
    for root in (Path.home(), Path("/tmp")):
        keep = _kept_top_folders(root)
        args += [str(root), str(len(keep)), *keep]
    return args


def join_local_ray(head: dict, *, num_cpus: int, resources: dict[str, float] | None = None,
                   env: dict[str, str] | None = None, private_fs: bool = False,
                   timeout: float = 180) -> dict:
    """Start a worker node that joins ``head``'s cluster (a second node on this machine).

    ``resources`` are custom Ray resources only this node has (to place work on it); ``env`` is
    added to its environment (see node_env). With ``private_fs`` its processes see a filesystem
    of their own, as a separate pod would: the node lives in its own mount namespace (`unshare
    --mount`, needs root) with empty tmpfs over $HOME and /tmp, so nothing the head writes under
    either is visible to it. Returns {"temp_dir", "head_address"}; stop it with stop_local_ray.
    """
    token_path = Path(head["token_path"])
    token = token_path.read_text().strip()
    before = _cluster_cpus(head["dashboard"], token)
    temp_dir = f"/tmp/lf-ray-w-{os.getpid()}-{free_port()}"
    ray_cmd = [_ray_cli(), "start", f"--address={head['address']}", f"--num-cpus={num_cpus}",
               f"--temp-dir={temp_dir}", *_port_flags(*_NODE_PORTS)]
    if resources:
        ray_cmd.append(f"--resources={json.dumps(resources)}")
    node = node_env(token_path, env)
    if private_fs:
        # The token file is on the head's /tmp, hidden from this node: hand it over by value.
        node.pop("RAY_AUTH_TOKEN_PATH")
        node["RAY_AUTH_TOKEN"] = token
        cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", _PRIVATE_FS, "sh",
               *_private_fs_args(), "--", *ray_cmd]
    else:
        cmd = ray_cmd
    proc = subprocess.run(cmd, env=node, capture_output=True, text=True, timeout=timeout)
    info = {"temp_dir": temp_dir, "head_address": head["address"]}
    if proc.returncode != 0:
        stop_local_ray(info)
        raise RuntimeError(f"ray start (worker) failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    deadline = time.monotonic() + timeout
    while _cluster_cpus(head["dashboard"], token) < before + num_cpus:
        if time.monotonic() > deadline:
            stop_local_ray(info)
            raise RuntimeError("the worker node did not join the cluster in time")
        time.sleep(0.5)
    return info


def _node_processes(info: dict) -> list:
    """The node's processes: those naming its temp dir (or a head's GCS port), and all their
    children. A worker node's processes name the head's GCS address too: its temp dir alone."""
    import psutil

    marks: tuple[str, ...] = (info["temp_dir"],)
    if "address" in info:
        port = info["address"].rsplit(":", 1)[1]
        marks += (f":{port} ", f":{port}\0")
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
