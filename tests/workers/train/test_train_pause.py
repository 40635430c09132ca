"""A pause mid-epoch: the run writes a checkpoint at the step it reached and stops; the resumed
run continues from exactly that step and publishes the adapter an uninterrupted run publishes."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load

from train_helpers import make_spec
from workers.storage import get_bytes
from workers.train.errors import TrainingCancelled, TrainingPaused
from workers.train.loop import run_training
from workers.train.report import MemoryReporter


class PauseAfter(MemoryReporter):
    """The control plane answering `pausing` once step ``at`` has been reported."""

    def __init__(self, at: int):
        super().__init__()
        self.at = at

    def should_stop(self) -> bool:
        self.pause = any(e.data and e.data.get("step", 0) >= self.at for e in self.events if e.type == "metrics")
        return super().should_stop()


def _weights(store, spec) -> dict[str, torch.Tensor]:
    return load(get_bytes(store, f"{spec.output_prefix}/adapter_model.safetensors"))


def test_pause_checkpoints_where_it_stands_and_resume_gives_the_uninterrupted_result(local_store, tiny_llama_dir):
    from workers.models.registry import ensure_builtin

    ensure_builtin("lorafleet/tiny-llama", local_store)
    hp = {"n_epochs": 2, "lora_dropout": 0.1}  # 4 steps an epoch; dropout draws from the saved RNG
    straight = make_spec(local_store, "job-straight", validation=False, hp=hp)
    run_training(straight, store=local_store, reporter=MemoryReporter(), device="cpu")

    spec = make_spec(local_store, "job-paused", validation=False, hp=hp)
    first = PauseAfter(3)  # mid-epoch 1, between the epoch-end checkpoints
    with pytest.raises(TrainingPaused, match="paused at step 3"):
        run_training(spec, store=local_store, reporter=first, device="cpu")
    assert issubclass(TrainingPaused, TrainingCancelled)  # to the Ray wrapper, a run that stopped
    assert [c.step for c in first.checkpoints] == [3]
    assert [m["step"] for m in first.metrics()][-1] == 3
    assert first.events[-1].type == "status" and first.events[-1].data == {"step": 3}
    second = MemoryReporter()
    result = run_training(spec, store=local_store, reporter=second, device="cpu")
    assert any("resumed from checkpoint at step 3" in e.message for e in second.events)
    assert [m["step"] for m in second.metrics()][0] == 4 and result.metrics["steps"] == 8
    ours, theirs = _weights(local_store, spec), _weights(local_store, straight)
    assert ours.keys() == theirs.keys() and ours
    for name in ours:  # the same process, the same kernels, the same order of operations: bitwise
        assert torch.equal(ours[name], theirs[name]), name


def test_a_pause_right_after_a_checkpoint_writes_no_second_one(local_store, tiny_llama_dir):
    from workers.models.registry import ensure_builtin

    ensure_builtin("lorafleet/tiny-llama", local_store)
    spec = make_spec(local_store, "job-pause-edge", validation=False, hp={"n_epochs": 2, "checkpoint_steps": 2})
    first = PauseAfter(2)
    with pytest.raises(TrainingPaused, match="paused at step 2"):
        run_training(spec, store=local_store, reporter=first, device="cpu")
    assert [c.step for c in first.checkpoints] == [2]
