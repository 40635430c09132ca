"""Transport-level behaviour of the SDK over httpx.MockTransport: retries, Retry-After,
idempotency keys, error mapping, cursor pagination, SSE and the jobs.wait loop."""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import subprocess
import sys
import time

import httpx
import pytest

import lorafleet
from lorafleet import _core
from lorafleet.errors import APIConnectionError, APITimeoutError


def problem(status: int, code: str, detail: str, **extra) -> httpx.Response:
    body = {"type": f"https://lorafleet.dev/problems/{code}", "title": "x", "status": status,
            "detail": detail, "code": code, "request_id": "req_123", **extra}
    return httpx.Response(status, json=body, headers={"x-request-id": "req_123",
                                                      "content-type": "application/problem+json"})


@pytest.fixture
def sleeps(monkeypatch) -> list[float]:
    slept: list[float] = []
    monkeypatch.setattr(_core, "sleep", slept.append)

    async def fake_async_sleep(seconds: float) -> None:
        slept.append(seconds)

    monkeypatch.setattr(_core, "async_sleep", fake_async_sleep)
    return slept


def make_client(handler, **kw) -> lorafleet.Client:
    kw.setdefault("api_key", "lf-test")
    return lorafleet.Client(base_url="http://lf.test", http_client=httpx.Client(
        transport=httpx.MockTransport(handler)), **kw)


def make_async_client(handler, **kw) -> lorafleet.AsyncClient:
    kw.setdefault("api_key", "lf-test")
    return lorafleet.AsyncClient(base_url="http://lf.test", http_client=httpx.AsyncClient(
        transport=httpx.MockTransport(handler)), **kw)


JOB = {"id": "ftjob-1", "object": "fine_tuning.job", "model": "lorafleet/tiny-llama",
       "status": "queued", "created_at": 1, "error": None}


# --------------------------------------------------------------------------- retries


def test_retries_5xx_then_succeeds_reusing_one_idempotency_key(sleeps):
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if len(seen) < 3:
            return problem(503, "service_unavailable", "busy")
        return httpx.Response(201, json=JOB)

    client = make_client(handler, max_retries=2)
    job = client.fine_tuning.jobs.create(model="lorafleet/tiny-llama", training_file="file-1")
    assert job.id == "ftjob-1" and job.status == "queued"
    keys = {r.headers["idempotency-key"] for r in seen}
    assert len(seen) == 3 and len(keys) == 1 and next(iter(keys)).startswith("lf-")
    assert all(r.headers["authorization"] == "Bearer lf-test" for r in seen)
    assert len(sleeps) == 2 and all(0 <= s <= _core.MAX_BACKOFF_S for s in sleeps)
    # the body is the same on each retry, so the server can replay it
    assert len({r.content for r in seen}) == 1
    assert json.loads(seen[0].content)["method"] == {"type": "lora", "lora": {"hyperparameters": {}}}


def test_each_logical_post_gets_its_own_key_and_explicit_key_is_used(sleeps):
    keys: list[str] = []

    def handler(request):
        keys.append(request.headers["idempotency-key"])
        return httpx.Response(201, json=JOB)

    client = make_client(handler)
    client.fine_tuning.jobs.create(model="m", training_file="f")
    client.fine_tuning.jobs.create(model="m", training_file="f")
    client.fine_tuning.jobs.create(model="m", training_file="f", idempotency_key="mine")
    assert keys[0] != keys[1] and keys[2] == "mine"


def test_gives_up_after_max_retries_and_raises_typed_error(sleeps):
    calls = []

    def handler(request):
        calls.append(1)
        return problem(500, "internal_error", "boom")

    with pytest.raises(lorafleet.InternalServerError) as info:
        make_client(handler, max_retries=3).files.retrieve("file-1")
    assert len(calls) == 4 and len(sleeps) == 3
    assert info.value.status_code == 500 and info.value.code == "internal_error"


@pytest.mark.parametrize("status", [408, 409, 429, 502])
def test_retryable_statuses(sleeps, status):
    calls = []

    def handler(request):
        calls.append(1)
        if len(calls) == 1:
            return problem(status, "conflict" if status == 409 else "x", "try again")
        return httpx.Response(200, json={**JOB, "status": "running"})

    assert make_client(handler).fine_tuning.jobs.retrieve("ftjob-1").status == "running"
    assert len(calls) == 2


@pytest.mark.parametrize("status,code", [(400, "bad_request"), (404, "not_found"),
                                         (409, "invalid_transition"), (422, "validation_error")])
def test_permanent_errors_are_not_retried(sleeps, status, code):
    calls = []

    def handler(request):
        calls.append(1)
        return problem(status, code, "no")

    with pytest.raises(lorafleet.APIStatusError) as info:
        make_client(handler).fine_tuning.jobs.cancel("ftjob-1")
    assert len(calls) == 1 and sleeps == [] and info.value.code == code


def test_retry_after_seconds_is_honoured_and_capped(sleeps):
    answers = iter([
        httpx.Response(429, json={"code": "rate_limited", "detail": "slow"}, headers={"Retry-After": "7"}),
        httpx.Response(429, json={"code": "rate_limited", "detail": "slow"}, headers={"Retry-After": "99999"}),
        httpx.Response(200, json={**JOB}),
    ])
    make_client(lambda r: next(answers), max_retries=2).fine_tuning.jobs.retrieve("ftjob-1")
    assert sleeps == [7.0, _core.MAX_RETRY_AFTER_S]


def test_retry_after_http_date(sleeps):
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    answers = iter([httpx.Response(503, text="down", headers={"Retry-After": when}),
                    httpx.Response(200, json=JOB)])
    make_client(lambda r: next(answers)).fine_tuning.jobs.retrieve("ftjob-1")
    assert len(sleeps) == 1 and 25 <= sleeps[0] <= 30


def test_parse_retry_after():
    now = 1_700_000_000.0
    assert _core.parse_retry_after("3", now=now) == 3.0
    assert _core.parse_retry_after(email.utils.formatdate(now + 12, usegmt=True), now=now) == 12.0
    assert _core.parse_retry_after(email.utils.formatdate(now - 100, usegmt=True), now=now) == 0.0
    assert _core.parse_retry_after("soon", now=now) is None
    assert _core.parse_retry_after(None) is None


def test_backoff_is_exponential_with_full_jitter(monkeypatch):
    monkeypatch.setattr(_core.random, "uniform", lambda lo, hi: hi)
    caps = [_core.backoff_delay(a) for a in range(8)]
    assert caps[:4] == [0.5, 1.0, 2.0, 4.0] and caps[-1] == _core.MAX_BACKOFF_S
    monkeypatch.setattr(_core.random, "uniform", lambda lo, hi: lo)
    assert _core.backoff_delay(5) == 0


def test_connection_errors_are_retried_then_raised(sleeps):
    calls = []

    def handler(request):
        calls.append(1)
        raise httpx.ConnectError("refused", request=request)

    with pytest.raises(APIConnectionError) as info:
        make_client(handler, max_retries=2).models.list()
    assert len(calls) == 3 and "lf.test" in str(info.value)
    assert not isinstance(info.value, APITimeoutError)


def test_timeout_maps_to_api_timeout_error(sleeps):
    def handler(request):
        raise httpx.ReadTimeout("slow", request=request)

    with pytest.raises(APITimeoutError):
        make_client(handler, max_retries=1).models.list()
    assert len(sleeps) == 1


def test_default_timeout_and_env_configuration(monkeypatch):
    monkeypatch.setenv("LORAFLEET_BASE_URL", "http://env.example:9000/v1/")
    monkeypatch.setenv("LORAFLEET_API_KEY", "lf-env")
    monkeypatch.setenv("LORAFLEET_ADMIN_TOKEN", "adm")
    client = lorafleet.Client()
    assert client.base_url == "http://env.example:9000"
    assert client._core.api_key == "lf-env" and client._core.admin_token == "adm"
    assert client._core.timeout.read == 60 and client._core.timeout.connect == 5
    assert lorafleet.Client(base_url="http://x", api_key="k").base_url == "http://x"


def test_missing_api_key_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("LORAFLEET_API_KEY", raising=False)
    client = make_client(lambda r: httpx.Response(200, json={}), api_key=None)
    with pytest.raises(lorafleet.LoraFleetError, match="LORAFLEET_API_KEY"):
        client.files.list()


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("status,cls", [
    (400, lorafleet.BadRequestError), (401, lorafleet.AuthenticationError),
    (403, lorafleet.PermissionDeniedError), (404, lorafleet.NotFoundError),
    (409, lorafleet.ConflictError), (413, lorafleet.PayloadTooLargeError),
    (422, lorafleet.UnprocessableEntityError), (429, lorafleet.RateLimitError),
    (500, lorafleet.InternalServerError), (504, lorafleet.InternalServerError),
])
def test_error_class_per_status(sleeps, status, cls):
    client = make_client(lambda r: problem(status, "some_code", "went wrong", param="p"), max_retries=0)
    with pytest.raises(cls) as info:
        client.files.retrieve("file-x")
    err = info.value
    assert err.status_code == status and err.code == "some_code" and err.message == "went wrong"
    assert err.param == "p" and err.request_id == "req_123"


def test_dataset_errors_are_carried(sleeps):
    def handler(request):
        assert b'name="purpose"' in request.content and b'{"text": "hi"}' in request.content
        return problem(422, "invalid_training_file", "2 lines are invalid", param="file",
                       errors=[{"line": 2, "reason": "not valid JSON"}, {"line": 5, "reason": "no text"}])

    with pytest.raises(lorafleet.UnprocessableEntityError) as info:
        make_client(handler).files.create(b'{"text": "hi"}\n', filename="d.jsonl")
    assert info.value.errors == [{"line": 2, "reason": "not valid JSON"}, {"line": 5, "reason": "no text"}]
    assert info.value.code == "invalid_training_file" and info.value.param == "file"


def test_openai_style_error_body_and_non_json_body(sleeps):
    body = {"error": {"message": "bad model", "code": "model_not_found", "param": "model"}}
    client = make_client(lambda r: httpx.Response(404, json=body), max_retries=0)
    with pytest.raises(lorafleet.NotFoundError) as info:
        client.models.retrieve("nope")
    assert (info.value.code, info.value.message, info.value.param) == ("model_not_found", "bad model", "model")
    client = make_client(lambda r: httpx.Response(502, text="Bad Gateway"), max_retries=0)
    with pytest.raises(lorafleet.InternalServerError, match="Bad Gateway"):
        client.models.list()


def test_admin_calls_use_admin_token(sleeps):
    seen = []

    def handler(request):
        seen.append(request)
        return httpx.Response(201, json={"id": "tn_1", "name": "acme", "status": "active"})

    client = make_client(handler, api_key=None, admin_token="root")
    tenant = client.admin.tenants.create("acme", max_concurrent_jobs=1)
    assert tenant.id == "tn_1" and seen[0].headers["authorization"] == "Bearer root"
    assert seen[0].url.path == "/v1/admin/tenants"
    assert json.loads(seen[0].content) == {"name": "acme", "max_concurrent_jobs": 1}


# --------------------------------------------------------------------------- pagination


def paged_handler(total: int, seen: list):
    items = [{**JOB, "id": f"ftjob-{i}"} for i in range(total)]

    def handler(request):
        seen.append(dict(request.url.params))
        limit = int(request.url.params.get("limit", 2))
        after = request.url.params.get("after")
        start = 0 if after is None else next(i for i, x in enumerate(items) if x["id"] == after) + 1
        chunk = items[start:start + limit]
        return httpx.Response(200, json={"object": "list", "data": chunk,
                                         "has_more": start + limit < total,
                                         "first_id": chunk[0]["id"] if chunk else None,
                                         "last_id": chunk[-1]["id"] if chunk else None})
    return handler


def test_sync_pages_iterate_across_cursors():
    seen: list = []
    page = make_client(paged_handler(5, seen)).fine_tuning.jobs.list(limit=2, status="queued")
    assert [j.id for j in page.data] == ["ftjob-0", "ftjob-1"] and page.has_more
    ids = [job.id for job in page]
    assert ids == [f"ftjob-{i}" for i in range(5)]
    assert [p.get("after") for p in seen] == [None, "ftjob-1", "ftjob-3"]
    assert all(p["status"] == "queued" and p["limit"] == "2" for p in seen)
    assert isinstance(page.data[0], lorafleet.types.FineTuningJob)


def test_async_pages_iterate_and_await():
    seen: list = []

    async def main():
        client = make_async_client(paged_handler(3, seen))
        ids = [job.id async for job in client.fine_tuning.jobs.list(limit=2)]
        first = await client.fine_tuning.jobs.list(limit=2)
        second = await first.next_page()
        await client.close()
        return ids, first, second

    ids, first, second = asyncio.run(main())
    assert ids == ["ftjob-0", "ftjob-1", "ftjob-2"]
    assert [j.id for j in first.data] == ["ftjob-0", "ftjob-1"] and first.has_more
    assert [j.id for j in second.data] == ["ftjob-2"] and not second.has_more


def test_async_retries_share_the_same_logic(sleeps):
    seen = []

    def handler(request):
        seen.append(request.headers["idempotency-key"])
        if len(seen) == 1:
            return httpx.Response(429, json={"code": "rate_limited"}, headers={"Retry-After": "2"})
        return httpx.Response(201, json={"id": "file-1", "filename": "d.jsonl", "bytes": 3})

    async def main():
        async with make_async_client(handler) as client:
            return await client.files.create(("d.jsonl", b"abc"))

    assert asyncio.run(main()).id == "file-1"
    assert len(seen) == 2 and seen[0] == seen[1] and sleeps == [2.0]


# --------------------------------------------------------------------------- SSE


SSE_BODY = (
    b": keep-alive\n\n"
    b'data: {"id":"c1","object":"chat.completion.chunk","model":"m","choices":[{"index":0,"delta":{"role":"assistant"}}]}\n\n'
    b'data: {"id":"c1","object":"chat.completion.chunk","model":"m",\n'
    b'data: "choices":[{"index":0,"delta":{"content":"Ahoy"}}]}\n\n'
    b'data: {"id":"c1","object":"chat.completion.chunk","model":"m","choices":[{"index":0,"delta":{"content":" matey"},"finish_reason":"stop"}]}\n\n'
    b"data: [DONE]\n\n"
    b'data: {"id":"after-done","model":"m","choices":[]}\n\n'
)


def sse_handler(request):
    assert json.loads(request.content)["stream"] is True
    return httpx.Response(200, content=SSE_BODY, headers={"content-type": "text/event-stream"})


def test_sse_stream_sync():
    stream = make_client(sse_handler).chat.completions.create(
        model="ft-x", messages=[{"role": "user", "content": "hi"}], stream=True)
    chunks = list(stream)
    assert [c.choices[0].delta.content for c in chunks] == [None, "Ahoy", " matey"]
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert stream.response.is_closed


def test_sse_stream_async():
    async def main():
        client = make_async_client(sse_handler)
        stream = await client.chat.completions.create(
            model="ft-x", messages=[{"role": "user", "content": "hi"}], stream=True)
        return [c.choices[0].delta.content async for c in stream]

    assert asyncio.run(main()) == [None, "Ahoy", " matey"]


def test_sse_error_event_raises():
    body = b'data: {"error": {"message": "adapter failed to load"}}\n\n'
    client = make_client(lambda r: httpx.Response(200, content=body))
    with pytest.raises(lorafleet.APIError, match="adapter failed to load"):
        list(client.completions.create(model="m", prompt="p", stream=True))


def test_stream_error_status_is_raised_before_iterating(sleeps):
    client = make_client(lambda r: problem(404, "model_not_found", "unknown model"), max_retries=0)
    with pytest.raises(lorafleet.NotFoundError, match="unknown model"):
        client.completions.create(model="ft-other", prompt="p", stream=True)


def test_sse_decoder_fields():
    dec = lorafleet._streaming.SSEDecoder()
    assert dec.feed("event: ping") is None and dec.feed("id: 7") is None
    assert dec.feed("data: a") is None and dec.feed("data:b") is None
    sse = dec.feed("")
    assert (sse.event, sse.id, sse.data) == ("ping", "7", "a\nb")
    assert dec.feed("") is None


# --------------------------------------------------------------------------- jobs.wait


def wait_handler(final_status: str, error=None):
    """A job that runs for two polls, with metrics events appearing in between."""
    events = [
        {"id": "ev-1", "type": "status", "message": "running", "level": "info"},
        {"id": "ev-2", "type": "metrics", "message": "step", "data": {"step": 1, "total_steps": 4, "train_loss": 2.5}},
        {"id": "ev-3", "type": "metrics", "message": "step", "data": {"step": 4, "total_steps": 4, "train_loss": 1.25, "eta_s": 0}},
        {"id": "ev-4", "type": "status", "message": final_status, "level": "info"},
    ]
    state = {"polls": 0, "event_queries": []}

    def handler(request):
        path = request.url.path
        if path.endswith("/events"):
            params = request.url.params
            state["event_queries"].append((params.get("order"), params.get("after")))
            visible = events[: min(len(events), 2 * state["polls"])]
            after = params.get("after")
            start = 0 if after is None else [e["id"] for e in visible].index(after) + 1
            chunk = visible[start:start + 1]  # one per page: exercises has_more
            return httpx.Response(200, json={"object": "list", "data": chunk,
                                             "has_more": start + 1 < len(visible)})
        state["polls"] += 1
        status = final_status if state["polls"] >= 2 else "running"
        return httpx.Response(200, json={**JOB, "status": status,
                                         "error": error if status == "failed" else None,
                                         "fine_tuned_model": "ft-a" if status == "succeeded" else None})
    return handler, state


def test_wait_follows_events_to_success(sleeps, capsys, monkeypatch):
    monkeypatch.setattr(lorafleet._progress, "make_progress", lorafleet._progress.PlainProgress)
    monkeypatch.setattr(lorafleet.resources.fine_tuning, "make_progress", lorafleet._progress.PlainProgress)
    handler, state = wait_handler("succeeded")
    seen = []
    job = make_client(handler).fine_tuning.jobs.wait("ftjob-1", poll_interval=0.25, on_event=seen.append)
    assert job.status == "succeeded" and job.fine_tuned_model == "ft-a"
    assert [e.id for e in seen] == ["ev-1", "ev-2", "ev-3", "ev-4"]
    assert all(order == "asc" for order, _ in state["event_queries"])
    assert [a for _, a in state["event_queries"]][:3] == [None, "ev-1", "ev-2"]
    assert sleeps == [0.25]
    err = capsys.readouterr().err
    assert "step 1/4  loss 2.5000" in err and "step 4/4  loss 1.2500  eta 00:00" in err
    assert "status succeeded" in err


def test_wait_raises_job_failed_with_error(sleeps):
    handler, _ = wait_handler("failed", {"code": "training_diverged", "message": "loss is NaN", "param": None})
    with pytest.raises(lorafleet.JobFailedError) as info:
        make_client(handler).fine_tuning.jobs.wait("ftjob-1", progress=False)
    assert info.value.code == "training_diverged" and info.value.message == "loss is NaN"
    assert info.value.job.id == "ftjob-1"


def test_wait_raises_cancelled_and_timeout(sleeps):
    handler, _ = wait_handler("cancelled")
    with pytest.raises(lorafleet.JobCancelledError):
        make_client(handler).fine_tuning.jobs.wait("ftjob-1", progress=False)
    handler, _ = wait_handler("succeeded")
    with pytest.raises(lorafleet.WaitTimeoutError):
        make_client(handler).fine_tuning.jobs.wait("ftjob-1", progress=False, timeout=0)


def test_wait_async(sleeps):
    handler, _ = wait_handler("succeeded")

    async def main():
        return await make_async_client(handler).fine_tuning.jobs.wait("ftjob-1", progress=False)

    assert asyncio.run(main()).status == "succeeded"


# --------------------------------------------------------------------------- adapter download


def adapter_handler(files: dict[str, bytes], corrupt: str | None = None):
    listing = [{"name": n, "bytes": len(b), "sha256": hashlib.sha256(b).hexdigest()} for n, b in files.items()]

    def handler(request):
        path = request.url.path
        if path == "/v1/adapters/ft-a":
            return httpx.Response(200, json={"id": "ft-a", "object": "adapter", "files": listing})
        name = path.rsplit("/", 1)[1]
        body = files[name]
        return httpx.Response(200, content=body + b"!" if name == corrupt else body)
    return handler


def test_adapter_download_verifies_sha256(tmp_path):
    files = {"adapter_config.json": b'{"r": 8}', "adapter_model.safetensors": b"\x00" * 64,
             "manifest.json": b"{}"}
    out = make_client(adapter_handler(files)).adapters.download("ft-a", tmp_path / "a")
    assert sorted(p.name for p in out.iterdir()) == sorted(files)
    assert (out / "adapter_model.safetensors").read_bytes() == files["adapter_model.safetensors"]
    with pytest.raises(lorafleet.IntegrityError, match="adapter_model.safetensors"):
        make_client(adapter_handler(files, corrupt="adapter_model.safetensors")).adapters.download(
            "ft-a", tmp_path / "b")
    assert not (tmp_path / "b").exists()  # nothing written when any file is wrong


def test_adapter_download_rejects_path_traversal(tmp_path):
    def handler(request):
        return httpx.Response(200, json={"id": "ft-a", "files": [{"name": "../evil", "bytes": 1, "sha256": "x"}]})

    with pytest.raises(lorafleet.IntegrityError, match="unsafe"):
        make_client(handler).adapters.download("ft-a", tmp_path / "a")
    assert not (tmp_path / "evil").exists()


def test_sdk_works_without_rich_or_typer():
    code = ("import sys\nsys.modules['rich'] = sys.modules['typer'] = None\n"
            "import lorafleet, lorafleet._progress as p\n"
            "assert type(p.make_progress('ftjob-1')) is p.PlainProgress")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_interrupt_closes_the_call(monkeypatch):
    """Ctrl-C inside jobs.wait still stops the progress display (the call's finally runs)."""
    closed = []
    monkeypatch.setattr(lorafleet.resources.fine_tuning, "make_progress",
                        lambda job_id: type("P", (lorafleet._progress.PlainProgress,), {
                            "close": lambda self: closed.append(job_id)})(job_id))

    def handler(request):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        make_client(handler).fine_tuning.jobs.wait("ftjob-1")
    assert closed == ["ftjob-1"]
