"""The API's uvicorn flags: whose X-Forwarded-For it believes (api.forwardedAllowIps), and the
same header-size and keep-alive bounds as ``service.main.run()``.

Without --forwarded-allow-ips, uvicorn believes only 127.0.0.1, so every request through the
Ingress has the controller's address and all clients share one failed-authentication budget.
"""

from __future__ import annotations

import asyncio
import inspect
import re

from chart_helpers import FULLNAME, pod, render, values_error
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

import service.main
from service.api.auth import client_address

API = f"Deployment/{FULLNAME}-api"


def _command(values: dict | None = None) -> list[str]:
    container = next(c for c in pod(render(values), API).spec["containers"] if c["name"] == "api")
    return container["command"]


def _flag(command: list[str], name: str) -> str:
    assert command.count(name) == 1, command
    return command[command.index(name) + 1]


def test_forwarded_allow_ips_comes_from_values():
    command = _command()
    assert "--proxy-headers" in command
    assert _flag(command, "--forwarded-allow-ips") == "127.0.0.1"  # uvicorn's own default, said aloud
    command = _command({"api": {"forwardedAllowIps": "10.42.0.0/16,fd00::/8"}})
    assert _flag(command, "--forwarded-allow-ips") == "10.42.0.0/16,fd00::/8"


def test_header_and_keep_alive_bounds_match_service_main_run():
    source = inspect.getsource(service.main.run)
    size = eval(re.search(r"h11_max_incomplete_event_size=([0-9* ]+)", source).group(1))  # noqa: S307 - our own literal
    keep_alive = re.search(r"timeout_keep_alive=([0-9]+)", source).group(1)
    command = _command()
    assert _flag(command, "--h11-max-incomplete-event-size") == str(size) == "65536"
    assert _flag(command, "--timeout-keep-alive") == keep_alive == "5"


def test_the_installed_uvicorn_takes_a_network_from_the_chart():
    """A CIDR is a trusted network to uvicorn (not a literal host name): a request from the
    ingress pod's network is seen from its real client, one from elsewhere is not believed."""
    trusted = _flag(_command({"api": {"forwardedAllowIps": "10.42.0.0/16"}}), "--forwarded-allow-ips")
    seen: list[str] = []

    async def app(scope, receive, send):
        seen.append(client_address(scope))

    middleware = ProxyHeadersMiddleware(app, trusted_hosts=trusted)
    for peer in ("10.42.7.9", "192.0.2.1"):
        scope = {"type": "http", "scheme": "http", "client": (peer, 5000),
                 "headers": [(b"x-forwarded-for", b"203.0.113.5")]}
        asyncio.run(middleware(scope, None, None))
    assert seen == ["203.0.113.5", "192.0.2.1"]


def test_a_value_that_is_no_address_list_is_refused():
    for bad in ("ingress.example.com", "10.0.0.0/8 ", "", "10.0.0.0/8;rm"):
        assert "forwardedAllowIps" in values_error({"api": {"forwardedAllowIps": bad}}), bad
