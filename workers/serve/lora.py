"""Batched multi-LoRA linear layers (Punica/S-LoRA style BGMV) and PEFT adapter loading.

Every targeted linear layer of the shared base model is wrapped by ``MultiLoraLinear``, which
holds the LoRA A/B weights of all adapters resident on the device as one zero-padded stack
``(slots, in, max_rank)`` / ``(slots, max_rank, out)``. Slot 0 stays all zeros: rows without an
adapter, and adapters that do not target a module, gather it and contribute exactly zero. Once per
batch composition the engine gathers each row's slot (``prepare``); the forward is then two
``bmm`` per layer for the whole batch, whatever the number of distinct adapters.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Weights we accept: floating point, never wider than float32 on the wire.
ADAPTER_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ADAPTER_CONFIG = "adapter_config.json"
# Every linear layer of a Llama-style decoder block; adapters may target any subset.
DEFAULT_WRAPPED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class AdapterFormatError(ValueError):
    """The adapter files are not a LoRA adapter this engine can serve."""


@dataclass
class LoraAdapter:
    """One adapter on the host: per module ``(A^T (in, r), B^T (r, out))`` and its scale; and
    the bias vectors it trained (PEFT ``bias="all"|"lora_only"``), whole, per module."""

    key: str  # unique per version (id@prefix): a new version gets a new device slot
    adapter_id: str
    rank: int
    scale: float
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(repr=False)
    biases: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def modules(self) -> set[str]:
        return set(self.weights) | set(self.biases)

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size()
                   for a, b in self.weights.values()) + sum(t.numel() * t.element_size()
                                                            for t in self.biases.values())


def _peft_module_name(key: str) -> tuple[str, str]:
    """'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' → (module, 'lora_A');
    a trained bias, '….q_proj.base_layer.bias' or '….k_proj.bias' → (module, 'bias')."""
    name = key.removeprefix("base_model.model.")
    for part in ("lora_A", "lora_B"):
        suffix = f".{part}.weight"
        if name.endswith(suffix):
            return name[: -len(suffix)], part
    if name.endswith(".bias") and ".lora_" not in name:
        return name.removesuffix(".bias").removesuffix(".base_layer"), "bias"
    raise AdapterFormatError(f"unexpected tensor {key!r}: only LoRA A/B weights and biases are served")


def load_peft_adapter(directory: Path, *, key: str, adapter_id: str,
                      dtype: torch.dtype = torch.float32) -> LoraAdapter:
    """Read a PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``)."""
    directory = Path(directory)
    try:
        config = (directory / ADAPTER_CONFIG).read_bytes()
        weights = (directory / ADAPTER_WEIGHTS).read_bytes()
    except FileNotFoundError as exc:
        raise AdapterFormatError(f"adapter {adapter_id!r} lacks {Path(exc.filename).name}") from None
    return parse_peft_adapter(config, weights, key=key, adapter_id=adapter_id, dtype=dtype)


def parse_peft_adapter(config_json: bytes, safetensors: bytes, *, key: str, adapter_id: str,
                       dtype: torch.dtype = torch.float32) -> LoraAdapter:
    """PEFT's two adapter files, as bytes, into host tensors ``(A^T, B^T)`` per module."""
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    try:
        config = json.loads(config_json)
        tensors = load_safetensors(safetensors)
    except (ValueError, SafetensorError) as exc:  # bad JSON or a corrupt safetensors header
        log.warning("adapter %s: unreadable files: %s", adapter_id, exc)  # the library's words: ours only
        raise AdapterFormatError(f"adapter {adapter_id!r} is unreadable: {ADAPTER_CONFIG} or "
                                 f"{ADAPTER_WEIGHTS} is corrupt") from None
    if not isinstance(config, dict):
        raise AdapterFormatError(f"adapter {adapter_id!r}: {ADAPTER_CONFIG} is not a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterFormatError(f"adapter {adapter_id!r} is {config.get('peft_type')}, not LORA")
    unsupported = [k for k in ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save")
                   if config.get(k)]
    if config.get("bias", "none") not in ("none", "all", "lora_only"):
        unsupported.append("bias")
    if config.get("lora_bias"):  # a bias on lora_B: not served (nor trainable through our API)
        unsupported.append("lora_bias")
    if unsupported:
        raise AdapterFormatError(f"adapter {adapter_id!r} uses unsupported LoRA options: {unsupported}")
    try:
        rank, alpha = int(config["r"]), float(config["lora_alpha"])
    except (KeyError, TypeError, ValueError, OverflowError):  # OverflowError: int(inf), r=1e999
        raise AdapterFormatError(f"adapter {adapter_id!r}: {ADAPTER_CONFIG} needs numbers r and lora_alpha") from None
    if rank < 1 or not math.isfinite(alpha):
        raise AdapterFormatError(f"adapter {adapter_id!r}: r must be at least 1 and lora_alpha finite")
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank

    parts: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        module, part = _peft_module_name(name)
        parts.setdefault(module, {})[part] = tensor
    weights, biases = {}, {}
    for module, ab in parts.items():
        if "bias" in ab:
            bias = _checked(adapter_id, f"{module}.bias", ab.pop("bias"), dtype, dims=1)
            biases[module] = bias.contiguous()
            if not ab:
                continue  # bias="all": a layer without LoRA weights whose bias was trained
        if set(ab) != {"lora_A", "lora_B"}:
            raise AdapterFormatError(f"adapter {adapter_id!r}: {module} lacks lora_A or lora_B")
        a = _checked(adapter_id, f"{module}.lora_A", ab["lora_A"], dtype)  # (r, in)
        b = _checked(adapter_id, f"{module}.lora_B", ab["lora_B"], dtype)  # (out, r)
        if a.shape[0] != rank or b.shape[1] != rank:
            raise AdapterFormatError(f"adapter {adapter_id!r}: {module} rank differs from r={rank}")
        weights[module] = (a.t().contiguous(), b.t().contiguous())
    if not weights:
        raise AdapterFormatError(f"adapter {adapter_id!r} holds no LoRA weights")
    return LoraAdapter(key=key, adapter_id=adapter_id, rank=rank, scale=scale, weights=weights,
                       biases=biases)


def _checked(adapter_id: str, name: str, t: torch.Tensor, dtype: torch.dtype, dims: int = 2) -> torch.Tensor:
    """``t`` in the serving dtype, if one request's rows can use it without breaking: a matrix
    (a vector for a bias), floating point, finite *after* the conversion (a large float32 value
    becomes inf in float16). (Shapes against the base model's layers: ``DeviceSlots.check``.)"""
    if t.dtype not in ADAPTER_DTYPES:
        raise AdapterFormatError(f"adapter {adapter_id!r}: {name} is {str(t.dtype).removeprefix('torch.')}; "
                                 f"LoRA weights must be float16, bfloat16 or float32")
    if t.dim() != dims or 0 in t.shape:
        raise AdapterFormatError(f"adapter {adapter_id!r}: {name} has shape {tuple(t.shape)}, not a "
                                 f"{'matrix' if dims == 2 else 'vector'}")
    t = t.to(dtype)
    if not bool(torch.isfinite(t).all()):
        raise AdapterFormatError(f"adapter {adapter_id!r}: {name} holds non-finite values (inf or NaN) "
                                 f"in {str(dtype).removeprefix('torch.')}")
    return t


class MultiLoraLinear(nn.Module):
    """base(x) + (x A_row) (scale_row B_row) for every row of the batch: two batched matmuls;
    plus, when the base layer has a bias, each row's trained bias minus the base's (zero for
    rows whose adapter did not train it)."""

    def __init__(self, base: nn.Module, slots: int, max_rank: int, dtype: torch.dtype,
                 device: torch.device):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.register_buffer("stack_a", torch.zeros(slots, self.in_features, max_rank, dtype=dtype,
                                                    device=device), persistent=False)
        self.register_buffer("stack_b", torch.zeros(slots, max_rank, self.out_features, dtype=dtype,
                                                    device=device), persistent=False)
        self.filled: set[int] = set()  # slots holding weights for this module
        self._a: torch.Tensor | None = None  # (batch, in, rank) for the current batch
        self._b: torch.Tensor | None = None  # (batch, rank, out), times each row's scale
        # Trained bias minus the base's, per slot: only for a base layer that has a bias.
        self.has_bias = getattr(base, "bias", None) is not None
        self.register_buffer("stack_bias", torch.zeros(slots if self.has_bias else 0, self.out_features,
                                                       dtype=dtype, device=device), persistent=False)
        self.bias_filled: set[int] = set()
        self._bias: torch.Tensor | None = None  # (batch, 1, out) for the current batch

    def write(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None,
              bias: torch.Tensor | None = None) -> None:
        self.forget(slot)
        self.stack_a[slot].zero_()
        self.stack_b[slot].zero_()
        if self.has_bias:
            self.stack_bias[slot].zero_()
        if a is not None:
            r = a.shape[1]
            self.stack_a[slot, :, :r].copy_(a)
            self.stack_b[slot, :r, :].copy_(b)
            self.filled.add(slot)
        if bias is not None:  # DeviceSlots.check refused a bias for a layer without one
            self.stack_bias[slot].copy_(bias.to(self.stack_bias) - self.base.bias.detach().to(self.stack_bias))
            self.bias_filled.add(slot)

    def forget(self, slot: int) -> None:
        self.filled.discard(slot)
        self.bias_filled.discard(slot)

    def prepare(self, rows: list[int], rows_t: torch.Tensor, rank: int, scale: torch.Tensor) -> None:
        """Gather the batch's weights once per composition, not in every forward; each row's
        scale is folded into its B so the forward is one bmm and one baddbmm."""
        self._bias = None
        if self.has_bias and not self.bias_filled.isdisjoint(rows):
            self._bias = self.stack_bias.index_select(0, rows_t).unsqueeze(1)
        if rank == 0 or self.filled.isdisjoint(rows):
            self._a = self._b = None
            return
        self._a = self.stack_a[:, :, :rank].index_select(0, rows_t)
        self._b = self.stack_b[:, :rank, :].index_select(0, rows_t) * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self._bias is not None:
            y = y + self._bias.to(y.dtype)
        if self._a is None:
            return y
        if y.dtype != self._a.dtype:
            return y + torch.bmm(torch.bmm(x.to(self._a.dtype), self._a), self._b).to(y.dtype)
        return torch.baddbmm(y, torch.bmm(x, self._a), self._b)


def wrap_model(model: nn.Module, *, slots: int, max_rank: int, dtype: torch.dtype,
               targets: Iterable[str] = DEFAULT_WRAPPED) -> dict[str, MultiLoraLinear]:
    """Replace every targeted linear (nn.Linear or bnb Linear4bit) in place; returns them by name."""
    targets = set(targets)
    device = next(model.parameters()).device
    found = [(name, module) for name, module in model.named_modules()
             if name.rsplit(".", 1)[-1] in targets and hasattr(module, "in_features")]
    if not found:
        raise ValueError(f"no linear layer named one of {sorted(targets)} in the model")
    wrapped = {}
    for name, module in found:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapper = MultiLoraLinear(module, slots, max_rank, dtype, device)
        setattr(parent, child, wrapper)
        wrapped[name] = wrapper
    return wrapped
