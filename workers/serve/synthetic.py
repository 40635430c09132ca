"""Random-weight Llama models, a small byte-level tokenizer and random PEFT LoRA adapters.

Real model code with random weights, so the engine's tests and benchmarks run anywhere without a
model hub: the CPU tests, ``bench/serve_throughput.py`` and ``bench/gpu/serve_gpu.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tiny_llama_config(*, vocab_size: int = 512, hidden: int = 64, layers: int = 2, heads: int = 4,
                      kv_heads: int = 2, intermediate: int | None = None, max_len: int = 1024,
                      init_range: float = 0.02):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads,
                       intermediate_size=intermediate or int(hidden * 8 / 3) // 8 * 8,
                       max_position_embeddings=max_len, bos_token_id=1, eos_token_id=2,
                       pad_token_id=0, initializer_range=init_range, tie_word_embeddings=False)


def random_llama(config, *, seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in ``dtype`` at once: a 7B model never exists in fp32
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.generation_config.pad_token_id = config.pad_token_id
    return model.eval()


def byte_tokenizer(vocab_size: int = 512):
    """A byte-level BPE trained on a few sentences: real merges, a chat template, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["The quick brown fox jumps over the lazy dog. Hello, how are you today?",
              "LoRA adapters are small low-rank updates to a large shared base model.",
              "Serving many tenants means batching many adapters in one forward pass."] * 20
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", chat_template=CHAT_TEMPLATE)


def save_base(directory: Path, config, *, seed: int = 0) -> Path:
    """A base model directory in the Hugging Face layout (weights, config, tokenizer)."""
    directory = Path(directory)
    random_llama(config, seed=seed).save_pretrained(directory)
    byte_tokenizer(config.vocab_size).save_pretrained(directory)
    return directory


def random_adapters(base, specs: list[dict], *, seed: int = 0):
    """A PeftModel over ``base`` holding one random LoRA adapter per spec (``name``, ``r``,
    ``target_modules``, optional ``lora_alpha``/``use_rslora``), B initialised non-zero so every
    adapter changes the output. ``base`` is modified in place (PEFT injects its layers)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = None
    for spec in specs:
        spec = dict(spec)
        name = spec.pop("name")
        cfg = LoraConfig(init_lora_weights=False, lora_dropout=0.0, **{"lora_alpha": 2 * spec["r"], **spec})
        if peft_model is None:
            peft_model = get_peft_model(base, cfg, adapter_name=name)
        else:
            peft_model.add_adapter(name, cfg)
    peft_model.eval()
    return peft_model


def save_adapters(peft_model, names: list[str], directory: Path) -> dict[str, Path]:
    """Each adapter in its own PEFT directory (adapter_model.safetensors + adapter_config.json)."""
    directory = Path(directory)
    out = {}
    for name in names:
        peft_model.save_pretrained(directory, selected_adapters=[name])
        # PEFT writes non-default adapters to a sub-folder named after them.
        out[name] = directory / name if (directory / name / "adapter_config.json").exists() else directory
        json.loads((out[name] / "adapter_config.json").read_text())  # fail here if not written
    return out


def publish_adapter(store, directory: Path, prefix: str, *, adapter_id: str, base_model_id: str,
                    tenant_id: str = "tn_test", job_id: str = "ftjob-test") -> dict:
    """Upload a PEFT adapter directory with a manifest.json, as a finished training job does."""
    from workers.spec import AdapterManifest, BaseModelRef, FileDigest, Hyperparameters
    from workers.storage import put_bytes

    config = json.loads((Path(directory) / "adapter_config.json").read_text())
    files = {}
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        put = put_bytes(store, f"{prefix}/{name}", (Path(directory) / name).read_bytes())
        files[name] = FileDigest(sha256=put.sha256, bytes=put.bytes)
    targets = config["target_modules"]
    manifest = AdapterManifest(
        adapter_id=adapter_id, job_id=job_id, tenant_id=tenant_id,
        base_model=BaseModelRef(id=base_model_id, uri=f"models/{base_model_id}"), method="lora",
        quantization="none", dataset_sha256="0" * 64, files=files,
        hyperparameters=Hyperparameters(r=config["r"], lora_alpha=config["lora_alpha"],
                                        target_modules=sorted(targets) if isinstance(targets, list) else targets))
    put_bytes(store, f"{prefix}/manifest.json", manifest.model_dump_json().encode())
    return manifest.model_dump()
