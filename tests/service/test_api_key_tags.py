"""Tagged API keys: one address spending its failed-auth budget (say, every tenant behind an
Ingress whose real addresses uvicorn was not told to trust) locks no tenant out.

A key we issued carries a tag only we can make, so it is looked up whatever its address has
spent; a key of no shape we ever issued is refused without a database query; keys issued before
tags, or tagged under an earlier internal secret, keep working through the budgeted lookup. The admin token is checked
after the budget: a blocked address waits like anyone else.
"""

from __future__ import annotations

import re
import secrets
import uuid

import pytest
from pydantic import SecretStr
import sqlalchemy as sa
from api_helpers import ADMIN, assert_problem, new_tenant
from fastapi.testclient import TestClient

from service.db.models import ApiKey
from service.ids import new_id, now
from service.security import api_key_tag
from service.main import create_app
from service.tenants.repository import hash_key

ATTACKER = ("10.0.0.1", 40000)  # e.g. the ingress controller, when its clients all share it
OPERATOR = ("10.9.9.9", 40000)


@pytest.fixture
def apps(api_settings):
    """(a client at the attacker's address, one at the operator's) on one app of their own:
    5 failed authentications per minute per address."""
    app = create_app(api_settings.model_copy(update={"failed_auth_per_minute": 5}))
    with TestClient(app, client=OPERATOR) as operator:
        yield TestClient(app, client=ATTACKER), operator


def _key_queries(app) -> list[str]:
    seen: list[str] = []
    engine = app.state.read_session_factory.kw["bind"]
    sa.event.listen(engine, "before_cursor_execute",
                    lambda *a: seen.append(a[2]) if "api_keys" in a[2] else None)
    return seen


def _bearer(key: str) -> dict[str, bytes]:
    return {"Authorization": f"Bearer {key}".encode("latin-1")}  # latin-1: what a header may carry


def _spend_budget(client: TestClient) -> None:
    answers = [client.get("/v1/files", headers=_bearer(f"lf-{uuid.uuid4().hex}")) for _ in range(10)]
    assert [r.status_code for r in answers[:5]] == [401] * 5
    for r in answers[5:]:
        assert_problem(r, 429, "too_many_auth_failures")


def test_new_keys_are_tagged_and_stored_hashed(apps):
    _, operator = apps
    tenant = new_tenant(operator)
    assert re.fullmatch(r"lf-[A-Za-z0-9_-]{43}\.[0-9a-f]{16}", tenant.key), tenant.key
    with operator.app.state.session_factory() as s:
        row = s.get(ApiKey, tenant.key_id)
        assert row.key_hash == hash_key(tenant.key) and tenant.key not in (row.key_hash, row.prefix)


def test_a_valid_key_is_accepted_from_an_address_out_of_failures(apps):
    attacker, operator = apps
    _spend_budget(attacker)
    # A key the cache has never seen (its tenant made after the flood), sent from the blocked
    # address: one lookup, and in.
    tenant = new_tenant(operator)
    queries = _key_queries(attacker.app)
    r = attacker.get("/v1/files", headers=tenant.headers)
    assert r.status_code == 200, r.text
    assert len(queries) == 1
    # The flood goes on; the tenant is still served once its entry left the cache.
    more = [attacker.get("/v1/files", headers=_bearer(f"lf-{uuid.uuid4().hex}")) for _ in range(5)]
    assert {r.status_code for r in more} == {429}
    attacker.app.state.principals.forget(tenant_id=tenant.id)
    assert attacker.get("/v1/files", headers=tenant.headers).status_code == 200


def test_unknown_shapes_cost_no_query_and_bad_tags_only_the_budgeted_one(apps):
    attacker, operator = apps
    tenant = new_tenant(operator)
    body, _, tag = tenant.key.rpartition(".")
    forged_tag = f"{body}.{'0' * 16 if tag != '0' * 16 else '1' * 16}"
    other_body = f"lf-{secrets.token_urlsafe(32)}.{tag}"
    queries = _key_queries(attacker.app)
    keys = (forged_tag, other_body, "lf-nope", "not-a-key", "lf-" + "é" * 43, "lf-x.y", f"{body}.{'é' * 16}")
    answers = [attacker.get("/v1/files", headers=_bearer(key)) for key in keys]
    # They count as failures all the same: the address hears 429 once it has spent its budget.
    for r, (status, code) in zip(answers, [(401, "unauthorized")] * 5 + [(429, "too_many_auth_failures")] * 2):
        assert_problem(r, status, code)
    # A tag that does not check may be one made under an earlier internal secret: it is looked up,
    # within the address's budget; the shapes we never issued are refused without a query.
    assert len(queries) == 2


def test_a_key_tagged_under_an_earlier_internal_secret_still_works_within_the_budget(apps):
    attacker, operator = apps
    tenant = new_tenant(operator)
    body, _, _ = tenant.key.rpartition(".")
    earlier = operator.app.state.settings.model_copy(update={"internal_secret": SecretStr("an-earlier-secret")})
    rotated_key = f"{body}.{api_key_tag(body, earlier)}"
    with operator.app.state.session_factory() as s:
        s.add(ApiKey(id=new_id("key_"), tenant_id=tenant.id, name="rotated", key_hash=hash_key(rotated_key),
                     prefix=rotated_key[:10], created_at=now(), revoked_at=None))
        s.commit()
    assert attacker.get("/v1/files", headers=_bearer(rotated_key)).status_code == 200


def test_keys_issued_before_tags_still_work_within_the_budget(apps):
    attacker, operator = apps
    tenant = new_tenant(operator)
    old_key = "lf-" + secrets.token_urlsafe(32)  # the shape keys had before they were tagged
    with operator.app.state.session_factory() as s:
        s.add(ApiKey(id=new_id("key_"), tenant_id=tenant.id, name="old", key_hash=hash_key(old_key),
                     prefix=old_key[:10], created_at=now(), revoked_at=None))
        s.commit()
    assert attacker.get("/v1/files", headers=_bearer(old_key)).status_code == 200
    # Random keys of the old shape each cost a lookup, up to the address's budget.
    queries = _key_queries(attacker.app)
    junk = [attacker.get("/v1/files", headers=_bearer("lf-" + secrets.token_urlsafe(32))) for _ in range(8)]
    assert [r.status_code for r in junk] == [401] * 5 + [429] * 3
    assert len(queries) == 5


def test_an_address_out_of_failures_is_refused_even_the_admin_token(apps):
    attacker, operator = apps
    for _ in range(5):
        assert_problem(attacker.get("/v1/admin/tenants", headers=_bearer("guess")), 403, "forbidden")
    # Past the budget, right and wrong guesses look the same: no oracle at full speed.
    assert_problem(attacker.get("/v1/admin/tenants", headers=_bearer("guess")), 429, "too_many_auth_failures")
    assert_problem(attacker.get("/v1/admin/tenants", headers=ADMIN), 429, "too_many_auth_failures")
    assert operator.get("/v1/admin/tenants", headers=ADMIN).status_code == 200
