"""One drill stack for the whole module: the embedded server (API + scheduler) as a subprocess on
PostgreSQL and S3 (moto), each reached through a FaultProxy, submitting to a local Ray of its own
whose nodes hold the object store's credentials (as the Ray pods do in a deployment)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
sys.path[:0] = [str(HERE), str(HERE.parent / "e2e")]  # faultproxy, drill helpers; e2e's Stack

from e2e_stack import Stack  # noqa: E402
from faultproxy import FaultProxy  # noqa: E402
from pg_databases import PG, fresh_pg_database, url_of  # noqa: E402

from workers.local_ray import start_local_ray, stop_local_ray  # noqa: E402
from workers.storage import S3Store  # noqa: E402

BUCKET = "drills"


def _start_ray(state_dir: Path, env: dict) -> dict:
    """A Ray head of the drills' own; once more if a loaded machine makes `ray start` time out,
    after stopping what the failed start left running."""
    import glob
    import os

    for attempt in (1, 2):
        before = set(glob.glob(f"/tmp/lf-ray-{os.getpid()}-*"))
        try:
            return start_local_ray(state_dir, num_cpus=4, env=env)
        except RuntimeError:
            for temp_dir in set(glob.glob(f"/tmp/lf-ray-{os.getpid()}-*")) - before:
                stop_local_ray({"temp_dir": temp_dir})
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def drill(tmp_path_factory, s3_endpoint):
    with fresh_pg_database("lf_drill") as name:
        yield from _drill_stack(name, tmp_path_factory, s3_endpoint)


def _drill_stack(name: str, tmp_path_factory, s3_endpoint):
    S3Store(BUCKET, endpoint_url=s3_endpoint, access_key_id="test", secret_access_key="test").ensure_bucket()
    pg = FaultProxy(PG.port or 5432, PG.host or "127.0.0.1")
    s3 = FaultProxy(int(s3_endpoint.rsplit(":", 1)[1]))
    s3_url = f"http://127.0.0.1:{s3.port}"
    root = tmp_path_factory.mktemp("drill")
    creds = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_ENDPOINT_URL": s3_url}
    ray = _start_ray(root / "ray", creds)
    (root / "data").mkdir()
    stack = Stack(root / "data", ray["dashboard"])
    stack.env |= {
        "LORAFLEET_DATABASE_URL": url_of(name, port=pg.port),
        "LORAFLEET_OBJECT_STORE_URL": f"s3://{BUCKET}/lorafleet", "LORAFLEET_S3_ENDPOINT_URL": s3_url,
        "LORAFLEET_S3_ACCESS_KEY_ID": "test", "LORAFLEET_S3_SECRET_ACCESS_KEY": "test",
        "RAY_AUTH_TOKEN_PATH": ray["token_path"], "LORAFLEET_SCHEDULER_INTERVAL_S": "0.5",
    }
    stack.env.pop("RAY_AUTH_TOKEN", None)
    try:
        stack.start()
        yield {"stack": stack, "pg": pg, "s3": s3, "ray": ray, "database": name,
               "store": S3Store(BUCKET, "lorafleet", endpoint_url=s3_endpoint, access_key_id="test",
                                secret_access_key="test")}
    finally:
        stack.stop()
        stop_local_ray(ray)
        pg.close()
        s3.close()
