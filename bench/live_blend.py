"""Live weighted blends: what a request that blends two adapters costs against one adapter of
the same summed rank, in the same engine and the same mixed batch.

A 4-layer, 256-wide random Llama; N requests, 16 prompt tokens, 16 new tokens greedy, LoRA on
q,k,v,o. Columns:
  (a) summed_rank  each request its own rank-16 adapter (what a blend of two rank-8 adapters is)
  (b) live_blend   each request a live blend of two rank-8 adapters (workers.serve.blend), composed
                   on its first use and cached
  (c) half_blend   half the requests (a), half (b): blends mixed with plain adapters in one batch
Each column is repeated, interleaved with the others, best repetition kept (a shared machine).
Plus ``compose_ms``: composing one blend on the host (its first request pays it once).

    python bench/live_blend.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from workers.serve import synthetic
from workers.serve.blend import BlendCache, compose
from workers.serve.engine import Engine
from workers.serve.lora import LoraAdapter
from workers.serve.sampling import SamplingParams

NEW_TOKENS, PROMPT_LEN = 16, 16
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def random_adapter(model, name: str, rank: int, gen: torch.Generator) -> LoraAdapter:
    weights = {}
    for module, layer in model.named_modules():
        if module.rsplit(".", 1)[-1] in TARGETS:
            weights[module] = (torch.randn(layer.in_features, rank, generator=gen) * 0.05,
                               torch.randn(rank, layer.out_features, generator=gen) * 0.05)
    return LoraAdapter(key=name, adapter_id=name, rank=rank, scale=2.0, weights=weights)


def run(engine: Engine, prompts, adapters) -> float:
    start = time.perf_counter()
    engine.generate_batch(prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=0), adapters)
    return len(prompts) * NEW_TOKENS / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="8 requests, fewer repetitions")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()
    torch.set_num_threads(1)  # one thread: stable on a shared machine (see bench/serve_throughput.py)
    n, reps = (8, 3) if args.quick else (32, 5)
    cfg = synthetic.tiny_llama_config(vocab_size=2048, hidden=256, layers=4, heads=4, kv_heads=4,
                                      intermediate=688, init_range=0.1)
    model = synthetic.random_llama(cfg)
    gen = torch.Generator().manual_seed(0)
    summed = [random_adapter(model, f"r16-{i}", 16, gen) for i in range(n)]
    halves = [(random_adapter(model, f"a{i}", 8, gen), random_adapter(model, f"b{i}", 8, gen)) for i in range(n)]
    engine = Engine(model, max_batch=n, max_len=PROMPT_LEN + NEW_TOKENS + 8, adapter_slots=2 * n + 1, max_rank=16,
                    eos_token_id=[])
    prompts = torch.randint(3, cfg.vocab_size, (n, PROMPT_LEN), generator=gen).tolist()

    compose_ms = []
    for a, b in halves:
        t0 = time.perf_counter()
        compose([(a, 0.7), (b, 0.3)], adapter_id=f"{a.adapter_id}+{b.adapter_id}")
        compose_ms.append((time.perf_counter() - t0) * 1000)
    cache = BlendCache(max_blends=n)

    def blends():  # what the serving front does per request: a cache lookup once composed
        return [cache.get([(a, 0.7), (b, 0.3)], adapter_id=f"{a.adapter_id}+{b.adapter_id}") for a, b in halves]

    columns = {"a_summed_rank": lambda: summed, "b_live_blend": blends,
               "c_half_blend": lambda: [s if i % 2 else bl for i, (s, bl) in enumerate(zip(summed, blends()))]}
    for make in columns.values():  # warm: device slots filled, blends composed
        run(engine, prompts, make())
    best = {name: 0.0 for name in columns}
    for _ in range(reps):
        for name, make in columns.items():
            best[name] = max(best[name], run(engine, prompts, make()))
    rows = [{"column": name, "requests": n, "tokens_per_s": tps} for name, tps in best.items()]
    figures = {"blend_vs_summed_rank": best["b_live_blend"] / best["a_summed_rank"],
               "mixed_vs_summed_rank": best["c_half_blend"] / best["a_summed_rank"],
               "compose_ms": statistics.median(compose_ms)}
    print(f"{'column':<16}{'requests':>9}{'tok/s':>10}")
    for r in rows:
        print(f"{r['column']:<16}{r['requests']:>9}{r['tokens_per_s']:>10.0f}")
    print("figures:", ", ".join(f"{k}={v:.2f}" for k, v in figures.items()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"bench": "live_blend", "quick": args.quick, "rows": rows,
                                         "figures": figures}, indent=2))


if __name__ == "__main__":
    main()
