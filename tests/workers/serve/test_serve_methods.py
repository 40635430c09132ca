"""Every PEFT method's adapter in one mixed batch with LoRA and base rows, against plain PEFT
(``PeftModel.from_pretrained`` + ``generate``) on each request alone."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file, save_file

from workers.serve import synthetic
from workers.serve.adapters import AdapterCache, AdapterError
from workers.serve.engine import Engine
from workers.serve.lora import AdapterFormatError, load_peft_adapter
from workers.serve.sampling import SamplingParams
from workers.serve.synthetic_methods import METHOD_SPECS, peft_reference, random_method_adapters
from workers.storage import put_bytes

GREEDY = SamplingParams(max_tokens=10, temperature=0)
BASE_ID = "test/tiny-random-llama"
# The batch: every method once, rows without an adapter between them.
ROWS = ["lora", None, "rslora", "dora", "adalora", None, "ia3", "prompt_tuning", "p_tuning",
        "prefix_tuning"]


class MethodAdapters:
    def __init__(self, tiny, directory: Path, specs: dict | None = None, seed: int = 0):
        self.tiny = tiny
        self.dirs = random_method_adapters(tiny.config, directory, specs or METHOD_SPECS, seed=seed)
        self._refs: dict = {}
        self._dense: dict[int, torch.Tensor] = {}

    def adapter(self, name: str | None, dtype: torch.dtype = torch.float32):
        return None if name is None else load_peft_adapter(self.dirs[name], key=name, adapter_id=name,
                                                           dtype=dtype)

    def reference(self, prompt: list[int], name: str | None, *, nf4: bool = False) -> list[int]:
        """Greedy tokens of plain PEFT for this request alone: PEFT's forward (what training
        optimises) over the whole sequence at each step. Not ``generate``: PEFT 0.21 under
        transformers 5 still hands its prefix to generation as ``past_key_values``, which the
        model ignores for ``cache``, and re-inserts the virtual tokens at every decode step."""
        if (name, nf4) not in self._refs:
            if nf4:
                from workers.serve.base import load_serving_base

                base, _ = load_serving_base(self.tiny.base_dir, quantization="nf4", device="cpu")
            else:
                base = self.tiny.base_model()
            self._refs[name, nf4] = peft_reference(base, self.dirs[name] if name else None)
            if nf4:  # each 4-bit weight dequantized before any forward could repack it
                self._dense.update({id(m): _dequantize_before_packing(m) for m in self._refs[name, nf4].modules()
                                    if type(m).__name__ == "Linear4bit"})
        model, seq = self._refs[name, nf4], list(prompt)
        with torch.inference_mode(), _peft_dora_reads(self._dense):
            for _ in range(GREEDY.max_tokens):
                ids = torch.tensor([seq])
                logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
                seq.append(int(logits[0, -1].argmax()))
        return seq[len(prompt):]


def _dequantize_before_packing(module) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    assert not getattr(module.weight.quant_state, "packing_format_for_cpu", False)
    return bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state).float()


@contextlib.contextmanager
def _peft_dora_reads(dense: dict[int, torch.Tensor]):
    """PEFT's DoRA dequantizes the 4-bit base weight at every forward with ``dequantize_4bit``,
    which misreads the layout bitsandbytes repacks a weight into at its first inference forward
    on a CPU with AVX512-BF16 (PEFT 0.21 / bitsandbytes 0.50): there the reference reads the
    weights as dequantized before that repacking, the values PEFT reads everywhere else."""
    from peft.tuners.lora import dora

    original = dora.dequantize_module_weight
    with mock.patch.object(dora, "dequantize_module_weight",
                           lambda module: dense[id(module)] if id(module) in dense else original(module)):
        yield


@pytest.fixture(scope="module")
def methods(tiny, tmp_path_factory) -> MethodAdapters:
    return MethodAdapters(tiny, tmp_path_factory.mktemp("methods"))


def _run_mixed(engine: Engine, methods: MethodAdapters, texts: list[list[int]]):
    """Half the rows start, run a few steps, then the rest join (continuous batching)."""
    adapters = {n: methods.adapter(n) for n in set(ROWS) if n}
    half = len(ROWS) // 2
    first = [engine.submit(texts[i], GREEDY, adapters.get(ROWS[i])) for i in range(half)]
    for _ in range(3):
        engine.step()
    rest = [engine.submit(texts[i], GREEDY, adapters.get(ROWS[i])) for i in range(half, len(ROWS))]
    while engine.has_work():
        engine.step()
    return first + rest


def test_one_mixed_batch_of_every_method_equals_peft_alone(tiny, methods, prompts):
    engine = Engine(tiny.base_model(), max_batch=len(ROWS), max_len=64, adapter_slots=len(METHOD_SPECS))
    texts = prompts([5, 9, 4, 7, 6, 3, 8, 5, 10, 6], seed=21)
    for prompt, name, req in zip(texts, ROWS, _run_mixed(engine, methods, texts)):
        assert req.finish_reason == "length", (name, req.error)
        assert req.output_ids == methods.reference(prompt, name), name
    # Every adapter changes the answer: one prompt under each method and under none.
    same = prompts([6], seed=22) * (len(METHOD_SPECS) + 1)
    outs = engine.generate_batch(same, GREEDY, [None] + [methods.adapter(n) for n in METHOD_SPECS])
    assert len({tuple(r.output_ids) for r in outs}) == len(METHOD_SPECS) + 1


def test_nf4_base_mixed_batch_of_every_method_equals_peft_alone(tiny, methods, prompts):
    """PEFT takes a 4-bit base under every one of these methods (LoRA/DoRA/AdaLoRA/(IA)3 have
    bitsandbytes layers; the virtual-token methods leave the linear layers alone)."""
    from workers.serve.base import load_serving_base

    model, _ = load_serving_base(tiny.base_dir, quantization="nf4", device="cpu")
    engine = Engine(model, max_batch=len(ROWS), max_len=64, adapter_slots=len(METHOD_SPECS))
    texts = prompts([6, 4, 8, 5, 7, 3, 9, 4, 6, 5], seed=23)
    for prompt, name, req in zip(texts, ROWS, _run_mixed(engine, methods, texts)):
        assert req.finish_reason == "length", (name, req.error)
        assert req.output_ids == methods.reference(prompt, name, nf4=True), name


def test_dora_reads_the_4bit_weight_whatever_layout_bitsandbytes_keeps(tiny):
    """After an inference forward (which on an AVX512-BF16 CPU repacks the weight for
    bitsandbytes' own kernel) the engine still reads the weight as dequantized before it."""
    from workers.serve.base import load_serving_base
    from workers.serve.methods import _dense_weight

    model, _ = load_serving_base(tiny.base_dir, quantization="nf4", device="cpu")
    layer = model.model.layers[0].self_attn.q_proj
    before = _dequantize_before_packing(layer)
    with torch.inference_mode():
        layer(torch.randn(2, before.shape[1]))
    # The repacked layout keeps each block's absmax in bfloat16 (8 significant bits): the weight
    # bitsandbytes' kernel then multiplies by is the dequantized one to within that rounding.
    torch.testing.assert_close(_dense_weight(layer), before, rtol=2**-8, atol=0)


def test_slots_reused_across_methods_keep_each_rows_output(tiny, methods, prompts):
    """One device slot, every method through it in turn: a slot's (IA)3/DoRA vectors follow
    the adapter that holds it, and the LoRA weights a DoRA/AdaLoRA adapter left are gone."""
    engine = Engine(tiny.base_model(), max_batch=2, max_len=64, adapter_slots=1)
    text = prompts([7], seed=24)[0]
    for name in ["dora", "ia3", "adalora", "prefix_tuning", "dora"]:
        (req,) = engine.generate_batch([text], GREEDY, [methods.adapter(name)])
        assert req.output_ids == methods.reference(text, name), name
    assert engine.slots.stats["evictions"] == 4


def test_parsed_forms(methods, tiny):
    ada = methods.adapter("adalora")
    raw = load_file(methods.dirs["adalora"] / "adapter_model.safetensors")
    ranks = {k: v.shape[0] for k, v in raw.items() if k.endswith("lora_A")}
    assert len(set(ranks.values())) > 1  # pruned per module: a LoRA of per-module rank
    assert ada.method == "adalora" and ada.rank == max(ranks.values()) and ada.scale == 1.0
    assert {m: a.shape[1] for m, (a, _) in ada.weights.items()} == {
        k.removeprefix("base_model.model.").removesuffix(".lora_A"): r for k, r in ranks.items()}
    ia3 = methods.adapter("ia3")
    assert ia3.rank == 0 and {m.rsplit(".", 1)[-1] for m in ia3.parts.ia3_in} == {"down_proj"}
    assert {m.rsplit(".", 1)[-1] for m in ia3.parts.ia3_out} == {"k_proj", "v_proj"}
    dora = methods.adapter("dora")
    assert dora.method == "dora" and set(dora.parts.dora) == set(dora.weights)
    prefix = methods.adapter("prefix_tuning")
    cfg = tiny.config
    assert tuple(prefix.parts.prefix.shape) == (cfg.num_hidden_layers, 2, cfg.num_key_value_heads, 4,
                                                cfg.hidden_size // cfg.num_attention_heads)
    assert methods.adapter("p_tuning").parts.virtual.shape == (3, cfg.hidden_size)
    assert all(methods.adapter(n).nbytes > 0 for n in METHOD_SPECS)


def test_an_adalora_module_pruned_to_rank_zero_adds_nothing(methods, tmp_path):
    def prune(w):
        name = next(k for k in w if k.endswith("lora_A")).removesuffix(".lora_A")
        return {k: v[:0] if k == f"{name}.lora_A" or k == f"{name}.lora_E" else
                v[:, :0] if k == f"{name}.lora_B" else v for k, v in w.items()}, name

    pruned, name = prune(load_file(methods.dirs["adalora"] / "adapter_model.safetensors"))
    adapter = load_peft_adapter(_variant(methods.dirs["adalora"], tmp_path / "a", tensors=lambda _: pruned),
                                key="a", adapter_id="a")
    module = name.removeprefix("base_model.model.")
    assert module not in adapter.weights and module in methods.adapter("adalora").weights
    assert len(adapter.weights) == len(methods.adapter("adalora").weights) - 1


def _variant(src: Path, dst: Path, *, config: dict | None = None, tensors=None) -> Path:
    """A copy of an adapter directory with its config and/or tensors changed."""
    dst.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((src / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**cfg, **(config or {})}))
    weights = load_file(src / "adapter_model.safetensors")
    save_file(tensors(weights) if tensors else weights, dst / "adapter_model.safetensors")
    return dst


@pytest.mark.parametrize("name, change, match", [
    ("ia3", dict(config={"peft_type": "LOHA"}), "LOHA: this replica serves"),
    ("ia3", dict(config={"modules_to_save": ["lm_head"]}), "modules_to_save"),
    ("ia3", dict(config={"feedforward_modules": ["k_proj"]}), "disagrees with feedforward_modules"),
    ("dora", dict(config={"bias": "all"}), r"\['bias'\]"),
    # Saved against a base they rewrote (unconverted PiSSA/OLoRA): wrong on the shared base.
    ("lora", dict(config={"init_lora_weights": "pissa"}), "init_lora_weights"),
    ("dora", dict(config={"init_lora_weights": "olora"}), "init_lora_weights"),
    ("adalora", dict(tensors=lambda w: {k: v for k, v in w.items() if not k.endswith("lora_E")}),
     "needs"),
    ("prefix_tuning", dict(config={"num_virtual_tokens": 3}), "4 prompt embeddings for num_virtual_tokens=3"),
    ("prompt_tuning", dict(tensors=lambda w: {"prompt_embeddings": w["prompt_embeddings"].int()}),
     "must be float16"),
    ("dora", dict(tensors=lambda w: {k: v * float("nan") if "magnitude" in k else v for k, v in w.items()}),
     "non-finite"),
])
def test_unservable_method_adapters_are_refused_at_load(methods, tmp_path, name, change, match):
    bad = _variant(methods.dirs[name], tmp_path / "bad", **change)
    with pytest.raises(AdapterFormatError, match=match):
        load_peft_adapter(bad, key="bad", adapter_id="bad")


@pytest.mark.parametrize("name, edit, match", [
    ("prompt_tuning", lambda w: {"prompt_embeddings": torch.cat([w["prompt_embeddings"]] * 2, 1)},
     "virtual tokens of width 128"),
    ("ia3", lambda w: {k: torch.cat([v, v], 0) if v.shape[1] == 1 else v for k, v in w.items()},
     "output scales of shape"),
])
def test_method_adapters_that_do_not_fit_the_base_are_refused_at_submit(tiny, methods, tmp_path, name,
                                                                        edit, match):
    engine = Engine(tiny.base_model(), max_batch=2, max_len=64, adapter_slots=1)
    bad = load_peft_adapter(_variant(methods.dirs[name], tmp_path / "bad", tensors=edit), key="b", adapter_id="b")
    with pytest.raises(AdapterFormatError, match=match):
        engine.submit([5, 6], GREEDY, bad)


def test_prefix_for_another_model_shape_is_refused_at_submit(tiny, methods, tmp_path):
    engine = Engine(tiny.base_model(), max_batch=2, max_len=64, adapter_slots=1)
    n = tiny.config.num_hidden_layers
    # Three layers' worth of keys and values for a two-layer base.
    bad = _variant(methods.dirs["prefix_tuning"], tmp_path / "bad", config={"num_layers": n + 1},
                   tensors=lambda w: {"prompt_embeddings": torch.cat(
                       [w["prompt_embeddings"], w["prompt_embeddings"][:, : w["prompt_embeddings"].shape[1] // n]], 1)})
    with pytest.raises(AdapterFormatError, match="prefix has"):
        engine.submit([5, 6], GREEDY, load_peft_adapter(bad, key="b", adapter_id="b"))


def test_published_adapters_of_every_method_load_through_the_cache(tiny, methods, local_store, prompts):
    """Manifest (the method recorded), checksums and base-model check, then each method's
    parser; the loaded adapters serve one batch."""
    engine = Engine(tiny.base_model(), max_batch=len(METHOD_SPECS), max_len=64, adapter_slots=len(METHOD_SPECS))
    cache = AdapterCache(local_store, base_model_id=BASE_ID, device=engine.slots)
    loaded = []
    for name, (cls, _) in METHOD_SPECS.items():
        prefix = f"tenants/tn_a/adapters/{name}/v1"
        method = "lora" if cls == "LoraConfig" else name  # DoRA and rsLoRA are LoRA options
        publish_method_adapter(local_store, methods.dirs[name], prefix, adapter_id=name, method=method)
        loaded.append(asyncio.run(cache.get(name, prefix)))
        assert loaded[-1].method == methods.adapter(name).method
        assert loaded[-1].nbytes == methods.adapter(name).nbytes
    texts = prompts([4] * len(loaded), seed=25)
    for text, name, req in zip(texts, METHOD_SPECS, engine.generate_batch(texts, GREEDY, loaded)):
        assert req.output_ids == methods.reference(text, name), name


def test_a_manifest_naming_another_method_is_refused(methods, local_store):
    prefix = "tenants/tn_a/adapters/liar/v1"
    publish_method_adapter(local_store, methods.dirs["ia3"], prefix, adapter_id="liar", method="lora")
    cache = AdapterCache(local_store, base_model_id=BASE_ID)
    with pytest.raises(AdapterError, match="manifest says lora"):
        asyncio.run(cache.get("liar", prefix))


def publish_method_adapter(store, directory: Path, prefix: str, *, adapter_id: str, method: str) -> None:
    """As a finished training job publishes: the two PEFT files, then manifest.json (method and
    the method's default hyperparameters)."""
    from workers.spec import AdapterManifest, BaseModelRef, FileDigest, hyperparameters_for

    files = {}
    for fname in ("adapter_model.safetensors", "adapter_config.json"):
        put = put_bytes(store, f"{prefix}/{fname}", (directory / fname).read_bytes())
        files[fname] = FileDigest(sha256=put.sha256, bytes=put.bytes)
    manifest = AdapterManifest(adapter_id=adapter_id, job_id="ftjob-test", tenant_id="tn_a",
                               base_model=BaseModelRef(id=BASE_ID, uri=f"models/{BASE_ID}"), method=method,
                               quantization="none", dataset_sha256="0" * 64, files=files,
                               hyperparameters=hyperparameters_for(method, {}))
    put_bytes(store, f"{prefix}/manifest.json", manifest.model_dump_json().encode())


def test_the_replica_answers_chats_through_published_adapters_of_every_method(tiny, methods, local_store):
    """The serving path a deployment runs (ServeConfig → base → engine → adapter cache → front):
    a chat completion per method's published adapter answers what plain PEFT answers."""
    from workers.serve.replica import ServeConfig, build_front

    config = ServeConfig.load(base_model_id=BASE_ID, base_model_uri=str(tiny.base_dir),
                              object_store_url=local_store.url, max_batch=4, max_len=48, max_rank=16,
                              adapter_slots=4, default_max_tokens=16)
    front = build_front(config, local_store)
    eos = set(front.runner.engine.eos)

    def ask(kind: str, body: dict) -> dict:
        async def run():
            return [item async for item in front.run(kind, body)]

        (item,) = asyncio.run(asyncio.wait_for(run(), 120))
        assert "response" in item, item
        return item["response"]

    try:
        messages = [{"role": "user", "content": "Hello, how are you today?"}]
        prompt = front.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        prompt = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
        for name, (cls, _) in METHOD_SPECS.items():
            prefix = f"tenants/tn_a/adapters/{name}/v1"
            publish_method_adapter(local_store, methods.dirs[name], prefix, adapter_id=name,
                                   method="lora" if cls == "LoraConfig" else name)
            route = {"lorafleet": {"adapter": {"id": name, "prefix": prefix, "base_model_id": BASE_ID},
                                   "base_model": {"id": BASE_ID, "uri": "x"}}}
            answer = ask("chat", {"model": name, "messages": messages, "max_tokens": GREEDY.max_tokens,
                                  "temperature": 0, **route})
            expected = methods.reference(prompt, name)
            if eos & set(expected):  # the engine stops at the first end token
                expected = expected[: min(expected.index(t) for t in eos & set(expected)) + 1]
            text = front.tokenizer.decode(expected, skip_special_tokens=True)
            assert answer["choices"][0]["message"]["content"] == text, name
            assert answer["usage"]["completion_tokens"] == len(expected), name
        # Unasked, max_tokens is what the context leaves after the prompt AND the virtual tokens
        # (4 prefix positions): what the prompt alone leaves would not fit.
        route["lorafleet"]["adapter"] = {"id": "prefix_tuning", "prefix": "tenants/tn_a/adapters/prefix_tuning/v1",
                                         "base_model_id": BASE_ID}
        words = front.tokenizer.decode([7] * (config.max_len - 6))
        long = ask("completion", {"model": "prefix_tuning", "prompt": words, "temperature": 0, **route})
        used = long["usage"]["prompt_tokens"]
        assert used + 4 + min(config.default_max_tokens, config.max_len - used) > config.max_len
        assert used + long["usage"]["completion_tokens"] + 4 == config.max_len
    finally:
        front.close()


@pytest.mark.slow
def test_methods_bench_runs_quick(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[3]
    out = tmp_path / "serve_methods.json"
    proc = subprocess.run([sys.executable, str(root / "bench/serve_methods.py"), "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=root, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["bench"] == "serve_methods" and result["quick"] is True
    assert {r["column"] for r in result["rows"]} == {"d_ours", "d0_ours_no_adapter", "p_peft_per_request"}
    assert all(r["tokens_per_s"] > 0 and r["adapters"] == 16 for r in result["rows"])
    assert result["figures"]["methods"] == len(METHOD_SPECS)
    assert result["figures"]["vs_own_base"] > 0 and result["figures"]["vs_peft_per_request"] > 0


def test_dora_and_ia3_on_a_base_with_biases_equal_peft(tiny, methods, tmp_path, prompts):
    """DoRA scales base + LoRA but not the base's bias; (IA)3 scales the whole output, bias too."""
    config = type(tiny.config).from_dict(tiny.config.to_dict())
    config.attention_bias = config.mlp_bias = True
    specs = {n: METHOD_SPECS[n] for n in ("dora", "ia3")}
    dirs = random_method_adapters(config, tmp_path, specs)

    def base():  # Transformers initialises biases to zero: give them values that matter
        model, gen = synthetic.random_llama(config, seed=0), torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.copy_(torch.randn(p.shape, generator=gen))
        return model

    engine = Engine(base(), max_batch=3, max_len=64, adapter_slots=2)
    texts = prompts([6, 5, 7], seed=26)
    names = ["dora", None, "ia3"]
    adapters = [load_peft_adapter(dirs[n], key=n, adapter_id=n) if n else None for n in names]
    for text, name, req in zip(texts, names, engine.generate_batch(texts, GREEDY, adapters)):
        model, seq = peft_reference(base(), dirs[name] if name else None), list(text)
        with torch.inference_mode():
            for _ in range(GREEDY.max_tokens):
                seq.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
        assert req.output_ids == seq[len(text):], name


def test_an_input_scaled_layer_leaves_its_unit_and_rows_still_equal_peft(tiny, prompts, tmp_path):
    """q/k/v and gate/up are computed as one unit (one base matmul and one LoRA kernel pair for
    the unit); an (IA)3 input scale on ``up_proj`` changes that layer's input, so a batch with
    such a row runs gate/up apart, while LoRA rows on gate/up share the batch."""

    specs = {"ia3_up": ("IA3Config", dict(target_modules=["k_proj", "up_proj"], feedforward_modules=["up_proj"])),
             "lora_mlp": ("LoraConfig", dict(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "q_proj", "k_proj"]))}
    adapters = MethodAdapters(tiny, tmp_path, specs, seed=7)
    engine = Engine(tiny.base_model(), max_batch=4, max_len=64, adapter_slots=2)
    grouped = [[list(engine.modules)[i].rsplit(".", 1)[-1] for i in u] for u in engine.slots.units if len(u) > 1]
    # k/v (q is wider than them: grouped query attention) and gate/up of every layer
    assert grouped == [["k_proj", "v_proj"], ["gate_proj", "up_proj"]] * tiny.config.num_hidden_layers
    names = ["lora_mlp", "ia3_up", None, "lora_mlp"]
    texts = prompts([5, 7, 4, 6], seed=31)
    outs = engine.generate_batch(texts, GREEDY, [adapters.adapter(n) for n in names])
    for prompt, name, req in zip(texts, names, outs):
        assert req.output_ids == adapters.reference(prompt, name), name
    split = engine.slots.current.plan(1)
    gate = list(engine.modules).index(next(n for n in engine.modules if n.endswith("mlp.gate_proj")))
    assert len(split[gate][0]) == 1  # gate/up apart in this batch


def test_ia3_and_dora_vectors_count_in_the_device_budget(tiny, methods):
    """The float32 vectors a slot holds for (IA)3 and DoRA are bytes of the budget too."""
    engine = Engine(tiny.base_model(), max_batch=2, max_len=64, adapter_slots=2)
    slots = engine.slots
    ia3, dora = methods.adapter("ia3"), methods.adapter("dora")
    ia3_vectors = 4 * sum(v.numel() for v in (*ia3.parts.ia3_in.values(), *ia3.parts.ia3_out.values()))
    assert ia3_vectors > 0 and slots.bytes_needed(ia3) == ia3_vectors  # (IA)3: no pages at all
    pages = sum(n * slots.pools[s].page_bytes for s, n in slots.pages_needed(dora).items())
    assert slots.bytes_needed(dora) == pages + 4 * sum(v.numel() for v in dora.parts.dora.values())
    slots.acquire(ia3)
    assert slots.usage()["bytes_used"] == ia3_vectors
    slots.max_bytes = ia3_vectors + slots.bytes_needed(dora) - 1  # the pages fit, the vectors not
    slots.release(ia3.key)
    slots.pin("ia3")
    assert slots.acquire(dora) is None  # ia3 is pinned: no room for dora's vectors
    slots.pin("ia3", False)
    assert slots.acquire(dora) is not None and slots.resident() == ["dora"]
    assert slots.usage()["bytes_used"] == slots.bytes_needed(dora)
