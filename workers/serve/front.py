"""OpenAI chat/completions requests in, engine requests out, OpenAI response objects back.

No HTTP here: ``ServingFront.run`` yields plain dicts (a response, stream chunks, or one
problem), so the same code answers under uvicorn (``workers.serve.http``) and inside a Ray Serve
replica, whose results cross process boundaries as data, not exceptions.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any, Literal

from jinja2 import TemplateError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from workers.serve.adapters import AdapterCache, AdapterError
from workers.serve.blend import BlendCache
from workers.serve.engine import ContextLengthExceeded, InvalidPrompt, Request, RequestFailed
from workers.serve.lora import AdapterFormatError
from workers.serve.runner import EngineRunner
from workers.serve.sampling import SamplingParams

Kind = Literal["chat", "completion"]
# Characters one token can stand for when the tokenizer's vocabulary cannot tell us (see
# ``max_chars_per_token``); generous, so the pre-check never refuses what would fit.
FALLBACK_CHARS_PER_TOKEN = 64
PROBLEM_BASE = "https://lorafleet.dev/problems/"
# Stop strings are searched on the engine thread every batch shares (``Engine._detokenize``):
# bounded in number and length, so one tenant's stops cannot slow everyone's decoding.
MAX_STOPS, MAX_STOP_CHARS = 4, 256
# torch.Generator.manual_seed takes a 64-bit integer; OpenAI documents seed as an int64.
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1

log = logging.getLogger(__name__)


def problem(status: int, code: str, detail: str, param: str | None = None) -> dict:
    """RFC 9457 body with OpenAI's ``error`` mirrored (docs/API.md)."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"type": PROBLEM_BASE + code, "title": code.replace("_", " ").capitalize(), "status": status,
            "detail": detail, "code": code, "param": param,
            "error": {"message": detail, "type": kind, "code": code, "param": param}}


class Problem(Exception):
    def __init__(self, status: int, code: str, detail: str, param: str | None = None):
        super().__init__(detail)
        self.body = problem(status, code, detail, param)


class AdapterRef(BaseModel):
    id: str
    prefix: str
    base_model_id: str


class BaseRef(BaseModel):
    id: str
    uri: str | None = None


class BlendPart(BaseModel):
    id: str
    prefix: str
    weight: float


class Routing(BaseModel):
    """The ``lorafleet`` field only the control plane sets (docs/API.md, Inference)."""

    adapter: AdapterRef | None = None
    base_model: BaseRef | None = None
    # A live weighted blend: the tenant's adapters, ownership checked by the control plane.
    blend: list[BlendPart] | None = None


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use (user, …)
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    stream_options: dict | None = None
    lorafleet: Routing | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else v or []
        if len(stops) > MAX_STOPS or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop takes up to {MAX_STOPS} non-empty strings of at most "
                             f"{MAX_STOP_CHARS} characters")
        return stops

    def sampling(self, default_max: int) -> SamplingParams:
        return SamplingParams(max_tokens=self.max_completion_tokens or self.max_tokens or default_max,
                              temperature=self.temperature, top_p=self.top_p, seed=self.seed,
                              stop=tuple(self.stop or ()))


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    @field_validator("content")
    @classmethod
    def _text_parts(cls, v):
        """A text part's ``text`` is a string: anything else is the caller's error (a 422), not a
        TypeError in ``text()`` that would end the request as a server failure."""
        for part in v if isinstance(v, list) else ():
            if part.get("type") == "text" and not isinstance(part.get("text"), str):
                raise ValueError("a content part of type text needs a string text")
        return v

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: only text is served
            return "".join(p.get("text", "") for p in self.content if p.get("type") == "text")
        return self.content or ""


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(_Common):
    prompt: str


class ServingFront:
    def __init__(self, runner: EngineRunner, cache: AdapterCache, tokenizer, *, base_model_id: str,
                 default_max_tokens: int = 256):
        self.runner, self.cache, self.tokenizer = runner, cache, tokenizer
        self.base_model_id, self.default_max_tokens = base_model_id, default_max_tokens
        self.chars_per_token = max_chars_per_token(tokenizer)
        self.blends = BlendCache()

    def check_health(self) -> None:
        """Raises when this replica cannot serve (``EngineRunner.check_health``)."""
        self.runner.check_health()

    async def health(self) -> None:
        """``check_health`` off the event loop: on a GPU its probe waits for queued kernels."""
        await asyncio.to_thread(self.runner.check_health)

    async def run(self, kind: Kind, body: dict) -> AsyncIterator[dict]:
        """Yields ``{"problem": …}`` once, or ``{"response": …}``, or ``{"chunk": …}`` per SSE event."""
        try:
            req = self._parse(kind, body)
            adapter = await self._adapter(req)
            prompt_ids = self._encode(kind, req)
            # Unasked, a completion may use what the context leaves, up to the default.
            # Prompt and prefix tuning put their virtual tokens in the context too.
            parts = getattr(adapter, "parts", None)
            room = self.runner.engine.max_len - len(prompt_ids) - (parts.virtual_tokens if parts else 0)
            params = req.sampling(min(self.default_max_tokens, room))
            if req.stream:
                # aclosing: a client that leaves closes this generator, and with it the engine
                # request (runner.stream aborts it), now rather than at garbage collection.
                async with aclosing(self._stream(kind, req, prompt_ids, params, adapter)) as stream:
                    async for chunk in stream:
                        yield {"chunk": chunk}
            else:
                done = await self.runner.generate(prompt_ids, params, adapter)
                yield {"response": self._response(kind, req.model, done)}
        except Problem as exc:
            yield {"problem": exc.body}
        except AdapterError as exc:
            yield {"problem": problem(exc.status, exc.code, str(exc), "model")}
        except AdapterFormatError as exc:
            yield {"problem": problem(422, "adapter_invalid", str(exc), "model")}
        except RequestFailed as exc:  # our words; the cause was logged where it happened
            yield {"problem": problem(exc.status, exc.code, str(exc))}
        except ContextLengthExceeded as exc:  # Engine.submit: prompt + max_tokens past the context
            yield {"problem": problem(400, "context_length_exceeded", str(exc), "max_tokens")}
        except InvalidPrompt as exc:  # Engine.submit, in our words: a prompt the model cannot read
            yield {"problem": problem(400, "invalid_request", str(exc), "prompt")}
        except ValueError:  # a library refusing what the request asked for: its text is not ours
            log.warning("request refused by a library", exc_info=True)
            yield {"problem": problem(400, "invalid_request", "this replica cannot serve the request "
                                                              "with these settings")}
        except Exception:  # noqa: BLE001 - a bug: a plain 500, never a retryable 503 (Ray's path)
            log.exception("serving a %s request failed", kind)
            yield {"problem": problem(500, "internal_error", "serving this request failed on this replica")}

    # ---- request side -------------------------------------------------------------------------

    def _parse(self, kind: Kind, body: dict) -> ChatRequest | CompletionRequest:
        try:
            return (ChatRequest if kind == "chat" else CompletionRequest).model_validate(body)
        except ValidationError as exc:
            err = exc.errors()[0]
            param = ".".join(str(p) for p in err["loc"]) or None
            raise Problem(422, "validation_error", f"{param}: {err['msg']}", param) from None

    async def _adapter(self, req: ChatRequest | CompletionRequest):
        routing = req.lorafleet or Routing()
        if routing.base_model is not None and routing.base_model.id != self.base_model_id:
            raise Problem(422, "base_model_mismatch",
                          f"this replica serves {self.base_model_id!r}, not {routing.base_model.id!r}", "model")
        if routing.adapter is None:
            if req.model != self.base_model_id:  # never answer an unknown adapter with the base
                raise Problem(404, "model_not_found", f"the model {req.model!r} does not exist", "model")
            return None
        ref = routing.adapter
        if ref.base_model_id != self.base_model_id:
            raise Problem(422, "adapter_base_mismatch",
                          f"adapter {ref.id!r} was trained for base model {ref.base_model_id!r}; "
                          f"this replica serves {self.base_model_id!r}", "model")
        if routing.blend:
            return await self._blend(routing.blend)
        return await self.cache.get(ref.id, ref.prefix)

    async def _blend(self, blend: list[BlendPart]):
        """One adapter composed from the blend's (workers.serve.blend), checked like a loaded one."""
        parts = [(await self.cache.get(p.id, p.prefix), p.weight) for p in blend]
        adapter = self.blends.get(parts, adapter_id="+".join(p.id for p in blend))
        if self.cache.device is not None:
            self.cache.device.check(adapter)  # the summed rank against this replica's stacks
        return adapter

    def _encode(self, kind: Kind, req: ChatRequest | CompletionRequest) -> list[int]:
        limit = self.runner.engine.max_len
        param = "messages" if kind == "chat" else "prompt"
        # Before tokenising, which costs CPU in proportion to the text: no token stands for more
        # than ``chars_per_token`` characters, so a longer text cannot fit in the context.
        chars = sum(len(m.text()) for m in req.messages) if kind == "chat" else len(req.prompt)
        if chars >= limit * self.chars_per_token:
            raise Problem(400, "context_length_exceeded",
                          f"the prompt has {chars} characters, more than fit in this model's context "
                          f"of {limit} tokens", param)
        try:
            if kind == "chat":
                messages = [{"role": m.role, "content": m.text()} for m in req.messages]
                ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
                ids = ids["input_ids"] if hasattr(ids, "keys") else ids  # transformers 5 returns a dict
            else:
                ids = self.tokenizer(req.prompt)["input_ids"]
        except TemplateError:  # the model's template refuses these messages (roles, their order)
            log.info("the chat template refused the messages", exc_info=True)
            raise Problem(400, "invalid_request", "this model's chat template does not accept these "
                          "messages (check their roles and order)", param) from None
        except (ValueError, TypeError):  # the tokenizer cannot read this text
            log.warning("tokenising the request failed", exc_info=True)
            raise Problem(400, "invalid_request", "this model's tokenizer cannot read the prompt",
                          param) from None
        if not ids:
            raise Problem(400, "invalid_request", "the prompt is empty", "prompt")
        if len(ids) >= limit:
            raise Problem(400, "context_length_exceeded",
                          f"the prompt has {len(ids)} tokens; this model's context is {limit}", param)
        return list(ids)

    # ---- response side ------------------------------------------------------------------------

    @staticmethod
    def _usage(done: Request) -> dict:
        p, c = len(done.prompt_ids), len(done.output_ids)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def _response(self, kind: Kind, model: str, done: Request) -> dict:
        base = {"id": _new_id(kind), "created": int(time.time()), "model": model,
                "usage": self._usage(done)}
        if kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": done.text},
                      "finish_reason": done.finish_reason, "logprobs": None}
            return {**base, "object": "chat.completion", "choices": [choice]}
        choice = {"index": 0, "text": done.text, "finish_reason": done.finish_reason, "logprobs": None}
        return {**base, "object": "text_completion", "choices": [choice]}

    async def _stream(self, kind: Kind, req, prompt_ids, params, adapter) -> AsyncIterator[dict]:
        head = {"id": _new_id(kind), "created": int(time.time()), "model": req.model,
                "object": "chat.completion.chunk" if kind == "chat" else "text_completion"}

        def chunk(text: str, finish: str | None, role: bool = False) -> dict:
            if kind == "chat":
                delta = {"role": "assistant", "content": text} if role else ({"content": text} if text else {})
                return {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                                             "logprobs": None}]}
            return {**head, "choices": [{"index": 0, "text": text, "finish_reason": finish,
                                         "logprobs": None}]}

        if kind == "chat":
            yield chunk("", None, role=True)
        done = None
        async with aclosing(self.runner.stream(prompt_ids, params, adapter)) as tokens:
            async for delta, done in tokens:
                if delta or done.finish_reason:
                    yield chunk(delta, done.finish_reason)
        if (req.stream_options or {}).get("include_usage"):
            yield {**head, "choices": [], "usage": self._usage(done)}

    # ---- operations ---------------------------------------------------------------------------

    def close(self) -> None:
        self.runner.close()

    async def evict(self, adapter_id: str) -> bool:
        for blend_id in self.blends.evict(adapter_id):  # blends using it go with it
            if self.cache.device is not None:
                self.cache.device.evict(blend_id)
        return self.cache.evict(adapter_id)

    async def stats(self) -> dict:
        engine = self.runner.engine
        return {"base_model_id": self.base_model_id, "engine": {**engine.stats, **engine.load()},
                "adapters": self.cache.stats()}


def max_chars_per_token(tokenizer) -> int:
    """An upper bound on the characters of text one token can consume: the longest vocabulary
    entry. Byte-level and SentencePiece entries spell each character with at least one
    character of their own (byte fallback entries like ``<0x0A>`` only overestimate), so a text
    of N characters needs at least N / bound tokens."""
    try:
        vocab = tokenizer.get_vocab()
        longest = max((len(piece) for piece in vocab), default=0)
    except Exception:  # noqa: BLE001 - no usable vocabulary: fall back to the generous constant
        return FALLBACK_CHARS_PER_TOKEN
    return max(longest, 1) if longest else FALLBACK_CHARS_PER_TOKEN


def _new_id(kind: Kind) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
