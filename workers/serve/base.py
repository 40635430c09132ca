"""The replica's shared base model, loaded once from a local directory, NF4 or not."""

from __future__ import annotations

from pathlib import Path

import torch


def load_serving_base(path: Path, *, quantization: str = "none", device: str | None = None):
    """(model, tokenizer) for inference. ``quantization="nf4"``: 4-bit NF4 weights through
    bitsandbytes (imported only then), computing in bf16 on a GPU and fp32 on the CPU."""
    from transformers import AutoModelForCausalLM

    from workers.models.loading import load_tokenizer

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    kwargs = dict(dtype=dtype, device_map={"": dev}, attn_implementation="sdpa")
    if quantization == "nf4":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    elif quantization != "none":
        raise ValueError(f"unknown quantization {quantization!r}: use 'nf4' or 'none'")
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
    return model, load_tokenizer(path)

