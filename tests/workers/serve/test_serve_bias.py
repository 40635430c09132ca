"""Adapters trained with PEFT ``bias="all"`` / ``"lora_only"`` are served, with the greedy tokens
of PEFT itself, beside adapters without biases and rows without an adapter."""

from __future__ import annotations

import pytest
import torch

from workers.serve import synthetic
from workers.serve.engine import Engine
from workers.serve.lora import AdapterFormatError, load_peft_adapter
from workers.serve.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=10, temperature=0)
SPECS = {
    "all": dict(r=8, target_modules=["q_proj", "v_proj"], bias="all"),
    "lora_only": dict(r=4, target_modules=["q_proj", "k_proj", "o_proj", "down_proj"], bias="lora_only"),
    "plain": dict(r=8, target_modules=["gate_proj", "up_proj"]),
}


@pytest.fixture(scope="module")
def biased(tmp_path_factory):
    """A tiny Llama whose attention and MLP layers have biases, and one PEFT model per adapter
    (bias="all" trains the base's own bias parameters, so each needs its own copy), with those
    biases moved as training would move them."""
    from peft import LoraConfig, get_peft_model

    config = synthetic.tiny_llama_config(intermediate=192, init_range=0.1)
    config.attention_bias = config.mlp_bias = True
    root = tmp_path_factory.mktemp("biased")
    refs, dirs = {}, {}
    for i, (name, spec) in enumerate(SPECS.items()):
        torch.manual_seed(100 + i)
        peft = get_peft_model(synthetic.random_llama(config, seed=0),
                              LoraConfig(init_lora_weights=False, lora_dropout=0.0, lora_alpha=2 * spec["r"], **spec))
        with torch.no_grad():
            for param_name, p in peft.named_parameters():
                if p.requires_grad and param_name.endswith("bias"):
                    p.add_(torch.randn_like(p) * 0.5)
        peft.eval()
        dirs[name] = root / name
        peft.save_pretrained(dirs[name])
        refs[name] = peft
    return config, refs, dirs


def reference(peft, prompt: list[int]) -> list[int]:
    out = peft.generate(torch.tensor([prompt]), max_new_tokens=GREEDY.max_tokens, do_sample=False)
    return out[0, len(prompt):].tolist()


def test_bias_trained_adapters_equal_peft_in_a_mixed_batch(biased, prompts):
    config, refs, dirs = biased
    from safetensors.torch import load_file

    assert any(k.endswith("bias") for k in load_file(dirs["all"] / "adapter_model.safetensors"))
    adapters = {n: load_peft_adapter(dirs[n], key=n, adapter_id=n) for n in SPECS}
    assert set(adapters["all"].biases) > set(adapters["all"].weights)  # k, o, mlp biases too
    engine = Engine(synthetic.random_llama(config, seed=0), max_batch=8, max_len=64, adapter_slots=3)
    names = ["all", None, "lora_only", "plain", "all"]
    texts = prompts([5, 7, 6, 8, 4], seed=31)
    outs = engine.generate_batch(texts, GREEDY, [adapters[n] if n else None for n in names])
    base = synthetic.random_llama(config, seed=0).eval()
    for prompt, name, req in zip(texts, names, outs):
        want = reference(refs[name], prompt) if name else reference(base, prompt)
        assert req.output_ids == want, name
    # The biases matter: the same adapter without them answers differently.
    stripped = load_peft_adapter(dirs["all"], key="stripped", adapter_id="stripped")
    stripped.biases.clear()
    (plain_out,) = engine.generate_batch([texts[0]], GREEDY, [stripped])
    assert plain_out.output_ids != outs[0].output_ids


def test_a_trained_bias_for_a_layer_without_one_is_refused(biased, tiny):
    _, _, dirs = biased
    adapter = load_peft_adapter(dirs["all"], key="b", adapter_id="b")
    # The session's tiny base has no biases: an adapter carrying them cannot be served on it.
    adapter.biases = {k.replace("layers.1", "layers.0"): v[: tiny.config.hidden_size]
                      for k, v in adapter.biases.items() if "q_proj" in k}
    adapter.weights = {}
    engine = Engine(tiny.base_model(), max_batch=2, max_len=64, adapter_slots=1)
    with pytest.raises(AdapterFormatError, match="has a trained bias but the base model's layer has none"):
        engine.submit([5, 6], GREEDY, adapter)
