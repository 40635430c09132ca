"""Typed responses. Extra fields are kept, so the service can grow without breaking clients."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

# The training methods the service offers (method.type; "supervised" is OpenAI's name for lora).
METHODS = ("lora", "qlora", "ia3", "adalora", "prefix_tuning", "prompt_tuning", "p_tuning")


class LFModel(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())


class FileObject(LFModel):
    id: str
    object: str = "file"
    bytes: int = 0
    created_at: int = 0
    filename: str = ""
    purpose: str = "fine-tune"
    status: str = "processed"
    status_details: str | None = None
    sha256: str | None = None
    format: str | None = None
    examples: int | None = None


class Deleted(LFModel):
    id: str
    object: str
    deleted: bool = True


class JobError(LFModel):
    code: str | None = None
    message: str | None = None
    param: str | None = None


TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})


class FineTuningJob(LFModel):
    id: str
    object: str = "fine_tuning.job"
    model: str
    status: str
    created_at: int = 0
    finished_at: int | None = None
    fine_tuned_model: str | None = None
    training_file: str | None = None
    validation_file: str | None = None
    hyperparameters: dict[str, Any] | None = None
    method: dict[str, Any] | None = None
    seed: int | None = None
    user_provided_suffix: str | None = None
    metadata: dict[str, str] | None = None
    error: JobError | None = None
    trained_tokens: int | None = None
    estimated_finish: int | None = None
    # Which hyperparameters the service chose because they were left `auto` (values above).
    auto_hyperparameters: list[str] = Field(default_factory=list)
    result_files: list[str] = Field(default_factory=list)
    organization_id: str | None = None
    integrations: list[Any] = Field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.status in TERMINAL_STATUSES


class SweepParameter(LFModel):
    name: str
    values: list[Any]


class SweepChild(LFModel):
    """One row of a sweep's comparison table; None where the child has no result yet."""

    job_id: str
    status: str
    values: dict[str, Any] = Field(default_factory=dict)
    fine_tuned_model: str | None = None
    eval_loss: float | None = None
    train_loss: float | None = None
    trainable_params: int | None = None
    peak_memory_mb: float | None = None
    tokens_per_s: float | None = None
    train_time_s: float | None = None


class FineTuningSweep(LFModel):
    id: str
    object: str = "fine_tuning.sweep"
    created_at: int = 0
    model: str
    status: str  # running | succeeded | partially_succeeded | failed
    parameters: list[SweepParameter] = Field(default_factory=list)
    base: dict[str, Any] = Field(default_factory=dict)
    metadata: dict[str, str] | None = None
    metric: str = "eval_loss"  # what `best` minimises
    children: list[SweepChild] = Field(default_factory=list)
    best: SweepChild | None = None

    @property
    def done(self) -> bool:
        return self.status != "running"


class FineTuningJobEvent(LFModel):
    id: str
    object: str = "fine_tuning.job.event"
    created_at: int = 0
    level: str = "info"
    message: str = ""
    type: str = "message"
    data: dict[str, Any] | None = None


class FineTuningJobCheckpoint(LFModel):
    id: str
    object: str = "fine_tuning.job.checkpoint"
    created_at: int = 0
    fine_tuning_job_id: str
    step_number: int
    metrics: dict[str, Any] = Field(default_factory=dict)
    fine_tuned_model_checkpoint: str | None = None


class Model(LFModel):
    id: str
    object: str = "model"
    created: int = 0
    owned_by: str = ""
    # An adapter's method: {"type": ...}, and from models.retrieve also {<type>: {"hyperparameters"}}.
    method: dict[str, Any] | None = None


class AdapterFile(LFModel):
    name: str
    bytes: int
    sha256: str


class Adapter(LFModel):
    id: str
    object: str = "adapter"
    job_id: str | None = None
    base_model: str | None = None
    version: int = 1
    method: str | None = None
    files: list[AdapterFile] = Field(default_factory=list)
    created_at: int = 0


class OperationFile(LFModel):
    name: str
    bytes: int
    sha256: str


class ModelExport(LFModel):
    id: str
    object: str = "model.export"
    adapter: str | None = None
    status: str
    dtype: str | None = None
    files: list[OperationFile] | None = None
    error: dict | None = None
    created_at: int = 0


class AdapterBlend(LFModel):
    id: str
    object: str = "adapter.blend"
    name: str | None = None
    status: str
    combination: str | None = None
    fine_tuned_model: str | None = None
    error: dict | None = None
    created_at: int = 0


class Usage(LFModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ChatMessage(LFModel):
    role: str = "assistant"
    content: str | None = None


class ChatChoice(LFModel):
    index: int = 0
    message: ChatMessage
    finish_reason: str | None = None


class ChatCompletion(LFModel):
    id: str
    object: str = "chat.completion"
    created: int = 0
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class ChatDelta(LFModel):
    role: str | None = None
    content: str | None = None


class ChatChunkChoice(LFModel):
    index: int = 0
    delta: ChatDelta = Field(default_factory=ChatDelta)
    finish_reason: str | None = None


class ChatCompletionChunk(LFModel):
    id: str
    object: str = "chat.completion.chunk"
    created: int = 0
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(LFModel):
    index: int = 0
    text: str = ""
    finish_reason: str | None = None


class Completion(LFModel):
    """A text completion, and also each chunk of a streamed one (as OpenAI's API does)."""

    id: str
    object: str = "text_completion"
    created: int = 0
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class Tenant(LFModel):
    id: str
    object: str = "tenant"
    name: str
    status: str = "active"
    max_concurrent_jobs: int | None = None
    max_queued_jobs: int | None = None
    requests_per_minute: int | None = None
    created_at: int = 0


class APIKey(LFModel):
    id: str
    object: str = "api_key"
    name: str | None = None
    key: str | None = None  # the secret: only in the create response
    prefix: str | None = None
    created_at: int = 0
    revoked_at: int | None = None


class BaseModelInfo(LFModel):
    """A base model registered by the admin (``BaseModel`` in the API)."""

    id: str
    object: str = "model"
    source_uri: str | None = None
    architecture: str | None = None
    methods: list[str] = Field(default_factory=list)
    max_rank: int | None = None
    quantization: str | None = None
    created_at: int = 0
