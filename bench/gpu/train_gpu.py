"""QLoRA training throughput on one GPU, no Ray, no network: our loop vs the chapter's recipe.

A Llama-2-7B-shaped model with random weights (config built here, initialised on the GPU,
saved once to local disk so both contenders load it through BitsAndBytesConfig NF4 + double
quant + bf16 compute, exactly as the chapter). Data: Alpaca-like, mean ~150 tokens.
  reference: HF Trainer, padding="max_length", max_length=512, batch 4 x 4 accumulation,
             paged_adamw_32bit (chapter section 6.3.2)
  ours:      workers.train.loop.run_training, packed rows up to 2048 tokens, batch 16 x 1
Same effective batch (16 examples) and steps. Prints non-padding tokens/s, MFU against the
H200's dense bf16 peak, 989 TFLOP/s, and peak GPU memory. MFU counts useful model FLOPs per
non-padding token for LoRA on a frozen base: 4 x the matmul parameters (forward, plus the
backward's input gradients; no weight gradients for the frozen base, and the recomputation of
checkpointing is not useful work) plus attention over the measured mean example length
(3 x the forward's 4 x layers x hidden x length). Both contenders are timed from the start of
their first step (after model loading, dataset and optimizer setup) to the end of the last.
`--smoke` runs a tiny model on the CPU (for testing the script itself).

    python bench/gpu/train_gpu.py [--steps 12] [--smoke] [--json PATH]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from train_throughput import alpaca_like  # noqa: E402

PEAK_TFLOPS = 989.0  # H200 SXM, dense bf16
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
SMOKE = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096)


def build_model(directory: Path, shape: dict, device: str) -> Path:
    """Random-weight Llama of ``shape`` plus a tokenizer (the tiny-llama one, trained in 1 s)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from workers.models.tiny_llama import load_corpus, train_tokenizer

    prose, chats = load_corpus()
    tokenizer = train_tokenizer(prose + [m["content"] for c in chats for m in c])
    config = LlamaConfig(**shape, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    del model
    return directory


def flops_per_token(shape: dict, seq: float) -> float:
    """Useful FLOPs of LoRA training per token: the frozen base's matmuls forward (2N) and their
    input gradients (2N), no weight gradients; attention (no weights) forward and backward."""
    d, layers = shape["hidden_size"], shape["num_hidden_layers"]
    matmul_params = layers * (4 * d * d + 3 * d * shape["intermediate_size"]) + d * shape["vocab_size"]
    return 4 * matmul_params + 3 * 4 * layers * d * seq


def _reset_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gb(device: str) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def _train_clock(device: str):
    """A Trainer callback timing the training loop alone: from the first step's start (model,
    dataset, optimizer and dataloader are set up by then) to the end of the last step."""
    from transformers import TrainerCallback

    class TrainClock(TrainerCallback):
        start = end = None

        def _now(self) -> float:
            if device == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter()

        def on_step_begin(self, args, state, control, **kwargs):
            if self.start is None:
                self.start = self._now()

        def on_step_end(self, args, state, control, **kwargs):
            self.end = self._now()

    return TrainClock()


def run_reference(model_dir: Path, rows: list[dict], steps: int, device: str) -> dict:
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from workers.data.textgen import alpaca_prompt
    from workers.models.loading import load_base_model, load_tokenizer

    _reset_memory(device)
    tokenizer = load_tokenizer(model_dir)
    model = get_peft_model(load_base_model(model_dir, "qlora", device), LoraConfig(task_type="CAUSAL_LM", bias="none", **LORA))
    texts = [alpaca_prompt(r["instruction"], r["input"]) + r["output"] for r in rows]
    ds = Dataset.from_dict({"text": texts}).map(
        lambda ex: tokenizer(ex["text"], truncation=True, max_length=512, padding="max_length"),
        batched=True, remove_columns=["text"])
    args = TrainingArguments(output_dir=tempfile.mkdtemp(prefix="ref-"), max_steps=steps, per_device_train_batch_size=4,
                             gradient_accumulation_steps=4, learning_rate=2e-4, logging_steps=10, save_strategy="no",
                             report_to=[], bf16=device == "cuda", use_cpu=device == "cpu",
                             optim="paged_adamw_32bit" if device == "cuda" else "adamw_torch", disable_tqdm=True)
    clock = _train_clock(device)
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[clock],
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    trainer.train()
    real = sum(sum(m) for m in ds["attention_mask"][: steps * 16])
    out = {"name": "reference (HF Trainer, pad 512)", "steps": steps, "seconds": clock.end - clock.start,
           "real_tokens": real, "padded_tokens": steps * 16 * 512, "peak_gpu_gb": _peak_gb(device),
           "mean_seq": real / (steps * 16)}
    del trainer, model
    return out


def run_ours(model_dir: Path, rows: list[dict], steps: int, device: str) -> dict:
    import hashlib

    from workers.spec import BaseModelRef, Hyperparameters, TrainJobSpec
    from workers.storage import LocalStore, put_bytes
    from workers.train.loop import run_training
    from workers.train.report import MemoryReporter

    class Clock(MemoryReporter):
        def event(self, event):
            if event.type == "metrics" and device == "cuda":
                torch.cuda.synchronize()
            super().event(event)
            self.events[-1].data = {**(event.data or {}), "_t": time.perf_counter()}

    _reset_memory(device)
    with tempfile.TemporaryDirectory(prefix="ours-") as tmp:
        store = LocalStore(Path(tmp) / "objects")
        raw = "".join(json.dumps(r) + "\n" for r in rows[: steps * 16]).encode()
        put_bytes(store, "bench/train.jsonl", raw)
        spec = TrainJobSpec(
            job_id="gpu-bench", tenant_id="bench", method="qlora",
            base_model=BaseModelRef(id="llama-2-7b-random", uri=str(model_dir)),
            hyperparameters=Hyperparameters(**LORA, n_epochs=1, batch_size=16, gradient_accumulation_steps=1,
                                            max_seq_length=2048, batching="pack"),
            training_file="bench/train.jsonl", training_file_sha256=hashlib.sha256(raw).hexdigest(),
            output_prefix="bench/adapter/v1", checkpoint_prefix="bench/ckpt", object_store_url=store.url)
        clock = Clock()
        result = run_training(spec, store=store, reporter=clock, device=device)
    start = next(e.data["_t"] for e in clock.events if e.message.startswith("training from step"))
    end = [e.data["_t"] for e in clock.events if e.type == "metrics" and "train_loss" in e.data][-1]
    real = result.metrics["trained_tokens"]
    steps = int(result.metrics["steps"])
    return {"name": "ours (run_training, packed 2048)", "steps": steps, "seconds": end - start,
            "real_tokens": real, "padded_tokens": real, "peak_gpu_gb": _peak_gb(device),
            "mean_seq": real / len(rows)}  # every example once (n_epochs=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps (16 examples each)")
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU")
    parser.add_argument("--json", help="write results to this path")
    args = parser.parse_args()
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: use --smoke to run the script on the CPU")
    shape = SMOKE if args.smoke else LLAMA2_7B
    steps = min(args.steps, 3) if args.smoke else args.steps
    rows = alpaca_like(steps * 16, seed=1)
    with tempfile.TemporaryDirectory(prefix="llama7b-", dir=os.environ.get("LORAFLEET_BENCH_TMP")) as tmp:
        t0 = time.perf_counter()
        model_dir = build_model(Path(tmp) / "model", shape, device)
        print(f"built and saved the random model in {time.perf_counter() - t0:.0f} s", flush=True)
        results = [run_reference(model_dir, rows, steps, device), run_ours(model_dir, rows, steps, device)]
    for r in results:
        r["tokens_per_s"] = r["real_tokens"] / r["seconds"]
        r["mfu"] = r["tokens_per_s"] * flops_per_token(shape, r["mean_seq"]) / (PEAK_TFLOPS * 1e12)
        r["speedup"] = r["tokens_per_s"] / results[0]["tokens_per_s"]
    print(f"\ntrain_gpu (QLoRA NF4, {'smoke: tiny model on CPU' if args.smoke else 'Llama-2-7B shape, random weights'}, "
          f"{steps} steps x 16 examples)")
    print(f"{'contender':34} {'steps':>5} {'seconds':>8} {'real tok/s':>10} {'MFU %':>6} {'peak GB':>8} {'speedup':>7}")
    for r in results:
        print(f"{r['name']:34} {r['steps']:5d} {r['seconds']:8.1f} {r['tokens_per_s']:10.0f} {100 * r['mfu']:6.2f} "
              f"{r['peak_gpu_gb'] or float('nan'):8.1f} {r['speedup']:7.2f}")
    figures = {"speedup": results[1]["speedup"], "tokens_per_s": results[1]["tokens_per_s"], "mfu": results[1]["mfu"],
               "peak_gpu_gb": results[1]["peak_gpu_gb"], "reference_tokens_per_s": results[0]["tokens_per_s"]}
    print("figures:", json.dumps({k: v if v is None else round(v, 4) for k, v in figures.items()}))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"bench": "train_gpu", "quick": bool(args.smoke), "rows": results,
                                               "figures": figures}, indent=2))


if __name__ == "__main__":
    main()
