"""Multi-LoRA serving on one GPU: a Llama-2-7B-shaped NF4 base (random weights), 64 distinct
rank-16 adapters on q,k,v,o, closed-loop clients, 16 new tokens greedy. No Ray, no network.

Columns as bench/serve_throughput.py: (a) base alone (HF generate), (b) PEFT set_adapter per
request, (c) PEFT mixed batch (adapter_names=), (d) ours, (d0) ours with no adapter
(``vs_own_base``: what the LoRA path costs, bf16 pages through the dense kernel), and
``lora_bytes_overhead`` (the engine's own sizing, as on the CPU).

    python bench/gpu/serve_gpu.py [--json PATH]      # the H200 run, < 8 minutes
    python bench/gpu/serve_gpu.py --smoke            # the same code, tiny, on the CPU
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # repository root

import torch
from serve_rows import lora_bytes_overhead
from serve_throughput import (
    NEW_TOKENS,
    PROMPT_LEN,
    TARGETS,
    hf_rounds,
    ours_closed_loop,
    report,
    row,
)

from workers.serve import synthetic
from workers.serve.engine import Engine
from workers.serve.lora import load_peft_adapter

LLAMA2_7B = dict(vocab_size=32000, hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008)
SMOKE = dict(vocab_size=512, hidden=128, layers=2, heads=4, kv_heads=4, intermediate=256)


def nf4_llama(shape: dict, device: str, seed: int):
    """A random Llama with every decoder linear replaced by a bitsandbytes NF4 Linear4bit,
    quantized layer by layer so the bf16 copy of the whole model never sits in memory twice."""
    import bitsandbytes as bnb

    compute = torch.bfloat16 if device == "cuda" else torch.float32
    cfg = synthetic.tiny_llama_config(max_len=256, init_range=0.02, **shape)
    model = synthetic.random_llama(cfg, seed=seed, dtype=compute, device=device)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if not isinstance(lin, torch.nn.Linear):
                    continue
                q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False,
                                      compute_dtype=compute, quant_type="nf4", device="meta")
                # Params4bit quantizes on its first move to a real device.
                q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False,
                                             quant_type="nf4").to(device)
                setattr(parent, name, q)
                del lin
    if device == "cuda":
        torch.cuda.empty_cache()
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU (tests the script)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --smoke on a CPU machine")
    shape, n, rounds = (SMOKE, 4, 1) if args.smoke else (LLAMA2_7B, 64, 2)
    started = time.perf_counter()

    names = [f"ad{i}" for i in range(n)]
    peft_model = synthetic.random_adapters(nf4_llama(shape, device, seed=0),
                                           [dict(name=a, r=16, target_modules=TARGETS) for a in names])
    base = nf4_llama(shape, device, seed=0)
    ours_model = nf4_llama(shape, device, seed=0)
    lora_dtype = torch.bfloat16 if device == "cuda" else torch.float32
    engine = Engine(ours_model, max_batch=n, max_len=PROMPT_LEN + NEW_TOKENS + 8, adapter_slots=n,
                    max_rank=16, lora_dtype=lora_dtype, wrap=TARGETS, eos_token_id=[])
    with tempfile.TemporaryDirectory() as tmp:
        dirs = synthetic.save_adapters(peft_model, names, Path(tmp))
        adapters = [load_peft_adapter(dirs[a], key=a, adapter_id=a, dtype=lora_dtype) for a in names]
    print(f"setup {time.perf_counter() - started:.0f}s", flush=True)

    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, shape["vocab_size"], (n, PROMPT_LEN), generator=gen).tolist()
    hf_rounds(base, prompts[:2], 1)  # warm-up of each path
    ours_closed_loop(engine, prompts[:2], adapters[:2], 1)
    rows = [row("a_base", n, *hf_rounds(base, prompts, rounds))]
    print(f"a done {time.perf_counter() - started:.0f}s", flush=True)
    rows.append(row("b_set_adapter", n, *hf_rounds(peft_model, prompts, 1, serial=True,
                                                   set_adapter=lambda i: peft_model.set_adapter(names[i]))))
    print(f"b done {time.perf_counter() - started:.0f}s", flush=True)
    rows.append(row("c_peft_mixed", n, *hf_rounds(peft_model, prompts, rounds, adapter_names=names)))
    rows.append(row("d_ours", n, *ours_closed_loop(engine, prompts, adapters, rounds)))
    rows.append(row("d0_ours_no_adapter", n, *ours_closed_loop(engine, prompts, [None] * n, rounds)))

    by = {r["column"]: r["tokens_per_s"] for r in rows}
    figures = {"vs_base": by["d_ours"] / by["a_base"], "vs_set_adapter": by["d_ours"] / by["b_set_adapter"],
               "vs_peft_mixed": by["d_ours"] / by["c_peft_mixed"],
               "vs_own_base": by["d_ours"] / by["d0_ours_no_adapter"],
               "wall_s": time.perf_counter() - started, **lora_bytes_overhead()}
    if device == "cuda":
        figures["max_gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    report("serve_gpu", args, rows, figures, f"figures at {n} adapters", quick=args.smoke)


if __name__ == "__main__":
    main()
