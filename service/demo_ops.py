"""The demo's issue-12 stages (service/demo.py): one tenant's live weighted blend of its own two
adapters beside each alone and beside the offline ``cat`` blend, and an export whose merged
model, loaded with plain ``AutoModelForCausalLM``, answers like base + adapter through PEFT."""

from __future__ import annotations

import tempfile
from pathlib import Path

BLEND_WEIGHTS = (0.8, 0.8)


def _chat(client, model: str, question: str, **extra) -> str:
    out = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                         max_tokens=24, temperature=0, **extra)
    return out.choices[0].message.content.strip()


def start(client, first: str, second: str) -> tuple[str, str]:
    """The offline blend of both adapters and the export of the first, started at once: their Ray
    Jobs run while the demo asks its questions. Returns (blend id, export id)."""
    blend = client.adapters.blends.create([(first, BLEND_WEIGHTS[0]), (second, BLEND_WEIGHTS[1])],
                                          name="pirate-format", combination="cat")
    return blend.id, client.models.exports.create(first).id


def blend_stage(client, blend_id: str, first: str, second: str, questions: list[str], failures: list[str]) -> None:
    """Each adapter alone, the live blend (adapters=[…] on the request) and the offline cat blend."""
    weights = [{"model": first, "weight": BLEND_WEIGHTS[0]}, {"model": second, "weight": BLEND_WEIGHTS[1]}]
    offline = client.adapters.blends.wait(blend_id, timeout=600).fine_tuned_model
    print(f"   offline cat blend (a Ray Job) → {offline}")
    rows = []
    for q in questions:
        live = _chat(client, first, q, extra_body={"adapters": weights})
        rows.append((q, _chat(client, first, q), _chat(client, second, q), live, _chat(client, offline, q)))
    for q, a, b, live, off in rows:
        print(f"Q: {q}\n   pirate alone : {a}\n   format alone : {b}\n"
              f"   live blend   : {live}\n   offline blend: {off}")
        if live != off:
            failures.append(f"the live blend answered {live!r}, the offline cat blend {off!r}")


def export_stage(client, export_id: str, adapter: str, question: str, failures: list[str]) -> None:
    """Download the merged model of ``adapter`` and compare it with base + adapter (PEFT)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workers.models.registry import local_builtin

    done = client.models.exports.wait(export_id, timeout=600)
    with tempfile.TemporaryDirectory(prefix="lorafleet-demo-export-") as tmp:
        folder = client.models.exports.download(done.id, Path(tmp) / "merged")
        adapter_dir = client.adapters.download(adapter, Path(tmp) / "adapter")
        shards = sorted(p.name for p in folder.iterdir() if p.suffix == ".safetensors")
        print(f"   {done.id}: {len(done.files)} files ({', '.join(shards)}), sha256 checked on download")
        tokenizer = AutoTokenizer.from_pretrained(folder)
        ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
        kw = {"max_new_tokens": 24, "do_sample": False}
        merged = AutoModelForCausalLM.from_pretrained(folder).generate(ids, **kw)[0, ids.shape[1]:]
        base = AutoModelForCausalLM.from_pretrained(local_builtin("lorafleet/tiny-llama"), dtype=torch.float32)
        reference = PeftModel.from_pretrained(base, adapter_dir).generate(ids, **kw)[0, ids.shape[1]:]
    text = tokenizer.decode(merged, skip_special_tokens=True).strip()
    print(f"   Q: {question}\n   merged model (AutoModelForCausalLM): {text}\n"
          f"   base + adapter (PEFT)              : {tokenizer.decode(reference, skip_special_tokens=True).strip()}")
    if merged.tolist() != reference.tolist():
        failures.append("the exported model does not answer like base + adapter")
