"""A checkpoint is data, never code: the trainer state loads with torch.load(weights_only=True).

Checkpoints live in the shared bucket; unpickling arbitrary objects from there would let anyone
with write access to it run code in every worker that resumes. Real files through the real
load_checkpoint, on a local store.
"""

from __future__ import annotations

import io
import os
import pickle
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as save_safetensors

from workers.storage import put_bytes
from workers.train.artifacts import TRAINER_STATE, checkpoint_key, load_checkpoint

MARKER = Path("/tmp") / f"lorafleet-pwned-{os.getpid()}"


class _Payload:
    """Unpickling this runs ``open(MARKER, "w")``: what an attacker's trainer_state.pt would do."""

    def __reduce__(self):
        return (open, (str(MARKER), "w"))


def _write_checkpoint(store, state_bytes: bytes) -> str:
    key = checkpoint_key("tenants/t/checkpoints/job", 2)
    put_bytes(store, f"{key}/adapter_model.safetensors", save_safetensors({"w": torch.zeros(2, 2)}))
    put_bytes(store, f"{key}/{TRAINER_STATE}", state_bytes)
    return key


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_a_pickled_payload_in_a_checkpoint_is_refused_and_never_runs(local_store):
    MARKER.unlink(missing_ok=True)
    for state in (_torch_bytes({"step": 2, "rng": _Payload()}), pickle.dumps(_Payload())):
        key = _write_checkpoint(local_store, state)
        with pytest.raises(pickle.UnpicklingError):
            load_checkpoint(local_store, key)
        assert not MARKER.exists(), "unpickling the checkpoint ran the attacker's code"


def test_a_real_trainer_state_still_loads(local_store):
    param = torch.nn.Parameter(torch.randn(3))
    optimizer = torch.optim.AdamW([param], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    param.sum().backward()
    optimizer.step()
    scheduler.step()
    state = {"step": 2, "trained_tokens": 64, "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(),
             "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "cuda": None}}
    weights, loaded = load_checkpoint(local_store, _write_checkpoint(local_store, _torch_bytes(state)))
    assert torch.equal(weights["w"], torch.zeros(2, 2)) and loaded["step"] == 2
    random.setstate(loaded["rng"]["python"])  # the shapes the loop restores from
    optimizer.load_state_dict(loaded["optimizer"])
    assert torch.equal(loaded["rng"]["torch"], state["rng"]["torch"])
