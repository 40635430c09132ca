"""OpenAI-compatible inference bodies, typed for validation and for the OpenAPI document.

Permissive on purpose: the official ``openai`` client sends fields we do not use (``user``,
``logprobs``, ``response_format``, …), so unknown fields are allowed and forwarded as sent; the
serving application (workers/serve/front.py) decides what it can serve. What is typed here is
what every OpenAI-compatible server requires, plus the bounds serving enforces anyway, so a
malformed body is a 422 from the control plane, before any database read or proxy hop.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import Body
from pydantic import BaseModel, ConfigDict, Field, field_validator

from service.api.schemas.common import StrictBool, StrictInt, StrictNumber

_MODEL_DESCRIPTION = "A base model id or one of your adapters' ids (GET /v1/models)"
_StopString = Annotated[str, Field(min_length=1, max_length=256)]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = Field(
        None, description="Text, or OpenAI content parts (only text parts are served)")

    @field_validator("content")
    @classmethod
    def _text_parts_hold_strings(cls, v):
        """As serving requires (workers/serve/front.py): a text part's ``text`` is a string."""
        for part in v if isinstance(v, list) else ():
            if part.get("type") == "text" and not isinstance(part.get("text"), str):
                raise ValueError("a content part of type text needs a string text")
        return v


class _InferenceRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: Annotated[str, Field(min_length=1, max_length=300, description=_MODEL_DESCRIPTION)]
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    temperature: Annotated[StrictNumber, Field(ge=0, le=2)] | None = None
    top_p: Annotated[StrictNumber, Field(gt=0, le=1)] | None = None
    # Stop strings: at most 4 of at most 256 characters, as serving enforces (workers/serve/front.py).
    stop: _StopString | Annotated[list[_StopString], Field(max_length=4)] | None = None
    seed: Annotated[StrictInt, Field(ge=-(2**63), le=2**63 - 1, description="A 64-bit signed integer")] | None = None
    n: Annotated[StrictInt, Field(ge=1, le=1)] | None = None
    stream: StrictBool | None = None
    stream_options: dict[str, Any] | None = None

    def forwarded(self) -> dict[str, Any]:
        """The body as the client sent it (unknown fields included), for the serving app."""
        return self.model_dump(exclude_unset=True)


class ChatCompletionRequest(_InferenceRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]


class CompletionRequest(_InferenceRequest):
    prompt: str


CHAT_BODY = Body(openapi_examples={"chat": {"value": {
    "model": "lorafleet/tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}}})
COMPLETION_BODY = Body(openapi_examples={"completion": {"value": {
    "model": "lorafleet/tiny-llama", "prompt": "Once upon a time", "max_tokens": 16}}})
