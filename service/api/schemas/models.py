"""Model and adapter bodies (OpenAI's Model object; our Adapter)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

from service.db.models import Adapter


class ModelPublic(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    # An adapter's training method, shaped as a job's: {"type": "ia3", "ia3": {"hyperparameters":
    # {...}}} (the config only where one model is read); None for a base model.
    method: dict[str, Any] | None = None


class ModelDeleted(BaseModel):
    id: str
    object: Literal["model"] = "model"
    deleted: bool = True


class AdapterFile(BaseModel):
    name: str
    bytes: int
    sha256: str


class AdapterPublic(BaseModel):
    id: str
    object: Literal["adapter"] = "adapter"
    job_id: str | None  # None: an adapter an offline blend made
    base_model: str
    version: int
    method: str
    files: list[AdapterFile]
    created_at: int

    @classmethod
    def of(cls, a: Adapter) -> AdapterPublic:
        files: list[dict[str, Any]] = a.files
        return cls(id=a.id, job_id=a.job_id, base_model=a.base_model_id, version=a.version,
                   method=a.method, files=[AdapterFile(**f) for f in files], created_at=a.created_at)
