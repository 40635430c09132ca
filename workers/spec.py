"""Contracts shared by the control plane and the data plane.

Pydantic only and torch-free: ``service`` imports this module, ``workers`` implements it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Annotated, Any, Literal, get_args

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

# The chapter's seven ways to tune a frozen base (docs/API.md, "Methods"). "qlora" is LoRA on a
# 4-bit NF4 base; the other methods get a 4-bit base with ``quantization: "nf4"``.
Method = Literal["lora", "qlora", "ia3", "adalora", "prefix_tuning", "prompt_tuning", "p_tuning"]
METHODS: tuple[str, ...] = get_args(Method)
# Methods that add learned virtual tokens before the prompt rather than change layers.
VIRTUAL_TOKEN_METHODS = frozenset({"prefix_tuning", "prompt_tuning", "p_tuning"})
DatasetFormat = Literal["chat", "completion", "alpaca", "text"]

# The chapter's reference LLaMA recipe (QLoRA section): attention projections.
DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
# Hyperparameter limits that stand alone (docs/API.md, "Limits"); the rest are at job creation.
MAX_TARGET_MODULES = 256  # entries of a target_modules list (7 linears x 32 layers fit)
MAX_SEQ_LENGTH = 32768  # and never more than the base model's context
MAX_EFFECTIVE_BATCH = 1024  # batch_size x gradient_accumulation_steps
MAX_MICRO_BATCH_TOKENS = 262144  # batch_size x max_seq_length: one forward's activations


class _Strict(BaseModel):
    # Unknown fields are refused, and so are lax conversions (``true`` or ``3.0`` for an integer,
    # ``"3"`` for a number): the API's request bodies embed these models (issue 10).
    model_config = ConfigDict(extra="forbid", strict=True)


def _check_targets(v: list[str] | str) -> list[str] | str:
    if isinstance(v, list):
        if not v:
            raise ValueError("must not be empty")
        if len(v) > MAX_TARGET_MODULES:
            raise ValueError(f"lists at most {MAX_TARGET_MODULES} names")
        return v
    if len(v) > 200:
        raise ValueError("a regex has at most 200 characters")
    if v != "all-linear":
        try:
            re.compile(v)
        except re.error as exc:
            raise ValueError(f"not a valid regex: {exc}") from None
    return v


# A list of module names, a single regex (PEFT full-match semantics) or "all-linear".
TargetModules = Annotated[list[Annotated[str, Field(min_length=1, max_length=200)]] | str,
                          AfterValidator(_check_targets)]
ModuleNames = Annotated[list[Annotated[str, Field(min_length=1, max_length=200)]],
                        Field(max_length=MAX_TARGET_MODULES)]
VirtualTokens = Annotated[int, Field(ge=1, le=512)]


def _check_rank_schedule(v: list[list[int]]) -> list[list[int]]:
    epochs, ranks = [e for e, _ in v], [r for _, r in v]
    if epochs[0] != 0:
        raise ValueError("the first stage must start at epoch 0")
    if any(not 0 <= e <= 49 for e in epochs) or any(not 1 <= r <= 256 for r in ranks):
        raise ValueError("each stage is [epoch, rank] with epoch in 0-49 and rank in 1-256")
    if any(a >= b for a, b in zip(epochs, epochs[1:])) or any(a >= b for a, b in zip(ranks, ranks[1:])):
        raise ValueError("epochs and ranks must both be strictly increasing")
    return v


# LoRA initialisations whose B starts at zero, so added rank changes nothing (rank_schedule).
GROWABLE_INITS = ("default", "gaussian")
# [[epoch, rank], ...]: from each epoch on, that rank (docs/API.md, "Progressive rank growth").
RankSchedule = Annotated[list[Annotated[list[int], Field(min_length=2, max_length=2)]],
                         Field(min_length=1, max_length=16), AfterValidator(_check_rank_schedule)]


class TrainingHyperparameters(_Strict):
    """What every method shares: the optimisation and data settings, with the chapter's defaults.

    Each bound is in docs/API.md ("Limits"). Those that depend on the base model (max_seq_length
    against its context, target modules against its layers) and across fields (batch_size x
    gradient_accumulation_steps) are checked at job creation (``service.catalog.limits``)."""

    n_epochs: Annotated[int, Field(ge=1, le=50)] = 3
    batch_size: Annotated[int, Field(ge=1, le=256)] = 4
    gradient_accumulation_steps: Annotated[int, Field(ge=1, le=256)] = 4
    learning_rate: Annotated[float, Field(gt=0, le=0.01)] = 2e-4
    warmup_ratio: Annotated[float, Field(ge=0, le=0.5)] = 0.03
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    max_seq_length: Annotated[int, Field(ge=8, le=MAX_SEQ_LENGTH)] = 512
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = 42
    # Our extensions, in optimizer steps. eval_steps: evaluate every N steps (0 = only at the end).
    # checkpoint_steps: checkpoint every N steps too (0 = only at each epoch end, where a
    # checkpoint is always written: a restarted run repeats at most an epoch).
    eval_steps: Annotated[int, Field(ge=0, le=1_000_000)] = 0
    checkpoint_steps: Annotated[int, Field(ge=0, le=1_000_000)] = 0
    # "pack" (default) concatenates examples with per-example attention; "pad" pads per batch.
    batching: Literal["pack", "pad"] = "pack"

    @classmethod
    def base_learning_rate(cls) -> float:
        """This method's default rate: what OpenAI's learning_rate_multiplier scales."""
        return cls.model_fields["learning_rate"].default


class Hyperparameters(TrainingHyperparameters):
    """LoRA / QLoRA, with the chapter's defaults (r=8, alpha=2r, dropout 0.05, lr 2e-4).

    ``r`` is checked against the base's max_rank at creation, as are ``bias`` other than "none"
    (served only where serving wraps every layer that has a bias), ``init_lora_weights`` (PiSSA
    and OLoRA are published as a plain LoRA of the shared base, of rank 2r) and
    ``modules_to_save``. The base is 4-bit for "qlora", full precision for "lora"."""

    r: Annotated[int, Field(ge=1, le=256)] = 8
    lora_alpha: Annotated[float, Field(gt=0, le=2048)] | None = None  # None: 2 * r
    lora_dropout: Annotated[float, Field(ge=0, le=0.5)] = 0.05
    target_modules: TargetModules = Field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    bias: Literal["none", "all", "lora_only"] = "none"
    use_dora: bool = False
    use_rslora: bool = False  # scale alpha / sqrt(r) instead of alpha / r
    init_lora_weights: Literal["default", "gaussian", "pissa", "olora", "orthogonal"] = "default"
    modules_to_save: ModuleNames | None = None
    # Progressive rank growth; ``r`` is then the final (published) rank: left out, it is set so.
    rank_schedule: RankSchedule | None = None

    @model_validator(mode="after")
    def _r_is_the_final_rank(self) -> Hyperparameters:
        if self.rank_schedule and "r" not in self.model_fields_set:
            self.r = self.rank_schedule[-1][1]
        return self

    @property
    def alpha(self) -> float:
        return self.lora_alpha if self.lora_alpha is not None else 2.0 * self.r


class _Quantizable(TrainingHyperparameters):
    # "nf4": QLoRA's 4-bit NF4 base under this method's adapter (PEFT supports 4-bit for all five).
    quantization: Literal["none", "nf4"] = "none"


class IA3Hyperparameters(_Quantizable):
    """(IA)3: learned scaling vectors; keys, values and the MLP's input (PEFT's Llama default).
    Its few parameters want a far larger learning rate than LoRA's: 1e-2 left the pirate demo
    unlearned in the demo's 75 steps on tiny-llama, 5e-2 half learned, 1e-1 learned it."""

    learning_rate: Annotated[float, Field(gt=0, le=1.0)] = 1e-1
    target_modules: TargetModules = Field(default_factory=lambda: ["k_proj", "v_proj", "down_proj"])
    # Scaled on their input rather than their output; each must also be a target module.
    feedforward_modules: ModuleNames = Field(default_factory=lambda: ["down_proj"])


class AdaLoraHyperparameters(_Quantizable):
    """AdaLoRA: SVD-form LoRA whose rank budget shrinks from init_r to target_r per layer between
    step tinit and total_steps - tfinal (total steps derived from the job). Checks across fields
    (here and in the virtual-token models) are made at job creation, naming the field."""

    # 2e-3 left the pirate demo unlearned in 75 steps (E starts at zero); 1e-2 learned it.
    learning_rate: Annotated[float, Field(gt=0, le=0.05)] = 1e-2
    init_r: Annotated[int, Field(ge=1, le=256)] = 12
    target_r: Annotated[int, Field(ge=1, le=256)] = 8
    lora_alpha: Annotated[float, Field(gt=0, le=2048)] | None = None  # None: 2 * init_r
    target_modules: TargetModules = Field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    tinit: Annotated[int, Field(ge=0, le=1_000_000)] = 0
    tfinal: Annotated[int, Field(ge=0, le=1_000_000)] = 0
    delta_t: Annotated[int, Field(ge=1, le=1_000_000)] = 1
    beta1: Annotated[float, Field(ge=0, lt=1)] = 0.85
    beta2: Annotated[float, Field(ge=0, lt=1)] = 0.85
    orth_reg_weight: Annotated[float, Field(ge=0, le=10)] = 0.5

    @property
    def alpha(self) -> float:
        return self.lora_alpha if self.lora_alpha is not None else 2.0 * self.init_r


class _VirtualTokenHyperparameters(_Quantizable):
    # Virtual tokens come before every row, so examples cannot be packed into one row.
    batching: Literal["pad"] = "pad"
    learning_rate: Annotated[float, Field(gt=0, le=1.0)] = 3e-2
    num_virtual_tokens: VirtualTokens = 20


class PrefixTuningHyperparameters(_VirtualTokenHyperparameters):
    """Measured on tiny-llama, pirate demo, `auto` shape (100 steps, 10x): 20 tokens at 1e-2 learn
    the voice (held-out loss 3.24 -> 0.48; served answers all pirate)."""

    learning_rate: Annotated[float, Field(gt=0, le=1.0)] = 1e-2
    prefix_projection: bool = False  # reparameterise the prefix through a two-layer MLP
    encoder_hidden_size: Annotated[int, Field(ge=1, le=65536)] | None = None  # None: the model's


class PromptTuningHyperparameters(_VirtualTokenHyperparameters):
    """Input embeddings only, so the small base needs more of them: measured as for prefix tuning,
    20 tokens reached a held-out loss of 1.7 (random init, 3e-2) and 1.4-1.9 (text init, 1e-3 or
    3e-3), 50 tokens 1.30, 6 of 13 served answers with pirate words (docs/API.md, "Methods")."""

    num_virtual_tokens: VirtualTokens = 50
    init: Literal["random", "text"] = "random"
    init_text: Annotated[str, Field(min_length=1, max_length=2000)] | None = None  # with init "text"


class PTuningHyperparameters(_VirtualTokenHyperparameters):
    """Measured as for prefix tuning: the MLP encoder at 1e-2 (20 tokens) left the held-out loss
    at 2.6, at 3e-4 2.1; the LSTM encoder (P-tuning's original) at 3e-4 1.4 with 20 tokens, 1.10
    with 50, 7 of 13 served answers with pirate words; an LSTM 64 wide 1.7-2.1. The encoder is 256
    wide whatever the base (tiny-llama's width): one as wide as a 4096-wide base would train
    ~770M parameters (~40 x width^2); only its output, the virtual tokens, is published."""

    learning_rate: Annotated[float, Field(gt=0, le=1.0)] = 3e-4
    num_virtual_tokens: VirtualTokens = 50
    encoder_reparameterization_type: Literal["MLP", "LSTM"] = "LSTM"
    encoder_hidden_size: Annotated[int, Field(ge=1, le=65536)] | None = 256  # None: the model's
    encoder_num_layers: Annotated[int, Field(ge=1, le=8)] = 2
    encoder_dropout: Annotated[float, Field(ge=0, le=0.5)] = 0.0


AnyHyperparameters = (Hyperparameters | IA3Hyperparameters | AdaLoraHyperparameters
                      | PrefixTuningHyperparameters | PromptTuningHyperparameters | PTuningHyperparameters)
HYPERPARAMETERS: dict[str, type[TrainingHyperparameters]] = {
    "lora": Hyperparameters, "qlora": Hyperparameters, "ia3": IA3Hyperparameters,
    "adalora": AdaLoraHyperparameters, "prefix_tuning": PrefixTuningHyperparameters,
    "prompt_tuning": PromptTuningHyperparameters, "p_tuning": PTuningHyperparameters}


def hyperparameters_for(method: str, values: dict[str, Any]) -> AnyHyperparameters:
    """``values`` (a job row's stored JSON, a request's fields) as ``method``'s model."""
    return HYPERPARAMETERS[method].model_validate(values)


def quantization_of(method: str, hp: TrainingHyperparameters) -> Literal["nf4", "none"]:
    return "nf4" if method == "qlora" else getattr(hp, "quantization", "none")


class _MethodTyped(_Strict):
    """A model with ``method`` and ``hyperparameters``: the latter validated as the method's own
    model (a plain union would take any shape that fits)."""

    @model_validator(mode="before")
    @classmethod
    def _typed_hyperparameters(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("method") in HYPERPARAMETERS \
                and isinstance(data.get("hyperparameters"), dict):
            data = {**data, "hyperparameters": hyperparameters_for(data["method"], data["hyperparameters"])}
        return data

    @model_validator(mode="after")
    def _method_matches(self) -> Any:
        want = HYPERPARAMETERS[self.method]
        if type(self.hyperparameters) is not want:
            raise ValueError(f"method {self.method!r} takes {want.__name__}, not "
                             f"{type(self.hyperparameters).__name__}")
        return self


class Resources(_Strict):
    """A job's compute. These are absolute bounds (a node's worth per worker); what a job may
    really take is set by the cluster's maximum and its tenant's limits, checked at create."""

    num_workers: Annotated[int, Field(ge=1, le=16)] = 1
    gpus_per_worker: Annotated[float, Field(ge=0, le=8)] = 0
    cpus_per_worker: Annotated[float, Field(gt=0, le=128)] = 1


class BaseModelRef(_Strict):
    id: str
    uri: str  # an object-store key prefix ("models/..."), an s3:// URI or a local directory
    checksum: str | None = None  # sha256 over the model's files, recorded in adapter manifests


class TrainJobSpec(_MethodTyped):
    """Everything a training run needs. Handed to the worker; holds no database credentials."""

    job_id: str
    tenant_id: str
    base_model: BaseModelRef
    method: Method
    hyperparameters: AnyHyperparameters
    resources: Resources = Field(default_factory=Resources)
    training_file: str  # object-store key
    training_file_sha256: str
    validation_file: str | None = None
    output_prefix: str  # object-store key prefix where the final adapter goes
    adapter_id: str | None = None  # the id the published adapter will have (manifest.adapter_id)
    checkpoint_prefix: str  # object-store key prefix for checkpoints
    # How the worker reports progress: the control plane's internal endpoint and a job-scoped token.
    control_plane_url: str | None = None
    job_token: str | None = None
    object_store_url: str


class FileDigest(_Strict):
    sha256: str
    bytes: int


class AdapterManifest(_MethodTyped):
    """manifest.json written beside adapter_model.safetensors / adapter_config.json."""

    format_version: Literal[1] = 1
    adapter_id: str
    job_id: str
    tenant_id: str
    base_model: BaseModelRef
    method: Method
    quantization: Literal["nf4", "none"]
    hyperparameters: AnyHyperparameters  # the method's config as trained (adapter_config.json has PEFT's)
    dataset_sha256: str
    metrics: dict[str, float] = Field(default_factory=dict)
    files: dict[str, FileDigest]


EventLevel = Literal["info", "warn", "error"]


class JobEvent(_Strict):
    """One progress report from a worker (step metrics go in ``data``)."""

    level: EventLevel = "info"
    message: str
    type: Literal["message", "metrics", "status", "checkpoint", "warning"] = "message"
    data: dict[str, Any] | None = None


class CheckpointReport(_Strict):
    step: int
    key_prefix: str  # object-store prefix holding a loadable adapter
    metrics: dict[str, float] = Field(default_factory=dict)


class TrainResult(_Strict):
    manifest_key: str
    metrics: dict[str, float] = Field(default_factory=dict)


# Error codes a failed job carries. user_* are the tenant's mistakes, the rest platform failures.
USER_ERROR_CODES = {
    "invalid_training_file",
    "empty_dataset",
    "invalid_hyperparameters",
    "training_diverged",  # NaN/inf loss: usually the learning rate
}
PLATFORM_ERROR_CODES = {"base_model_load_failed", "storage_error", "worker_lost", "internal_error"}


# ---------------------------------------------------------------------------------------------
# Dataset formats (JSON Lines). One example per line; every bad line is reported.
# ---------------------------------------------------------------------------------------------


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str
    weight: Literal[0, 1] | None = None  # OpenAI's per-message training weight


class ChatExample(BaseModel):
    model_config = ConfigDict(extra="ignore")
    messages: list[ChatMessage] = Field(min_length=1)

    @model_validator(mode="after")
    def _needs_assistant(self) -> ChatExample:
        if not any(m.role == "assistant" for m in self.messages):
            raise ValueError("chat example has no assistant turn")
        return self


class CompletionExample(BaseModel):
    model_config = ConfigDict(extra="ignore")
    prompt: str
    completion: str = Field(min_length=1)


class AlpacaExample(BaseModel):
    model_config = ConfigDict(extra="ignore")
    instruction: str = Field(min_length=1)
    input: str = ""
    output: str = Field(min_length=1)


class TextExample(BaseModel):
    model_config = ConfigDict(extra="ignore")
    text: str = Field(min_length=1)


_FORMATS: list[tuple[DatasetFormat, str, type[BaseModel]]] = [
    ("chat", "messages", ChatExample),
    ("completion", "completion", CompletionExample),
    ("alpaca", "instruction", AlpacaExample),
    ("text", "text", TextExample),
]

Example = ChatExample | CompletionExample | AlpacaExample | TextExample


class LineError(_Strict):
    line: int  # 1-based
    reason: str


class DatasetReport(_Strict):
    format: DatasetFormat | None
    examples: int
    errors: list[LineError]

    @property
    def ok(self) -> bool:
        return not self.errors and self.examples > 0


MAX_REPORTED_ERRORS = 100


def parse_example(obj: Any) -> tuple[DatasetFormat, Example]:
    """Classify one decoded JSON line by its distinguishing key and validate it."""
    if not isinstance(obj, dict):
        raise ValueError("line is not a JSON object")
    for fmt, key, model in _FORMATS:
        if key in obj:
            try:
                return fmt, model.model_validate(obj)
            except Exception as exc:  # pydantic.ValidationError, flattened to one line
                raise ValueError(_flatten_validation_error(exc)) from None
    raise ValueError("unknown format: expected one of 'messages', 'prompt'/'completion', "
                     "'instruction'/'output' or 'text'")


def _flatten_validation_error(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return str(exc)
    parts = []
    for err in errors():
        loc = ".".join(str(p) for p in err.get("loc", ()))
        msg = err.get("msg", "invalid").removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def validate_jsonl(lines: Iterable[bytes | str], *, max_line_bytes: int | None = None) -> DatasetReport:
    """Validate a whole JSONL file; all lines must share one format. Blank lines are skipped.

    A UTF-8 BOM and CRLF line ends are accepted (Windows editors write them; OpenAI accepts
    them). A line longer than ``max_line_bytes`` (the caller may pass just its first
    ``max_line_bytes + 1`` bytes) or nested too deeply for the parser is an error of that line.
    """
    fmt: DatasetFormat | None = None
    examples = 0
    errors: list[LineError] = []
    for number, raw in enumerate(lines, start=1):
        try:
            if max_line_bytes is not None and len(raw) > max_line_bytes:
                raise ValueError(f"line is longer than {max_line_bytes} bytes")
            text = raw.decode("utf-8-sig", errors="strict") if isinstance(raw, bytes) else raw.lstrip("\ufeff")
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except RecursionError:
                raise ValueError("JSON nested too deeply") from None
            line_fmt, _ = parse_example(obj)
            if fmt is None:
                fmt = line_fmt
            elif line_fmt != fmt:
                raise ValueError(f"format '{line_fmt}' differs from the file's format '{fmt}'")
            examples += 1
        except (ValueError, UnicodeDecodeError) as exc:  # json.JSONDecodeError is a ValueError
            reason = f"not valid JSON: {exc.msg}" if isinstance(exc, json.JSONDecodeError) else str(exc)
            if len(errors) < MAX_REPORTED_ERRORS:
                errors.append(LineError(line=number, reason=reason))
    if examples == 0 and not errors:
        errors.append(LineError(line=0, reason="file contains no examples"))
    return DatasetReport(format=fmt, examples=examples, errors=errors)


def iter_examples(lines: Iterable[bytes | str]) -> Iterable[tuple[DatasetFormat, Example]]:
    """Parse a validated JSONL file into typed examples."""
    for raw in lines:
        text = raw.decode("utf-8-sig") if isinstance(raw, bytes) else raw.lstrip("\ufeff")
        if text.strip():
            yield parse_example(json.loads(text))


# ---------------------------------------------------------------------------------------------
# Operations on published adapters (workers/ops): merge-and-export, offline weighted blend.
# ---------------------------------------------------------------------------------------------

OperationKind = Literal["export", "blend"]
# PEFT add_weighted_adapter's combination types (chapter 6.5.1, way 2).
COMBINATIONS = ("linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_ties",
                "dare_linear_svd", "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd")
Combination = Literal[COMBINATIONS]  # type: ignore[valid-type]
OPERATION_ERROR_CODES = {"storage_error", "base_model_load_failed", "internal_error", "invalid_adapter"}


class OperationAdapter(_Strict):
    id: str
    prefix: str  # object-store prefix holding manifest.json and the PEFT files
    weight: float = 1.0


class OperationSpec(_Strict):
    """Everything one export or blend run needs (a Ray Job's env, or a file without Ray)."""

    operation_id: str
    kind: OperationKind
    tenant_id: str
    base_model: BaseModelRef
    method: Method  # of the adapters: qlora merges into the dequantised base
    adapters: list[OperationAdapter] = Field(min_length=1)
    combination: Combination | None = None  # blend only
    density: float | None = None  # ties / dare / magnitude_prune
    output_prefix: str
    adapter_id: str | None = None  # blend: the new adapter's id
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # export: the saved weights
    max_shard_size: str = "2GB"
    control_plane_url: str | None = None
    token: str | None = None
    object_store_url: str


class ExportManifest(_Strict):
    """manifest.json of a merged model: every file (shards, config, tokenizer) and its sha256."""

    format_version: Literal[1] = 1
    export_id: str
    adapter_id: str
    tenant_id: str
    base_model: BaseModelRef
    method: Method
    dtype: str
    files: dict[str, FileDigest]


class OperationResult(_Strict):
    manifest_key: str
