"""Load a base model for LoRA or QLoRA training: a first-match dispatcher over backends.

bitsandbytes is imported only by the 4-bit backend, so CPU-only machines without it still
import (and LoRA-train with) everything else.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch


def _load_qlora(path: Path, device: torch.device):
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, device_map={"": device},
                                                 attn_implementation="sdpa")
    # Casts norms/embeddings to fp32 and turns on gradient checkpointing (re-entrant-free, so
    # it composes with DDP and frozen inputs).
    return prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})


def _load_lora(path: Path, device: torch.device):
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map={"": device},
                                                attn_implementation="sdpa")


# (method, backend) pairs tried in order; the first whose method matches loads the model.
_BACKENDS: list[tuple[str, Callable]] = [("qlora", _load_qlora), ("lora", _load_lora)]


def load_base_model(path: Path | str, method: str, device: torch.device | str | None = None):
    """The base model at ``path`` ready for PEFT wrapping, on ``device`` (default: cuda if any)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    for name, loader in _BACKENDS:
        if name == method:
            return loader(Path(path), device)
    raise ValueError(f"unknown method {method!r}")


def quantization_of(method: str) -> str:
    return "nf4" if method == "qlora" else "none"


def load_tokenizer(path: Path | str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:  # many Llama tokenizers ship without one
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
