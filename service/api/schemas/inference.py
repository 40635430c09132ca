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
from pydantic import BaseModel, ConfigDict, Field

from service.api.schemas.common import StrictBool, StrictInt, StrictNumber

_MODEL_DESCRIPTION = "A base model id or one of your adapters' ids (GET /v1/models)"


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = Field(
        None, description="Text, or OpenAI content parts (only text parts are served)")


class _InferenceRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: Annotated[str, Field(min_length=1, max_length=300, description=_MODEL_DESCRIPTION)]
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    temperature: Annotated[StrictNumber, Field(ge=0, le=2)] | None = None
    top_p: Annotated[StrictNumber, Field(gt=0, le=1)] | None = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    seed: StrictInt | None = None
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
