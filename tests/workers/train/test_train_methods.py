"""Every method through the one train loop: the published adapter loads with plain
``PeftModel.from_pretrained`` and reproduces the loss the run measured; the method-specific
parts of the loop match PEFT's own forward; checkpoint/resume is exact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from method_adapters import CASES, method_spec, publish_method_adapter

from workers.data.batching import epoch_batches
from workers.models.loading import load_base_model, load_tokenizer
from workers.spec import AdapterManifest, hyperparameters_for
from workers.storage import LocalStore, download_prefix, get_bytes
from workers.train.errors import TrainingCancelled
from workers.train.loop import eval_mode, label_loss, read_dataset, run_training
from workers.train.methods import train_method
from workers.train.report import MemoryReporter

# fp32 on CPU: the same sums in another order (PiSSA's residual + converted adapter, a fresh
# NF4 dequantisation) agree to a few ulp of the loss, far inside this.
LOSS_RTOL = 1e-4


@pytest.fixture(scope="module")
def method_store(tmp_path_factory, tiny_llama_dir):
    from workers.models.registry import ensure_builtin

    store = LocalStore(tmp_path_factory.mktemp("method-store"))
    ensure_builtin("lorafleet/tiny-llama", store)
    return store


def adapter_loss(store, spec, manifest: AdapterManifest, directory: Path, model_dir: Path) -> tuple[float, float]:
    """(loss with the adapter loaded by plain PEFT, loss of the bare base) on the run's validation
    batches, as the loop evaluates them."""
    from peft import PeftModel

    hp = manifest.hyperparameters
    tokenizer = load_tokenizer(model_dir)
    val, _, _ = read_dataset(store, spec.validation_file, None, tokenizer, hp.max_seq_length)
    batches = epoch_batches(val, batch_size=hp.batch_size, mode=hp.batching, max_len=hp.max_seq_length,
                            pad_id=tokenizer.pad_token_id, seed=hp.seed + 10_000)
    shift = train_method(manifest.method, hp, total_steps=1, model_path=model_dir).virtual_tokens
    n = sum(b.label_tokens() for b in batches)
    model = PeftModel.from_pretrained(load_base_model(model_dir, manifest.quantization, "cpu"), directory)
    eval_mode(model)
    with torch.no_grad():
        tuned = sum(label_loss(model, b, "cpu", n, shift).item() for b in batches)
        with model.disable_adapter():
            bare = sum(label_loss(model, b, "cpu", n, 0).item() for b in batches)
    return tuned, bare


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_published_adapter_loads_with_plain_peft_and_gives_the_runs_eval_loss(method_store, tiny_llama_dir,
                                                                               tmp_path, case):
    spec = method_spec(method_store, case, validation=True)
    prefix, manifest = publish_method_adapter(method_store, case, validation=True)
    assert (manifest.method, type(manifest.hyperparameters)) == (spec.method, type(spec.hyperparameters))
    assert manifest.quantization == ("nf4" if spec.method == "qlora" else "none")
    directory = download_prefix(method_store, prefix, tmp_path)
    config = json.loads((directory / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "lorafleet/tiny-llama"
    tuned, bare = adapter_loss(method_store, spec, manifest, directory, tiny_llama_dir)
    assert tuned == pytest.approx(manifest.metrics["eval_loss"], rel=LOSS_RTOL)
    assert abs(tuned - bare) > 3 * LOSS_RTOL * bare  # the adapter does something, beyond rounding
    if case in ("lora_pissa", "lora_olora"):
        # Converted to a plain LoRA of the original base: rank doubled, nothing left to rewrite it.
        assert (config["r"], config["init_lora_weights"]) == (2 * spec.hyperparameters.r, True)


def _batch(tiny_llama_dir, n: int = 4):
    from train_helpers import DEMO

    from workers.data.batching import collate_padded
    from workers.data.encode import encode_dataset
    from workers.spec import iter_examples

    lines = (DEMO / "pirate_chat.jsonl").read_bytes().splitlines()[:n]
    encoded, _ = encode_dataset(load_tokenizer(tiny_llama_dir), iter_examples(lines), 64)
    return collate_padded(encoded, 0)


@pytest.mark.parametrize("case", ["adalora", "prefix_tuning", "prompt_tuning", "p_tuning"])
def test_loop_loss_matches_peft_forward_with_labels(tiny_llama_dir, case):
    """label_loss (selected logits, shifted past virtual tokens) plus the method's extra term is
    the loss PEFT's own forward computes from labels (AdaLoRA adds its orthogonal penalty there)."""
    from peft import get_peft_model

    method, overrides = CASES[case]
    hp = hyperparameters_for(method, overrides)
    plan = train_method(method, hp, total_steps=10, model_path=tiny_llama_dir)
    torch.manual_seed(0)
    model = get_peft_model(load_base_model(tiny_llama_dir, "none", "cpu"), plan.config())
    model.train()
    batch = _batch(tiny_llama_dir)
    ours = label_loss(model, batch, "cpu", batch.label_tokens(), plan.virtual_tokens)
    extra = plan.extra_loss(model)
    ours = ours + (extra if extra is not None else 0)
    inputs = batch.model_inputs("cpu")
    theirs = model(**inputs, use_cache=False).loss
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
    assert (extra is not None) == (case == "adalora")


class StopAfter(MemoryReporter):
    """The control plane answering "cancelling" once step ``n`` is done (and checkpointed)."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def should_stop(self):
        return any(c.step >= self.n for c in self.checkpoints)


@pytest.mark.parametrize("case,stop_at,hp", [
    # 6 steps: ranks budgeted from step 2, fixed at step 4; stopped in the final phase, where
    # the resumed run needs the rank pattern and the allocator's state back.
    ("adalora", 5, {"n_epochs": 6, "tinit": 1, "tfinal": 2}),
    # Saved as its projection's output (P-tuning's prompt encoder is restored the same way).
    ("prefix_tuning", 2, {"n_epochs": 3, "prefix_projection": True}),
])
@pytest.mark.slow
def test_resume_is_exact(method_store, case, stop_at, hp):
    hp = {**hp, "checkpoint_steps": 1}
    straight_prefix, _ = publish_method_adapter(method_store, case, hp=hp, tenant_id="tn_straight")
    spec = method_spec(method_store, case, hp=hp, tenant_id="tn_resumed")
    with pytest.raises(TrainingCancelled):
        run_training(spec, store=method_store, reporter=StopAfter(stop_at), device="cpu")
    resumed = MemoryReporter()
    run_training(spec, store=method_store, reporter=resumed, device="cpu")
    assert any(f"resumed from checkpoint at step {stop_at}" in e.message for e in resumed.events)
    from safetensors.torch import load

    straight = load(get_bytes(method_store, f"{straight_prefix}/adapter_model.safetensors"))
    again = load(get_bytes(method_store, f"{spec.output_prefix}/adapter_model.safetensors"))
    assert straight.keys() == again.keys()
    assert all(torch.equal(straight[k], again[k]) for k in straight)
    configs = [json.loads(get_bytes(method_store, f"{p}/adapter_config.json"))
               for p in (straight_prefix, spec.output_prefix)]
    assert configs[0] == configs[1]
    if case == "adalora":  # pruned to its budget, published with per-module ranks
        ranks = [sum(mask) for mask in configs[0]["rank_pattern"].values()]
        hp = spec.hyperparameters
        assert len(ranks) == 4 * 4 and sum(ranks) <= hp.target_r * len(ranks) < hp.init_r * len(ranks)


def test_p_tuning_mlp_encoder_of_any_depth_builds_and_runs(tiny_llama_dir):
    """PEFT's MLP prompt encoder reads the reparameterization type as its enum when the layer
    count is not 2: the job's string must reach it as one."""
    from peft import get_peft_model

    hp = hyperparameters_for("p_tuning", {"encoder_reparameterization_type": "MLP", "encoder_num_layers": 3,
                                          "num_virtual_tokens": 4})
    config = train_method("p_tuning", hp, total_steps=1, model_path=tiny_llama_dir).config()
    model = get_peft_model(load_base_model(tiny_llama_dir, "none", "cpu"), config)
    ids = torch.tensor([[1, 2, 3]])
    assert model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.shape[1] == 3 + 4
