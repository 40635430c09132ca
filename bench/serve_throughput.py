"""Multi-LoRA serving throughput: our batched engine against the base model and PEFT's two ways.

A 4-layer, 256-wide random Llama; N closed-loop clients, each with its own adapter (ranks 8 and
16 alternating, on q,k,v,o), 16 new tokens greedy, prompts of 16 tokens. Columns:
  (a) base      the base model alone, HF generate on the clients' batch
  (b) set_adapter  PEFT, one request at a time after model.set_adapter (the chapter's way)
  (c) peft_mixed   PEFT's mixed batch, generate(..., adapter_names=[...])
  (d) ours      workers.serve.engine.Engine, continuous batching, every adapter in one batch
  (d0) ours_base   our engine with no adapter on any row (how much the LoRA path itself costs)
Each column is repeated and interleaved with the others; the best repetition is kept (the machine is
shared). Plus:
  cold_load_ms  what a cold rank-16 adapter adds to time to first token when it comes from an S3
                endpoint (moto server subprocess): median cold TTFT - median warm TTFT;
  wide          (d) and (d0) on a 2048-wide, 4-layer model where matmuls, not Python, dominate
                (``vs_own_base_wide``);
  zipf          1,000 distinct rank-8 adapters in a local object store, Zipf(1.0) popularity,
                32 clients through the adapter cache (host tier 256, device budget of 32
                adapters' bytes) against the same load with every adapter resident
                (``zipf_vs_resident``, hit rates printed);
  lora_bytes_overhead  device bytes the engine takes for one r=8 q,k,v,o adapter on a
                Llama-2-7B-shaped model (built on the meta device: the engine's own sizing and
                page allocation, no memory) / that adapter's size in the same dtype.

    python bench/serve_throughput.py [--quick] [--wide] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from serve_rows import lora_bytes_overhead, wide_rows, zipf_rows

from workers.serve import synthetic
from workers.serve.engine import Engine
from workers.serve.lora import load_peft_adapter
from workers.serve.sampling import SamplingParams

NEW_TOKENS, PROMPT_LEN = 16, 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


class _FirstToken(LogitsProcessor):
    """Records when generate() picks its first token (time to first token of the batch)."""

    def __init__(self):
        self.at = None

    def __call__(self, input_ids, scores):
        if self.at is None:
            if scores.is_cuda:
                torch.cuda.synchronize()
            self.at = time.perf_counter()
        return scores


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def row(name: str, n: int, tokens: int, seconds: float, ttfts: list[float]) -> dict:
    return {"column": name, "adapters": n, "tokens_per_s": tokens / seconds,
            "ttft_p50_ms": 1000 * statistics.median(ttfts), "ttft_p99_ms": 1000 * _pct(ttfts, 0.99)}


def hf_rounds(model, prompts, rounds, *, serial=False, adapter_names=None, set_adapter=None):
    """Closed loop over HF generate: every client sends again once its answer is back."""
    ttfts, tokens, start = [], 0, time.perf_counter()
    kw = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    for _ in range(rounds):
        arrival = time.perf_counter()
        batches = [[i] for i in range(len(prompts))] if serial else [list(range(len(prompts)))]
        for rows in batches:
            if set_adapter is not None:
                set_adapter(rows[0])
            first = _FirstToken()
            extra = {"adapter_names": [adapter_names[i] for i in rows]} if adapter_names else {}
            out = model.generate(torch.tensor([prompts[i] for i in rows], device=model.device),
                                 logits_processor=LogitsProcessorList([first]), **kw, **extra)
            tokens += out[:, PROMPT_LEN:].numel()
            ttfts += [first.at - arrival] * len(rows)
    return tokens, time.perf_counter() - start, ttfts  # generate() ends synchronised (it reads ids)


def closed_loop(engine: Engine, prompts, adapters, rounds, *, max_tokens: int = NEW_TOKENS):
    """Each client submits its next request from the finish callback: it joins the running batch
    at the next step (continuous batching). Returns (tokens, seconds, [(client, request)])."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    done, sent = [], [0] * len(prompts)

    def send(i: int) -> None:
        sent[i] += 1
        engine.submit(prompts[i], params, adapters[i], lambda req, _d: finished(i, req))

    def finished(i: int, req) -> None:
        if req.finish_reason is not None:
            done.append((i, req))
            if sent[i] < rounds:
                send(i)

    start = time.perf_counter()
    for i in range(len(prompts)):
        send(i)
    while engine.has_work():
        engine.step()
    return sum(len(r.output_ids) for _, r in done), time.perf_counter() - start, done


def ours_closed_loop(engine: Engine, prompts, adapters, rounds):
    """closed_loop's tokens and seconds, and each request's time to first token."""
    tokens, seconds, done = closed_loop(engine, prompts, adapters, rounds)
    return tokens, seconds, [r.ttft for _, r in done]


@contextlib.contextmanager
def _moto_server():
    """A real S3-compatible HTTP endpoint on loopback (moto's standalone server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def _cold_load(adapter_dir: Path, base_id: str, engine: Engine, prompt: list[int], tries: int = 5) -> dict:
    """A rank-16 adapter published with its manifest to a real S3 endpoint (moto server). Each
    try publishes a new version (so it is cold) and times one request's first token from a cold
    cache (download, sha256 check, parse, copy into a device slot, prefill) against the same
    request once the adapter is warm. Medians over the tries."""
    import asyncio

    from workers.serve.adapters import AdapterCache
    from workers.storage import S3Store

    params = SamplingParams(max_tokens=1, temperature=0)

    def first_token(cache, prefix) -> tuple[float, float]:
        start = time.perf_counter()
        adapter = asyncio.run(cache.get("ft-bench", prefix))
        fetched = time.perf_counter()
        engine.generate_batch([prompt], params, [adapter])
        return time.perf_counter() - start, fetched - start

    cold, warm, fetch = [], [], []
    with _moto_server() as endpoint:
        store = S3Store("bench", "lorafleet", endpoint_url=endpoint, access_key_id="test",
                        secret_access_key="test")
        store.ensure_bucket()
        cache = AdapterCache(store, base_model_id=base_id, device=engine.slots)
        for v in range(tries):
            prefix = f"tenants/t1/adapters/ft-bench/v{v}"
            synthetic.publish_adapter(store, adapter_dir, prefix, adapter_id="ft-bench", base_model_id=base_id)
            total, fetched = first_token(cache, prefix)
            cold.append(total)
            fetch.append(fetched)
            warm.append(first_token(cache, prefix)[0])
    ms = lambda xs: 1000 * statistics.median(xs)
    return {"cold_load_ms": ms(cold) - ms(warm), "cold_fetch_ms": ms(fetch), "cold_ttft_ms": ms(cold),
            "warm_ttft_ms": ms(warm)}


def _measure(base, peft_model, engine: Engine, prompts, adapters, names, rounds: int, reps: int) -> list[dict]:
    """Every column with ``len(prompts)`` clients; the machine is shared, so the columns are
    interleaved and each keeps its best repetition."""
    n = len(prompts)
    hf_rounds(base, prompts[:2], 1)  # warm-up of each path
    ours_closed_loop(engine, prompts[:2], adapters[:2], 1)
    runs = {
        "a_base": lambda: hf_rounds(base, prompts, rounds),
        "b_set_adapter": lambda: hf_rounds(peft_model, prompts, 1, serial=True,
                                           set_adapter=lambda i: peft_model.set_adapter(names[i])),
        "c_peft_mixed": lambda: hf_rounds(peft_model, prompts, rounds, adapter_names=names),
        "d_ours": lambda: ours_closed_loop(engine, prompts, adapters, rounds),
        "d0_ours_no_adapter": lambda: ours_closed_loop(engine, prompts, [None] * n, rounds),
    }
    best: dict[str, dict] = {}
    for _ in range(reps):
        for column, run in runs.items():
            r = row(column, n, *run())
            if column not in best or r["tokens_per_s"] > best[column]["tokens_per_s"]:
                best[column] = r
    return list(best.values())


def _measure_ours(engine: Engine, prompts, adapters, rounds: int, reps: int) -> list[dict]:
    """(d) and (d0) only, interleaved, best of ``reps``."""
    n = len(prompts)
    ours_closed_loop(engine, prompts[:2], adapters[:2], 1)
    best: dict[str, dict] = {}
    for _ in range(reps):
        for column, run in (("d_ours", adapters), ("d0_ours_no_adapter", [None] * n)):
            r = row(column, n, *ours_closed_loop(engine, prompts, run, rounds))
            if column not in best or r["tokens_per_s"] > best[column]["tokens_per_s"]:
                best[column] = r
    return list(best.values())


def report(name: str, args, rows: list[dict], figures: dict, caption: str, *, quick: bool) -> None:
    print(f"{'column':<24}{'adapters':>9}{'tok/s':>10}{'ttft p50 ms':>13}{'ttft p99 ms':>13}")
    ms = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    for r in rows:
        print(f"{r['column']:<24}{r['adapters']:>9}{r['tokens_per_s']:>10.0f}"
              f"{ms(r['ttft_p50_ms']):>13}{ms(r['ttft_p99_ms']):>13}")
    print(f"{caption}:", ", ".join(f"{k}={v:.2f}" for k, v in figures.items()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"bench": name, "quick": quick,
                                         "rows": rows, "figures": figures}, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="8 and 32 adapters, fewer rounds")
    ap.add_argument("--wide", action="store_true", help="only the wide shape's rows")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = ap.parse_args()
    # One intra-op thread by default: on a shared 2-core machine, two threads that get preempted
    # spin in OpenMP barriers and every column loses 10-100x at random; one thread is stable.
    torch.set_num_threads(args.threads)
    rows, figures = [], {}
    parts = [] if args.wide else [lambda: _tiny(args.quick), lambda: ([], lora_bytes_overhead()),
                                  lambda: zipf_rows(quick=args.quick)]
    for part in parts + [lambda: wide_rows(_measure_ours, quick=args.quick)]:
        found_rows, found = part()
        rows += found_rows
        figures.update(found)
        print("so far:", json.dumps({"rows": found_rows, "figures": found}), flush=True)
    report("serve_throughput", args, rows, figures, "figures at 32 adapters", quick=args.quick)


def _tiny(quick: bool) -> tuple[list[dict], dict]:
    counts, rounds, reps = ([8, 32], 2, 2) if quick else ([8, 32, 64], 3, 3)
    cfg = synthetic.tiny_llama_config(vocab_size=2048, hidden=256, layers=4, heads=4, kv_heads=4,
                                      intermediate=688, init_range=0.1)
    n_max = max(counts)
    names = [f"ad{i}" for i in range(n_max)]
    specs = [dict(name=n, r=8 if i % 2 else 16, target_modules=TARGETS) for i, n in enumerate(names)]
    peft_model = synthetic.random_adapters(synthetic.random_llama(cfg), specs)
    base = synthetic.random_llama(cfg)
    # eos_token_id=[]: every request makes all 16 tokens, as min_new_tokens does for generate().
    engine = Engine(synthetic.random_llama(cfg), max_batch=n_max, max_len=PROMPT_LEN + NEW_TOKENS + 8,
                    adapter_slots=n_max, max_rank=16, eos_token_id=[])
    with tempfile.TemporaryDirectory() as tmp:
        dirs = synthetic.save_adapters(peft_model, names, Path(tmp))
        adapters = [load_peft_adapter(dirs[n], key=n, adapter_id=n) for n in names]
        gen = torch.Generator().manual_seed(0)
        all_prompts = torch.randint(3, cfg.vocab_size, (n_max, PROMPT_LEN), generator=gen).tolist()
        cold = _cold_load(dirs[names[0]], "bench-base", engine, all_prompts[0])

    rows = []
    for n in counts:
        rows += _measure(base, peft_model, engine, all_prompts[:n], adapters[:n], names[:n], rounds, reps)
        print(f"measured {n} adapters", flush=True)  # the shared machine may be slow: show progress

    by = {(r["column"], r["adapters"]): r["tokens_per_s"] for r in rows}
    ours = by[("d_ours", 32)]
    return rows, {"vs_base": ours / by[("a_base", 32)], "vs_set_adapter": ours / by[("b_set_adapter", 32)],
                  "vs_peft_mixed": ours / by[("c_peft_mixed", 32)],
                  "vs_own_base": ours / by[("d0_ours_no_adapter", 32)], **cold}


if __name__ == "__main__":
    main()
