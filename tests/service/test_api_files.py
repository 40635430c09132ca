"""Files: every dataset format accepted; every kind of bad upload refused with nothing left behind."""

from __future__ import annotations

import json
import socket

import pytest
from api_helpers import CHAT_LINE, assert_problem, make_settings, new_tenant, upload
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from service.db.models import File
from service.main import create_app

GOOD = {
    "chat": CHAT_LINE * 2,
    "completion": b'{"prompt": "2+2=", "completion": "4"}\n',
    "alpaca": b'{"instruction": "Translate", "input": "hola", "output": "hello"}\n',
    "text": b'{"text": "Once upon a time"}\n\n{"text": "the end"}\n',
}


def _leftovers(app, tenant_id: str) -> tuple[int, list[str]]:
    with app.state.session_factory() as s:
        rows = s.scalar(select(func.count()).select_from(File).where(File.tenant_id == tenant_id))
    return rows, app.state.store.list(f"tenants/{tenant_id}/")


@pytest.mark.parametrize("fmt", sorted(GOOD))
def test_each_format_is_accepted_and_stored(client, app, tenant, fmt):
    r = upload(client, tenant, GOOD[fmt])
    assert r.status_code == 201, r.text
    f = r.json()
    assert (f["format"], f["status"], f["purpose"]) == (fmt, "processed", "fine-tune")
    assert f["examples"] == GOOD[fmt].count(b"\n{") + 1 and f["bytes"] == len(GOOD[fmt])
    content = client.get(f"/v1/files/{f['id']}/content", headers=tenant.headers)
    assert content.content == GOOD[fmt]
    assert client.get(f"/v1/files/{f['id']}", headers=tenant.headers).json() == f


BAD = {
    "non_json_line": (CHAT_LINE + b"{not json\n" + CHAT_LINE + b"[1, 2]\n", [2, 4]),
    "no_assistant_turn": (b'{"messages": [{"role": "user", "content": "hi"}]}\n' + CHAT_LINE, [1]),
    "empty_file": (b"", [0]),
    "blank_lines_only": (b"\n\n  \n", [0]),
    "mixed_formats": (CHAT_LINE + GOOD["completion"], [2]),
    "not_utf8": (CHAT_LINE + b'{"text": "\xff\xfe"}\n', [2]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_invalid_files_list_every_bad_line_and_leave_nothing(client, app, case):
    t = new_tenant(client)
    data, lines = BAD[case]
    body = assert_problem(upload(client, t, data), 422, "invalid_training_file", "file")
    assert [e["line"] for e in body["errors"]] == lines
    assert all(e["reason"] for e in body["errors"])
    assert _leftovers(app, t.id) == (0, [])


def test_upload_over_the_limit_is_413_and_leaves_nothing(client, app, api_settings):
    t = new_tenant(client)
    big = CHAT_LINE * (api_settings.max_upload_bytes // len(CHAT_LINE) + 10)
    assert_problem(upload(client, t, big), 413, "payload_too_large", "file")
    assert _leftovers(app, t.id) == (0, [])


def test_declared_length_over_the_limit_is_refused_before_reading(client, tenant, api_settings):
    """Content-Length alone decides: the body sent is tiny, yet the answer is 413."""
    r = client.post("/v1/files", content=b"x", headers={
        **tenant.headers, "Content-Type": "multipart/form-data; boundary=b",
        "Content-Length": str(api_settings.max_upload_bytes * 4)})
    assert_problem(r, 413, "payload_too_large")


def test_chunked_upload_is_answered_413_before_it_is_all_sent(client, app, live_url):
    """No Content-Length, so only counting while streaming can stop it. A raw socket sends part
    of the body and then reads: the 413 arrives while the rest was never sent."""
    t = new_tenant(client)
    host, port = live_url.removeprefix("http://").split(":")
    part = (b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
            b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n'
            + CHAT_LINE * 4000)  # ~4x the limit; the full body would be 100x
    head = (f"POST /v1/files HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {t.key}\r\n"
            "Content-Type: multipart/form-data; boundary=b\r\nTransfer-Encoding: chunked\r\n\r\n")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head.encode() + f"{len(part):x}\r\n".encode() + part + b"\r\n")
        reply = sock.recv(65536)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert b'"payload_too_large"' in reply
    assert _leftovers(app, t.id) == (0, [])


def test_malformed_requests(client, tenant):
    assert_problem(client.post("/v1/files", json={"file": "x"}, headers=tenant.headers), 400, "bad_request")
    r = client.post("/v1/files", files={"file": ("a.jsonl", CHAT_LINE)}, data={"purpose": "batch"},
                    headers=tenant.headers)
    assert_problem(r, 422, "validation_error", "purpose")
    r = client.post("/v1/files", data={"purpose": "fine-tune"}, files={"other": ("a", b"x")},
                    headers=tenant.headers)
    assert_problem(r, 422, "validation_error", "file")


def test_list_with_cursor_and_delete(client, app):
    t = new_tenant(client)
    ids = [upload(client, t).json()["id"] for _ in range(3)]
    page = client.get("/v1/files?limit=2", headers=t.headers).json()
    assert [f["id"] for f in page["data"]] == ids[::-1][:2] and page["has_more"]
    rest = client.get(f"/v1/files?limit=2&after={page['last_id']}", headers=t.headers).json()
    assert [f["id"] for f in rest["data"]] == [ids[0]] and not rest["has_more"]

    r = client.delete(f"/v1/files/{ids[0]}", headers=t.headers)
    assert r.json() == {"id": ids[0], "object": "file", "deleted": True}
    assert_problem(client.get(f"/v1/files/{ids[0]}", headers=t.headers), 404, "not_found")
    assert len(app.state.store.list(f"tenants/{t.id}/files/")) == 2


def test_upload_streams_to_the_s3_endpoint(s3_store, s3_credentials, tmp_path):
    """The same upload path against a real S3-compatible HTTP endpoint (moto server)."""
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 's3.db'}",
                             object_store_url=s3_store.url, s3_endpoint_url=s3_credentials["endpoint_url"],
                             s3_access_key_id="test", s3_secret_access_key="test")
    with TestClient(create_app(settings)) as c:
        t = new_tenant(c)
        f = upload(c, t, GOOD["alpaca"]).json()
        key = f"tenants/{t.id}/files/{f['id']}.jsonl"
        assert s3_store.list(f"tenants/{t.id}/") == [key]
        assert c.get(f"/v1/files/{f['id']}/content", headers=t.headers).content == GOOD["alpaca"]
        assert c.get("/readyz").json()["checks"]["object_store"] == "ok"

        bad = CHAT_LINE + b"nope\n"
        body = assert_problem(upload(c, t, bad), 422, "invalid_training_file")
        assert body["errors"][0]["line"] == 2
        assert s3_store.list(f"tenants/{t.id}/") == [key]  # nothing added

        c.delete(f"/v1/files/{f['id']}", headers=t.headers)
        assert s3_store.list(f"tenants/{t.id}/") == []
        assert json.loads(c.get(f"/v1/files/{f['id']}", headers=t.headers).text)["code"] == "not_found"
