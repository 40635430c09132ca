"""workers.signing alone: what a signature binds, how long it lives, rotation, replays."""

from __future__ import annotations

import subprocess
import sys

import pytest

from workers.signing import KEY_ENV, PREVIOUS_KEY_ENV, SignatureError, Signer, Verifier, key_id

BODY = b'{"model":"ft-a","lorafleet":{"adapter":{"id":"ft-a","prefix":"tenants/tn_a/adapters/ft-a/v1"}}}'


class Clock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def _check(verifier: Verifier, headers: dict, method="POST", path="/v1/chat/completions", body=BODY):
    return verifier.verify(verifier.check_headers(headers), method, path, body)


def _reason(verifier, headers, **kw) -> str:
    with pytest.raises(SignatureError) as exc:
        _check(verifier, headers, **kw)
    return exc.value.reason


def test_a_signature_binds_method_path_body_tenant_and_request_id():
    clock = Clock()
    v = Verifier(["k1"], clock=clock)
    sign = Signer("k1", clock=clock).headers
    claims = _check(v, sign("POST", "/v1/chat/completions", BODY, tenant="tn_a", request_id="req_1"))
    assert (claims.tenant, claims.request_id) == ("tn_a", "req_1")
    h = sign("POST", "/v1/chat/completions", BODY, tenant="tn_a", request_id="req_2")
    assert _reason(v, h, path="/v1/completions") == "mismatch"
    assert _reason(v, h, method="DELETE") == "mismatch"
    assert _reason(v, h, body=BODY.replace(b"tn_a", b"tn_b")) == "mismatch"
    assert _reason(v, {**h, "x-lorafleet-tenant": "tn_b"}) == "mismatch"
    assert _reason(v, {**h, "x-lorafleet-request-id": "req_3"}) == "mismatch"
    assert _reason(v, {**h, "x-lorafleet-expires": str(int(clock.t) + 45)}) == "mismatch"


def test_missing_unknown_or_malformed_headers():
    v = Verifier(["k1"])
    h = Signer("k1").headers("POST", "/p", BODY, request_id="req_1")
    assert _reason(v, {}) == "missing"
    assert _reason(v, {k: val for k, val in h.items() if k != "x-lorafleet-signature"}) == "missing"
    assert _reason(v, {**h, "x-lorafleet-key-id": key_id("other")}) == "unknown_key"
    assert _reason(v, {**h, "x-lorafleet-expires": "1e9"}) == "malformed"
    assert _reason(v, {**h, "x-lorafleet-request-id": "req 1\n"}) == "malformed"
    assert _reason(Verifier([]), h) == "no_key"  # no key configured: closed, not open
    with pytest.raises(ValueError):
        Signer("k1").headers("POST", "/p", request_id="")


def test_expiry_and_lifetime():
    clock = Clock()
    v = Verifier(["k1"], clock=clock, max_ttl_s=60, skew_s=5)
    h = Signer("k1", clock=clock).headers("POST", "/p", BODY, request_id="req_1")
    clock.t += 66
    assert _reason(v, h, path="/p") == "expired"
    long_lived = Signer("k1", ttl_s=3600, clock=clock).headers("POST", "/p", BODY, request_id="req_2")
    assert _reason(v, long_lived, path="/p") == "too_long"


def test_rotation_accepts_current_and_previous_only():
    v = Verifier.from_env({KEY_ENV: "new", PREVIOUS_KEY_ENV: "old"})
    for i, key in enumerate(("new", "old")):
        _check(v, Signer(key).headers("GET", "/s", b"", request_id=f"req_{i}"), method="GET", path="/s", body=b"")
    assert _reason(v, Signer("older").headers("GET", "/s", b"", request_id="req_9"),
                   method="GET", path="/s", body=b"") == "unknown_key"
    assert key_id("new") != key_id("old") and "new" not in key_id("new")


def test_replays_refused_and_the_seen_set_stays_bounded():
    clock = Clock()
    v = Verifier(["k1"], clock=clock, max_seen=3, skew_s=0)
    sign = Signer("k1", clock=clock).headers
    h = sign("POST", "/p", BODY, request_id="req_1")
    _check(v, h, path="/p")
    assert _reason(v, h, path="/p") == "replayed"
    # A forged signature never enters the set (it could not then block the real request).
    assert _reason(v, {**sign("POST", "/p", BODY, request_id="req_2"), "x-lorafleet-signature": "0" * 64},
                   path="/p") == "mismatch"
    _check(v, sign("POST", "/p", BODY, request_id="req_2"), path="/p")
    _check(v, sign("POST", "/p", BODY, request_id="req_3"), path="/p")
    # Full of live signatures: refused rather than forgetting one (which would allow its replay).
    assert _reason(v, sign("POST", "/p", BODY, request_id="req_4"), path="/p") == "busy"
    clock.t += 61  # the first three have expired: forgotten, room again
    _check(v, sign("POST", "/p", BODY, request_id="req_4"), path="/p")
    assert len(v._seen) == 1


def test_module_needs_nothing_heavy():
    """The service imports it, like workers.spec: stdlib only (no torch, ray, fastapi)."""
    code = ("import sys, workers.signing; heavy = {'torch', 'ray', 'fastapi', 'pydantic'} & set(sys.modules);"
            "sys.exit(1 if heavy else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_clocks_apart_by_less_than_the_skew_both_ways_are_accepted():
    """API and serving on different nodes: a serving clock 20 s behind or ahead still verifies
    (a 60 s signature with 5 s of skew refused everything from a clock 5 s behind)."""
    api = Clock()
    sign = Signer("k1", clock=api).headers
    for i, offset in enumerate((-20, -5, 0, 5, 20)):
        serving = Clock(api.t + offset)
        _check(Verifier(["k1"], clock=serving), sign("POST", "/p", BODY, request_id=f"req_{i}"), path="/p")
    # Far apart is still refused, both ways.
    h = sign("POST", "/p", BODY, request_id="req_far")
    assert _reason(Verifier(["k1"], clock=Clock(api.t + 120)), h, path="/p") == "expired"
    assert _reason(Verifier(["k1"], clock=Clock(api.t - 120)), h, path="/p") == "too_long"


def test_a_malformed_signature_is_refused_not_an_error():
    """A non-ASCII or non-hex signature with a known key id is a refusal (it made
    ``hmac.compare_digest`` raise TypeError: a 500)."""
    v = Verifier(["k1"])
    h = Signer("k1").headers("POST", "/p", BODY, request_id="req_1")
    for bad in ("é" * 64, "Z" * 64, h["x-lorafleet-signature"][:-1], h["x-lorafleet-signature"] + "0",
                h["x-lorafleet-signature"].upper()):
        assert _reason(v, {**h, "x-lorafleet-signature": bad}, path="/p") == "malformed", bad
    _check(v, h, path="/p")  # the untouched one still verifies
