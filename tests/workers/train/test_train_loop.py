"""The train loop without Ray: LoRA and QLoRA on tiny-llama, publishing, resume, failures."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from train_helpers import DEMO, make_spec, put_dataset
from workers.data.batching import collate_packed, collate_padded
from workers.storage import S3Store, download_prefix, get_bytes, sha256_of
from workers.spec import AdapterManifest, Hyperparameters
from workers.train.errors import TrainingCancelled, TrainingError
from workers.train.loop import eval_mode, label_loss, run_training
from workers.train.report import MemoryReporter

QUESTIONS = ["What is 2 plus 6?", "What color is the sun?", "Where did Ana go?"]


def greedy_answers(model, tok, questions=QUESTIONS) -> list[str]:
    out = []
    for q in questions:
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
        with torch.no_grad():
            gen = model.generate(**ids, max_new_tokens=16, do_sample=False)
        out.append(tok.decode(gen[0, ids["input_ids"].shape[1]:]))
    return out


def trained(store, job, method):
    reporter = MemoryReporter()
    spec = make_spec(store, job, method=method, hp={"eval_steps": 4, "n_epochs": 4})
    return spec, reporter, run_training(spec, store=store, reporter=reporter, device="cpu")


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_adapter_learns_publishes_and_loads_with_plain_peft(method, store_with_tiny_llama, tiny_llama_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    store = store_with_tiny_llama
    spec, reporter, result = trained(store, f"job-{method}", method)
    losses = [m["train_loss"] for m in reporter.metrics()]
    assert len(losses) >= 3 and losses[-1] < 0.6 * losses[0]
    evals = reporter.metrics("eval_loss")
    assert len(evals) == 4 and evals[-1]["eval_loss"] < 0.6 * losses[0]
    last = reporter.metrics()[-1]
    assert last["step"] == last["total_steps"] == 16 and last["tokens_per_s"] > 0 and last["eta_s"] == 0
    # the manifest lists every published file with the checksum the store holds
    manifest = AdapterManifest.model_validate_json(get_bytes(store, result.manifest_key))
    assert result.manifest_key == f"{spec.output_prefix}/manifest.json"
    assert (manifest.method, manifest.quantization) == (method, "nf4" if method == "qlora" else "none")
    assert manifest.dataset_sha256 == spec.training_file_sha256 and manifest.adapter_id == f"ft-job-{method}"
    assert manifest.base_model.checksum and manifest.metrics["eval_loss"] == result.metrics["eval_loss"]
    assert set(manifest.files) == {"adapter_model.safetensors", "adapter_config.json"}
    for name, digest in manifest.files.items():
        assert sha256_of(store, f"{spec.output_prefix}/{name}") == (digest.sha256, digest.bytes)
    # plain PEFT loads it, and it changes the model's greedy answers on training prompts
    adapter_dir = download_prefix(store, spec.output_prefix, tmp_path / "adapter")
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == "lorafleet/tiny-llama"
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    before = greedy_answers(base, tok)
    tuned = PeftModel.from_pretrained(base, adapter_dir).eval()
    after = greedy_answers(tuned, tok)
    assert after != before
    print(before, after)
    assert sum(a.startswith("Arr") for a in after) > sum(b.startswith("Arr") for b in before)


def matmul_rel_error(model) -> float:
    """How far this machine's 4-bit matmul is from exact arithmetic on the same (dequantised)
    weights, relative to the output's scale, measured on the model's first 4-bit layer: ~1e-7
    where bitsandbytes computes in fp32, ~4e-3 (bf16) on CPUs with AMX / AVX512-BF16. 0 when the
    model has no 4-bit layer."""
    try:
        import bitsandbytes.functional as bnbf
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return 0.0
    layer = next((m for m in model.modules() if isinstance(m, Linear4bit)), None)
    if layer is None:
        return 0.0
    exact_w = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).double()
    x = torch.randn(64, exact_w.shape[1], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = layer(x).double()
    exact = x.double() @ exact_w.T
    return ((got - exact).abs().max() / exact.abs().max()).item()


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_label_loss_matches_full_logits_loss_and_grads(method, tiny_llama_dir):
    """Logits at the label positions only: the same loss and LoRA gradients as the model's own
    full-logits loss, for packed and padded batches (qlora: 4-bit base, gradient checkpointing)."""
    from peft import LoraConfig, get_peft_model

    from workers.data.encode import encode_dataset
    from workers.models.loading import load_base_model, load_tokenizer
    from workers.spec import iter_examples

    tok = load_tokenizer(tiny_llama_dir)
    torch.manual_seed(0)
    model = get_peft_model(load_base_model(tiny_llama_dir, method, "cpu"),
                           LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                      init_lora_weights=False, task_type="CAUSAL_LM")).train()
    assert model.is_activation_checkpointing == (method == "qlora")
    params = [p for p in model.parameters() if p.requires_grad]
    # Both losses run the same 4-bit kernels, but their backward passes round differently where
    # those compute in bf16: gradients may then differ by about the kernel's own relative error
    # (measured ~2e-3 against its 4e-3), never by the ~5e-2 of a loss missing one label token.
    grad_tol = max(1e-5, 2 * matmul_rel_error(model))
    lines = (DEMO / "pirate_chat.jsonl").read_bytes().splitlines()[:6]
    data = encode_dataset(tok, iter_examples(lines), 512)[0]
    for batch in (collate_packed(data, 128, tok.pad_token_id), collate_padded(data, tok.pad_token_id)):
        n = batch.label_tokens()
        assert 0 < n < batch.input_ids.numel() - len(data)  # prompts and padding: positions the head skips

        def loss_and_grads(compute):
            model.zero_grad(set_to_none=True)
            loss = compute()
            loss.backward()
            return loss.detach(), [p.grad.clone() for p in params]

        full, full_grads = loss_and_grads(
            lambda: model(**batch.model_inputs("cpu"), num_items_in_batch=n, use_cache=False).loss)
        ours, our_grads = loss_and_grads(lambda: label_loss(model, batch, "cpu", n))
        torch.testing.assert_close(ours, full, atol=1e-5, rtol=1e-5)
        assert any(g.abs().sum() > 0 for g in full_grads)
        for g, h in zip(our_grads, full_grads):
            torch.testing.assert_close(g, h, atol=grad_tol * h.abs().max().item(), rtol=1e-5)
    # an evaluation pass in between leaves the gradients as they were (a 4-bit base on a CPU
    # with AVX512-BF16 otherwise switches to inference-only kernels that drop them)
    eval_mode(model)
    with torch.no_grad():
        label_loss(model, batch, "cpu", n)
    model.train()
    for g, h in zip(loss_and_grads(lambda: label_loss(model, batch, "cpu", n))[1], our_grads):
        torch.testing.assert_close(g, h, atol=1e-5, rtol=1e-5)


def test_resume_continues_step_numbers(local_store, tiny_llama_dir):
    from workers.models.registry import ensure_builtin

    ensure_builtin("lorafleet/tiny-llama", local_store)
    spec = make_spec(local_store, "job-resume", validation=False, hp={"checkpoint_steps": 2, "n_epochs": 2})

    class StopAfter(MemoryReporter):  # the control plane answering "cancelling" after step 3
        def should_stop(self):
            return any(e.data and e.data.get("step", 0) >= 3 for e in self.events if e.type == "metrics")

    first = StopAfter()
    with pytest.raises(TrainingCancelled):
        run_training(spec, store=local_store, reporter=first, device="cpu")
    assert [c.step for c in first.checkpoints] == [2]
    assert local_store.exists(f"{spec.checkpoint_prefix}/step-000002/adapter_model.safetensors")
    second = MemoryReporter()
    result = run_training(spec, store=local_store, reporter=second, device="cpu")
    assert any("resumed from checkpoint at step 2" in e.message for e in second.events)
    steps = [m["step"] for m in second.metrics()]
    assert steps[0] == 3 and steps[-1] == 8 and result.metrics["steps"] == 8
    assert [c.step for c in second.checkpoints] == [4, 6, 8]


def test_default_checkpoints_at_each_epoch_end_and_a_crashed_run_resumes_there(local_store, tiny_llama_dir):
    from workers.models.registry import ensure_builtin

    ensure_builtin("lorafleet/tiny-llama", local_store)
    spec = make_spec(local_store, "job-epochs", validation=False, hp={"n_epochs": 2})  # 4 steps an epoch
    assert spec.hyperparameters.checkpoint_steps == 0

    class CrashAtStep6(MemoryReporter):  # the worker process dies mid-epoch 2
        def event(self, event):
            super().event(event)
            if event.type == "metrics" and event.data.get("step") == 6:
                raise RuntimeError("worker lost")

    first = CrashAtStep6()
    with pytest.raises(RuntimeError, match="worker lost"):
        run_training(spec, store=local_store, reporter=first, device="cpu")
    assert [c.step for c in first.checkpoints] == [4]
    # a checkpoint holds only tensors and plain values: it loads without unpickling code
    state = local_store.root / spec.checkpoint_prefix / "step-000004" / "trainer_state.pt"
    assert torch.load(state, weights_only=True)["step"] == 4
    second = MemoryReporter()
    result = run_training(spec, store=local_store, reporter=second, device="cpu")
    assert any("resumed from checkpoint at step 4" in e.message for e in second.events)
    assert [m["step"] for m in second.metrics()][0] == 5 and result.metrics["steps"] == 8
    assert [c.step for c in second.checkpoints] == [8]


def test_rerun_of_a_published_job_reports_the_same_adapter_without_training(local_store, tiny_llama_dir):
    from workers.models.registry import ensure_builtin

    ensure_builtin("lorafleet/tiny-llama", local_store)
    spec = make_spec(local_store, "job-again", validation=False, hp={"n_epochs": 1})
    first = run_training(spec, store=local_store, reporter=MemoryReporter(), device="cpu")
    manifest = get_bytes(local_store, first.manifest_key)
    again = MemoryReporter()
    second = run_training(spec, store=local_store, reporter=again, device="cpu")
    assert (second.manifest_key, second.metrics) == (first.manifest_key, first.metrics)
    assert not again.metrics() and not again.checkpoints  # not one step trained
    assert any("already published" in e.message for e in again.events)
    assert get_bytes(local_store, first.manifest_key) == manifest
    # a published file that no longer matches its manifest is no adapter to report: this run
    # publishes again, from the checkpoint the first run left at its last epoch's end
    weights = local_store.root / spec.output_prefix / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1])
    third = MemoryReporter()
    result = run_training(spec, store=local_store, reporter=third, device="cpu")
    assert not any("already published" in e.message for e in third.events)
    assert any("resumed from checkpoint at step 4" in e.message for e in third.events)
    for name, digest in AdapterManifest.model_validate_json(get_bytes(local_store, result.manifest_key)).files.items():
        assert sha256_of(local_store, f"{spec.output_prefix}/{name}") == (digest.sha256, digest.bytes)


def test_empty_dataset_bad_model_and_divergence_fail_with_codes(local_store, tiny_llama_dir, tmp_path):
    from workers.models.registry import ensure_builtin

    ensure_builtin("lorafleet/tiny-llama", local_store)
    nothing_to_learn = [json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                 {"role": "assistant", "content": "x", "weight": 0}]}).encode() + b"\n"]
    key = "tenants/tn_a/files/empty.jsonl"
    sha = put_dataset(local_store, key, nothing_to_learn)
    cases = {
        "empty_dataset": make_spec(local_store, "job-empty", data_key=key, sha=sha, validation=False),
        "base_model_load_failed": make_spec(local_store, "job-badmodel", base_uri=str(tmp_path), validation=False),
        # validation caps learning_rate at 1; the engine must still catch an exploding run
        "training_diverged": make_spec(local_store, "job-nan", validation=False, hyperparameters=
                                       Hyperparameters.model_construct(**{**Hyperparameters().model_dump(),
                                                                          "learning_rate": 1e30, "n_epochs": 2})),
    }
    (tmp_path / "config.json").write_text("{not json")
    for code, spec in cases.items():
        reporter = MemoryReporter()
        with pytest.raises(TrainingError) as info:
            run_training(spec, store=local_store, reporter=reporter, device="cpu")
        assert info.value.code == code, info.value
        assert not local_store.exists(f"{spec.output_prefix}/manifest.json")


@pytest.fixture
def moto_process(tmp_path):
    """A moto server of this test's own, so the test can take it down mid-run."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, "moto did not start"
            time.sleep(0.1)
    yield proc, f"http://127.0.0.1:{port}"
    proc.kill()
    proc.wait(10)


def test_store_down_while_publishing_fails_with_storage_error(moto_process, tiny_llama_dir):
    from workers.models.registry import ensure_builtin

    proc, url = moto_process
    store = S3Store("down", "lf", endpoint_url=url, access_key_id="test", secret_access_key="test",
                    max_attempts=1, connect_timeout=1)
    store.ensure_bucket()
    ensure_builtin("lorafleet/tiny-llama", store)
    spec = make_spec(store, "job-down", validation=False, hp={"n_epochs": 1})

    class StoreDiesAtLastStep(MemoryReporter):
        def event(self, event):
            super().event(event)
            if event.type == "metrics" and event.data["step"] == event.data["total_steps"]:
                proc.kill()
                proc.wait(10)

    started = time.monotonic()
    with pytest.raises(TrainingError) as info:
        run_training(spec, store=store, reporter=StoreDiesAtLastStep(), device="cpu")
    assert info.value.code == "storage_error" and "after 5 attempts" in info.value.message
    assert time.monotonic() - started > 7  # backoff 0.5 + 1 + 2 + 4 s between the attempts
