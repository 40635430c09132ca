"""Files: every dataset format accepted; every kind of bad upload refused with nothing left behind."""

from __future__ import annotations

import io
import json
import logging
import socket
import time
import tracemalloc

import httpx
import pytest
from api_helpers import CHAT_LINE, assert_problem, make_settings, new_tenant, upload
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from service.db.models import File
from service.files.upload import _bounded_lines, clean_filename
from service.main import create_app
from workers.spec import iter_examples, validate_jsonl

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
    assert_problem(r, 422, "validation_error", "other")  # unknown fields are refused, as in JSON bodies
    only_purpose = b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n--b--\r\n'
    r = client.post("/v1/files", content=only_purpose,
                    headers={**tenant.headers, "Content-Type": "multipart/form-data; boundary=b"})
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


# --- bounded input (issue 10) ---------------------------------------------------------------

@pytest.fixture(scope="module")
def roomy(tmp_path_factory):
    """An app with room for long lines (1 MiB uploads, 256 KiB per line), on SQLite."""
    path = tmp_path_factory.mktemp("roomy")
    settings = make_settings(path, f"sqlite:///{path / 'api.db'}", max_dataset_line_bytes=256 * 1024
                             ).model_copy(update={"max_upload_bytes": 1024 * 1024})
    with TestClient(create_app(settings)) as c:
        yield c


def test_bom_and_crlf_are_accepted_and_train(client, app, tenant):
    data = b"\xef\xbb\xbf" + CHAT_LINE.replace(b"\n", b"\r\n") * 3
    f = upload(client, tenant, data).json()
    assert (f["format"], f["examples"], f["bytes"]) == ("chat", 3, len(data))
    stored = client.get(f"/v1/files/{f['id']}/content", headers=tenant.headers).content
    assert stored == data  # kept as sent
    assert [fmt for fmt, _ in iter_examples(io.BytesIO(stored))] == ["chat"] * 3  # the trainer reads it


def test_a_line_over_the_cap_is_422_naming_it(roomy):
    t = new_tenant(roomy)
    long_line = b'{"text": "' + b"x" * 300 * 1024 + b'"}\n'
    body = assert_problem(upload(roomy, t, CHAT_LINE + long_line + CHAT_LINE), 422, "invalid_training_file", "file")
    assert [e["line"] for e in body["errors"]] == [2]
    assert "longer than 262144 bytes" in body["errors"][0]["reason"]
    assert _leftovers(roomy.app, t.id) == (0, [])


def test_a_deeply_nested_line_is_422_naming_it(roomy):
    t = new_tenant(roomy)
    deep = b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n"
    body = assert_problem(upload(roomy, t, CHAT_LINE * 2 + deep), 422, "invalid_training_file", "file")
    assert body["errors"] == [{"line": 3, "reason": "JSON nested too deeply"}]


def test_a_long_line_is_never_held_in_full():
    """The validator sees at most cap + 1 bytes of a 20 MB line (tracemalloc peak)."""
    cap = 64 * 1024
    data = io.BytesIO(CHAT_LINE + b'{"text": "' + b"y" * 20 * 1024 * 1024 + b'"}\n' + CHAT_LINE)
    tracemalloc.start()
    try:
        report = validate_jsonl(_bounded_lines(data, cap), max_line_bytes=cap)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [e.line for e in report.errors] == [2] and report.examples == 2
    assert peak < 4 * cap + 512 * 1024, peak


@pytest.mark.parametrize(("sent", "stored"), [
    (b"../../etc/", "etc"), (b"..\\..\\windows\\train.jsonl", "train.jsonl"), (b"/abs/path/a.jsonl", "a.jsonl"),
    (b"caf\xc3\xa9.jsonl", "café.jsonl"), (b"bad\xff\xfe.jsonl", "bad\ufffd\ufffd.jsonl"),
    (b"evil\x1b[31m\x07name\xe2\x80\xae.jsonl", "evil[31mname.jsonl"), (b"..", "upload.jsonl"),
    (b"x" * 1000 + b".jsonl", "x" * 255),
])
def test_file_names_are_sanitised(client, tenant, sent, stored):
    body = (b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
            b'--b\r\nContent-Disposition: form-data; name="file"; filename="' + sent + b'"\r\n\r\n'
            + CHAT_LINE + b"\r\n--b--\r\n")
    r = client.post("/v1/files", content=body,
                    headers={**tenant.headers, "Content-Type": "multipart/form-data; boundary=b"})
    assert r.status_code == 201, r.text
    assert r.json()["filename"] == stored
    assert client.get(f"/v1/files/{r.json()['id']}", headers=tenant.headers).json()["filename"] == stored


def test_clean_filename_unit():
    assert clean_filename(None) == "upload.jsonl"
    assert clean_filename("a\x00b\nc.jsonl") == "abc.jsonl"


def test_a_client_leaving_mid_upload_is_no_error(client, live_url, caplog):
    t = new_tenant(client)
    host, port = live_url.removeprefix("http://").split(":")
    part = (b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
            b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n' + CHAT_LINE * 100)
    head = (f"POST /v1/files HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {t.key}\r\n"
            f"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: {len(part) * 3}\r\n\r\n")
    with caplog.at_level(logging.INFO, logger="lorafleet.api"):
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(head.encode() + part)
            time.sleep(0.3)  # the server is reading the body
        deadline = time.monotonic() + 10
        while "client disconnected" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
    assert "client disconnected during POST /v1/files" in caplog.text
    assert "unhandled error" not in caplog.text
    metrics = httpx.get(live_url + "/metrics").text
    assert 'route="/v1/files",status="499"' in metrics
    assert 'route="/v1/files",status="500"' not in metrics
    assert _leftovers(client.app, t.id) == (0, [])
