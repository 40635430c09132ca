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
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from service.settings import Settings

log = logging.getLogger("lorafleet.embedded")


def _new_secrets() -> dict[str, str]:
    return {"admin_token": "lfadmin-" + secrets.token_urlsafe(24),
            "internal_secret": secrets.token_urlsafe(32),
            "serve_signing_key": secrets.token_urlsafe(32)}


def _persisted_secrets(data_dir: Path) -> dict[str, str]:
    path = data_dir / "secrets.json"
    stored = json.loads(path.read_text()) if path.exists() else {}
    values = _new_secrets() | stored
    if values == stored:
        return stored
    # First run, or a data dir from before a secret existed: add the missing ones, keep the rest.
    data_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(values, f)
    os.replace(tmp, path)
    return values


def embedded_settings(**overrides) -> Settings:
    """Settings from the environment, with the embedded defaults filled in."""
    base = Settings(**overrides)
    data_dir = base.data_dir.resolve()
    stored = _persisted_secrets(data_dir)
    explicit = {k for k in ("admin_token", "internal_secret", "serve_signing_key")
                if f"LORAFLEET_{k.upper()}" in os.environ}
    fill = {k: v for k, v in stored.items() if k not in explicit and k not in overrides}
    return Settings(**{**overrides, "data_dir": data_dir, **fill,
                       "public_url": overrides.get("public_url") or f"http://{base.host}:{base.port}"})


def serving_key_env(settings: Settings) -> dict[str, str]:
    """LORAFLEET_SERVE_SIGNING_KEY[_PREVIOUS], as ``workers.signing`` reads them."""
    from workers.signing import KEY_ENV, PREVIOUS_KEY_ENV

    keys = {KEY_ENV: settings.serve_signing_key, PREVIOUS_KEY_ENV: settings.serve_signing_key_previous}
    return {name: key.get_secret_value() for name, key in keys.items() if key is not None}


def object_store_env(settings: Settings) -> dict[str, str]:
    """The object store's settings as boto3 reads them from a process environment (AWS_*)."""
    if not settings.effective_object_store_url.startswith("s3://"):
        return {}
    env = {"AWS_DEFAULT_REGION": settings.s3_region}
    if settings.s3_access_key_id and settings.s3_secret_access_key:
        env["AWS_ACCESS_KEY_ID"] = settings.s3_access_key_id.get_secret_value()
        env["AWS_SECRET_ACCESS_KEY"] = settings.s3_secret_access_key.get_secret_value()
    if settings.s3_endpoint_url:
        env["AWS_ENDPOINT_URL"] = settings.s3_endpoint_url
    return env


def start_serving(settings: Settings, ray_info: dict, *, port: int) -> tuple[subprocess.Popen, str]:
    """Run the serving application on the local Ray (a driver subprocess that owns it).

    Returns the process (terminate it to undeploy) and the serving URL once it answers.
    """
    from workers.local_ray import auth_env

    cmd = [sys.executable, "-m", "workers.serve.app", "--port", str(port),
           f"base_model_id={settings.default_base_model}",
           f"base_model_uri=builtin://{settings.default_base_model}",
           f"object_store_url={settings.effective_object_store_url}",
           f"quantization={settings.serve_quantization}", "max_replicas=1"]
    # The serving side gets object-store access, the Ray token and the key that checks the
    # control plane's signatures: none of our other secrets. Through the environment, never argv.
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAFLEET_")}
    env |= auth_env(Path(ray_info["token_path"])) | {"RAY_ADDRESS": ray_info["address"]}
    env |= serving_key_env(settings)
    log = open(settings.data_dir / "serving.log", "ab")  # noqa: SIM115 - lives with the process
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"serving did not start; see {settings.data_dir / 'serving.log'}")
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
        # The object store's credentials go into the node's own environment, where its workers
        # (training and serving) read them; never into a Ray Job (see service.launcher.job_env).
        ray_info = start_local_ray(settings.data_dir / "ray", num_cpus=num_cpus, reuse=True,
                                   env=object_store_env(settings))
        updates["ray_address"] = ray_info["dashboard"]
        token = Path(ray_info["token_path"]).read_text().strip()
    serving_proc = None
    if serving and not settings.serve_url:
        if ray_info is None:
            raise RuntimeError("set LORAFLEET_SERVE_URL when using a remote Ray")
        serving_proc, updates["serve_url"] = start_serving(settings, ray_info, port=serve_port)
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
    if threading.current_thread() is threading.main_thread():
        # uvicorn re-raises SIGTERM after its graceful exit; as KeyboardInterrupt it still lets
        # the cleanup below stop the scheduler and the serving app instead of killing us outright.
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.run()  # blocks; handles SIGINT/SIGTERM by exiting
    finally:
        stop.set()
        if sched_thread.is_alive():
            sched_thread.join(10)
        if serving_proc is not None:
            serving_proc.terminate()
            try:
                serving_proc.wait(10)
            except subprocess.TimeoutExpired:  # a Ray driver can ignore SIGTERM mid-shutdown
                serving_proc.kill()
                serving_proc.wait(10)


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


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
