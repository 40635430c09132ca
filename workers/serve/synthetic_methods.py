"""Random adapters of every PEFT method the engine serves, made with PEFT itself on a random base.

For the serving tests and ``bench/serve_methods.py``: each adapter is created by PEFT, its
weights perturbed away from PEFT's identity initialisation (so it changes the output), and
saved with ``save_pretrained`` exactly as a training job publishes it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from workers.serve import synthetic

# name → (PEFT config class, its arguments). One of every method; AdaLoRA is pruned per module.
METHOD_SPECS: dict[str, tuple[str, dict]] = {
    "lora": ("LoraConfig", dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])),
    "rslora": ("LoraConfig", dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["k_proj", "o_proj"])),
    "dora": ("LoraConfig", dict(r=4, lora_alpha=8, use_dora=True,
                                target_modules=["q_proj", "o_proj", "up_proj"])),
    "adalora": ("AdaLoraConfig", dict(init_r=6, target_r=3, lora_alpha=8, total_step=10,
                                      target_modules=["q_proj", "v_proj", "down_proj"])),
    "ia3": ("IA3Config", dict(target_modules=["k_proj", "v_proj", "down_proj"],
                              feedforward_modules=["down_proj"])),
    "prompt_tuning": ("PromptTuningConfig", dict(num_virtual_tokens=5)),
    "p_tuning": ("PromptEncoderConfig", dict(num_virtual_tokens=3, encoder_hidden_size=32)),
    "prefix_tuning": ("PrefixTuningConfig", dict(num_virtual_tokens=4)),
}


def _perturb(model, seed: int, adalora_keep: float) -> None:
    """Move every trainable tensor away from its initialisation; AdaLoRA: also prune ranks the
    way its budget allocator does (E zeroed, ``rank_pattern`` recorded) so modules differ."""
    gen = torch.Generator().manual_seed(seed)
    config = model.peft_config["default"]
    pattern = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("ia3_l.default") or name.endswith("lora_magnitude_vector.default"):
                p.mul_(1 + 0.3 * noise)  # scales near their initial value, not near zero
            else:
                p.copy_(0.3 * noise)
            if name.endswith("lora_E.default"):
                keep = torch.rand(p.shape[0], generator=gen) < adalora_keep
                keep[0] = True  # one rank left per module: ranks vary between modules
                p.mul_(keep.view(-1, 1))
                pattern[name.removeprefix("base_model.model.").removesuffix(".default")] = keep.tolist()
    if pattern:
        config.rank_pattern = pattern


def random_method_adapters(config, directory: Path, specs: dict[str, tuple[str, dict]] = METHOD_SPECS,
                           *, seed: int = 0) -> dict[str, Path]:
    """One PEFT adapter directory per spec, over ``synthetic.random_llama(config, seed=0)``."""
    import peft

    out = {}
    for i, (name, (cls, kwargs)) in enumerate(specs.items()):
        torch.manual_seed(seed + i)
        base = synthetic.random_llama(config, seed=0)
        extra = {"init_lora_weights": False, "lora_dropout": 0.0} if cls == "LoraConfig" else {}
        model = peft.get_peft_model(base, getattr(peft, cls)(task_type="CAUSAL_LM", **kwargs, **extra))
        _perturb(model, seed + i, adalora_keep=0.6)
        model.save_pretrained(Path(directory) / name)
        out[name] = Path(directory) / name
    return out


def peft_reference(base, adapter_dir: Path | None):
    """Plain PEFT over ``base`` (a fresh model) for one adapter: what the engine must equal."""
    if adapter_dir is None:
        return base
    from peft import PeftModel

    return PeftModel.from_pretrained(base, adapter_dir).eval()
