"""Serving every PEFT method in one batch: 32 distinct adapters spread over the chapter's methods.

The model of ``bench/serve_throughput.py`` (a 4-layer, 256-wide random Llama), 32 closed-loop
clients, each with its own adapter: LoRA, rsLoRA, DoRA, AdaLoRA, (IA)3, prompt tuning, P-tuning
and prefix tuning, four of each (``workers.serve.synthetic_methods``); 16 new tokens greedy,
prompts of 16 tokens. Columns:
  (d) ours            workers.serve.engine.Engine, every adapter of every method in one batch
  (d0) ours_no_adapter the same engine, no adapter on any row (what the methods cost)
  (p) peft_per_request plain PEFT, one request at a time, each adapter in its own PeftModel
                      (PEFT cannot batch different methods together)
Columns are interleaved and repeated; each keeps its best repetition (the machine is shared).

    python bench/serve_methods.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from serve_throughput import NEW_TOKENS, PROMPT_LEN, ours_closed_loop, report, row
from workers.serve import synthetic
from workers.serve.engine import Engine
from workers.serve.lora import load_peft_adapter
from workers.serve.synthetic_methods import METHOD_SPECS, peft_reference, random_method_adapters


def peft_per_request(models, prompts, rounds):
    """Each client's request alone through its adapter's PeftModel (HF generate), serially."""
    ttfts, tokens, start = [], 0, time.perf_counter()
    kw = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    for _ in range(rounds):
        arrival = time.perf_counter()
        for model, prompt in zip(models, prompts):
            ids = torch.tensor([prompt])
            first = time.perf_counter()
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
            tokens += NEW_TOKENS
            # No first-token hook for PEFT's prompt-learning generate: a request's wait for
            # its turn plus 1/NEW_TOKENS of its own time stands for it.
            ttfts.append(first - arrival + (time.perf_counter() - first) / NEW_TOKENS)
            assert out.shape[1] >= NEW_TOKENS
    return tokens, time.perf_counter() - start, ttfts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="16 adapters (two per method), fewer rounds")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)  # one thread: stable on a shared machine (serve_throughput)
    per_method, rounds, reps = (2, 1, 2) if args.quick else (4, 2, 3)
    cfg = synthetic.tiny_llama_config(vocab_size=2048, hidden=256, layers=4, heads=4, kv_heads=4,
                                      intermediate=688, init_range=0.1)
    specs = {f"{m}_{i}": METHOD_SPECS[m] for i in range(per_method) for m in METHOD_SPECS}
    n = len(specs)
    engine = Engine(synthetic.random_llama(cfg), max_batch=n, max_len=PROMPT_LEN + NEW_TOKENS + 16,
                    adapter_slots=n, max_rank=16, eos_token_id=[])
    with tempfile.TemporaryDirectory() as tmp:
        dirs = random_method_adapters(cfg, Path(tmp), specs)
        adapters = [load_peft_adapter(d, key=name, adapter_id=name) for name, d in dirs.items()]
        models = [peft_reference(synthetic.random_llama(cfg), d) for d in dirs.values()]
    for model in models:
        model.generation_config.pad_token_id = cfg.pad_token_id
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, cfg.vocab_size, (n, PROMPT_LEN), generator=gen).tolist()

    ours_closed_loop(engine, prompts[:2], adapters[:2], 1)  # warm-up of each path
    peft_per_request(models[:2], prompts[:2], 1)
    runs = {
        "d_ours": lambda: ours_closed_loop(engine, prompts, adapters, rounds),
        "d0_ours_no_adapter": lambda: ours_closed_loop(engine, prompts, [None] * n, rounds),
        "p_peft_per_request": lambda: peft_per_request(models, prompts, 1),
    }
    best: dict[str, dict] = {}
    for _ in range(reps):
        for column, run in runs.items():
            r = row(column, n, *run())
            if column not in best or r["tokens_per_s"] > best[column]["tokens_per_s"]:
                best[column] = r
    rows = list(best.values())
    ours = best["d_ours"]["tokens_per_s"]
    figures = {"methods": len(METHOD_SPECS),
               "vs_own_base": ours / best["d0_ours_no_adapter"]["tokens_per_s"],
               "vs_peft_per_request": ours / best["p_peft_per_request"]["tokens_per_s"]}
    report("serve_methods", args, rows, figures, f"figures at {n} adapters of {len(METHOD_SPECS)} methods",
           quick=args.quick)


if __name__ == "__main__":
    main()
