"""Merge an adapter into its base model and write the full model (chapter 6.2.4).

``merge_and_unload`` always runs in full precision: a QLoRA adapter is merged into its base
*dequantised* from the very NF4 weights it was trained against (chapter 6.8.3: merging into
4-bit stacks quantisation error on top of the adapter's). The result is plain Hugging Face
files a user loads with ``AutoModelForCausalLM``: sharded safetensors, config, generation
config and tokenizer, plus ``manifest.json`` with every file's sha256.

Runnable without Ray: ``python -m workers.ops.export --base DIR --adapter DIR [--quantized] --out DIR``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from workers.models.registry import file_sha256s
from workers.spec import FileDigest

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MANIFEST = "manifest.json"
# PEFT types whose weights fold into the base's: prompt / prefix tuning add virtual tokens instead.
MERGEABLE_PEFT_TYPES = {"LORA", "ADALORA", "IA3"}


class NotMergeable(ValueError):
    """The adapter's method has no weights to fold into the base."""


def dequantized_base(base_dir: Path):
    """The base as a QLoRA run saw it: loaded in NF4 (as workers.models.loading does), then each
    4-bit layer dequantised to float32."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=quant,
                                                 device_map={"": "cpu"}, attn_implementation="sdpa")
    model = model.dequantize()  # bitsandbytes' own inverse; also drops the quantization config
    return model.to(torch.float32)


def full_precision_base(base_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, device_map={"": "cpu"},
                                                attn_implementation="sdpa")


def check_mergeable(adapter_config: dict) -> None:
    peft_type = adapter_config.get("peft_type", "LORA")
    if peft_type not in MERGEABLE_PEFT_TYPES:
        raise NotMergeable(f"a {peft_type} adapter cannot be merged into its base model: it adds "
                           f"virtual tokens, not weights; serve it as an adapter instead")


def merged_model(base_dir: Path, adapter_dir: Path, *, quantized: bool):
    """base (dequantised from NF4 when the adapter was ``quantized``) + adapter, merged in float32."""
    import json

    from peft import PeftModel

    check_mergeable(json.loads((Path(adapter_dir) / "adapter_config.json").read_text()))
    base = dequantized_base(base_dir) if quantized else full_precision_base(base_dir)
    return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()


def write_model(model, tokenizer, out_dir: Path, *, dtype: str = "float32",
                max_shard_size: str = "2GB") -> dict[str, FileDigest]:
    """Save ``model`` (cast to ``dtype`` only now: the merge itself ran in float32) and
    ``tokenizer``; returns every written file's digest, by path relative to ``out_dir``."""
    out_dir = Path(out_dir)
    model.to(DTYPES[dtype]).save_pretrained(out_dir, max_shard_size=max_shard_size, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return digests(out_dir)


def digests(directory: Path) -> dict[str, FileDigest]:
    return {rel: FileDigest(sha256=sha, bytes=size)
            for rel, (sha, size) in file_sha256s(directory, skip=MANIFEST).items()}


def export_local(base_dir: Path, adapter_dir: Path, out_dir: Path, *, quantized: bool,
                 dtype: str = "float32", max_shard_size: str = "2GB") -> dict[str, FileDigest]:
    from transformers import AutoTokenizer

    model = merged_model(base_dir, adapter_dir, quantized=quantized)
    return write_model(model, AutoTokenizer.from_pretrained(base_dir), out_dir, dtype=dtype,
                       max_shard_size=max_shard_size)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Merge a LoRA/QLoRA adapter into its base model")
    parser.add_argument("--base", required=True, type=Path, help="the base model's HF directory")
    parser.add_argument("--adapter", required=True, type=Path, help="the PEFT adapter directory")
    parser.add_argument("--quantized", action="store_true", help="the adapter was trained on the NF4 base (QLoRA)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--max-shard-size", default="2GB")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    files = export_local(args.base, args.adapter, args.out, quantized=args.quantized, dtype=args.dtype,
                         max_shard_size=args.max_shard_size)
    print(f"wrote {len(files)} files to {args.out}")


if __name__ == "__main__":
    main()
