"""One export or blend run: fetch and verify the adapters, do the work, publish the output.

Output is written "manifest last", as training publishes adapters: every file is uploaded and
read back against its sha256 before manifest.json goes up, so a manifest in the store means a
complete output. Adapters are checked against their own manifests before anything is loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from pathlib import Path

from workers.spec import AdapterManifest, ExportManifest, FileDigest, Hyperparameters, OperationResult, OperationSpec
from workers.storage import ObjectStore, get_bytes, put_bytes, sha256_of

log = logging.getLogger("lorafleet.ops")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class OperationFailed(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def fetch_adapter(store: ObjectStore, prefix: str, directory: Path) -> AdapterManifest:
    """The adapter's PEFT files in ``directory``, each checked against its manifest."""
    manifest = AdapterManifest.model_validate_json(get_bytes(store, f"{prefix}/manifest.json"))
    directory.mkdir(parents=True, exist_ok=True)
    for name in ADAPTER_FILES:
        data = get_bytes(store, f"{prefix}/{name}")
        digest = manifest.files.get(name)
        if digest is None or hashlib.sha256(data).hexdigest() != digest.sha256:
            raise OperationFailed("invalid_adapter", f"adapter file {name} under {prefix} does not match its manifest")
        (directory / name).write_bytes(data)
    return manifest


def upload_verified(store: ObjectStore, directory: Path, prefix: str, files: dict[str, FileDigest]) -> None:
    for rel, digest in files.items():
        with (directory / rel).open("rb") as f:
            store.put_stream(f"{prefix}/{rel}", f)
        if sha256_of(store, f"{prefix}/{rel}") != (digest.sha256, digest.bytes):
            raise OperationFailed("storage_error", f"{prefix}/{rel} reads back different bytes")


def _export(spec: OperationSpec, store: ObjectStore, base_dir: Path, work: Path) -> str:
    from workers.ops.export import export_local

    source = spec.adapters[0]
    trained = fetch_adapter(store, source.prefix, work / "adapter")
    # An adapter trained on the 4-bit base is merged into that base, dequantised (chapter 6.8.3).
    files = export_local(base_dir, work / "adapter", work / "out", quantized=trained.quantization == "nf4",
                         dtype=spec.dtype, max_shard_size=spec.max_shard_size)
    upload_verified(store, work / "out", spec.output_prefix, files)
    manifest = ExportManifest(export_id=spec.operation_id, adapter_id=source.id, tenant_id=spec.tenant_id,
                              base_model=spec.base_model, method=spec.method, dtype=spec.dtype, files=files)
    key = f"{spec.output_prefix}/manifest.json"
    put_bytes(store, key, manifest.model_dump_json(indent=2).encode())
    return key


def _blend(spec: OperationSpec, store: ObjectStore, base_dir: Path, work: Path) -> str:
    from workers.ops.blend import blend_local
    from workers.ops.export import digests

    parts, sources = [], []
    for i, ref in enumerate(spec.adapters):
        manifest = fetch_adapter(store, ref.prefix, work / f"in{i}")
        parts.append((work / f"in{i}", ref.weight))
        sources.append(f"{ref.id}:{ref.weight}:{manifest.files['adapter_model.safetensors'].sha256}")
    config = blend_local(base_dir, parts, work / "out", combination=spec.combination, density=spec.density)
    files = digests(work / "out")
    upload_verified(store, work / "out", spec.output_prefix, files)
    targets = config["target_modules"]
    manifest = AdapterManifest(
        adapter_id=spec.adapter_id, job_id=spec.operation_id, tenant_id=spec.tenant_id,
        base_model=spec.base_model, method=spec.method, quantization="nf4" if spec.method == "qlora" else "none",
        hyperparameters=Hyperparameters(r=config["r"], lora_alpha=float(config["lora_alpha"]), lora_dropout=0.0,
                                        target_modules=sorted(targets) if isinstance(targets, list) else targets),
        # What the blend was made of: the inputs' ids, weights and weights' checksums.
        dataset_sha256=hashlib.sha256("\n".join(sources).encode()).hexdigest(), files=files)
    key = f"{spec.output_prefix}/manifest.json"
    put_bytes(store, key, manifest.model_dump_json(indent=2).encode())
    return key


def run_operation(spec: OperationSpec, store: ObjectStore, reporter) -> OperationResult:
    """Raises OperationFailed with a code the control plane knows (workers.spec)."""
    from workers.models.registry import BaseModelError, resolve_base_model

    start = time.monotonic()
    reporter.event(f"{spec.kind} started")
    try:
        base_dir = resolve_base_model(spec.base_model, store)
    except BaseModelError as exc:
        raise OperationFailed("base_model_load_failed", str(exc)) from None
    with tempfile.TemporaryDirectory(prefix=f"lorafleet-{spec.kind}-") as tmp:
        try:
            key = (_export if spec.kind == "export" else _blend)(spec, store, base_dir, Path(tmp))
        except ValueError as exc:  # PEFT refusing these adapters (ranks, modules): the tenant's to fix
            if isinstance(exc, json.JSONDecodeError):
                raise
            raise OperationFailed("invalid_adapter", str(exc)) from None
    reporter.event(f"{spec.kind} finished in {time.monotonic() - start:.1f} s",
                   data={"seconds": round(time.monotonic() - start, 2)})
    return OperationResult(manifest_key=key)
