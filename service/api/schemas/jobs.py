"""Fine-tuning job bodies: OpenAI's shapes, with the chapter's methods as extra method types."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, ValidationError, model_validator

from service.api.schemas.common import Strict
from service.db.models import Checkpoint, Job, JobEventRow
from service.errors import ValidationFailed
from service.jobs.repository import event_public_id
from workers.spec import (
    HYPERPARAMETERS,
    AdaLoraHyperparameters,
    AnyHyperparameters,
    Hyperparameters,
    IA3Hyperparameters,
    PrefixTuningHyperparameters,
    PromptTuningHyperparameters,
    PTuningHyperparameters,
    Resources,
)


class MethodParams(Strict):
    hyperparameters: Hyperparameters | None = None


class IA3Params(Strict):
    hyperparameters: IA3Hyperparameters | None = None


class AdaLoraParams(Strict):
    hyperparameters: AdaLoraHyperparameters | None = None


class PrefixTuningParams(Strict):
    hyperparameters: PrefixTuningHyperparameters | None = None


class PromptTuningParams(Strict):
    hyperparameters: PromptTuningHyperparameters | None = None


class PTuningParams(Strict):
    hyperparameters: PTuningHyperparameters | None = None


MethodType = Literal["lora", "qlora", "supervised", "ia3", "adalora", "prefix_tuning", "prompt_tuning",
                     "p_tuning"]


class MethodIn(Strict):
    # OpenAI's "supervised" is a LoRA fine-tune here.
    type: MethodType = "lora"
    lora: MethodParams | None = None
    qlora: MethodParams | None = None
    supervised: MethodParams | None = None
    ia3: IA3Params | None = None
    adalora: AdaLoraParams | None = None
    prefix_tuning: PrefixTuningParams | None = None
    prompt_tuning: PromptTuningParams | None = None
    p_tuning: PTuningParams | None = None

    @model_validator(mode="after")
    def _params_match_type(self) -> MethodIn:
        for other in MethodType.__args__:
            if other != self.type and getattr(self, other) is not None:
                raise ValueError(f"method.{other} given but method.type is {self.type!r}")
        return self


class OpenAIHyperparameters(Strict):
    """The top-level OpenAI hyperparameters, mapped onto ours."""

    # The same limits as Hyperparameters (docs/API.md, "Limits"); 50 x the base rate is its cap.
    n_epochs: Annotated[int, Field(ge=1, le=50)] | Literal["auto"] = "auto"
    batch_size: Annotated[int, Field(ge=1, le=256)] | Literal["auto"] = "auto"
    learning_rate_multiplier: Annotated[float, Field(gt=0, le=50)] | Literal["auto"] = "auto"


class JobCreate(Strict):
    model: Annotated[str, Field(min_length=1, max_length=200)]
    training_file: Annotated[str, Field(min_length=1, max_length=64)]
    validation_file: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    suffix: Annotated[str, Field(min_length=1, max_length=40, pattern=r"^[A-Za-z0-9_-]+$")] | None = None
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] | None = None
    metadata: Annotated[dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]],
                        Field(max_length=16)] | None = None
    method: MethodIn | None = None
    hyperparameters: OpenAIHyperparameters | None = None
    resources: Resources | None = None
    integrations: Annotated[list[Any], Field(max_length=0)] | None = None  # accepted only empty

    def auto_fields(self) -> frozenset[str]:
        """The OpenAI hyperparameters left `auto` (the default) at the top level and unset in the
        method's own hyperparameters: service.jobs.auto chooses them from the training file."""
        top = self.hyperparameters or OpenAIHyperparameters()
        method = self.method or MethodIn()
        params = getattr(method, method.type)
        given = params.hyperparameters.model_fields_set if params and params.hyperparameters else set()
        own = {"n_epochs": "n_epochs", "batch_size": "batch_size", "learning_rate_multiplier": "learning_rate"}
        return frozenset(name for name, field in own.items()
                         if getattr(top, name) == "auto" and field not in given)

    def resolved(self) -> tuple[str, AnyHyperparameters]:
        """(method, hyperparameters): the method's own values over the OpenAI ones over defaults."""
        method = self.method or MethodIn()
        name = "lora" if method.type == "supervised" else method.type
        model = HYPERPARAMETERS[name]
        values: dict[str, Any] = {}
        if self.hyperparameters is not None:
            top = self.hyperparameters
            if top.n_epochs != "auto":
                values["n_epochs"] = top.n_epochs
            if top.batch_size != "auto":
                values["batch_size"] = top.batch_size
            if top.learning_rate_multiplier != "auto":
                values["learning_rate"] = model.base_learning_rate() * top.learning_rate_multiplier
        params = getattr(method, method.type)
        if params is not None and params.hyperparameters is not None:
            values.update(params.hyperparameters.model_dump(exclude_unset=True))
        if self.seed is not None:
            values["seed"] = self.seed
        try:
            hp = model.model_validate(values)
        except ValidationError as exc:
            # The combination failed (e.g. learning_rate_multiplier so small the rate is 0).
            err = exc.errors()[0]
            field = ".".join(str(p) for p in err["loc"])
            raise ValidationFailed(f"hyperparameters.{field}: {err['msg']}",
                                   param=f"hyperparameters.{field}") from None
        # Stored with alpha resolved, so the job shows (and the worker gets) the number it used.
        return name, hp.model_copy(update={"lora_alpha": hp.alpha}) if "lora_alpha" in model.model_fields else hp


class JobError(BaseModel):
    code: str
    message: str | None
    param: str | None


class OpenAIHyperparametersOut(BaseModel):
    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float


class JobPublic(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    model: str
    status: str
    created_at: int
    finished_at: int | None
    fine_tuned_model: str | None
    training_file: str
    validation_file: str | None
    hyperparameters: OpenAIHyperparametersOut
    method: dict[str, Any]
    resources: dict[str, Any]
    seed: int
    user_provided_suffix: str | None
    metadata: dict[str, str] | None
    error: JobError | None
    trained_tokens: int | None
    estimated_finish: int | None
    # Which of `hyperparameters` the service chose because the request left them `auto`.
    auto_hyperparameters: list[str] = []
    result_files: list[str] = []
    organization_id: str
    integrations: list[Any] = []

    @classmethod
    def of(cls, j: Job | Mapping[str, Any]) -> JobPublic:
        """From an ORM Job or a Core row mapping (``jobs.repository.get_job_row``: the read
        routes). One dict validated in pydantic's core, not nested model constructors in Python."""
        m = j if isinstance(j, Mapping) else {k: getattr(j, k) for k in _JOB_KEYS}
        hp, method = m["hyperparameters"], m["method"]
        return cls.model_validate({
            "id": m["id"], "model": m["model"], "status": m["status"], "created_at": m["created_at"],
            "finished_at": m["finished_at"], "fine_tuned_model": m["fine_tuned_model"],
            "training_file": m["training_file"], "validation_file": m["validation_file"],
            "hyperparameters": {"n_epochs": hp["n_epochs"], "batch_size": hp["batch_size"],
                                "learning_rate_multiplier":
                                    hp["learning_rate"] / HYPERPARAMETERS[method].base_learning_rate()},
            "method": {"type": method, method: {"hyperparameters": hp}},
            "resources": m["resources"], "seed": m["seed"], "user_provided_suffix": m["suffix"],
            "metadata": m["user_metadata"],
            "error": {"code": m["error_code"], "message": m["error_message"], "param": m["error_param"]}
            if m["error_code"] else None,
            "trained_tokens": m["trained_tokens"], "estimated_finish": m["estimated_finish"],
            "auto_hyperparameters": m["auto_hyperparameters"] or [],
            "organization_id": m["tenant_id"]})


# What JobPublic.of reads from an ORM Job (a row mapping has these keys already).
_JOB_KEYS = ("id", "model", "status", "created_at", "finished_at", "fine_tuned_model", "training_file",
             "validation_file", "hyperparameters", "method", "resources", "seed", "suffix", "user_metadata",
             "error_code", "error_message", "error_param", "trained_tokens", "estimated_finish", "tenant_id",
             "auto_hyperparameters")


class EventPublic(BaseModel):
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    id: str
    created_at: int
    level: str
    message: str
    type: str
    data: dict[str, Any] | None

    @classmethod
    def of(cls, e: JobEventRow) -> EventPublic:
        return cls(id=event_public_id(e), created_at=e.created_at, level=e.level,
                   message=e.message, type=e.type, data=e.data)


class CheckpointPublic(BaseModel):
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    id: str
    created_at: int
    fine_tuning_job_id: str
    step_number: int
    metrics: dict[str, Any]
    fine_tuned_model_checkpoint: str  # the object-store prefix holding a loadable adapter

    @classmethod
    def of(cls, c: Checkpoint) -> CheckpointPublic:
        return cls(id=c.id, created_at=c.created_at, fine_tuning_job_id=c.job_id,
                   step_number=c.step_number, metrics=c.metrics,
                   fine_tuned_model_checkpoint=c.key_prefix)
