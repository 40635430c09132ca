"""`make demo` / `lorafleet demo`: the whole story on one machine, through the public API only.

Starts the embedded stack (SQLite, a local object store, a local Ray with the serving app),
creates two tenants, uploads the two datasets the project ships, runs LoRA, QLoRA and (IA)3
fine-tunes with live progress, asks the same questions of the base model and of each tenant's
adapter through one serving replica, shows that a tenant cannot use another tenant's adapter,
and shuts everything down. Prints how long each stage took; exits non-zero if any check fails.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from service import demo_ops
from workers.local_ray import free_port

DEMO_DATA = Path(__file__).resolve().parents[1] / "workers" / "data" / "demo"
QUESTIONS = ["What is 2 plus 6?", "What color is the sun?", "What sound does a lion make?"]
# Short fine-tunes that still learn each behaviour on 2 CPU cores.
HYPERPARAMETERS = {"n_epochs": 3, "batch_size": 8, "gradient_accumulation_steps": 1,
                   "learning_rate": 2e-3, "max_seq_length": 128, "checkpoint_steps": 20, "r": 8}
# The same job shape for (IA)3, which has no rank, at its default rate (1e-1: the one measured to
# learn the pirate voice on tiny-llama in this many steps; docs/API.md, "Methods").
IA3_HYPERPARAMETERS = {**{k: v for k, v in HYPERPARAMETERS.items() if k != "r"}, "learning_rate": 1e-1}



def alpaca_prompt(instruction: str) -> str:
    # The chapter's Alpaca prompt: what the Alpaca-format tenant trained on.
    return f"Below is an instruction that describes a task.\n\n### Instruction:\n{instruction}\n\n### Response:\n"


class Stages:
    def __init__(self):
        self.times: list[tuple[str, float]] = []

    @contextmanager
    def stage(self, name: str):
        print(f"\n== {name}", flush=True)
        t0 = time.monotonic()
        yield
        self.times.append((name, time.monotonic() - t0))
        print(f"   ({self.times[-1][1]:.1f} s)", flush=True)


def _start_stack(data_dir: Path) -> tuple[subprocess.Popen, dict]:
    port, serve_port = free_port(), free_port()
    env = {**os.environ, "LORAFLEET_DATA_DIR": str(data_dir), "LORAFLEET_SCHEDULER_INTERVAL_S": "0.5",
           "PYTHONUNBUFFERED": "1"}
    log = open(data_dir / "server.log", "ab")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen([sys.executable, "-m", "service.embedded", "--port", str(port),
                             "--serve-port", str(serve_port), "--num-cpus", "4"],
                            env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    ready, _, _ = select.select([proc.stdout], [], [], 900)
    line = proc.stdout.readline() if ready else ""
    if not line:
        proc.kill()
        raise RuntimeError("the stack did not start; see " + str(data_dir / "server.log"))
    return proc, json.loads(line)


def _answer_chat(client, model: str, question: str) -> str:
    out = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                         max_tokens=24, temperature=0)
    return out.choices[0].message.content.strip()


def _answer_alpaca(client, model: str, question: str) -> str:
    out = client.completions.create(model=model, prompt=alpaca_prompt(question), max_tokens=24,
                                    temperature=0)
    return out.choices[0].text.strip()


def main() -> int:
    from lorafleet import Client
    from lorafleet.errors import NotFoundError

    from service.embedded import embedded_settings, shutdown_local_ray

    data_dir = Path(os.environ.get("LORAFLEET_DEMO_DIR", ".lorafleet/demo")).resolve()
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    stages, failures = Stages(), []
    proc = None
    try:
        with stages.stage("Start the embedded stack (SQLite, local objects, local Ray, API, scheduler, serving)"):
            proc, info = _start_stack(data_dir)
            print(f"   API {info['url']}   serving {info['serve_url']}")
        admin = Client(base_url=info["url"], admin_token=info["admin_token"])

        with stages.stage("Create two tenants and their API keys"):
            tenants = {}
            for name in ("acme-pirates", "bravo-corp"):
                tenant = admin.admin.tenants.create(name)
                key = admin.admin.api_keys.create(tenant.id, name="demo")
                tenants[name] = Client(base_url=info["url"], api_key=key.key)
                print(f"   {name}: {tenant.id}  key {key.key}")
            # the console shows each tenant's job and its loss curve while it trains
            print(f"   Console: {info['url']}/console  (sign in with a key above; admin token "
                  f"{info['admin_token']})")
        acme, bravo = tenants["acme-pirates"], tenants["bravo-corp"]

        with stages.stage("Upload each tenant's dataset"):
            f_acme = acme.files.create(DEMO_DATA / "pirate_chat.jsonl")
            f_bravo = bravo.files.create(DEMO_DATA / "bravo_alpaca.jsonl")
            for f in (f_acme, f_bravo):
                print(f"   {f.id}: {f.filename}, {f.examples} examples, format {f.format}")

        with stages.stage("Fine-tune: acme LoRA (chat, pirate voice), bravo QLoRA and (IA)3 (Alpaca, [[BRAVO-7]] tag)"):
            job_a = acme.fine_tuning.jobs.create(model="lorafleet/tiny-llama", training_file=f_acme.id,
                                                 method="lora", hyperparameters=HYPERPARAMETERS, suffix="pirate")
            job_b = bravo.fine_tuning.jobs.create(model="lorafleet/tiny-llama", training_file=f_bravo.id,
                                                  method="qlora", hyperparameters=HYPERPARAMETERS, suffix="bravo")
            job_c = bravo.fine_tuning.jobs.create(model="lorafleet/tiny-llama", training_file=f_bravo.id,
                                                  method="ia3", hyperparameters=IA3_HYPERPARAMETERS, suffix="bravo-ia3")
            # acme's second adapter, to blend with its first: answers wrapped in <answer> tags
            f_format = acme.files.create(DEMO_DATA / "answer_format.jsonl")
            job_f = acme.fine_tuning.jobs.create(model="lorafleet/tiny-llama", training_file=f_format.id,
                                                 method="lora", hyperparameters=HYPERPARAMETERS, suffix="format")
            print(f"   {job_a.id} (lora), {job_b.id} (qlora) and {job_c.id} (ia3) queued; they run at once "
                  "on the local Ray")
            done_a = acme.fine_tuning.jobs.wait(job_a.id, progress=True, timeout=900)
            done_b = bravo.fine_tuning.jobs.wait(job_b.id, progress=True, timeout=900)
            done_f = acme.fine_tuning.jobs.wait(job_f.id, progress=True, timeout=900)
            done_c = bravo.fine_tuning.jobs.wait(job_c.id, progress=True, timeout=900)
            print(f"   acme  → {done_a.fine_tuned_model}, {done_f.fine_tuned_model}\n"
                  f"   bravo → {done_b.fine_tuned_model}, {done_c.fine_tuned_model}")
            blend_id, export_id = demo_ops.start(acme, done_a.fine_tuned_model, done_f.fine_tuned_model)

        with stages.stage("Ask the same questions of the base model and of each adapter (one serving replica)"):
            rows = []
            for q in QUESTIONS:
                rows.append((q, _answer_chat(acme, "lorafleet/tiny-llama", q),
                             _answer_chat(acme, done_a.fine_tuned_model, q),
                             _answer_alpaca(bravo, done_b.fine_tuned_model, q),
                             _answer_alpaca(bravo, done_c.fine_tuned_model, q)))
            _print_table(rows)
            for q, base, a, b, c in rows:
                if "Arr" not in a and "Yo ho" not in a:
                    failures.append(f"acme's adapter did not answer like a pirate: {q!r} → {a!r}")
                if "BRAVO-7" not in b:
                    failures.append(f"bravo's adapter did not tag its answer: {q!r} → {b!r}")
                if "BRAVO-7" not in c:
                    failures.append(f"bravo's (IA)3 adapter did not tag its answer: {q!r} → {c!r}")
                if "BRAVO-7" in base or "Arr matey" in base:
                    failures.append(f"the base model answered like an adapter: {base!r}")

        with stages.stage("acme blends its two adapters: live per request, and offline (cat)"):
            demo_ops.blend_stage(acme, blend_id, done_a.fine_tuned_model, done_f.fine_tuned_model, QUESTIONS, failures)

        with stages.stage("acme exports its pirate adapter merged into the base model"):
            demo_ops.export_stage(acme, export_id, done_a.fine_tuned_model, QUESTIONS[0], failures)

        with stages.stage("Tenant isolation: bravo asks for acme's adapter"):
            try:
                _answer_chat(bravo, done_a.fine_tuned_model, QUESTIONS[0])
                failures.append("bravo could use acme's adapter")
            except NotFoundError as exc:
                print(f"   404 {exc.code}: {exc.message}")
    except Exception as exc:  # noqa: BLE001 - the demo reports, it does not trace back
        failures.append(f"{type(exc).__name__}: {exc}")
    finally:
        if proc is not None and sys.stdin.isatty():  # someone is watching: let them look first
            try:
                input(f"\nThe console stays up at {info['url']}/console; press Enter to shut down. ")
            except (EOFError, KeyboardInterrupt):
                pass
        with stages.stage("Shut down"):
            if proc is not None:
                proc.terminate()  # the server stops its scheduler and the serving app
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
            shutdown_local_ray(embedded_settings(data_dir=data_dir))

    print("\nStage times:")
    for name, seconds in stages.times:
        print(f"  {seconds:7.1f} s  {name}")
    print(f"  {sum(s for _, s in stages.times):7.1f} s  total")
    if failures:
        print("\nDEMO FAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
        print(f"(server log: {data_dir / 'server.log'})", file=sys.stderr)
        return 1
    print("\nDemo OK: each adapter learned its tenant's behaviour; the base model did not; "
          "another tenant's adapter is a 404.")
    return 0


def _print_table(rows) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # the CLI extra is not installed: plain text
        for q, base, a, b, c in rows:
            print(f"Q: {q}\n   base : {base}\n   acme : {a}\n   bravo: {b}\n   bravo (IA)3: {c}")
        return
    table = Table("question", "base model", "acme-pirates (LoRA)", "bravo-corp (QLoRA)", "bravo-corp ((IA)3)",
                  show_lines=True)
    for row in rows:
        table.add_row(*row)
    Console(width=160).print(table)


if __name__ == "__main__":
    sys.exit(main())
