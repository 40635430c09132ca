from __future__ import annotations

from typing import Any

from ..types import ChatCompletion, ChatCompletionChunk, Completion
from ._base import Resource, drop_none


def _flat(extra: dict[str, Any]) -> dict[str, Any]:
    """``extra_body`` merged into the other fields, as openai-python sends it: never a field of
    that name the server would ignore."""
    return {**{k: v for k, v in extra.items() if k != "extra_body"}, **(extra.get("extra_body") or {})}


class _Generation(Resource):
    """One POST that answers either a whole object or, with ``stream=True``, a stream of chunks."""

    def _generate(self, path: str, body: dict[str, Any], stream: bool, cast, chunk_cast):
        if stream:
            body["stream"] = True
            return self._client._stream(self._core.request("POST", path, json=body, stream=True), chunk_cast)
        return self._client._run(self._core.request("POST", path, json=body, cast=cast))


class ChatCompletions(_Generation):
    def create(self, *, model: str, messages: list[dict[str, Any]], stream: bool = False,
               max_tokens: int | None = None, temperature: float | None = None,
               top_p: float | None = None, stop: str | list[str] | None = None,
               seed: int | None = None, **extra: Any):
        """A ChatCompletion, or with ``stream=True`` a stream of ChatCompletionChunk. Other fields
        (``adapters=[…]`` for a live blend) go in the body as given, or in ``extra_body`` as the
        openai client takes them."""
        body = drop_none(model=model, messages=messages, max_tokens=max_tokens,
                         temperature=temperature, top_p=top_p, stop=stop, seed=seed, **_flat(extra))
        return self._generate("/v1/chat/completions", body, stream, ChatCompletion.model_validate,
                              ChatCompletionChunk.model_validate)


class Chat(Resource):
    def __init__(self, client):
        super().__init__(client)
        self.completions = ChatCompletions(client)


class Completions(_Generation):
    def create(self, *, model: str, prompt: str | list[str], stream: bool = False,
               max_tokens: int | None = None, temperature: float | None = None,
               top_p: float | None = None, stop: str | list[str] | None = None,
               seed: int | None = None, **extra: Any):
        """A Completion, or with ``stream=True`` a stream of Completion chunks (other fields as for
        chat)."""
        body = drop_none(model=model, prompt=prompt, max_tokens=max_tokens,
                         temperature=temperature, top_p=top_p, stop=stop, seed=seed, **_flat(extra))
        return self._generate("/v1/completions", body, stream, Completion.model_validate,
                              Completion.model_validate)
