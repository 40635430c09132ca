"""The serving ingress's body read and signature check, driven as raw ASGI (no model, no socket):
a caller that stalls, leaves mid-body or sends a malformed signature gets a problem, never a 500
or a held connection."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from signed_http import KEY

from workers.serve import http as serve_http
from workers.serve.http import create_app
from workers.signing import Signer, Verifier

PATH = "/v1/completions"
BODY = json.dumps({"model": "m", "prompt": "Hi"}).encode()


class NoBackend:
    """Every case here is refused before the backend: reaching it fails the test."""

    def run(self, kind, body):
        raise AssertionError("the backend was reached")


def _scope(headers: dict[str, str], content_length: int) -> dict:
    raw = [(k.encode(), v.encode("latin-1")) for k, v in headers.items()]
    raw.append((b"content-length", str(content_length).encode()))
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
            "scheme": "http", "path": PATH, "raw_path": PATH.encode(), "query_string": b"",
            "root_path": "", "headers": raw, "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2)}


async def _call(headers: dict[str, str], messages: list[dict], *, stall: bool = False,
                timeout: float = 10) -> tuple[int, dict]:
    """(status, JSON body) of the app's answer to a request whose body arrives as ``messages``;
    ``stall``: after them, the client neither sends more nor leaves."""
    app = create_app(NoBackend(), Verifier([KEY]))
    pending = list(messages)
    sent: list[dict] = []

    async def receive() -> dict:
        if pending:
            return pending.pop(0)
        if stall:
            await asyncio.sleep(3600)
        # After the response: what a server reports once the client has gone.
        await asyncio.sleep(0.01)
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    await asyncio.wait_for(app(_scope(headers, len(BODY)), receive, send), timeout)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], json.loads(body)


def _signed() -> dict[str, str]:
    return {"content-type": "application/json",
            **Signer(KEY).headers("POST", PATH, BODY, tenant="tn_a", request_id=f"req_{time.time_ns()}")}


def test_a_body_that_stalls_is_a_408_within_the_read_timeout(monkeypatch):
    monkeypatch.setattr(serve_http, "BODY_READ_TIMEOUT_S", 0.3)
    half = {"type": "http.request", "body": BODY[:5], "more_body": True}
    started = time.monotonic()
    status, body = asyncio.run(_call(_signed(), [half], stall=True, timeout=5))
    assert (status, body["code"]) == (408, "request_timeout")
    assert time.monotonic() - started < 3


def test_a_client_leaving_mid_body_is_not_a_500():
    half = {"type": "http.request", "body": BODY[:5], "more_body": True}
    status, body = asyncio.run(_call(_signed(), [half, {"type": "http.disconnect"}]))
    assert (status, body["code"]) == (400, "client_disconnected")


@pytest.mark.parametrize("signature", ["é" * 64, "\xff" * 64, "not hex at all"],
                         ids=["non-ascii", "latin-1", "not-hex"])
def test_a_malformed_signature_with_a_known_key_is_a_401(signature):
    headers = {**_signed(), "x-lorafleet-signature": signature}
    status, body = asyncio.run(_call(headers, [{"type": "http.request", "body": BODY, "more_body": False}]))
    assert (status, body["code"]) == (401, "invalid_signature")


def test_a_whole_signed_body_reaches_the_backend():
    """The harness itself: the same request, well signed and complete, gets past the checks."""
    with pytest.raises(AssertionError, match="the backend was reached"):
        asyncio.run(_call(_signed(), [{"type": "http.request", "body": BODY, "more_body": False}]))
