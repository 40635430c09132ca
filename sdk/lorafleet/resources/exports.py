"""Exports (an adapter merged into its base, as a full model) and offline blends."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path, PurePosixPath
from urllib.parse import quote

from .._core import Call, Sleep
from ..errors import IntegrityError, JobWaitError, WaitTimeoutError
from ..types import AdapterBlend, ModelExport
from ._base import Resource, drop_none


class OperationFailedError(JobWaitError):
    """The export or blend failed; ``.job`` is it, with its error code and message."""

    def __init__(self, op):
        error = op.error or {}
        super().__init__(f"{op.id} failed: {error.get('code')}: {error.get('message')}", op)


def _wait(core, path: str, cast, poll_interval: float, timeout: float | None) -> Call:
    start = time.monotonic()
    while True:
        op = yield from core.request("GET", path, cast=cast)
        if op.status == "succeeded":
            return op
        if op.status == "failed":
            raise OperationFailedError(op)
        if timeout is not None and time.monotonic() - start >= timeout:
            raise WaitTimeoutError(op, timeout)
        yield Sleep(poll_interval)


class Exports(Resource):
    def create(self, adapter_id: str, *, dtype: str | None = None, max_shard_size: str | None = None):
        """Merge the adapter into its base model (in float32; a QLoRA adapter into the base
        dequantised from NF4); ``dtype`` is the saved weights' type."""
        return self._client._run(self._core.request(
            "POST", f"/v1/models/{adapter_id}/exports", cast=ModelExport.model_validate,
            json=drop_none(dtype=dtype, max_shard_size=max_shard_size)))

    def retrieve(self, export_id: str):
        return self._client._run(self._core.request("GET", f"/v1/exports/{export_id}", cast=ModelExport.model_validate))

    def list(self, adapter_id: str):
        return self._client._paginate(f"/v1/models/{adapter_id}/exports", ModelExport.model_validate, {})

    def wait(self, export_id: str, *, poll_interval: float = 2.0, timeout: float | None = None):
        """The export once succeeded; OperationFailedError if it failed."""
        return self._client._run(_wait(self._core, f"/v1/exports/{export_id}", ModelExport.model_validate,
                                       poll_interval, timeout))

    def download(self, export_id: str, dest: str | os.PathLike):
        """Every file of a succeeded export into ``dest`` (AutoModelForCausalLM.from_pretrained
        loads it), each checked against the export's size and sha256 before it is kept."""
        return self._client._run(self._download(export_id, Path(dest)))

    def _download(self, export_id: str, folder: Path) -> Call[Path]:
        export = yield from self._core.request("GET", f"/v1/exports/{export_id}", cast=ModelExport.model_validate)
        if not export.files:
            raise IntegrityError(f"export {export_id} lists no files (status {export.status})")
        for f in export.files:
            parts = PurePosixPath(f.name).parts
            if not parts or f.name.startswith("/") or ".." in parts or "\\" in f.name:
                raise IntegrityError(f"export {export_id} lists an unsafe file name {f.name!r}")
        folder.mkdir(parents=True, exist_ok=True)
        for f in export.files:  # a model is large: each file is written once checked, not all held
            response = yield from self._core.request("GET", f"/v1/exports/{export_id}/files/{quote(f.name)}")
            content = response.content
            digest = hashlib.sha256(content).hexdigest()
            if len(content) != f.bytes or digest != f.sha256:
                raise IntegrityError(f"{f.name}: got {len(content)} bytes sha256 {digest}, "
                                     f"expected {f.bytes} bytes sha256 {f.sha256}")
            target = folder / f.name
            target.parent.mkdir(parents=True, exist_ok=True)
            part = target.with_name(f".{target.name}.part")
            part.write_bytes(content)
            part.replace(target)
        return folder


class Blends(Resource):
    def create(self, adapters: list[tuple[str, float]] | list[dict], *, name: str, combination: str = "cat",
               density: float | None = None):
        """A new adapter of yours from ``adapters`` ((adapter id, weight) pairs), combined by
        PEFT's add_weighted_adapter (``cat``, ``linear``, ``svd``, ``ties``, ``dare_linear``, …)."""
        inputs = [a if isinstance(a, dict) else {"model": a[0], "weight": a[1]} for a in adapters]
        return self._client._run(self._core.request(
            "POST", "/v1/adapters/blend", cast=AdapterBlend.model_validate,
            json=drop_none(adapters=inputs, name=name, combination=combination, density=density)))

    def retrieve(self, blend_id: str):
        return self._client._run(self._core.request("GET", f"/v1/adapters/blends/{blend_id}",
                                                    cast=AdapterBlend.model_validate))

    def wait(self, blend_id: str, *, poll_interval: float = 2.0, timeout: float | None = None):
        """The blend once succeeded (its ``fine_tuned_model`` is then servable)."""
        return self._client._run(_wait(self._core, f"/v1/adapters/blends/{blend_id}", AdapterBlend.model_validate,
                                       poll_interval, timeout))
