"""Sweep bodies: a base job, one or two varied hyperparameters, and the comparison table."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, model_validator

from service.api.schemas.common import Strict
from service.api.schemas.jobs import JobCreate

MAX_VALUES = 10
MAX_CHILDREN = 25

Scalar = int | float | str | bool
Value = Scalar | Annotated[list[Annotated[str, Field(max_length=200)]], Field(max_length=64)]


class SweepParameter(Strict):
    # A field of the method's hyperparameters (r, lora_alpha, learning_rate, n_epochs, ...).
    name: Annotated[str, Field(min_length=1, max_length=64)]
    values: Annotated[list[Value], Field(min_length=2, max_length=MAX_VALUES)]


class SweepCreate(Strict):
    base: JobCreate  # the job every child starts from
    parameters: Annotated[list[SweepParameter], Field(min_length=1, max_length=2)]
    metadata: Annotated[dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]],
                        Field(max_length=16)] | None = None

    @model_validator(mode="after")
    def _shape(self) -> SweepCreate:
        names = [p.name for p in self.parameters]
        if len(set(names)) != len(names):
            raise ValueError("parameters vary the same hyperparameter twice")
        children = 1
        for p in self.parameters:
            children *= len(p.values)
        if children > MAX_CHILDREN:
            raise ValueError(f"the parameters make {children} child jobs; a sweep has at most {MAX_CHILDREN}")
        return self


class SweepChild(BaseModel):
    """One row of the chapter's comparison table (6.2.3); None where the child has no result yet."""

    job_id: str
    status: str
    values: dict[str, Any]
    fine_tuned_model: str | None
    eval_loss: float | None
    train_loss: float | None
    trainable_params: int | None
    peak_memory_mb: float | None
    tokens_per_s: float | None
    train_time_s: float | None


class SweepPublic(BaseModel):
    id: str
    object: Literal["fine_tuning.sweep"] = "fine_tuning.sweep"
    created_at: int
    model: str
    status: Literal["running", "succeeded", "partially_succeeded", "failed"]
    parameters: list[SweepParameter]
    base: dict[str, Any]
    metadata: dict[str, str] | None
    metric: Literal["eval_loss", "train_loss"]  # what "best" minimises
    children: list[SweepChild]
    best: SweepChild | None
