from __future__ import annotations

import hashlib
import os
from pathlib import Path
from urllib.parse import quote

from .._core import Call
from ..errors import IntegrityError
from ..types import Adapter, Deleted, Model
from ._base import Resource
from .exports import Blends, Exports


class Models(Resource):
    def __init__(self, client):
        super().__init__(client)
        self.exports = Exports(client)  # client.models.exports.create(adapter_id)

    def list(self):
        """The base models and this tenant's adapters."""
        return self._client._paginate("/v1/models", Model.model_validate, {})

    def retrieve(self, model: str):
        return self._client._run(self._core.request("GET", f"/v1/models/{model}",
                                                    cast=Model.model_validate))

    def delete(self, model: str):
        """Delete one of this tenant's adapters (its objects and row)."""
        return self._client._run(self._core.request("DELETE", f"/v1/models/{model}",
                                                    cast=Deleted.model_validate))


class Adapters(Resource):
    def __init__(self, client):
        super().__init__(client)
        self.blends = Blends(client)  # client.adapters.blends.create([(id, 0.7), (id2, 0.3)], name=...)

    def retrieve(self, adapter_id: str):
        return self._client._run(self._core.request("GET", f"/v1/adapters/{adapter_id}",
                                                    cast=Adapter.model_validate))

    def download(self, adapter_id: str, dest: str | os.PathLike | None = None):
        """Download every adapter file into ``dest`` (default ``./<adapter id>``), checking each
        file's size and sha256 against the adapter's file list; returns the folder, which
        ``PeftModel.from_pretrained`` loads. A mismatch raises IntegrityError before any file
        is written."""
        return self._client._run(self._download(adapter_id, Path(dest or adapter_id)))

    def _download(self, adapter_id: str, folder: Path) -> Call[Path]:
        adapter = yield from self._core.request("GET", f"/v1/adapters/{adapter_id}",
                                                cast=Adapter.model_validate)
        if not adapter.files:
            raise IntegrityError(f"adapter {adapter_id} lists no files")
        for f in adapter.files:
            if not f.name or f.name in (".", "..") or "/" in f.name or "\\" in f.name:
                raise IntegrityError(f"adapter {adapter_id} lists an unsafe file name {f.name!r}")
        verified: dict[str, bytes] = {}
        for f in adapter.files:
            response = yield from self._core.request(
                "GET", f"/v1/adapters/{adapter_id}/files/{quote(f.name, safe='')}")
            content = response.content
            digest = hashlib.sha256(content).hexdigest()
            if len(content) != f.bytes or digest != f.sha256:
                raise IntegrityError(
                    f"{f.name}: got {len(content)} bytes sha256 {digest}, "
                    f"expected {f.bytes} bytes sha256 {f.sha256}")
            verified[f.name] = content
        folder.mkdir(parents=True, exist_ok=True)
        for name, content in verified.items():
            part = folder / f".{name}.part"
            part.write_bytes(content)
            part.replace(folder / name)
        return folder
