"""Defaults that learn (issue 12): the 150-example answer-format task, trained with every
`auto` hyperparameter chosen as the API chooses it, shows the format on new prompts; the base
model alone does not."""

from __future__ import annotations

import hashlib
import re

import pytest
import torch

from train_helpers import DEMO, make_spec
from workers.storage import download_prefix, put_bytes
from workers.spec import Hyperparameters
from workers.train.loop import run_training
from workers.train.report import MemoryReporter

pytestmark = [pytest.mark.slow, pytest.mark.operations]

# None of these questions is in the training file.
NEW_PROMPTS = ["What is 3 plus 4?", "What color is the sky?", "How do you write 6 in words?",
               "What sound does a owl make?", "Where did Ida go?"]
FORMAT = re.compile(r"\[\[ [^\[\]]+ \]\]")  # the whole answer, exactly: [[ <answer> ]]


def _in_format(model, tok) -> int:
    hits = 0
    for q in NEW_PROMPTS:
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
        with torch.no_grad():
            gen = model.generate(**ids, max_new_tokens=16, do_sample=False)
        hits += bool(FORMAT.fullmatch(tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()))
    return hits


def test_the_answer_format_task_is_learned_with_the_defaults(local_store, tiny_llama_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from service.jobs.auto import AUTO_FIELDS, resolve_auto
    from workers.models.registry import ensure_builtin

    ensure_builtin("lorafleet/tiny-llama", local_store)
    raw = (DEMO / "answer_format.jsonl").read_bytes()
    key = "tenants/tn_a/files/answer_format.jsonl"
    put_bytes(local_store, key, raw)
    hp = resolve_auto(Hyperparameters(), frozenset(AUTO_FIELDS), examples=len(raw.splitlines()), file_bytes=len(raw))
    assert (hp.n_epochs, hp.batch_size) == (10, 4)  # the rest are the chapter's defaults
    spec = make_spec(local_store, "job-auto", data_key=key, sha=hashlib.sha256(raw).hexdigest(), validation=False,
                     hyperparameters=hp)
    run_training(spec, store=local_store, reporter=MemoryReporter(), device="cpu")

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    assert _in_format(base, tok) == 0
    download_prefix(local_store, spec.output_prefix, tmp_path / "adapter")
    tuned = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    assert _in_format(tuned, tok) >= 4  # the bar: 4-5 of 5
