"""The chapter's method comparison (its sections 6.2.3 and 6.7), run for real: every method with its
default hyperparameters (docs/API.md, "Methods") and the `auto` job shape the API would choose,
trained on `lorafleet/tiny-llama` and the pirate chat demo by our train loop, then served together
by our engine.

Data: the first 160 lines of workers/data/demo/pirate_chat.jsonl train, the last 40 are held out.
Per method (each trained in a fresh process, so memory figures compare):
  trainable        parameters the optimizer updates (the loop's count)
  peak RSS MB      the training process's peak resident set *above* its resident set just before
                   training (imports done; the peak is reset there through /proc/self/clear_refs):
                   base model load, data, adapter, optimizer state and activations. A CPU has no
                   allocator counter like torch.cuda.max_memory_allocated; this is the closest
  train tok/s      the loop's own measure (example tokens per second of optimizer steps)
  eval loss        on the 40 held-out lines (the base alone: figures.base_eval_loss)
  styled           of the held-out questions served greedily in the mixed batch, how many
                   answers carry the pirate's "Arr matey" or "Yo ho ho"
  served tok/s     the engine with this method's adapter on half the rows of a batch, no adapter
                   on the other half, greedy, a fixed number of new tokens
Figures: methods_trained, methods_served (methods whose rows all finished in the one batch that
holds one adapter of every method and rows without one), that batch's tokens/s and its ratio to
the same batch with no adapter on any row. One fp32 base serves every adapter; the QLoRA adapter,
trained against the NF4 base, is served on it too (our service serves it on an NF4 replica).

    python bench/method_compare.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from workers.spec import BaseModelRef, TrainJobSpec, hyperparameters_for
from workers.storage import LocalStore, download_prefix, put_bytes

DEMO = Path(__file__).resolve().parents[1] / "workers" / "data" / "demo" / "pirate_chat.jsonl"
BASE_ID = "lorafleet/tiny-llama"
TRAIN_LINES, VAL_LINES = slice(0, 160), slice(160, 200)
# Row name -> (method.type, hyperparameters other than the defaults).
METHOD_ROWS = {"lora": ("lora", {}), "qlora": ("qlora", {}), "lora+dora": ("lora", {"use_dora": True}),
               "ia3": ("ia3", {}), "adalora": ("adalora", {}), "prefix_tuning": ("prefix_tuning", {}),
               "prompt_tuning": ("prompt_tuning", {}), "p_tuning": ("p_tuning", {})}
STYLE_MARKS = ("Arr matey", "Yo ho ho")
NEW_TOKENS = 24


def _split() -> tuple[bytes, bytes]:
    lines = DEMO.read_bytes().splitlines(keepends=True)
    return b"".join(lines[TRAIN_LINES]), b"".join(lines[VAL_LINES])


def _spec(store, name: str, quick: bool) -> TrainJobSpec:
    from service.jobs.auto import AUTO_FIELDS, resolve_auto

    method, extra = METHOD_ROWS[name]
    train, val = _split()
    put_bytes(store, "data/train.jsonl", train)
    put_bytes(store, "data/val.jsonl", val)
    # What a job with only method.type gets for this file; --quick fixes 3 epochs and lets `auto`
    # pick the rest (a shorter run gets the same capped rate multiplier).
    fixed = {"n_epochs": 3} if quick else {}
    hp = resolve_auto(hyperparameters_for(method, {**extra, **fixed}), frozenset(AUTO_FIELDS) - set(fixed),
                      examples=len(train.splitlines()), file_bytes=len(train))
    key = name.replace("+", "_")
    return TrainJobSpec(
        job_id=f"bench-{key}", tenant_id="bench", base_model=BaseModelRef(id=BASE_ID, uri=f"builtin://{BASE_ID}"),
        method=method, hyperparameters=hp, training_file="data/train.jsonl",
        training_file_sha256=hashlib.sha256(train).hexdigest(), validation_file="data/val.jsonl",
        output_prefix=f"adapters/{key}", adapter_id=f"bench-{key}", checkpoint_prefix=f"ckpt/{key}",
        object_store_url=store.url)


def _vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def train_one(name: str, store_dir: Path, quick: bool) -> dict:
    """In a fresh process: train and publish ``name``'s adapter, return its row."""
    import bitsandbytes  # noqa: F401 - imported before the baseline, as peft and transformers are
    import peft  # noqa: F401
    import transformers  # noqa: F401

    from workers.train.loop import run_training
    from workers.train.report import MemoryReporter

    torch.set_num_threads(1)
    store = LocalStore(store_dir)
    spec = _spec(store, name, quick)
    reporter = MemoryReporter()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (the peak RSS) to the current RSS
    before = _vm_kib("VmRSS")
    result = run_training(spec, store=store, reporter=reporter, device="cpu")
    peak = _vm_kib("VmHWM")
    rates = [m["tokens_per_s"] for m in reporter.metrics() if "tokens_per_s" in m]
    hp = spec.hyperparameters
    return {"method": name, "trainable_params": int(result.metrics["trainable_params"]),
            "peak_rss_delta_mb": (peak - before) / 1024, "process_peak_rss_mb": peak / 1024,
            "train_tokens_per_s": sum(rates) / len(rates), "eval_loss": result.metrics["eval_loss"],
            "learning_rate": hp.learning_rate, "n_epochs": hp.n_epochs, "batch_size": hp.batch_size,
            "gradient_accumulation_steps": hp.gradient_accumulation_steps, "steps": int(result.metrics["steps"])}


def _questions(tokenizer, n: int) -> list[list[int]]:
    _, val = _split()
    qs = [json.loads(line)["messages"][0]["content"] for line in val.splitlines()[:n]]
    return [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                          tokenize=True, return_dict=True)["input_ids"] for q in qs]


def _base_eval_loss(path: Path) -> float:
    from transformers import AutoModelForCausalLM

    from workers.data.batching import epoch_batches
    from workers.models.loading import load_tokenizer
    from workers.train.loop import read_dataset, summed_label_loss

    tokenizer = load_tokenizer(path)
    with tempfile.TemporaryDirectory() as tmp:
        store = LocalStore(Path(tmp))
        put_bytes(store, "val.jsonl", _split()[1])
        val, _, _ = read_dataset(store, "val.jsonl", None, tokenizer, 512)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    total, n = summed_label_loss(model, epoch_batches(val, batch_size=8, mode="pad", max_len=512,
                                                     pad_id=tokenizer.pad_token_id, seed=0), "cpu")
    return total / n


def _closed_loop(engine, prompts, adapters, rounds: int) -> tuple[int, float, list]:
    from serve_throughput import closed_loop  # bench/: the serving bench's client loop

    return closed_loop(engine, prompts, adapters, rounds, max_tokens=NEW_TOKENS)


def serve(store, rows: list[dict], questions: int, rounds: int, reps: int) -> dict:
    """Fill each row's served tokens/s and styled answers; the mixed batch's figures."""
    from transformers import AutoModelForCausalLM

    from workers.models.loading import load_tokenizer
    from workers.models.registry import local_builtin
    from workers.serve.engine import Engine
    from workers.serve.lora import load_peft_adapter

    path = local_builtin(BASE_ID)
    tokenizer = load_tokenizer(path)
    prompts = _questions(tokenizer, questions)
    clients = questions * (len(rows) + 1)
    # No end-of-sequence: every row decodes NEW_TOKENS, so the columns compare equal work.
    engine = Engine(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), max_batch=clients,
                    max_len=max(map(len, prompts)) + NEW_TOKENS + 64, adapter_slots=len(rows), max_rank=16,
                    eos_token_id=[])
    with tempfile.TemporaryDirectory() as tmp:
        adapters = {r["method"]: load_peft_adapter(
            download_prefix(store, f"adapters/{r['method'].replace('+', '_')}", Path(tmp) / r["method"]),
            key=r["method"], adapter_id=r["method"]) for r in rows}

    def best_of(batch_prompts, batch_adapters) -> tuple[float, list]:
        best, done = 0.0, []
        for _ in range(reps):
            tokens, seconds, done = _closed_loop(engine, batch_prompts, batch_adapters, rounds)
            best = max(best, tokens / seconds)
        return best, done

    _closed_loop(engine, prompts[:2], [None, None], 1)  # warm-up
    # The one batch: every method's adapter on `questions` rows, and as many rows without one.
    owners = [r["method"] for r in rows for _ in prompts] + [None] * len(prompts)
    mixed_prompts = prompts * (len(rows) + 1)
    mixed, done = best_of(mixed_prompts, [adapters[o] if o else None for o in owners])
    bare, _ = best_of(mixed_prompts, [None] * clients)
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    for r in rows:
        mine = [req for i, req in done if owners[i] == r["method"]]
        answers = [tokenizer.decode(req.output_ids[:req.output_ids.index(end)] if end in req.output_ids
                                    else req.output_ids) for req in mine]
        r["served_ok"] = len(mine) == len(prompts) * rounds and all(req.finish_reason == "length" for req in mine)
        r["styled"] = f"{sum(any(m in a for m in STYLE_MARKS) for a in answers)}/{len(answers)}"
        r["sample_answer"] = answers[0] if answers else None
        half = [adapters[r["method"]]] * len(prompts) + [None] * len(prompts)
        r["served_tokens_per_s"], _ = best_of(prompts * 2, half)
    return {"mixed_tokens_per_s": mixed, "mixed_vs_no_adapter": mixed / bare, "mixed_rows": clients}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 epochs instead of auto's, fewer served rounds")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--train-one", help=argparse.SUPPRESS)  # the child process's mode
    ap.add_argument("--store", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.train_one:
        print(json.dumps(train_one(args.train_one, args.store, args.quick)))
        return
    from workers.models.registry import ensure_builtin, local_builtin

    torch.set_num_threads(1)
    start = time.monotonic()
    figures: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = LocalStore(Path(tmp))
        ensure_builtin(BASE_ID, store)
        figures["base_eval_loss"] = _base_eval_loss(local_builtin(BASE_ID))
        rows, failed = [], {}
        for name in METHOD_ROWS:
            t0 = time.monotonic()
            out = subprocess.run([sys.executable, __file__, "--train-one", name, "--store", tmp]
                                 + (["--quick"] if args.quick else []), capture_output=True, text=True)
            if out.returncode:
                failed[name] = (out.stderr.strip().splitlines() or ["(no output)"])[-1]
                print(f"  {name}: FAILED {failed[name]}", file=sys.stderr, flush=True)
                continue
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"  trained {name} in {time.monotonic() - t0:.0f} s: {rows[-1]}", file=sys.stderr, flush=True)
        try:
            figures.update(serve(store, rows, questions=4 if args.quick else 8, rounds=1, reps=2 if args.quick else 3))
        except Exception as exc:  # noqa: BLE001 - reported as missing columns, not a crash
            print(f"serving not measured: {type(exc).__name__}: {exc}", file=sys.stderr)
    print(f"{'method':<15}{'trainable':>11}{'peak +RSS MB':>13}{'train tok/s':>13}{'eval loss':>11}"
          f"{'styled':>8}{'served tok/s':>14}  lr, epochs x batch")
    for r in rows:
        served = f"{r['served_tokens_per_s']:.0f}" if "served_tokens_per_s" in r else "-"
        print(f"{r['method']:<15}{r['trainable_params']:>11,}{r['peak_rss_delta_mb']:>13.1f}"
              f"{r['train_tokens_per_s']:>13.0f}{r['eval_loss']:>11.3f}{r.get('styled', '-'):>8}{served:>14}"
              f"  {r['learning_rate']:.3g}, {r['n_epochs']} x {r['batch_size']}x{r['gradient_accumulation_steps']}")
    for name, why in failed.items():
        print(f"{name}: FAILED {why}")
    figures["methods_trained"] = len(rows)
    figures["methods_served"] = sum(bool(r.get("served_ok")) for r in rows)
    figures["wall_s"] = time.monotonic() - start
    print("figures:", ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"bench": "method_compare", "quick": args.quick, "rows": rows,
                                         "figures": figures}, indent=2))


if __name__ == "__main__":
    main()
