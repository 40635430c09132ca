"""The train loop: plain torch + PEFT, runnable with or without Ray (and DDP when ``world`` says so).

run_training(spec, store=..., reporter=...) resolves the base model, tokenises the data, trains
an adapter of the job's method (``workers.train.methods``: what each method adds to this one
loop) with gradient accumulation, evaluates, checkpoints, resumes from the latest checkpoint,
and publishes the adapter with its manifest. Every failure leaves as a
TrainingError with a code from workers.spec.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from workers.data.batching import Batch, epoch_batches
from workers.data.encode import IGNORE, Encoded, encode_dataset
from workers.models.loading import load_base_model, load_tokenizer
from workers.models.registry import BaseModelError, model_checksum, resolve_base_model
from workers.spec import (
    BaseModelRef,
    CheckpointReport,
    JobEvent,
    TrainingHyperparameters,
    TrainJobSpec,
    TrainResult,
    iter_examples,
    quantization_of,
)
from workers.storage import ObjectStore, StorageError
from workers.train import artifacts
from workers.train.errors import TrainingCancelled, TrainingError, TrainingPaused
from workers.train.methods import train_method
from workers.train.rank_growth import rank_at, replace_parameters
from workers.train.report import Reporter

log = logging.getLogger(__name__)
MAX_GRAD_NORM = 1.0


@dataclass(frozen=True)
class World:
    """This process's place in a data-parallel run (torch.distributed already initialised)."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(params, hp: TrainingHyperparameters, device: torch.device):
    """The chapter's paged 32-bit AdamW where bitsandbytes runs it (CUDA), else torch's AdamW."""
    if device.type == "cuda":
        try:
            import bitsandbytes as bnb

            return bnb.optim.PagedAdamW32bit(params, lr=hp.learning_rate, weight_decay=0.0)
        except (ImportError, RuntimeError) as exc:
            log.warning("bitsandbytes paged AdamW unavailable (%s); using torch AdamW", exc)
    return torch.optim.AdamW(params, lr=hp.learning_rate, weight_decay=0.0)


def label_loss(net, batch: Batch, device, n_items: int, virtual_tokens: int = 0) -> torch.Tensor:
    """Causal-LM loss summed over the batch's label tokens, divided by ``n_items``.

    The LM head runs only on the positions that predict a label (``logits_to_keep`` as a boolean
    mask, applied by the model's own forward, so PEFT, DDP and gradient checkpointing see a normal
    call): the same loss and gradients as ``model(..., labels=...)``, without the
    batch x length x vocab logits of prompt and padding positions, which dominate the cost of a
    large vocabulary. ``virtual_tokens``: positions the model puts before the input (prompt
    tuning, P-tuning), whose logits are never kept.
    """
    inputs = batch.model_inputs(device)
    targets = inputs.pop("labels")[:, 1:]
    wanted = targets != IGNORE
    keep = torch.nn.functional.pad(wanted, (virtual_tokens, 1), value=False)  # position t predicts label t+1
    logits = net(**inputs, logits_to_keep=keep, use_cache=False).logits
    return torch.nn.functional.cross_entropy(logits.float(), targets[wanted], reduction="sum") / n_items


def eval_mode(model) -> None:
    """``model.eval()``, but bitsandbytes 4-bit layers stay in training mode: on a CPU with
    AVX512-BF16, an eval-mode forward repacks their weights into an inference-only layout
    through which later training silently backpropagates no gradient (bitsandbytes 0.50)."""
    model.eval()
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.train()  # no dropout or other train-only behaviour of its own


@torch.no_grad()
def summed_label_loss(model, batches, device, virtual_tokens: int = 0) -> tuple[float, int]:
    """(summed token loss, label tokens) over ``batches``: their quotient is the eval loss."""
    loss_sum, n_items = 0.0, 0
    for batch in batches:
        loss_sum += label_loss(model, batch, device, 1, virtual_tokens).item()
        n_items += batch.label_tokens()
    return loss_sum, n_items


def read_dataset(store: ObjectStore, key: str, expected_sha256: str | None, tokenizer, max_len: int):
    """Download, verify and encode a JSONL file. Returns (examples, stats, sha256)."""
    def fetch() -> bytes:
        with store.open(key) as f:
            return f.read()
    raw = artifacts.with_retries(f"download of {key}", fetch)
    sha = hashlib.sha256(raw).hexdigest()
    if expected_sha256 and sha != expected_sha256:
        raise TrainingError("storage_error", f"{key} does not match its recorded sha256")
    try:
        return (*encode_dataset(tokenizer, iter_examples(raw.splitlines()), max_len), sha)
    except ValueError as exc:  # a line that is not a valid example (uploads are validated first)
        raise TrainingError("invalid_training_file", str(exc), param=key) from exc


def _resolve_and_load(spec: TrainJobSpec, store: ObjectStore, device: torch.device):
    try:
        path = resolve_base_model(spec.base_model, store)
    except StorageError as exc:
        raise TrainingError("storage_error", f"cannot fetch base model {spec.base_model.id}: {exc}") from exc
    except BaseModelError as exc:
        raise TrainingError("base_model_load_failed", str(exc)) from exc
    try:
        tokenizer = load_tokenizer(path)
        model = load_base_model(path, quantization_of(spec.method, spec.hyperparameters), device)
    except Exception as exc:  # noqa: BLE001 - any loader failure is the same failure to the tenant
        raise TrainingError("base_model_load_failed",
                            f"cannot load base model {spec.base_model.id}: {type(exc).__name__}: {exc}") from exc
    return path, tokenizer, model


def peak_memory_mb(device: torch.device) -> float:
    """The chapter's "peak memory": the accelerator's peak allocation; on a CPU the process's
    peak resident set (model, data and everything else the process holds)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class _Run:
    """One training run's mutable state; methods are the loop's phases."""

    def __init__(self, spec: TrainJobSpec, store: ObjectStore, reporter: Reporter, device, world: World):
        self.spec, self.store, self.reporter, self.world = spec, store, reporter, world
        self.hp = spec.hyperparameters
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.step = 0
        self.checkpointed_step = -1
        self.trained_tokens = 0
        self.metrics: dict[str, float] = {}

    # -- reporting (rank 0 only) ---------------------------------------------------------------
    def emit(self, message: str, type_: str = "message", data: dict | None = None, level: str = "info"):
        if self.world.is_main:
            self.reporter.event(JobEvent(message=message, type=type_, data=data, level=level))

    # -- setup ---------------------------------------------------------------------------------
    def prepare(self) -> None:
        from peft import get_peft_model

        seed_everything(self.hp.seed)
        self.model_path, self.tokenizer, base = _resolve_and_load(self.spec, self.store, self.device)
        self.base_checksum = self.spec.base_model.checksum or model_checksum(self.model_path)
        self.train_set, stats, self.dataset_sha = read_dataset(
            self.store, self.spec.training_file, self.spec.training_file_sha256, self.tokenizer,
            self.hp.max_seq_length)
        if not self.train_set:
            raise TrainingError("empty_dataset", f"the training file has {stats.examples} examples and "
                                f"none leaves a token to learn from after tokenisation", param="training_file")
        self._warn_truncation(stats, "training")
        self.val_set: list[Encoded] = []
        if self.spec.validation_file:
            self.val_set, vstats, _ = read_dataset(self.store, self.spec.validation_file, None,
                                                   self.tokenizer, self.hp.max_seq_length)
            self._warn_truncation(vstats, "validation")
        self.emit(f"{len(self.train_set)} training examples, {stats.tokens} tokens "
                  f"({stats.label_tokens} trained on), longest {stats.longest}")
        micro = math.ceil(len(self.train_set) / (self.hp.batch_size * self.world.size))
        self.steps_per_epoch = math.ceil(micro / self.hp.gradient_accumulation_steps)
        self.total_steps = self.steps_per_epoch * self.hp.n_epochs
        self.method = train_method(self.spec.method, self.hp, total_steps=self.total_steps,
                                   model_path=self.model_path)
        try:
            self.model = get_peft_model(base, self.method.config())
        except ValueError as exc:  # PEFT refusing this configuration (e.g. AdaLoRA's schedule)
            raise TrainingError("invalid_hyperparameters", f"{self.spec.method}: {exc}",
                                param=f"method.{self.spec.method}.hyperparameters") from exc
        self.method.wrapped(self.model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.params, self.hp, self.device)
        from transformers import get_scheduler

        self.scheduler = get_scheduler(self.hp.lr_scheduler, self.optimizer,
                                       num_warmup_steps=math.ceil(self.hp.warmup_ratio * self.total_steps),
                                       num_training_steps=self.total_steps)

    def _warn_truncation(self, stats, which: str) -> None:
        if stats.truncated or stats.dropped:
            self.emit(f"{stats.truncated} of {stats.examples} {which} examples were longer than "
                      f"max_seq_length={self.hp.max_seq_length} and were truncated; "
                      f"{stats.dropped} had nothing left to learn and were skipped",
                      "warning", {"file": which, "truncated": stats.truncated, "dropped": stats.dropped,
                                  "examples": stats.examples, "max_seq_length": self.hp.max_seq_length},
                      level="warn")

    def resume(self) -> None:
        found = artifacts.latest_checkpoint(self.store, self.spec.checkpoint_prefix)
        if not found:
            return
        step, key = found
        weights, state = artifacts.load_checkpoint(self.store, key)
        self._reshape(state=state.get("method", {}))  # the shapes it was saved with
        self.method.load_state(self.model, weights, state.get("method", {}))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        if torch.cuda.is_available() and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        self.step, self.trained_tokens = state["step"], state.get("trained_tokens", 0)
        self.checkpointed_step = self.step
        self.emit(f"resumed from checkpoint at step {self.step}", "status", {"step": self.step, "checkpoint": key})

    # -- training ------------------------------------------------------------------------------
    def _reshape(self, **where) -> bool:
        """The method's parameters of a new shape (``TrainMethod.reshaped``) into the optimizer."""
        pairs = self.method.reshaped(self.model, **where)
        if pairs:
            replace_parameters(self.optimizer, pairs)
            self.params = [p for p in self.model.parameters() if p.requires_grad]
        return bool(pairs)

    def _net(self):
        """What the steps run: the model, under DDP when data-parallel (rebuilt when it reshapes)."""
        if self.world.size == 1:
            return self.model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def _batches(self, epoch: int, data: list[Encoded], seed_offset: int = 0) -> list[Batch]:
        return epoch_batches(data, batch_size=self.hp.batch_size, mode=self.hp.batching,
                             max_len=self.hp.max_seq_length, pad_id=self.tokenizer.pad_token_id,
                             seed=self.hp.seed + epoch + seed_offset, rank=self.world.rank,
                             world_size=self.world.size)

    def train(self) -> None:
        ga = self.hp.gradient_accumulation_steps
        net = self._net()
        log_every = max(1, min(10, self.total_steps // 10))
        self.emit(f"training from step {self.step} of {self.total_steps}", "status",
                  {"step": self.step, "total_steps": self.total_steps, "world_size": self.world.size})
        window_loss, window_steps, window_tokens, window_start = 0.0, 0, 0, time.monotonic()
        run_start, run_start_step = time.monotonic(), self.step
        for epoch in range(self.step // self.steps_per_epoch, self.hp.n_epochs):
            if self._reshape(epoch=epoch):
                net = self._net()
                rank = rank_at(self.hp.rank_schedule, epoch)
                self.emit(f"epoch {epoch}: LoRA rank grown to {rank} (rank_schedule)", "status",
                          {"epoch": epoch, "step": self.step, "rank": rank,
                           "trainable_params": sum(p.numel() for p in self.params)})
            batches = self._batches(epoch, self.train_set)
            first = (self.step - epoch * self.steps_per_epoch) * ga
            for s in range(first, len(batches), ga):
                self.model.train()
                window = batches[s:s + ga]
                loss, grad_norm = self._optimizer_step(net, window)
                self.step += 1
                tokens = sum(b.real_tokens for b in window) * self.world.size
                self.trained_tokens += tokens
                window_loss, window_steps, window_tokens = window_loss + loss, window_steps + 1, window_tokens + tokens
                if self.step % log_every == 0 or self.step == self.total_steps:
                    now = time.monotonic()
                    per_step = (now - run_start) / (self.step - run_start_step)
                    self.metrics["train_loss"] = window_loss / window_steps
                    self.emit(f"step {self.step}/{self.total_steps}: train loss {self.metrics['train_loss']:.4f}",
                              "metrics", {"step": self.step, "total_steps": self.total_steps,
                                          "epoch": round(self.step / self.steps_per_epoch, 4),
                                          "train_loss": self.metrics["train_loss"],
                                          "learning_rate": self.scheduler.get_last_lr()[0],
                                          "grad_norm": grad_norm,
                                          "tokens_per_s": window_tokens / max(now - window_start, 1e-9),
                                          "eta_s": per_step * (self.total_steps - self.step)})
                    window_loss, window_steps, window_tokens, window_start = 0.0, 0, 0, now
                if self.hp.eval_steps and self.step % self.hp.eval_steps == 0 and self.step < self.total_steps:
                    self.evaluate()
                if self.hp.checkpoint_steps and self.step % self.hp.checkpoint_steps == 0:
                    self.checkpoint()
                if self.world.is_main and self.reporter.should_stop():
                    if self.reporter.pause_requested():
                        self.pause()
                    raise TrainingCancelled(f"cancelled at step {self.step}")
            # Every epoch end, the last one included: a run restarted after a crash, or after its
            # result could not be delivered, never repeats more than an epoch of work.
            if self.checkpointed_step != self.step:
                self.checkpoint()

    def _optimizer_step(self, net, window: list[Batch]) -> tuple[float, float]:
        """Forward/backward every micro-batch of one optimizer step; the loss is the mean over
        all label tokens of the window (not a mean of micro-batch means)."""
        n_items = max(1, sum(b.label_tokens() for b in window))
        total = torch.zeros((), device=self.device)
        for i, batch in enumerate(window):
            sync = i == len(window) - 1 or not isinstance(net, torch.nn.parallel.DistributedDataParallel)
            with contextlib.nullcontext() if sync else net.no_sync():
                loss = label_loss(net, batch, self.device, n_items, self.method.virtual_tokens)
                extra = self.method.extra_loss(self.model)
                (loss if extra is None else loss + extra / len(window)).backward()
            total += loss.detach().float()
        if self.world.size > 1:
            torch.distributed.all_reduce(total)
            total /= self.world.size
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM)
        if not (torch.isfinite(total) and torch.isfinite(grad_norm)):
            raise TrainingError("training_diverged",
                                f"the loss or its gradient became {total.item()} / {grad_norm.item()} at step "
                                f"{self.step + 1}: lower the learning rate", param="learning_rate")
        self.optimizer.step()
        self.scheduler.step()
        self.method.after_step(self.model, self.step)
        self.optimizer.zero_grad(set_to_none=True)
        return total.item(), grad_norm.item()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float] | None:
        if not self.val_set:
            return None
        eval_mode(self.model)
        loss_sum, n_items = summed_label_loss(self.model, self._batches(0, self.val_set, seed_offset=10_000),
                                              self.device, self.method.virtual_tokens)
        if self.world.size > 1:
            t = torch.tensor([loss_sum, n_items], dtype=torch.float64, device=self.device)
            torch.distributed.all_reduce(t)
            loss_sum, n_items = t.tolist()
        eval_loss = loss_sum / max(n_items, 1)
        result = {"eval_loss": eval_loss, "eval_perplexity": math.exp(min(eval_loss, 50.0))}
        self.metrics.update(result)
        self.emit(f"step {self.step}: eval loss {eval_loss:.4f}", "metrics", {"step": self.step, **result})
        return result

    def _state(self) -> dict:
        return {"step": self.step, "trained_tokens": self.trained_tokens,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "method": self.method.state(self.model),
                "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                        "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}}

    def checkpoint(self) -> None:
        self.checkpointed_step = self.step
        if not self.world.is_main:
            return
        key = artifacts.save_checkpoint(self.store, self.spec.checkpoint_prefix, self.step, self.model,
                                        self.spec.base_model.id, self._state())
        metrics = {k: float(v) for k, v in self.metrics.items()}
        # The control plane records the checkpoint and its event; no second event from here.
        self.reporter.checkpoint(CheckpointReport(step=self.step, key_prefix=key, metrics=metrics))

    def pause(self) -> None:
        """Checkpoint where the run stands and stop: resuming continues from exactly this step."""
        if self.checkpointed_step != self.step:
            self.checkpoint()
        self.emit(f"paused at step {self.step}", "status", {"step": self.step})
        raise TrainingPaused(f"paused at step {self.step}")

    def publish(self, runtime_s: float) -> TrainResult:
        metrics = {**self.metrics, "steps": float(self.step), "trained_tokens": float(self.trained_tokens),
                   "train_runtime_s": runtime_s, "tokens_per_s": self.trained_tokens / max(runtime_s, 1e-9),
                   "trainable_params": float(sum(p.numel() for p in self.params)),
                   "peak_memory_mb": peak_memory_mb(self.device)}
        key = artifacts.publish_adapter(self.store, self.spec.output_prefix, self.model, {
            "adapter_id": self.spec.adapter_id or artifacts.adapter_id_from_prefix(self.spec.output_prefix),
            "job_id": self.spec.job_id, "tenant_id": self.spec.tenant_id,
            "base_model": BaseModelRef(id=self.spec.base_model.id, uri=self.spec.base_model.uri,
                                       checksum=self.base_checksum),
            "method": self.spec.method, "quantization": quantization_of(self.spec.method, self.hp),
            "hyperparameters": self.hp, "dataset_sha256": self.dataset_sha, "metrics": metrics},
            save=self.method.save)
        self.emit("adapter published", "status", {"manifest_key": key})
        return TrainResult(manifest_key=key, metrics=metrics)


def run_training(spec: TrainJobSpec, *, store: ObjectStore, reporter: Reporter, device=None,
                 world: World | None = None) -> TrainResult:
    """Train ``spec``'s adapter and publish it (rank 0); raises TrainingError / TrainingCancelled."""
    start = time.monotonic()
    run = _Run(spec, store, reporter, device, world or World())
    # A rerun of a job whose adapter an earlier run already published (its result was lost on
    # the way to the control plane): hand in that adapter again rather than train it again.
    if published := artifacts.published_adapter(store, spec.output_prefix, spec.job_id):
        key, manifest = published
        run.emit("adapter already published by an earlier run of this job; reporting it again",
                 "status", {"manifest_key": key})
        return TrainResult(manifest_key=key, metrics=manifest.metrics)
    run.emit(f"training {spec.method} adapter on {spec.base_model.id} (pid {os.getpid()})", "status")
    run.prepare()
    run.resume()
    run.train()
    run.evaluate()
    if not run.world.is_main:
        return TrainResult(manifest_key="", metrics=run.metrics)
    return run.publish(time.monotonic() - start)

