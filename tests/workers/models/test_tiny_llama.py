"""The built-in base model and how references to base models resolve and load."""

from __future__ import annotations

import json
import re

import pytest
import torch

from workers.models.loading import load_base_model, load_tokenizer
from workers.models.registry import (MODEL_INDEX, BaseModelError, model_checksum, resolve_base_model,
                                     upload_model)
from workers.spec import BaseModelRef

BUILTIN = BaseModelRef(id="lorafleet/tiny-llama", uri="builtin://lorafleet/tiny-llama")


def test_tiny_llama_is_a_trained_chat_language_model(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    assert isinstance(model, LlamaForCausalLM)
    assert 2e6 < sum(p.numel() for p in model.parameters()) < 2e7
    text = tok("Every morning the dog barks at the market.", return_tensors="pt")
    random_model = LlamaForCausalLM(LlamaConfig.from_pretrained(tiny_llama_dir)).eval()
    with torch.no_grad():
        trained = model(**text, labels=text.input_ids).loss.item()
        untrained = random_model(**text, labels=text.input_ids).loss.item()
    assert trained < 2.5 < untrained  # pre-training happened
    prompt = tok.apply_chat_template([{"role": "user", "content": "What color is the grass?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert tok.decode(prompt["input_ids"][0]).endswith("<|assistant|>\n")
    out = model.generate(**prompt, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, prompt["input_ids"].shape[1]:])
    assert re.fullmatch(r"The \w+ is \w+\.<\|end\|>", answer), answer  # the corpus's answer form


def test_builtin_is_uploaded_once_and_cached_by_checksum(store_with_tiny_llama, tiny_llama_dir, tmp_path, monkeypatch):
    store = store_with_tiny_llama
    monkeypatch.setenv("LORAFLEET_MODEL_CACHE", str(tmp_path / "cache"))
    index = json.loads(store.open(f"models/lorafleet/tiny-llama/{MODEL_INDEX}").read())
    path = resolve_base_model(BUILTIN, store)
    assert path == tmp_path / "cache" / index["checksum"]
    assert model_checksum(path) == model_checksum(tiny_llama_dir) == index["checksum"]
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert resolve_base_model(BUILTIN.model_copy(update={"checksum": index["checksum"]}), store) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime  # served from the cache
    with pytest.raises(BaseModelError, match="checksum"):
        resolve_base_model(BUILTIN.model_copy(update={"checksum": "0" * 64}), store)


def test_resolve_prefix_s3_uri_and_local_dir(s3_store, s3_credentials, tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFLEET_MODEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_credentials["endpoint_url"])
    checksum = upload_model(s3_store, tiny_llama_dir, "models/imported/llama")
    by_prefix = resolve_base_model(BaseModelRef(id="x", uri="models/imported/llama"), s3_store)
    by_uri = resolve_base_model(BaseModelRef(id="x", uri=f"s3://{s3_store.bucket}/lorafleet/models/imported/llama"),
                                s3_store)
    local = resolve_base_model(BaseModelRef(id="x", uri=str(tiny_llama_dir)), s3_store)
    assert by_prefix == by_uri == tmp_path / "cache" / checksum
    assert local == tiny_llama_dir
    with pytest.raises(BaseModelError):
        resolve_base_model(BaseModelRef(id="x", uri="models/nothing-here"), s3_store)
    with pytest.raises(BaseModelError):
        resolve_base_model(BaseModelRef(id="x", uri=str(tmp_path)), s3_store)
    with pytest.raises(BaseModelError):
        resolve_base_model(BaseModelRef(id="x", uri="builtin://lorafleet/huge-llama"), s3_store)


def test_loading_dispatches_on_method(tiny_llama_dir):
    import bitsandbytes as bnb

    qlora = load_base_model(tiny_llama_dir, "qlora", "cpu")
    q_proj = qlora.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit) and q_proj.weight.quant_state.quant_type == "nf4"
    assert q_proj.weight.quant_state.nested  # double quantisation
    assert qlora.is_gradient_checkpointing
    lora = load_base_model(tiny_llama_dir, "lora", "cpu")
    assert lora.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    assert load_tokenizer(tiny_llama_dir).pad_token == "<pad>"
    with pytest.raises(ValueError):
        load_base_model(tiny_llama_dir, "full", "cpu")
