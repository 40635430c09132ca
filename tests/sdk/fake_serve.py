"""Stand-in for the serving application behind the control plane's inference proxy: it answers
with the routing the control plane attached, so tests see which adapter a request reached.

Like the real one, it answers only requests the control plane signed (workers.signing; the key
comes from LORAFLEET_SERVE_SIGNING_KEY, which tests/sdk/live_stack.py gives the API too)."""

from __future__ import annotations

import json

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse

from workers.signing import SignatureError, Verifier

app = FastAPI()
verifier = Verifier.from_env()


async def _signed_body(request: Request) -> dict:
    try:
        claims = verifier.check_headers(request.headers)
        raw = await request.body()
        verifier.verify(claims, request.method, request.url.path, raw)
    except SignatureError as exc:
        raise HTTPException(401, f"invalid_signature: {exc.reason}") from None
    return json.loads(raw)


@app.get("/healthz")
def healthz() -> dict:
    return {"ok": True}


# Its "adapter cache": the adapters it has answered for (the first request for one is a miss),
# reported by GET /internal/v1/stats in the real serving app's shape (the admin view reads it).
_seen: set[str] = set()
_cache = {"hits": 0, "misses": 0, "evictions": 0, "adapters": 0, "bytes": 0, "max_adapters": None, "max_bytes": None}


def _answer(body: dict) -> list[str]:
    adapter = (body.get("lorafleet") or {}).get("adapter")
    if adapter:
        _cache["hits" if adapter["id"] in _seen else "misses"] += 1
        _seen.add(adapter["id"])
        _cache["adapters"] = len(_seen)
    return ["Ahoy", " from ", adapter["id"] if adapter else "base"]


@app.get("/internal/v1/stats")
async def stats(request: Request) -> dict:
    try:
        verifier.verify(verifier.check_headers(request.headers), "GET", request.url.path, b"")
    except SignatureError as exc:
        raise HTTPException(401, f"invalid_signature: {exc.reason}") from None
    return {"base_model_id": "lorafleet/tiny-llama", "engine": {}, "adapters": {"host": dict(_cache)}}


@app.post("/v1/chat/completions")
async def chat(request: Request):
    body = await _signed_body(request)
    words, model = _answer(body), body["model"]
    if not body.get("stream"):
        return JSONResponse({"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": model,
                             "choices": [{"index": 0, "finish_reason": "stop",
                                          "message": {"role": "assistant", "content": "".join(words)}}],
                             "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}})

    def events():
        for word in words:
            chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": model,
                     "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}]}
            yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


@app.post("/v1/completions")
async def completions(request: Request):
    body = await _signed_body(request)
    words, model = _answer(body), body["model"]
    if not body.get("stream"):
        return JSONResponse({"id": "cmpl-1", "object": "text_completion", "created": 1, "model": model,
                             "choices": [{"index": 0, "text": "".join(words), "finish_reason": "stop"}]})

    def events():
        for word in words:
            chunk = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": model,
                     "choices": [{"index": 0, "text": word, "finish_reason": None}]}
            yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")
