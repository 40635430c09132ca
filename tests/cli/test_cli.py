"""The `lorafleet` command run for real (subprocess) against the live control plane."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from live_stack import FakeWorker, adapter_files, free_port

LORAFLEET = Path(sys.executable).with_name("lorafleet")
DATASET = b'{"prompt": "Say hi", "completion": "Ahoy!"}\n' * 3


def run(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("LORAFLEET_")}
    return subprocess.run([str(LORAFLEET), *args], capture_output=True, text=True, timeout=timeout,
                          env={**base, "COLUMNS": "200", **(env or {})})


def assert_one_line_error(result: subprocess.CompletedProcess, prefix: str) -> None:
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), result.stderr


@pytest.fixture(scope="module")
def tenant_env(stack) -> dict:
    admin = {"LORAFLEET_BASE_URL": stack.base_url, "LORAFLEET_ADMIN_TOKEN": stack.admin_token}
    created = run("admin", "tenant", "create", "cli-co", "--max-concurrent-jobs", "1", "--json", env=admin)
    assert created.returncode == 0, created.stderr
    tenant = json.loads(created.stdout)
    assert tenant["name"] == "cli-co" and tenant["max_concurrent_jobs"] == 1
    key = run("admin", "key", "create", tenant["id"], "--json", env=admin)
    assert key.returncode == 0, key.stderr
    secret = json.loads(key.stdout)["key"]
    assert secret.startswith("lf-")
    return {"LORAFLEET_BASE_URL": stack.base_url, "LORAFLEET_API_KEY": secret, "TENANT_ID": tenant["id"]}


def test_connection_refused_is_one_line():
    result = run("--base-url", f"http://127.0.0.1:{free_port()}", "--api-key", "lf-x", "models", "list")
    assert_one_line_error(result, "error: connection_error: could not connect to http://127.0.0.1:")


def test_usage_errors_exit_2_without_traceback():
    result = run("jobs", "create", "--model", "m", "--file", "f", "--method", "full")
    assert result.returncode == 2 and "Traceback" not in result.stderr and "lora" in result.stderr
    result = run("jobs", "create", "--model", "m", "--file", "f", "--hp", "r")
    assert result.returncode == 2 and "key=value" in result.stderr
    assert run("files", "upload", "/no/such/file.jsonl").returncode == 2


def test_missing_key_is_a_clear_error(stack):
    assert_one_line_error(run("--base-url", stack.base_url, "files", "list"),
                          "error: no API key: pass api_key= or set LORAFLEET_API_KEY")


def test_bad_key_and_bad_admin_token(stack):
    assert_one_line_error(run("--base-url", stack.base_url, "--api-key", "lf-wrong", "jobs", "list"),
                          "error: unauthorized:")
    assert_one_line_error(run("--base-url", stack.base_url, "--admin-token", "nope", "admin", "tenant", "list"),
                          "error: forbidden:")


def test_upload_create_list_get_events_cancel(tenant_env, tmp_path):
    data = tmp_path / "hi.jsonl"
    data.write_bytes(DATASET)
    up = run("files", "upload", str(data), "--json", env=tenant_env)
    assert up.returncode == 0, up.stderr
    file = json.loads(up.stdout)
    assert (file["format"], file["examples"], file["filename"]) == ("completion", 3, "hi.jsonl")
    assert file["id"] in run("files", "list", env=tenant_env).stdout

    created = run("jobs", "create", "--model", "lorafleet/tiny-llama", "--file", file["id"], "--method", "qlora",
                  "--suffix", "cli", "--hp", "r=4", "--hp", "target_modules=all-linear", "--json", env=tenant_env)
    assert created.returncode == 0, created.stderr
    job = json.loads(created.stdout)
    hp = job["method"]["qlora"]["hyperparameters"]
    assert (hp["r"], hp["target_modules"], job["user_provided_suffix"]) == (4, "all-linear", "cli")

    listed = json.loads(run("jobs", "list", "--json", env=tenant_env).stdout)
    assert [j["id"] for j in listed] == [job["id"]]
    table = run("jobs", "list", env=tenant_env)
    assert table.returncode == 0 and job["id"] in table.stdout and "STATUS" in table.stdout
    got = run("jobs", "get", job["id"], env=tenant_env)
    assert got.returncode == 0 and "qlora" not in got.stderr and job["id"] in got.stdout

    events = json.loads(run("jobs", "events", job["id"], "--json", env=tenant_env).stdout)
    assert events and all(e["object"] == "fine_tuning.job.event" for e in events)
    cancel = run("jobs", "cancel", job["id"], "--json", env=tenant_env)
    assert cancel.returncode == 0 and json.loads(cancel.stdout)["status"] in ("cancelled", "cancelling")

    followed = run("jobs", "events", job["id"], "--follow", env=tenant_env, timeout=30)
    assert followed.returncode == 0 and "cancel" in followed.stdout.lower()


def test_invalid_dataset_lists_bad_lines(tenant_env, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(DATASET + b"oops\n" + b'{"prompt": "x"}\n')
    result = run("files", "upload", str(bad), env=tenant_env)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("error: invalid_training_file:")
    assert lines[1].startswith("  line 4:") and lines[2].startswith("  line 5:")


def test_not_found_and_unknown_model(tenant_env):
    assert_one_line_error(run("jobs", "get", "ftjob-missing", env=tenant_env), "error: not_found:")
    assert_one_line_error(run("chat", "--model", "ft-someone-elses", "hello", env=tenant_env),
                          "error: model_not_found:")


def test_models_list(tenant_env):
    models = json.loads(run("models", "list", "--json", env=tenant_env).stdout)
    assert {"id": "lorafleet/tiny-llama", "owned_by": "lorafleet"}.items() <= models[0].items()


def test_create_wait_progress_then_chat(stack, tenant_env, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_bytes(DATASET)
    file_id = json.loads(run("files", "upload", str(data), "--json", env=tenant_env).stdout)["id"]
    proc = subprocess.Popen(
        [str(LORAFLEET), "jobs", "create", "--model", "lorafleet/tiny-llama", "--file", file_id, "--wait", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "COLUMNS": "200", **tenant_env})

    # The job id is on the first stderr line (read before communicate() takes the pipe).
    first = proc.stderr.readline()
    job_id = re.search(r"ftjob-[0-9a-z]+", first).group(0)

    def drive():  # play the scheduler and the worker while the CLI follows the job
        worker = FakeWorker(stack, job_id)
        worker.start()
        worker.events({"type": "metrics", "message": "s", "data": {"step": 3, "total_steps": 6, "train_loss": 0.5}})
        worker.publish(adapter_files())
        worker.close()

    thread = threading.Thread(target=drive)
    thread.start()
    out, err = proc.communicate(timeout=60)
    thread.join()
    assert proc.returncode == 0, err
    job = json.loads(out)
    assert job["status"] == "succeeded" and job["fine_tuned_model"].startswith("ft-tiny-llama-")
    assert first.startswith("created ftjob-") and "loss 0.5000" in err and "Traceback" not in err

    chat = run("chat", "--model", job["fine_tuned_model"], "Who are you?", env=tenant_env)
    assert chat.returncode == 0 and chat.stdout.strip() == f"Ahoy from {job['fine_tuned_model']}"
    names = run("models", "list", env=tenant_env).stdout
    assert job["fine_tuned_model"] in names


def _cli_with_modules(modules: str, *args: str) -> subprocess.CompletedProcess:
    """The real CLI entry point, with service modules replaced first (``None`` = not installed)."""
    code = ("import sys, types\n" + modules +
            "\nfrom lorafleet.cli import main\nsys.argv = ['lorafleet', *sys.argv[1:]]\nmain()")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60)


def test_up_and_demo_without_the_control_plane():
    # the server package not installed: nothing registers the entry points the CLI looks up
    absent = ("import importlib.metadata as md; real = md.entry_points\n"
              "md.entry_points = lambda **kw: md.EntryPoints(()) if kw.get('group') == 'lorafleet.server' else real(**kw)")
    for command in ("up", "demo"):
        assert_one_line_error(_cli_with_modules(absent, command),
                              f"error: `lorafleet {command}` needs the LoRA Fleet server package, which is not installed")
    # registered but broken (a half-removed install): the same kind of line, naming the import
    broken = "sys.modules['service.embedded'] = None; sys.modules['service.demo'] = None"
    assert_one_line_error(_cli_with_modules(broken, "up"),
                          "error: `lorafleet up` needs the LoRA Fleet server package, which does not import")


def test_the_sdk_never_imports_the_server_package():
    import ast

    sdk = Path(__file__).resolve().parents[2] / "sdk"
    for path in sdk.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            assert not any(n.split(".")[0] in ("service", "workers") for n in names), (path, names)


def test_up_and_demo_call_the_stack_entry_points(tmp_path):
    fake = """
demo = types.ModuleType('service.demo')
demo.main = lambda: print('demo ran') or 3
emb = types.ModuleType('service.embedded')
class S:
    host, port, serve_url = '127.0.0.1', 0, None
    admin_token = types.SimpleNamespace(get_secret_value=lambda: 'tok')
def embedded_settings(**kw):
    s = S(); s.port = kw['port']; s.data_dir = kw['data_dir']; return s
def run_stack(settings, *, serving, serve_port, num_cpus, on_ready):
    print('run_stack', settings.port, settings.data_dir, serving, serve_port, num_cpus)
    on_ready(settings)
emb.embedded_settings, emb.run_stack = embedded_settings, run_stack
sys.modules['service.demo'], sys.modules['service.embedded'] = demo, emb
"""
    demo = _cli_with_modules(fake, "demo")
    assert demo.returncode == 3 and demo.stdout.strip() == "demo ran"
    up = _cli_with_modules(fake, "up", "--port", "8123", "--data-dir", str(tmp_path), "--no-serving")
    assert up.returncode == 0, up.stderr
    lines = up.stdout.splitlines()
    assert lines[0] == f"run_stack 8123 {tmp_path} False 8001 None"
    assert "export LORAFLEET_BASE_URL=http://127.0.0.1:8123" in lines
    assert "export LORAFLEET_ADMIN_TOKEN=tok" in lines
    assert any(line.startswith("Console: http://127.0.0.1:8123/console") for line in lines)


@pytest.mark.operations
def test_pause_resume_and_a_sweep_table(stack, tenant_env, tmp_path):
    from service.db.models import Job
    from service.jobs import states

    data = tmp_path / "ops.jsonl"
    data.write_bytes(DATASET)
    file_id = json.loads(run("files", "upload", str(data), "--json", env=tenant_env).stdout)["id"]
    job = json.loads(run("jobs", "create", "--model", "lorafleet/tiny-llama", "--file", file_id, "--json",
                         env=tenant_env).stdout)
    assert_one_line_error(run("jobs", "pause", job["id"], env=tenant_env), "error: job_not_pausable:")
    worker = FakeWorker(stack, job["id"])
    try:
        worker.start()
        paused = run("jobs", "pause", job["id"], "--json", env=tenant_env)
        assert paused.returncode == 0 and json.loads(paused.stdout)["status"] == "pausing", paused.stderr
        worker.checkpoint(3)  # the run's checkpoint at the pause, then the scheduler's move
        with worker._factory() as session:
            states.transition(session, session.get(Job, job["id"]), states.PAUSED)
            session.commit()
        resumed = run("jobs", "resume", job["id"], "--json", env=tenant_env)
        assert resumed.returncode == 0 and json.loads(resumed.stdout)["status"] == "queued", resumed.stderr
    finally:
        worker.close()
    run("jobs", "cancel", job["id"], env=tenant_env)  # frees the queue for the sweep

    created = run("sweeps", "create", "--model", "lorafleet/tiny-llama", "--file", file_id, "--vary", "r=2,4",
                  "--hp", "n_epochs=1", "--json", env=tenant_env)
    assert created.returncode == 0, created.stderr
    sweep = json.loads(created.stdout)
    assert [c["values"] for c in sweep["children"]] == [{"r": 2}, {"r": 4}]
    for child, loss in zip(sweep["children"], [0.9, 0.7], strict=True):
        worker = FakeWorker(stack, child["job_id"])
        try:
            worker.start()
            worker.publish(adapter_files(), metrics={"train_loss": loss, "trainable_params": 1000.0 * child["values"]["r"],
                                                     "peak_memory_mb": 321.0, "tokens_per_s": 456.0, "train_runtime_s": 7.5})
        finally:
            worker.close()
    table = run("sweeps", "get", sweep["id"], env=tenant_env)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].startswith(f"{sweep['id']}  succeeded")
    assert lines[1].split()[:8] == ["R", "STATUS", "TRAIN", "LOSS", "TRAINABLE", "PEAK", "MB", "TOKENS/S"]
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert rows["2"][1:6] == ["succeeded", "0.9000", "2,000", "321", "456"] and rows["2"][-1] != "best"
    assert rows["4"][2] == "0.7000" and rows["4"][-1] == "best"
    assert sweep["id"] in run("sweeps", "list", env=tenant_env).stdout
