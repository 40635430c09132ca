"""Data-plane fixtures: the built-in tiny Llama, built once (and cached across runs by the
hash of its build inputs), and object stores that already hold it."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_llama_dir():
    """Local HF directory of `lorafleet/tiny-llama` (AutoModelForCausalLM / AutoTokenizer)."""
    import torch

    from workers.models.registry import local_builtin
    from workers.models.tiny_llama import MODEL_ID

    torch.set_num_threads(2)
    return local_builtin(MODEL_ID)


@pytest.fixture
def store_with_tiny_llama(object_store, tiny_llama_dir):
    """An object store (both backends) where `builtin://lorafleet/tiny-llama` is already uploaded."""
    from workers.models.registry import ensure_builtin

    ensure_builtin("lorafleet/tiny-llama", object_store)
    return object_store
