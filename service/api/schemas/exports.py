"""Export and blend bodies (service.exports)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from service.api.schemas.common import Strict, StrictNumber
from service.db.models import Operation, OperationEventRow
from service.exports.repository import EVENT_ID_PREFIX
from workers.spec import Combination

ShardSize = Annotated[str, Field(pattern=r"^[1-9][0-9]{0,5}(KB|MB|GB)$", description="e.g. 500MB, 2GB")]


class ExportCreate(Strict):
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="The saved weights' type. The merge itself always runs in float32.")
    max_shard_size: ShardSize = "2GB"


class OperationFile(BaseModel):
    name: str
    bytes: int
    sha256: str


class OperationError(BaseModel):
    code: str
    message: str | None


class ExportPublic(BaseModel):
    object: Literal["model.export"] = "model.export"
    id: str
    adapter: str
    base_model: str
    method: str
    status: str
    dtype: str
    files: list[OperationFile] | None = Field(None, description="Once succeeded: the merged model's files")
    error: OperationError | None
    created_at: int
    started_at: int | None
    finished_at: int | None

    @classmethod
    def of(cls, op: Operation) -> ExportPublic:
        return cls(id=op.id, adapter=op.adapter_id, base_model=op.base_model_id, method=op.method, status=op.status,
                   dtype=op.request.get("dtype", "float32"), files=op.files, error=_error(op),
                   created_at=op.created_at, started_at=op.started_at, finished_at=op.finished_at)


class BlendInput(Strict):
    model: Annotated[str, Field(min_length=1, max_length=200, description="One of your adapters")]
    weight: Annotated[StrictNumber, Field(ge=-10, le=10)] = 1.0


class BlendCreate(Strict):
    adapters: Annotated[list[BlendInput], Field(min_length=1, max_length=8)]
    combination: Combination = "cat"
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")]
    density: Annotated[StrictNumber, Field(gt=0, le=1)] | None = None


class BlendPublic(BaseModel):
    object: Literal["adapter.blend"] = "adapter.blend"
    id: str
    name: str
    adapters: list[dict[str, Any]]
    combination: str
    base_model: str
    status: str
    fine_tuned_model: str = Field(description="The adapter the blend publishes (servable once succeeded)")
    error: OperationError | None
    created_at: int
    finished_at: int | None

    @classmethod
    def of(cls, op: Operation) -> BlendPublic:
        req = op.request
        return cls(id=op.id, name=req["name"], combination=req["combination"], base_model=op.base_model_id,
                   adapters=[{"model": a["id"], "weight": a["weight"]} for a in req["adapters"]],
                   status=op.status, fine_tuned_model=op.result_adapter_id, error=_error(op),
                   created_at=op.created_at, finished_at=op.finished_at)


class OperationEventPublic(BaseModel):
    object: Literal["operation.event"] = "operation.event"
    id: str
    created_at: int
    level: str
    type: str
    message: str
    data: dict[str, Any] | None

    @classmethod
    def of(cls, e: OperationEventRow) -> OperationEventPublic:
        return cls(id=f"{EVENT_ID_PREFIX}{e.id}", created_at=e.created_at, level=e.level, type=e.type,
                   message=e.message, data=e.data)


def _error(op: Operation) -> OperationError | None:
    return OperationError(code=op.error_code, message=op.error_message) if op.error_code else None
