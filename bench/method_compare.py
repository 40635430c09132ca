"""The chapter's method comparison (its sections 6.2.3 and 6.7), run for real: every method with its
default hyperparameters (docs/API.md, "Methods") trained on `lorafleet/tiny-llama` and the pirate
chat demo dataset by our train loop, then served by our engine.

Per method: trainable parameters; peak memory of the training process (its max RSS: each method
trains in a fresh process, so the figures compare); train tokens/s (the loop's own measure);
eval loss on held-out lines; served tokens/s in a mixed batch
(the method's published adapter on half the rows, no adapter on the other half, greedy, one
engine). LoRA in the same run is the baseline of the ratios.

    python bench/method_compare.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from serve_throughput import NEW_TOKENS, PROMPT_LEN, ours_closed_loop

from workers.spec import METHODS, BaseModelRef, TrainJobSpec, hyperparameters_for
from workers.storage import LocalStore, download_prefix, put_bytes

DEMO = Path(__file__).resolve().parents[1] / "workers" / "data" / "demo" / "pirate_chat.jsonl"
BASE_ID = "lorafleet/tiny-llama"


def _spec(store, method: str, quick: bool) -> TrainJobSpec:
    lines = DEMO.read_bytes().splitlines(keepends=True)
    train, val = (lines[:48], lines[160:176]) if quick else (lines[:160], lines[160:200])
    put_bytes(store, "data/train.jsonl", b"".join(train))
    put_bytes(store, "data/val.jsonl", b"".join(val))
    # The method's defaults; the job's shape fixed so every method sees the same examples.
    hp = hyperparameters_for(method, {"n_epochs": 1 if quick else 2, "batch_size": 8,
                                      "gradient_accumulation_steps": 1, "max_seq_length": 128})
    return TrainJobSpec(
        job_id=f"bench-{method}", tenant_id="bench", base_model=BaseModelRef(id=BASE_ID, uri=f"builtin://{BASE_ID}"),
        method=method, hyperparameters=hp, training_file="data/train.jsonl",
        training_file_sha256=hashlib.sha256(b"".join(train)).hexdigest(), validation_file="data/val.jsonl",
        output_prefix=f"adapters/{method}", adapter_id=f"bench-{method}", checkpoint_prefix=f"ckpt/{method}",
        object_store_url=store.url)


def train_one(method: str, store_dir: Path, quick: bool) -> dict:
    """In a fresh process: train and publish ``method``'s adapter, return its row."""
    from peft import get_peft_model

    from workers.models.loading import load_base_model
    from workers.models.registry import local_builtin
    from workers.train.loop import run_training
    from workers.train.methods import train_method
    from workers.train.report import MemoryReporter

    torch.set_num_threads(1)
    store = LocalStore(store_dir)
    spec = _spec(store, method, quick)
    reporter = MemoryReporter()
    result = run_training(spec, store=store, reporter=reporter, device="cpu")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rates = [m["tokens_per_s"] for m in reporter.metrics() if "tokens_per_s" in m]
    path = local_builtin(BASE_ID)
    plan = train_method(method, spec.hyperparameters, total_steps=1, model_path=path)
    model = get_peft_model(load_base_model(path, "none", "cpu"), plan.config())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"method": method, "trainable_params": trainable, "peak_train_rss_mb": peak_mb,
            "train_tokens_per_s": sum(rates) / len(rates), "eval_loss": result.metrics["eval_loss"],
            "learning_rate": spec.hyperparameters.learning_rate, "steps": result.metrics["steps"]}


def served_tokens_per_s(store, rows: list[dict], rounds: int, reps: int) -> None:
    """Fill each row's served tokens/s: a batch of 8 clients, 4 on the method's adapter and 4 on
    none, closed loop; the best of ``reps`` (the machine is shared)."""
    from transformers import AutoModelForCausalLM

    from workers.models.registry import local_builtin
    from workers.serve.engine import Engine
    from workers.serve.lora import load_peft_adapter

    path = local_builtin(BASE_ID)
    engine = Engine(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), max_batch=8,
                    max_len=PROMPT_LEN + NEW_TOKENS + 64, adapter_slots=len(rows), max_rank=16,
                    eos_token_id=[])
    prompts = torch.randint(3, engine.model.config.vocab_size, (8, PROMPT_LEN),
                            generator=torch.Generator().manual_seed(0)).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        adapters = {r["method"]: load_peft_adapter(
            download_prefix(store, f"adapters/{r['method']}", Path(tmp) / r["method"]),
            key=r["method"], adapter_id=r["method"]) for r in rows}
    ours_closed_loop(engine, prompts[:2], [None, None], 1)  # warm-up
    for r in rows:
        mixed = [adapters[r["method"]]] * 4 + [None] * 4
        best = 0.0
        for _ in range(reps):
            tokens, seconds, _ = ours_closed_loop(engine, prompts, mixed, rounds)
            best = max(best, tokens / seconds)
        r["served_tokens_per_s"] = best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="48 training examples, one epoch")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--train-one", help=argparse.SUPPRESS)  # the child process's mode
    ap.add_argument("--store", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.train_one:
        print(json.dumps(train_one(args.train_one, args.store, args.quick)))
        return
    from workers.models.registry import ensure_builtin

    with tempfile.TemporaryDirectory() as tmp:
        store = LocalStore(Path(tmp))
        ensure_builtin(BASE_ID, store)
        rows, failed = [], {}
        for method in METHODS:
            t0 = time.monotonic()
            out = subprocess.run([sys.executable, __file__, "--train-one", method, "--store", tmp]
                                 + (["--quick"] if args.quick else []), capture_output=True, text=True)
            if out.returncode:
                failed[method] = out.stderr.strip().splitlines()[-1:]
                continue
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"  trained {method} in {time.monotonic() - t0:.0f} s: {rows[-1]}", file=sys.stderr, flush=True)
        served = True
        try:
            served_tokens_per_s(store, rows, rounds=1 if args.quick else 2, reps=2 if args.quick else 3)
        except Exception as exc:  # noqa: BLE001 - reported as a missing column, not a crash
            served = False
            print(f"served tokens/s not measured: {type(exc).__name__}: {exc}", file=sys.stderr)
    lora = next((r for r in rows if r["method"] == "lora"), None)
    print(f"{'method':<15}{'trainable':>11}{'peak MB':>9}{'train tok/s':>13}{'eval loss':>11}"
          f"{'served tok/s':>14}{'train vs lora':>15}")
    for r in rows:
        served_s = f"{r['served_tokens_per_s']:.0f}" if "served_tokens_per_s" in r else "-"
        ratio = r["train_tokens_per_s"] / lora["train_tokens_per_s"] if lora else float("nan")
        print(f"{r['method']:<15}{r['trainable_params']:>11,}{r['peak_train_rss_mb']:>9.0f}"
              f"{r['train_tokens_per_s']:>13.0f}{r['eval_loss']:>11.3f}{served_s:>14}{ratio:>15.2f}")
    for method, why in failed.items():
        print(f"{method}: FAILED {why}")
    figures = {"methods_trained": len(rows),
               "methods_served": sum("served_tokens_per_s" in r for r in rows) if served else 0}
    if lora:
        figures["best_eval_loss_vs_lora"] = min(r["eval_loss"] for r in rows) / lora["eval_loss"]
    print("figures:", ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"bench": "method_compare", "quick": args.quick, "rows": rows,
                                         "figures": figures}, indent=2))


if __name__ == "__main__":
    main()
