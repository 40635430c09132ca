"""Defaults that learn, for the virtual-token methods (issue 11): a short run of the pirate chat demo
with each method's default hyperparameters (docs/API.md, "Methods"), at the rate `auto` gives a run
this short, lowers the held-out loss well below the base model's. The old defaults did not: prompt
tuning with 20 virtual tokens and P-tuning's MLP encoder at 1e-2 stayed above the bar."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from workers.spec import VIRTUAL_TOKEN_METHODS, BaseModelRef, TrainJobSpec, hyperparameters_for
from workers.storage import put_bytes
from workers.train.loop import read_dataset, run_training, summed_label_loss
from workers.train.report import MemoryReporter

pytestmark = pytest.mark.slow

DEMO = Path(__file__).resolve().parents[2] / "workers" / "data" / "demo" / "pirate_chat.jsonl"
LINES = DEMO.read_bytes().splitlines(keepends=True)
TRAIN, VAL = b"".join(LINES[:48]), b"".join(LINES[160:176])
SHAPE = {"n_epochs": 10, "batch_size": 8, "gradient_accumulation_steps": 1}  # 60 optimizer steps
# Measured held-out losses of this run (base 3.28): prefix tuning 0.81, prompt tuning 1.93,
# P-tuning 1.88 (ratios 0.25, 0.59, 0.57); the old defaults: prompt tuning (20 tokens) 2.08,
# P-tuning (MLP, 1e-2, 20 tokens) 2.83 (ratios 0.63, 0.86). fp32 on a CPU: another CPU's kernels
# move these by far less than the gaps to the bar.
MAX_LOSS_RATIO = 0.62


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The tiny model gains nothing from a second thread; on a shared 2-core machine its spinning
    # tripled this module's CPU time.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base_eval_loss(tiny_llama_dir, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from workers.data.batching import epoch_batches
    from workers.models.loading import load_tokenizer
    from workers.storage import LocalStore

    store = LocalStore(tmp_path_factory.mktemp("val"))
    put_bytes(store, "val.jsonl", VAL)
    tokenizer = load_tokenizer(tiny_llama_dir)
    val, _, _ = read_dataset(store, "val.jsonl", None, tokenizer, 512)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    total, n = summed_label_loss(model, epoch_batches(val, batch_size=8, mode="pad", max_len=512,
                                                     pad_id=tokenizer.pad_token_id, seed=0), "cpu")
    return total / n


@pytest.mark.parametrize("method", sorted(VIRTUAL_TOKEN_METHODS))
def test_virtual_token_defaults_learn_the_pirate_demo(local_store, tiny_llama_dir, base_eval_loss, method):
    from service.jobs.auto import auto_multiplier, optimizer_steps
    from workers.models.registry import ensure_builtin

    ensure_builtin("lorafleet/tiny-llama", local_store)
    put_bytes(local_store, "train.jsonl", TRAIN)
    put_bytes(local_store, "val.jsonl", VAL)
    hp = hyperparameters_for(method, SHAPE)
    steps = optimizer_steps(48, batch_size=8, accumulation=1, epochs=SHAPE["n_epochs"])
    hp = hp.model_copy(update={"learning_rate": hp.learning_rate * auto_multiplier(steps)})  # as `auto` does
    spec = TrainJobSpec(
        job_id=f"defaults-{method}", tenant_id="tn_a",
        base_model=BaseModelRef(id="lorafleet/tiny-llama", uri="builtin://lorafleet/tiny-llama"),
        method=method, hyperparameters=hp, training_file="train.jsonl",
        training_file_sha256=hashlib.sha256(TRAIN).hexdigest(), validation_file="val.jsonl",
        output_prefix=f"adapters/{method}", checkpoint_prefix=f"checkpoints/{method}", object_store_url=local_store.url)
    result = run_training(spec, store=local_store, reporter=MemoryReporter(), device="cpu")
    assert result.metrics["eval_loss"] < MAX_LOSS_RATIO * base_eval_loss, (method, result.metrics["eval_loss"],
                                                                           base_eval_loss)
