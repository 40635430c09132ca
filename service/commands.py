"""``lorafleet up`` and ``lorafleet demo``: the server package registers these under the
``lorafleet.server`` entry-point group (pyproject.toml), and the SDK's CLI finds them there, so
the SDK never imports this package and can be published alone."""

from __future__ import annotations

import sys
from pathlib import Path

from service.demo import main as demo_main
from service.embedded import embedded_settings, run_stack


def up(*, port: int | None, data_dir: Path | None, serving: bool, serve_port: int,
       num_cpus: int | None) -> None:
    """Run the embedded stack until Ctrl-C, after printing where it is and how to reach it."""
    overrides = {k: v for k, v in {"port": port, "data_dir": data_dir}.items() if v is not None}
    settings = embedded_settings(**overrides)

    def ready(s) -> None:
        url = f"http://{s.host}:{s.port}"
        print(f"LoRA Fleet is up at {url}  (serving: {s.serve_url or 'off'})")
        print(f"Console: {url}/console  (sign in with the admin token below, or a tenant's API key)")
        print(f"export LORAFLEET_BASE_URL={url}")
        print(f"export LORAFLEET_ADMIN_TOKEN={s.admin_token.get_secret_value()}", flush=True)
        print("Ctrl-C stops the API and scheduler.", file=sys.stderr, flush=True)

    run_stack(settings, serving=serving, serve_port=serve_port, num_cpus=num_cpus, on_ready=ready)


def demo() -> int:
    """The scripted demo; its exit code."""
    return demo_main()
