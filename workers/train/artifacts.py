"""What a run writes to the object store: checkpoints and the published adapter.

Both are written "marker last": a checkpoint counts only once its trainer_state.pt is there,
an adapter only once manifest.json is, and the manifest goes up after every file it lists has
been uploaded and its checksum read back. Store failures are retried with exponential backoff.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from workers.spec import AdapterManifest, FileDigest
from workers.storage import ObjectStore, StorageError, get_bytes, put_bytes, sha256_of
from workers.train.errors import TrainingError

log = logging.getLogger(__name__)
T = TypeVar("T")

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
TRAINER_STATE = "trainer_state.pt"
MANIFEST = "manifest.json"
RETRY_ATTEMPTS = 5
RETRY_BASE_DELAY = 0.5
_STEP_DIR = re.compile(r"step-(\d+)/" + re.escape(TRAINER_STATE) + "$")


def with_retries(what: str, fn: Callable[[], T], *, attempts: int = RETRY_ATTEMPTS,
                 base_delay: float = RETRY_BASE_DELAY) -> T:
    delay = base_delay
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except StorageError as exc:
            if attempt == attempts:
                raise TrainingError("storage_error", f"{what} failed after {attempts} attempts: {exc}") from exc
            log.warning("%s failed (attempt %d/%d): %s; retrying in %.1fs", what, attempt, attempts, exc, delay)
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def _upload_file(store: ObjectStore, path: Path, key: str, **retry) -> None:
    def put():
        with path.open("rb") as f:
            store.put_stream(key, f)
    with_retries(f"upload of {key}", put, **retry)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_adapter_files(peft_model, directory: Path, base_model_id: str,
                       save: Callable[[object, Path], None] | None = None) -> None:
    """adapter_model.safetensors + adapter_config.json naming the base model by its id (the
    local cache path it was loaded from means nothing elsewhere; prompt tuning's text
    initialisation names its tokenizer the same way). ``save``: the method's own writer
    (``TrainMethod.save``), else PEFT's ``save_pretrained``."""
    for config in peft_model.peft_config.values():
        config.base_model_name_or_path = base_model_id
        if getattr(config, "tokenizer_name_or_path", None):
            config.tokenizer_name_or_path = base_model_id
    if save is not None:
        save(peft_model, directory)
    else:
        peft_model.save_pretrained(directory, save_embedding_layers=False)


def checkpoint_key(prefix: str, step: int) -> str:
    return f"{prefix.rstrip('/')}/step-{step:06d}"


def save_checkpoint(store: ObjectStore, prefix: str, step: int, peft_model, base_model_id: str,
                    state: dict) -> str:
    key = checkpoint_key(prefix, step)
    with tempfile.TemporaryDirectory(prefix="lorafleet-ckpt-") as tmp:
        tmp = Path(tmp)
        save_adapter_files(peft_model, tmp, base_model_id)
        torch.save(state, tmp / TRAINER_STATE)
        for name in (*ADAPTER_FILES, TRAINER_STATE):
            _upload_file(store, tmp / name, f"{key}/{name}")
    return key


def latest_checkpoint(store: ObjectStore, prefix: str) -> tuple[int, str] | None:
    keys = with_retries("checkpoint listing", lambda: store.list(prefix.rstrip("/") + "/"))
    steps = [int(m.group(1)) for k in keys if (m := _STEP_DIR.search(k))]
    return (max(steps), checkpoint_key(prefix, max(steps))) if steps else None


def load_checkpoint(store: ObjectStore, key: str) -> tuple[dict, dict]:
    """(adapter weights as saved by PEFT, trainer state) of the checkpoint at ``key``."""
    from safetensors.torch import load as load_safetensors

    def fetch(name: str) -> bytes:
        def get():
            with store.open(f"{key}/{name}") as f:
                return f.read()
        return with_retries(f"download of {key}/{name}", get)

    weights = load_safetensors(fetch("adapter_model.safetensors"))
    with tempfile.TemporaryFile() as f:
        f.write(fetch(TRAINER_STATE))
        f.seek(0)
        # weights_only: the bucket is shared, and unpickling arbitrary objects would let anyone
        # with write access there run code in our workers. Tensors, numbers, tuples only.
        state = torch.load(f, weights_only=True)
    return weights, state


def publish_adapter(store: ObjectStore, prefix: str, peft_model, manifest_fields: dict,
                    save: Callable[[object, Path], None] | None = None, **retry) -> str:
    """Upload the adapter (written by ``save``, see save_adapter_files), verify each file in the
    store, then write manifest.json; return its key."""
    prefix = prefix.rstrip("/")
    with tempfile.TemporaryDirectory(prefix="lorafleet-publish-") as tmp:
        tmp = Path(tmp)
        save_adapter_files(peft_model, tmp, manifest_fields["base_model"].id, save)
        files = {name: FileDigest(sha256=_sha256(tmp / name), bytes=(tmp / name).stat().st_size)
                 for name in ADAPTER_FILES}
        for name in ADAPTER_FILES:
            _upload_file(store, tmp / name, f"{prefix}/{name}", **retry)
            stored, size = with_retries(f"verification of {prefix}/{name}",
                                        lambda n=name: sha256_of(store, f"{prefix}/{n}"), **retry)
            if (stored, size) != (files[name].sha256, files[name].bytes):
                raise TrainingError("storage_error", f"{prefix}/{name} reads back different bytes")
    manifest = AdapterManifest(files=files, **manifest_fields)
    key = f"{prefix}/{MANIFEST}"
    body = json.dumps(manifest.model_dump(mode="json"), indent=2).encode()
    with_retries(f"upload of {key}", lambda: put_bytes(store, key, body), **retry)
    return key


def published_adapter(store: ObjectStore, prefix: str, job_id: str) -> tuple[str, AdapterManifest] | None:
    """(key, manifest) of the adapter ``job_id`` already published under ``prefix``, when its
    manifest is there and every file it lists reads back with the recorded sha256; else None."""
    prefix = prefix.rstrip("/")
    key = f"{prefix}/{MANIFEST}"

    def read() -> bytes | None:
        return get_bytes(store, key) if store.exists(key) else None

    raw = with_retries(f"lookup of {key}", read)
    if raw is None:
        return None
    try:
        manifest = AdapterManifest.model_validate_json(raw)
    except ValueError:
        log.warning("%s is not a valid manifest; training again", key)
        return None
    if manifest.job_id != job_id:
        return None

    def stored_digest(name: str) -> tuple[str, int] | None:
        return sha256_of(store, f"{prefix}/{name}") if store.exists(f"{prefix}/{name}") else None

    for name, digest in manifest.files.items():
        stored = with_retries(f"verification of {prefix}/{name}", lambda n=name: stored_digest(n))
        if stored != (digest.sha256, digest.bytes):
            log.warning("%s/%s is missing or differs from its manifest; training again", prefix, name)
            return None
    return key, manifest


def adapter_id_from_prefix(prefix: str) -> str:
    """``tenants/{t}/adapters/{adapter_id}/v{n}`` → adapter_id (docs/API.md's layout)."""
    parts = prefix.rstrip("/").split("/")
    if len(parts) >= 2 and re.fullmatch(r"v\d+", parts[-1]):
        return parts[-2]
    return parts[-1]
