"""What the control plane knows about base models' layers, without torch: static metadata.

The serving engine wraps the seven linear layers of a Llama-style decoder block
(``workers.serve.lora.DEFAULT_WRAPPED``; tests keep the two lists equal), so an adapter may only
target those. For architectures with that layout we also know where each layer sits
(``model.layers.<i>.<block>.<name>``), which checks dotted names like ``self_attn.q_proj`` and
regexes. Built-in models also ship their layer count and context length; a base model an admin
registers gets its layout from its ``architecture`` (unknown architectures: names only).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

# The linear layers serving can apply LoRA to, and the block of a decoder layer each sits in.
SERVABLE_LINEAR = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
                   "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
# Families whose decoder layers are exactly ``model.layers.<i>.{self_attn,mlp}.<linear>``.
LLAMA_LAYOUT = frozenset({"llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2"})
# Every other module of such a model (a regex matching one of them trains what serving lacks).
OTHER_MODULES = ("model", "model.embed_tokens", "model.layers", "model.norm", "model.rotary_emb", "lm_head")
OTHER_PER_LAYER = ("", ".self_attn", ".mlp", ".input_layernorm", ".post_attention_layernorm",
                   ".mlp.act_fn")
# When the layer count is unknown, regexes are tried against this many layers' names.
ASSUMED_LAYERS = 128


@dataclass(frozen=True)
class ModelFacts:
    architecture: str | None
    layers: int | None = None  # decoder layers, when known
    context: int | None = None  # max_position_embeddings, when known


# Shipped models (``workers.models``), by source URI; a test checks them against the real model.
BUILTIN = {"builtin://lorafleet/tiny-llama": ModelFacts("llama", layers=4, context=2048)}


def facts_for(source_uri: str, architecture: str | None) -> ModelFacts:
    known = BUILTIN.get(source_uri)
    if known is not None:
        return known
    arch = (architecture or "").lower().removesuffix("forcausallm") or None
    return ModelFacts(arch)


def has_llama_layout(facts: ModelFacts) -> bool:
    return facts.architecture in LLAMA_LAYOUT


@lru_cache(maxsize=64)
def full_names(layers: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(servable, not servable) module names of a Llama-layout model with ``layers`` layers."""
    servable = tuple(f"model.layers.{i}.{block}.{name}"
                     for i in range(layers) for name, block in SERVABLE_LINEAR.items())
    others = OTHER_MODULES + tuple(f"model.layers.{i}{part}" for i in range(layers) for part in OTHER_PER_LAYER)
    return servable, others
