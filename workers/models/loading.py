"""Load a base model for adapter training, 4-bit NF4 or not: a first-match dispatcher over backends.

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


# (quantization, backend) pairs tried in order; the first that matches loads the model.
_BACKENDS: list[tuple[str, Callable]] = [("nf4", _load_qlora), ("none", _load_lora)]
# The two LoRA methods name their quantization (benchmarks and tests pass them).
_BY_METHOD = {"qlora": "nf4", "lora": "none"}


def load_base_model(path: Path | str, quantization: str, device: torch.device | str | None = None):
    """The base model at ``path`` ready for PEFT wrapping, on ``device`` (default: cuda if any);
    ``quantization``: "nf4", "none", or the method "qlora" / "lora"."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    quantization = _BY_METHOD.get(quantization, quantization)
    for name, loader in _BACKENDS:
        if name == quantization:
            return loader(Path(path), device)
    raise ValueError(f"unknown quantization {quantization!r}")


def load_tokenizer(path: Path | str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:  # many Llama tokenizers ship without one
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
