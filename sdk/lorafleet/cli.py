"""The ``lorafleet`` command. User mistakes end in one ``error: <code>: <message>`` line on
stderr and a non-zero exit code, never a traceback."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import entry_points
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

from . import Client
from .errors import APIConnectionError, APIStatusError, JobWaitError, LoraFleetError
from .types import METHODS, FineTuningJobEvent, FineTuningSweep

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="LoRA Fleet: multi-tenant LoRA / QLoRA fine-tuning and serving.")
admin_app = typer.Typer(no_args_is_help=True, help="Operator commands (admin token).")
tenant_app = typer.Typer(no_args_is_help=True, help="Tenants.")
key_app = typer.Typer(no_args_is_help=True, help="Tenant API keys.")
files_app = typer.Typer(no_args_is_help=True, help="Training datasets.")
jobs_app = typer.Typer(no_args_is_help=True, help="Fine-tuning jobs.")
models_app = typer.Typer(no_args_is_help=True, help="Base models and adapters.")
adapters_app = typer.Typer(no_args_is_help=True, help="Adapter files.")
app.add_typer(admin_app, name="admin")
admin_app.add_typer(tenant_app, name="tenant")
admin_app.add_typer(key_app, name="key")
app.add_typer(files_app, name="files")
app.add_typer(jobs_app, name="jobs")
app.add_typer(models_app, name="models")
app.add_typer(adapters_app, name="adapters")
sweeps_app = typer.Typer(no_args_is_help=True, help="Sweeps: one job per varied hyperparameter value, compared.")
app.add_typer(sweeps_app, name="sweeps")

# Pipes get a wide console so ids in tables are never wrapped.
out = Console(width=None if sys.stdout.isatty() else 200, highlight=False)
err = Console(stderr=True, highlight=False)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON (for scripts).")]


@dataclass
class Config:
    base_url: str | None
    api_key: str | None
    admin_token: str | None

    def client(self) -> Client:
        return Client(base_url=self.base_url, api_key=self.api_key, admin_token=self.admin_token)


@app.callback()
def _options(
    ctx: typer.Context,
    base_url: Annotated[Optional[str], typer.Option(envvar="LORAFLEET_BASE_URL", help="API URL.")] = None,
    api_key: Annotated[Optional[str], typer.Option(envvar="LORAFLEET_API_KEY", help="Tenant API key.")] = None,
    admin_token: Annotated[Optional[str], typer.Option(envvar="LORAFLEET_ADMIN_TOKEN", help="Admin token.")] = None,
) -> None:
    ctx.obj = Config(base_url, api_key, admin_token)


def _client(ctx: typer.Context) -> Client:
    return ctx.obj.client()


def _when(ts: int | None) -> str:
    if not ts:
        return "-"
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _print_json(value: BaseModel | list[BaseModel]) -> None:
    if isinstance(value, list):
        print(json.dumps([v.model_dump(mode="json") for v in value], indent=2))
    else:
        print(value.model_dump_json(indent=2))


def _table(rows: list[BaseModel], columns: dict[str, Any]) -> None:
    table = Table(*columns.keys(), box=None, pad_edge=False)
    for row in rows:
        table.add_row(*(str(get(row) if callable(get) else getattr(row, get)) for get in columns.values()))
    out.print(table)


def _show(value: BaseModel, as_json: bool, fields: list[str]) -> None:
    if as_json:
        _print_json(value)
        return
    width = max(len(name) for name in fields) + 2
    for name in fields:
        v = getattr(value, name, None)
        if isinstance(v, BaseModel):
            v = v.model_dump(exclude_none=True)
        if v not in (None, [], {}):
            shown = _when(v) if name in ("created_at", "finished_at", "revoked_at") else v
            out.print(f"{name + ':':<{width}}{shown}", markup=False)


# --------------------------------------------------------------------------- stack


SERVER_COMMANDS = "lorafleet.server"  # the entry-point group the server package registers


def _server_command(name: str) -> Callable[..., Any]:
    """``up`` and ``demo`` live in the server package: found through its entry point, so this
    package never imports it (and installs without it)."""
    found = list(entry_points(group=SERVER_COMMANDS, name=name))
    if not found:
        raise LoraFleetError(f"`lorafleet {name}` needs the LoRA Fleet server package, which is not "
                             "installed (pip install -e . in the repository)")
    try:
        return found[0].load()
    except ImportError as exc:
        raise LoraFleetError(f"`lorafleet {name}` needs the LoRA Fleet server package, which does not "
                             f"import ({exc}); reinstall it (pip install -e . in the repository)") from None


@app.command()
def up(
    port: Annotated[Optional[int], typer.Option(help="API port (default 8000).")] = None,
    data_dir: Annotated[Optional[Path], typer.Option(help="Where SQLite, objects and secrets live.")] = None,
    serving: Annotated[bool, typer.Option(help="Deploy the serving application on the local Ray.")] = True,
    serve_port: Annotated[int, typer.Option(help="Serving port.")] = 8001,
    num_cpus: Annotated[Optional[int], typer.Option(help="CPUs for the local Ray.")] = None,
) -> None:
    """Start the embedded stack (SQLite, local object store, local Ray, API, scheduler, serving, console)."""
    run = _server_command("up")
    try:
        run(port=port, data_dir=data_dir, serving=serving, serve_port=serve_port, num_cpus=num_cpus)
    except RuntimeError as exc:  # Ray or serving could not start: the reason, not a traceback
        raise LoraFleetError(f"the stack did not start: {exc}") from None
    except KeyboardInterrupt:
        pass


@app.command()
def demo() -> None:
    """The whole story: two tenants, a LoRA and a QLoRA fine-tune, answers side by side."""
    code = _server_command("demo")()
    raise typer.Exit(code if isinstance(code, int) else 0)


# --------------------------------------------------------------------------- admin


@tenant_app.command("create")
def tenant_create(
    ctx: typer.Context, name: str,
    max_concurrent_jobs: Annotated[Optional[int], typer.Option()] = None,
    max_queued_jobs: Annotated[Optional[int], typer.Option()] = None,
    requests_per_minute: Annotated[Optional[int], typer.Option()] = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a tenant."""
    tenant = _client(ctx).admin.tenants.create(
        name, max_concurrent_jobs=max_concurrent_jobs, max_queued_jobs=max_queued_jobs,
        requests_per_minute=requests_per_minute)
    _show(tenant, as_json, ["id", "name", "status", "max_concurrent_jobs", "max_queued_jobs",
                            "requests_per_minute", "created_at"])


@tenant_app.command("list")
def tenant_list(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """List tenants."""
    tenants = list(_client(ctx).admin.tenants.list())
    if as_json:
        return _print_json(tenants)
    _table(tenants, {"ID": "id", "NAME": "name", "STATUS": "status",
                     "CREATED": lambda t: _when(t.created_at)})


@key_app.command("create")
def key_create(ctx: typer.Context, tenant_id: str,
               name: Annotated[Optional[str], typer.Option(help="A label for the key.")] = None,
               as_json: JsonOpt = False) -> None:
    """Create an API key for a tenant; the secret is shown once."""
    key = _client(ctx).admin.api_keys.create(tenant_id, name=name)
    if as_json:
        return _print_json(key)
    out.print(f"id:   {key.id}", markup=False)
    out.print(f"key:  {key.key}", markup=False)
    err.print("Store the key now: it is not shown again.")


@key_app.command("list")
def key_list(ctx: typer.Context, tenant_id: str, as_json: JsonOpt = False) -> None:
    """List a tenant's API keys (never the secrets)."""
    keys = list(_client(ctx).admin.api_keys.list(tenant_id))
    if as_json:
        return _print_json(keys)
    _table(keys, {"ID": "id", "NAME": lambda k: k.name or "-", "PREFIX": lambda k: k.prefix or "-",
                  "REVOKED": lambda k: _when(k.revoked_at)})


@key_app.command("revoke")
def key_revoke(ctx: typer.Context, key_id: str, as_json: JsonOpt = False) -> None:
    """Revoke an API key."""
    _show(_client(ctx).admin.api_keys.revoke(key_id), as_json, ["id", "name", "revoked_at"])


# --------------------------------------------------------------------------- files


@files_app.command("upload")
def files_upload(
    ctx: typer.Context,
    path: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True)],
    as_json: JsonOpt = False,
) -> None:
    """Upload a JSONL dataset (validated on upload: bad lines are listed)."""
    f = _client(ctx).files.create(path)
    _show(f, as_json, ["id", "filename", "bytes", "format", "examples", "status", "sha256"])


@files_app.command("list")
def files_list(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """List uploaded files."""
    files = list(_client(ctx).files.list())
    if as_json:
        return _print_json(files)
    _table(files, {"ID": "id", "FILENAME": "filename", "BYTES": "bytes", "FORMAT": "format",
                   "EXAMPLES": "examples", "CREATED": lambda f: _when(f.created_at)})


@files_app.command("get")
def files_get(ctx: typer.Context, file_id: str, as_json: JsonOpt = False) -> None:
    """Show one file."""
    _show(_client(ctx).files.retrieve(file_id), as_json,
          ["id", "filename", "bytes", "format", "examples", "status", "sha256", "created_at"])


@files_app.command("delete")
def files_delete(ctx: typer.Context, file_id: str) -> None:
    """Delete a file."""
    _client(ctx).files.delete(file_id)
    out.print(f"deleted {file_id}", markup=False)


# --------------------------------------------------------------------------- jobs


def _parse_hp(values: list[str]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected key=value, got {item!r}", param_hint="--hp")
        try:
            params[key] = json.loads(raw)
        except ValueError:
            params[key] = raw  # a bare string such as all-linear
    return params


JOB_FIELDS = ["id", "status", "model", "fine_tuned_model", "training_file", "validation_file",
              "user_provided_suffix", "trained_tokens", "error", "created_at", "finished_at"]


@jobs_app.command("create")
def jobs_create(
    ctx: typer.Context,
    model: Annotated[str, typer.Option(help="Base model id, e.g. lorafleet/tiny-llama.")],
    file: Annotated[str, typer.Option("--file", help="Training file id (file-…).")],
    method: Annotated[str, typer.Option(help=f"One of {', '.join(METHODS)}.")] = "lora",
    validation_file: Annotated[Optional[str], typer.Option(help="Validation file id.")] = None,
    suffix: Annotated[Optional[str], typer.Option(help="Goes into the adapter id.")] = None,
    seed: Annotated[Optional[int], typer.Option()] = None,
    hp: Annotated[list[str], typer.Option("--hp", help="Hyperparameter key=value (repeatable).")] = [],  # noqa: B006
    wait: Annotated[bool, typer.Option("--wait", help="Follow progress until the job ends.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Submit a fine-tune (--hp sets the method's own hyperparameters too, e.g. num_virtual_tokens=8)."""
    if method not in METHODS:
        raise typer.BadParameter(f"must be one of {', '.join(METHODS)}", param_hint="--method")
    client = _client(ctx)
    job = client.fine_tuning.jobs.create(model=model, training_file=file, method=method,
                                         hyperparameters=_parse_hp(hp), validation_file=validation_file,
                                         suffix=suffix, seed=seed)
    if wait:
        print(f"created {job.id}; following its progress (Ctrl-C stops watching, not the job)",
              file=sys.stderr, flush=True)
        job = client.fine_tuning.jobs.wait(job.id, progress=True)
    _show(job, as_json, JOB_FIELDS)


@jobs_app.command("list")
def jobs_list(ctx: typer.Context,
              status: Annotated[Optional[str], typer.Option(help="Only jobs in this status.")] = None,
              limit: Annotated[Optional[int], typer.Option(help="At most this many.")] = None,
              as_json: JsonOpt = False) -> None:
    """List fine-tuning jobs, newest first."""
    jobs = []
    for job in _client(ctx).fine_tuning.jobs.list(status=status, limit=min(limit, 100) if limit else None):
        jobs.append(job)
        if limit and len(jobs) >= limit:
            break
    if as_json:
        return _print_json(jobs)
    _table(jobs, {"ID": "id", "STATUS": "status", "MODEL": "model",
                  "ADAPTER": lambda j: j.fine_tuned_model or "-", "CREATED": lambda j: _when(j.created_at)})


@jobs_app.command("get")
def jobs_get(ctx: typer.Context, job_id: str, as_json: JsonOpt = False) -> None:
    """Show one job."""
    _show(_client(ctx).fine_tuning.jobs.retrieve(job_id), as_json, JOB_FIELDS)


@jobs_app.command("cancel")
def jobs_cancel(ctx: typer.Context, job_id: str, as_json: JsonOpt = False) -> None:
    """Cancel a queued or running job."""
    _show(_client(ctx).fine_tuning.jobs.cancel(job_id), as_json, ["id", "status"])


@jobs_app.command("pause")
def jobs_pause(ctx: typer.Context, job_id: str, as_json: JsonOpt = False) -> None:
    """Pause a running job: it checkpoints and stops (pausing, then paused)."""
    _show(_client(ctx).fine_tuning.jobs.pause(job_id), as_json, ["id", "status"])


@jobs_app.command("resume")
def jobs_resume(ctx: typer.Context, job_id: str, as_json: JsonOpt = False) -> None:
    """Requeue a paused job; it continues from the step it was paused at."""
    _show(_client(ctx).fine_tuning.jobs.resume(job_id), as_json, ["id", "status"])


def _event_line(event: FineTuningJobEvent) -> str:
    data = ""
    if event.data:
        data = "  " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in event.data.items())
    return f"{_when(event.created_at)}  {event.level:<5} {event.type:<10} {event.message}{data}"


@jobs_app.command("events")
def jobs_events(ctx: typer.Context, job_id: str,
                follow: Annotated[bool, typer.Option("--follow", "-f",
                                                     help="Keep following until the job ends.")] = False,
                as_json: JsonOpt = False) -> None:
    """A job's events, oldest first (JSON: an array; with --follow one object per line)."""
    client = _client(ctx)
    if follow:
        def emit(event: FineTuningJobEvent) -> None:
            print(event.model_dump_json() if as_json else _event_line(event), flush=True)

        try:
            client.fine_tuning.jobs.wait(job_id, progress=False, on_event=emit)
        except JobWaitError:
            pass  # failed / cancelled: the events said so, and following them worked
        return
    events = list(client.fine_tuning.jobs.list_events(job_id, order="asc", limit=100))
    if as_json:
        return _print_json(events)
    for event in events:
        out.print(_event_line(event), markup=False)


# --------------------------------------------------------------------------- models, adapters, chat


@models_app.command("list")
def models_list(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Base models and your adapters."""
    models = list(_client(ctx).models.list())
    if as_json:
        return _print_json(models)
    _table(models, {"ID": "id", "OWNED BY": "owned_by", "CREATED": lambda m: _when(m.created)})


@models_app.command("delete")
def models_delete(ctx: typer.Context, model_id: str) -> None:
    """Delete one of your adapters."""
    _client(ctx).models.delete(model_id)
    out.print(f"deleted {model_id}", markup=False)


@adapters_app.command("download")
def adapters_download(ctx: typer.Context, adapter_id: str,
                      dest: Annotated[Optional[Path],
                                      typer.Option(help="Folder (default ./ADAPTER_ID).")] = None) -> None:
    """Download an adapter (checksums verified) into a folder PeftModel.from_pretrained loads."""
    folder = _client(ctx).adapters.download(adapter_id, dest)
    out.print(str(folder), markup=False)


@models_app.command("export")
def models_export(ctx: typer.Context, adapter_id: str,
                  dtype: Annotated[str, typer.Option(help="Saved weights: float32, bfloat16 or float16.")] = "float32",
                  wait: Annotated[bool, typer.Option("--wait", help="Wait until the export ends.")] = False,
                  download: Annotated[Optional[Path], typer.Option(help="Then download the model here.")] = None,
                  as_json: JsonOpt = False) -> None:
    """Merge an adapter into its base model: a full model AutoModelForCausalLM loads."""
    client = _client(ctx)
    export = client.models.exports.create(adapter_id, dtype=dtype)
    if wait or download:
        export = client.models.exports.wait(export.id)
    if download:
        folder = client.models.exports.download(export.id, download)
        if not as_json:
            out.print(str(folder), markup=False)
            return
    _show(export, as_json, ["id", "adapter", "status", "dtype"])


@adapters_app.command("blend")
def adapters_blend(ctx: typer.Context,
                   adapters: Annotated[list[str], typer.Argument(help="ADAPTER_ID:WEIGHT, one per adapter.")],
                   name: Annotated[str, typer.Option(help="Names the new adapter.")],
                   combination: Annotated[str, typer.Option(help="cat, linear, svd, ties, dare_linear, ...")] = "cat",
                   density: Annotated[Optional[float], typer.Option(help="For ties / dare / magnitude_prune.")] = None,
                   wait: Annotated[bool, typer.Option("--wait", help="Wait until the blend ends.")] = False,
                   as_json: JsonOpt = False) -> None:
    """A new adapter of yours from weighted adapters of one base model."""
    pairs = []
    for item in adapters:
        adapter_id, _, weight = item.rpartition(":")
        try:
            pairs.append((adapter_id, float(weight)))
        except ValueError:
            raise typer.BadParameter(f"{item!r} is not ADAPTER_ID:WEIGHT") from None
    client = _client(ctx)
    blend = client.adapters.blends.create(pairs, name=name, combination=combination, density=density)
    if wait:
        blend = client.adapters.blends.wait(blend.id)
    _show(blend, as_json, ["id", "status", "combination", "fine_tuned_model"])


@app.command()
def chat(ctx: typer.Context, prompt: str,
         model: Annotated[str, typer.Option(help="An adapter id of yours or a base model id.")],
         system: Annotated[Optional[str], typer.Option(help="A system message.")] = None,
         max_tokens: Annotated[int, typer.Option()] = 128,
         temperature: Annotated[Optional[float], typer.Option()] = None,
         as_json: JsonOpt = False) -> None:
    """Ask a model; the answer streams as it is generated."""
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}]
    client = _client(ctx)
    if as_json:
        return _print_json(client.chat.completions.create(
            model=model, messages=messages, max_tokens=max_tokens, temperature=temperature))
    stream = client.chat.completions.create(model=model, messages=messages, stream=True,
                                            max_tokens=max_tokens, temperature=temperature)
    for chunk in stream:
        for choice in chunk.choices:
            if choice.delta.content:
                sys.stdout.write(choice.delta.content)
                sys.stdout.flush()
    sys.stdout.write("\n")


# --------------------------------------------------------------------------- entry point


# --------------------------------------------------------------------------- sweeps


def _parse_vary(values: list[str]) -> dict[str, list[Any]]:
    """``r=2,4,8`` → {"r": [2, 4, 8]} (each value JSON, else a bare string)."""
    out: dict[str, list[Any]] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key or not raw:
            raise typer.BadParameter(f"expected name=v1,v2,..., got {item!r}", param_hint="--vary")
        out[key] = [_parse_hp([f"v={v}"])["v"] for v in raw.split(",")]
    return out


def _num(value: float | int | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _sweep_table(sweep: FineTuningSweep) -> None:
    """The chapter's comparison table (6.2.3), one row per child, the best one marked."""
    names = [p.name for p in sweep.parameters]
    best = sweep.best.job_id if sweep.best else None
    table = Table(*[n.upper() for n in names], "STATUS", sweep.metric.upper().replace("_", " "),
                  "TRAINABLE", "PEAK MB", "TOKENS/S", "TIME S", "JOB", "", box=None, pad_edge=False)
    for c in sweep.children:
        table.add_row(*(str(c.values.get(n)) for n in names), c.status,
                      _num(getattr(c, sweep.metric), ".4f"), _num(c.trainable_params, ","),
                      _num(c.peak_memory_mb, ".0f"), _num(c.tokens_per_s, ".0f"), _num(c.train_time_s, ".1f"),
                      c.job_id, "best" if c.job_id == best else "")
    out.print(f"{sweep.id}  {sweep.status}  (best = lowest {sweep.metric})", markup=False)
    out.print(table)


@sweeps_app.command("create")
def sweeps_create(
    ctx: typer.Context,
    model: Annotated[str, typer.Option(help="Base model id, e.g. lorafleet/tiny-llama.")],
    file: Annotated[str, typer.Option("--file", help="Training file id (file-…).")],
    vary: Annotated[list[str], typer.Option("--vary", help="name=v1,v2,... (once or twice), e.g. r=2,4,8,16,32.")],
    method: Annotated[str, typer.Option(help=f"One of {', '.join(METHODS)}.")] = "lora",
    validation_file: Annotated[Optional[str], typer.Option(help="Validation file id (best = lowest eval loss).")] = None,
    hp: Annotated[list[str], typer.Option("--hp", help="Base hyperparameter key=value (repeatable).")] = [],  # noqa: B006
    wait: Annotated[bool, typer.Option("--wait", help="Wait until every child has finished.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Start one job per combination of the varied values, then compare them."""
    if method not in METHODS:
        raise typer.BadParameter(f"must be one of {', '.join(METHODS)}", param_hint="--method")
    client = _client(ctx)
    sweep = client.fine_tuning.sweeps.create(model=model, training_file=file, parameters=_parse_vary(vary),
                                             method=method, hyperparameters=_parse_hp(hp),
                                             validation_file=validation_file)
    if wait:
        print(f"created {sweep.id} ({len(sweep.children)} jobs); waiting for all of them", file=sys.stderr, flush=True)
        sweep = client.fine_tuning.sweeps.wait(sweep.id)
    _print_json(sweep) if as_json else _sweep_table(sweep)


@sweeps_app.command("get")
def sweeps_get(ctx: typer.Context, sweep_id: str, as_json: JsonOpt = False) -> None:
    """Show a sweep's comparison table and its best child."""
    sweep = _client(ctx).fine_tuning.sweeps.retrieve(sweep_id)
    _print_json(sweep) if as_json else _sweep_table(sweep)


@sweeps_app.command("list")
def sweeps_list(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """List sweeps, newest first."""
    sweeps = list(_client(ctx).fine_tuning.sweeps.list())
    if as_json:
        return _print_json(sweeps)
    _table(sweeps, {"ID": "id", "STATUS": "status", "VARIED": lambda s: ", ".join(p.name for p in s.parameters),
                    "JOBS": lambda s: len(s.children), "BEST": lambda s: s.best.job_id if s.best else "-",
                    "CREATED": lambda s: _when(s.created_at)})


@sweeps_app.command("cancel")
def sweeps_cancel(ctx: typer.Context, sweep_id: str, as_json: JsonOpt = False) -> None:
    """Cancel every child that has not finished."""
    sweep = _client(ctx).fine_tuning.sweeps.cancel(sweep_id)
    _print_json(sweep) if as_json else _sweep_table(sweep)


def _fail(lines: list[str], code: int = 1) -> None:
    for line in lines:
        print(line, file=sys.stderr)
    sys.exit(code)


def main() -> None:
    try:
        app()
    except APIStatusError as exc:
        lines = [f"error: {exc.code or exc.status_code}: {exc.message}"]
        for item in exc.errors:
            lines.append(f"  line {item.get('line')}: {item.get('reason')}")
        _fail(lines)
    except APIConnectionError as exc:
        _fail([f"error: connection_error: {exc.message}"])
    except JobWaitError as exc:
        _fail([f"error: {exc}"])
    except (LoraFleetError, OSError) as exc:
        _fail([f"error: {exc}"])
    except KeyboardInterrupt:
        _fail(["interrupted"], 130)


if __name__ == "__main__":
    main()

