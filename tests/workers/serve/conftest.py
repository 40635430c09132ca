"""A small random Llama, random PEFT adapters (different ranks and target modules) and the plain
PEFT reference model every serving test compares against."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from workers.serve import synthetic
from workers.serve.lora import LoraAdapter, load_peft_adapter

# Ranks 8 and 16, overlapping and disjoint target modules, plain and rsLoRA scaling.
ADAPTER_SPECS = [
    dict(name="ad8", r=8, target_modules=["q_proj", "v_proj"]),
    dict(name="ad16", r=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
         use_rslora=True),
    dict(name="mlp8", r=8, target_modules=["gate_proj", "up_proj"], lora_alpha=8),
]


@dataclass
class Tiny:
    config: object
    base_dir: Path  # HF directory of the base model (weights + tokenizer)
    adapter_dirs: dict[str, Path]
    peft: object  # PeftModel over the same base, holding every adapter
    tokenizer: object

    def adapter(self, name: str) -> LoraAdapter:
        return load_peft_adapter(self.adapter_dirs[name], key=name, adapter_id=name)

    def base_model(self):
        return synthetic.random_llama(self.config, seed=0)

    def reference(self, prompt_ids: list[int], adapter: str | None, max_tokens: int) -> list[int]:
        """Greedy tokens of plain PEFT generate, the request alone."""
        ids = torch.tensor([prompt_ids])
        kw = dict(max_new_tokens=max_tokens, do_sample=False)
        if adapter is None:
            with self.peft.disable_adapter():
                out = self.peft.generate(ids, **kw)
        else:
            self.peft.set_adapter(adapter)
            out = self.peft.generate(ids, **kw)
        return out[0, len(prompt_ids):].tolist()


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Tiny:
    root = tmp_path_factory.mktemp("tiny")
    # A wider init than HF's default keeps the top-2 logit margins of a random model well above
    # float rounding, so "identical greedy output" tests the algorithm, not luck.
    # Widths divisible by 64: bitsandbytes' CPU 4-bit kernels require it (the NF4 test).
    config = synthetic.tiny_llama_config(intermediate=192, init_range=0.1)
    base_dir = synthetic.save_base(root / "base", config, seed=0)
    peft = synthetic.random_adapters(synthetic.random_llama(config, seed=0), ADAPTER_SPECS)
    dirs = synthetic.save_adapters(peft, [s["name"] for s in ADAPTER_SPECS], root / "adapters")
    return Tiny(config, base_dir, dirs, peft, synthetic.byte_tokenizer(config.vocab_size))


@pytest.fixture
def prompts(tiny):
    """prompts([5, 8], seed=1): random token-id prompts of those lengths."""

    def make(lengths: list[int], seed: int = 0) -> list[list[int]]:
        gen = torch.Generator().manual_seed(seed)
        return [torch.randint(3, tiny.config.vocab_size, (n,), generator=gen).tolist() for n in lengths]

    return make
