"""The embedded stack on one machine: API + scheduler + a local Ray (training and serving).

``lorafleet up`` and ``make demo`` run this. Defaults: SQLite and a local object-store folder
under the data dir, a local Ray node started as a daemon (it outlives this process, so a
restarted server finds its runs still going and reconciles them). Secrets are generated once
and kept in the data dir, so worker job tokens stay valid across restarts.

Ray is reached over HTTP and subprocesses only: this module does not import ray or torch.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from service.settings import Settings

log = logging.getLogger("lorafleet.embedded")


def _persisted_secrets(data_dir: Path) -> dict[str, str]:
    path = data_dir / "secrets.json"
    if path.exists():
        return json.loads(path.read_text())
    values = {"admin_token": "lfadmin-" + secrets.token_urlsafe(24),
              "internal_secret": secrets.token_urlsafe(32)}
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(values, f)
    return values


def embedded_settings(**overrides) -> Settings:
    """Settings from the environment, with the embedded defaults filled in."""
    base = Settings(**overrides)
    data_dir = base.data_dir.resolve()
    stored = _persisted_secrets(data_dir)
    explicit = {k for k in ("admin_token", "internal_secret") if f"LORAFLEET_{k.upper()}" in os.environ}
    fill = {k: v for k, v in stored.items() if k not in explicit and k not in overrides}
    return Settings(**{**overrides, "data_dir": data_dir, **fill,
                       "public_url": overrides.get("public_url") or f"http://{base.host}:{base.port}"})


def start_serving(settings: Settings, ray_info: dict, *, port: int) -> str:
    """Deploy the serving application on the local Ray; returns its HTTP URL."""
    cmd = [sys.executable, "-m", "workers.serve.app", "--ray-address", ray_info["address"],
           "--http-port", str(port), "--object-store-url", settings.effective_object_store_url,
           "--base-model-id", settings.default_base_model,
           "--base-model-uri", "builtin://" + settings.default_base_model]
    from workers.local_ray import auth_env

    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAFLEET_")}
    env |= auth_env(Path(ray_info["token_path"]))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"serving failed to deploy:\n{proc.stderr[-3000:]}")
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                return url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("serving did not become healthy")
        time.sleep(1)


def run_stack(settings: Settings | None = None, *, serving: bool = True, serve_port: int = 8001,
              num_cpus: int | None = None, on_ready=None, stop: threading.Event | None = None) -> None:
    """Start everything and serve until ``stop`` is set (or SIGINT/SIGTERM)."""
    import uvicorn

    from service.db.session import engine_from_settings
    from service.launcher import RayJobLauncher
    from service.main import create_app
    from service.scheduler import Scheduler
    from workers.local_ray import start_local_ray

    settings = settings or embedded_settings()
    updates: dict = {}
    ray_info = None
    token = None
    if not settings.ray_address:
        ray_info = start_local_ray(settings.data_dir / "ray", num_cpus=num_cpus, reuse=True)
        updates["ray_address"] = ray_info["dashboard"]
        token = Path(ray_info["token_path"]).read_text().strip()
    if serving and not settings.serve_url:
        if ray_info is None:
            raise RuntimeError("set LORAFLEET_SERVE_URL when using a remote Ray")
        updates["serve_url"] = start_serving(settings, ray_info, port=serve_port)
    settings = settings.model_copy(update=updates)

    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port,
                                           log_level="warning"))
    stop = stop or threading.Event()
    launcher = RayJobLauncher(settings.ray_address, entrypoint=settings.train_entrypoint, token=token)
    scheduler = Scheduler(settings, engine_from_settings(settings), launcher)
    sched_thread = threading.Thread(target=scheduler.run_forever, args=(stop,), daemon=True,
                                    name="scheduler")

    def watch() -> None:
        while not server.started and not stop.is_set():
            time.sleep(0.05)
        if server.started:
            sched_thread.start()
            if on_ready:
                on_ready(settings)
        stop.wait()
        server.should_exit = True

    threading.Thread(target=watch, daemon=True).start()
    server.run()  # blocks; handles SIGINT/SIGTERM by exiting
    stop.set()
    if sched_thread.is_alive():
        sched_thread.join(10)


def shutdown_local_ray(settings: Settings) -> None:
    from workers.local_ray import stop_local_ray

    record = settings.data_dir / "ray" / "ray.json"
    if record.exists():
        stop_local_ray(json.loads(record.read_text()))
        record.unlink()


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Run the embedded LoRA Fleet stack.")
    parser.add_argument("--port", type=int)
    parser.add_argument("--data-dir")
    parser.add_argument("--no-serving", action="store_true")
    parser.add_argument("--serve-port", type=int, default=8001)
    parser.add_argument("--num-cpus", type=int)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    overrides = {k: v for k, v in {"port": args.port, "data_dir": args.data_dir}.items() if v}
    settings = embedded_settings(**overrides)

    def ready(s: Settings) -> None:
        # The admin token is printed once, to the operator's own terminal, never logged.
        print(json.dumps({"url": f"http://{s.host}:{s.port}", "admin_token":
                          s.admin_token.get_secret_value(), "serve_url": s.serve_url}), flush=True)

    try:
        run_stack(settings, serving=not args.no_serving, serve_port=args.serve_port,
                  num_cpus=args.num_cpus, on_ready=ready)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
