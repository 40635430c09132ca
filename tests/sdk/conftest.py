from __future__ import annotations

import pytest
from live_stack import LiveStack, new_tenant, start_stack

import lorafleet


@pytest.fixture(scope="session")
def stack(tmp_path_factory) -> LiveStack:
    stack = start_stack(tmp_path_factory.mktemp("lorafleet-live"))
    yield stack
    stack.stop()


@pytest.fixture(scope="session")
def admin(stack) -> lorafleet.Client:
    with lorafleet.Client(base_url=stack.base_url, admin_token=stack.admin_token, api_key="unused") as c:
        yield c


@pytest.fixture
def tenant(stack, admin) -> lorafleet.Client:
    client = new_tenant(stack, admin)
    yield client
    client.close()
