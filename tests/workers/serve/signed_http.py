"""Calling the serving app as the control plane does: every request signed (workers.signing)."""

from __future__ import annotations

import uuid

import httpx
import openai

from workers.signing import Signer

KEY, PREVIOUS_KEY = "test-serve-signing-key", "test-serve-signing-key-before-rotation"


def sign_requests(signer: Signer, tenant: str = "tn_a"):
    """An httpx request hook that signs each request with a fresh request id."""

    def hook(request: httpx.Request) -> None:
        body = request.read()
        path = request.url.path + (f"?{request.url.query.decode()}" if request.url.query else "")
        request.headers.update(signer.headers(request.method, path, body, tenant=tenant,
                                              request_id=f"req_{uuid.uuid4().hex[:16]}"))

    return hook


def signed_http(base_url: str, key: str = KEY, **kw) -> httpx.Client:
    return httpx.Client(base_url=base_url, event_hooks={"request": [sign_requests(Signer(key))]}, **kw)


def signed_openai(base_url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused-here", max_retries=0,
                         http_client=signed_http(base_url, key, timeout=60))
