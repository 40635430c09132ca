"""The API pod's /tmp (where uploads are spooled while validated) is a sized emptyDir."""

from __future__ import annotations

from chart_helpers import FULLNAME, pod, render, values_error

API = f"Deployment/{FULLNAME}-api"


def _tmp(values: dict | None = None) -> dict:
    return next(v for v in pod(render(values), API).spec["volumes"] if v["name"] == "tmp")


def test_api_tmp_is_sized_from_values():
    assert _tmp() == {"name": "tmp", "emptyDir": {"sizeLimit": "2Gi"}}
    assert _tmp({"api": {"tmpSizeLimit": "700Mi"}})["emptyDir"] == {"sizeLimit": "700Mi"}


def test_a_size_that_is_no_quantity_is_refused():
    assert "tmpSizeLimit" in values_error({"api": {"tmpSizeLimit": "lots"}})
