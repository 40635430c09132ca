"""Batched multi-LoRA linear layers and PEFT adapter loading.

Every targeted linear layer of the shared base model is wrapped by ``MultiLoraLinear``. The LoRA
weights of the adapters resident on the device live in page pools (``workers.serve.pool``): one
page per rank, so each row of a batch reads exactly its own adapter's ``rank`` pages of a layer,
and nothing when its adapter does not target it. Per batch composition the engine builds a
``LoraBatch``: for every unit of layers that read the same input (q/k/v, gate/up, each other
layer alone), a sparse row → pages pattern. The forward is then, per unit, one sampled matmul
(``x · A`` only at each row's own pages, SDDMM) and one ``embedding_bag`` summing each row's B
pages weighted by those values, for the whole batch, whatever the number of distinct adapters
and their ranks: no copy of any weight per row, no padding to the largest rank (Punica's BGMV,
from torch's own kernels). With 32 distinct adapters on a small model the rows' pages are more
bytes than the base layers' weights, so on a CPU that path is bound by memory, not FLOPs. For half-precision pools, which torch's sparse kernels do not
take, the batch gathers its distinct adapters' pages once per composition and runs dense matmuls
over them, masked per row.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from workers.serve.methods import MethodParts

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
    method: str = "lora"  # workers.serve.methods.METHODS: "dora", "adalora", "ia3", ...
    parts: MethodParts | None = field(default=None, repr=False)  # what the other methods add

    @property
    def modules(self) -> set[str]:
        return set(self.weights) | set(self.biases) | (self.parts.modules if self.parts else set())

    @functools.cached_property
    def nbytes(self) -> int:
        # Cached: the host tier sums it over every adapter it holds at each insert (256 adapters
        # of 32 tensors each were milliseconds of Python under the GIL the engine thread needs).
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size()
                   for a, b in self.weights.values()) + sum(t.numel() * t.element_size()
                                                            for t in self.biases.values()) + (
            self.parts.nbytes if self.parts else 0)


def rewrites_base(config: dict) -> bool:
    """PiSSA/OLoRA (CorDA, LoftQ) adapters saved as trained pair with a base whose weights they
    changed; on the shared base only their conversion to a plain LoRA (rank 2r, PEFT's
    ``path_initial_model_for_weight_conversion``, config ``init_lora_weights: true``) is right."""
    init = str(config.get("init_lora_weights", "")).lower()
    return init.startswith(("pissa", "olora", "corda", "loftq")) or bool(config.get("loftq_config"))


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
    if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora"):
        from workers.serve.methods import parse_method  # imports this module

        return parse_method(config, tensors, key=key, adapter_id=adapter_id, dtype=dtype)
    unsupported = [k for k in ("rank_pattern", "alpha_pattern", "modules_to_save")
                   if config.get(k)]
    if config.get("bias", "none") not in ("none", "all", "lora_only"):
        unsupported.append("bias")
    if config.get("lora_bias"):  # a bias on lora_B: not served (nor trainable through our API)
        unsupported.append("lora_bias")
    if rewrites_base(config):
        unsupported.append("init_lora_weights")
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


# torch's sampled_addmm (SDDMM) takes float32/float64 only; other pools use the dense path.
SPARSE_DTYPES = (torch.float32, torch.float64)


# Wrapped layers that read the same input: grouped, they take one sampled matmul and one
# embedding_bag for the group (and, for plain linear bases, one base matmul over their
# concatenated weights), a third of the calls per decoder layer for q/k/v.
SIBLINGS = ({"q_proj", "k_proj", "v_proj"}, {"gate_proj", "up_proj"})


def sibling_units(modules: dict[str, MultiLoraLinear]) -> list[list[int]]:
    """Indices of ``modules`` (in order) grouped into units: q/k/v and gate/up of one block whose
    layers have the same shape (they share a page pool, so an adapter's pages of the unit are
    one contiguous range); every other layer alone."""
    units, open_units = [], {}
    for i, (name, module) in enumerate(modules.items()):
        parent, _, child = name.rpartition(".")
        family = next((k for k, names in enumerate(SIBLINGS) if child in names), None)
        key = (parent, family, module.in_features, module.out_features)
        if family is not None and key in open_units:
            units[open_units[key]].append(i)
        else:
            open_units[key] = len(units)
            units.append([i])
    return units


def fuse_bases(unit: list[MultiLoraLinear]) -> None:
    """One weight for a unit of plain ``nn.Linear`` bases: each base's weight (and bias) becomes
    a view of the concatenation, so the unit's base output is one matmul and no memory is added.
    Quantized or mixed bases keep their own calls."""
    bases = [m.base for m in unit]
    if len(unit) < 2 or any(type(b) is not nn.Linear for b in bases) or \
            len({(b.weight.dtype, b.weight.device, b.bias is None) for b in bases}) > 1:
        return
    weight = torch.cat([b.weight.detach() for b in bases])
    bias = None if bases[0].bias is None else torch.cat([b.bias.detach() for b in bases])
    at = 0
    for b in bases:
        n = b.out_features
        b.weight = nn.Parameter(weight[at:at + n], requires_grad=False)
        if bias is not None:
            b.bias = nn.Parameter(bias[at:at + n], requires_grad=False)
        at += n
    for m in unit:
        m.fused = (weight, bias)


class LoraBatch:
    """One batch composition's view of the page pools. ``starts``/``ranks``/``bias_pages``:
    ``(layers, rows)`` int64 on the CPU, a row's range in each wrapped layer's pool and its bias
    page (0: none). ``units``: the wrapped layers grouped by shared input (``sibling_units``;
    singletons where a layer must run alone). The per-token patterns (a prefill chunk feeds
    ``T`` tokens per row, a decode step one) are built once per token count, for every layer in
    one pass: each unit's bags are ordered (token row, member), so its ``embedding_bag`` output
    viewed ``(rows, sum of widths)`` is the members' outputs side by side."""

    def __init__(self, modules: list[MultiLoraLinear], starts: torch.Tensor, ranks: torch.Tensor,
                 bias_pages: torch.Tensor, *, dense: bool, units: list[list[int]] | None = None,
                 layouts: dict | None = None):
        self._modules, self._dense = modules, dense
        self._unit_index = units or [[i] for i in range(len(modules))]
        self._units = [[modules[i] for i in u] for u in self._unit_index]
        self._starts, self._ranks, self._bias = starts, ranks, bias_pages
        self._plans: dict[int, list[tuple]] = {}
        self._layouts = {} if layouts is None else layouts  # shared by the batches of one owner

    def plan(self, tokens: int) -> list[tuple]:
        """Per wrapped layer: its unit's (members, LoRA operands or None, per-row bias
        (rows, 1, members' widths) or None, members' widths); a unit's members share one tuple."""
        plan = self._plans.get(tokens)
        if plan is None:
            plan = self._plans[tokens] = self._build(tokens)
        return plan

    def _layout(self, rows: int) -> tuple:
        """Where each unit's bags and CSR row pointers are, for ``rows`` token rows: the same for
        every composition of that size, so kept by the owner (``layouts``)."""
        key = (tuple(map(tuple, self._unit_index)), rows)
        layout = self._layouts.get(key)
        if layout is None:
            if len(self._layouts) > 64:
                self._layouts.clear()
            # Bags in unit order, (row, member) within a unit: an index into the flat tables.
            index = torch.cat([(torch.tensor(u)[None, :] * rows + torch.arange(rows)[:, None]).flatten()
                               for u in self._unit_index])
            sizes = torch.tensor([len(u) for u in self._unit_index])
            bag_at = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(sizes * rows, 0)])
            unit = torch.arange(len(sizes))
            # Row r of unit u starts at bag bag_at[u] + r * members(u); r = rows closes it.
            crow_pos = (bag_at[:-1, None] + torch.arange(rows + 1)[None, :] * sizes[:, None]).flatten()
            layout = self._layouts[key] = (index, bag_at, bag_at.tolist(), unit.repeat_interleave(sizes * rows),
                                           crow_pos, unit.repeat_interleave(rows + 1))
        return layout

    def _build(self, tokens: int) -> list[tuple]:
        ranks = self._ranks.repeat_interleave(tokens, 1) if tokens > 1 else self._ranks
        starts = self._starts.repeat_interleave(tokens, 1) if tokens > 1 else self._starts
        rows = ranks.shape[1]
        index, bag_at_t, bag_at, bag_unit, crow_pos, crow_unit = self._layout(rows)
        flat, first_page = ranks.flatten()[index], starts.flatten()[index]
        ends = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(flat, 0)])  # entries before each bag
        total = int(ends[-1])
        first = ends[:-1]
        # Column of every stored entry: its bag's first page plus its place within the bag.
        col = (first_page.repeat_interleave(flat, output_size=total) + torch.arange(total)
               - first.repeat_interleave(flat, output_size=total))
        unit_first = ends[bag_at_t]  # each unit's first entry
        entry_at = unit_first.tolist()
        offsets = first - unit_first[bag_unit]  # embedding_bag offsets, per unit
        crow = ends[crow_pos] - unit_first[crow_unit]  # CSR row pointers, per unit
        has_bias = self._bias.any(1).tolist()
        device = self._modules[0].pool.device if self._modules else torch.device("cpu")
        col_d, offsets_d, crow_d = col.to(device), offsets.to(device), crow.to(device)
        values = None
        plan: list[tuple | None] = [None] * len(self._modules)
        for u, unit in enumerate(self._units):
            pool, members = unit[0].pool, len(unit)
            e0, e1 = entry_at[u], entry_at[u + 1]
            bias = None
            if any(has_bias[m.index] for m in unit):
                pages = self._bias[[m.index for m in unit]].t().reshape(-1).to(device)
                bias = pool.b.index_select(0, pages).view(len(pages) // members, 1, -1)
            n = e1 - e0
            if n == 0:
                lora = None
            elif self._dense:  # (units are single layers for half-precision pools)
                cols = col_d[e0:e1]
                # The batch's distinct pages once, and which of them each row uses.
                pages, which = torch.unique(cols, return_inverse=True)
                row = torch.repeat_interleave(torch.arange(rows, device=device),
                                              flat[bag_at[u]:bag_at[u + 1]].to(device), output_size=n)
                mask = torch.zeros(rows, len(pages), dtype=pool.dtype, device=device)
                mask[row, which] = 1
                lora = ("dense", pool.a.index_select(0, pages), pool.b.index_select(0, pages), mask)
            else:
                if values is None:  # every unit's SDDMM output, one allocation
                    values = torch.zeros(total, dtype=pool.dtype, device=device)
                at = u * (rows + 1)
                pattern = torch.sparse_csr_tensor(crow_d[at:at + rows + 1], col_d[e0:e1], values[e0:e1],
                                                  (rows, pool.pages), check_invariants=False)
                lora = ("sparse", pattern, pattern.values(), pool.a.t(), col_d[e0:e1],
                        offsets_d[bag_at[u]:bag_at[u + 1]])
            entry = (unit, lora, bias, [m.out_features for m in unit])
            for m in unit:
                plan[m.index] = entry
        return plan


class MultiLoraLinear(nn.Module):
    """base(x) + x A_row (scale_row B_row) for every row of the batch, from the page pool of its
    shape; plus, when the base layer has a bias, each row's trained bias minus the base's (zero
    for rows whose adapter did not train it). ``workers.serve.slots.DeviceSlots`` attaches the
    pool and publishes the current ``LoraBatch``.

    Layers of one unit (q/k/v, gate/up) are computed together by whichever of them is called
    first; the others find their output waiting for the same input tensor (``_stash``), and
    compute their unit again, for themselves, if their input is another tensor."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.has_bias = getattr(base, "bias", None) is not None
        self.index = -1
        self.pool = self.owner = None
        self.fused: tuple[torch.Tensor, torch.Tensor | None] | None = None  # fuse_bases
        self._stash: tuple[torch.Tensor, torch.Tensor] | None = None

    def attach(self, owner, index: int, pool) -> None:
        self.owner, self.index, self.pool = owner, index, pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stash = self._stash
        if stash is not None:
            self._stash = None
            if stash[0] is x:
                return stash[1]
        batch = self.owner.current
        if batch is None:
            return self.base(x)
        unit, lora, bias, widths = batch.plan(x.shape[1] if x.dim() == 3 else 1)[self.index]
        if len(unit) == 1:
            y = self.base(x)
        elif self.fused is not None:
            y = F.linear(x, *self.fused)
        else:  # quantized bases: their outputs side by side
            y = torch.cat([m.base(x) for m in unit], -1)
        if bias is not None:
            y = y + bias.to(y.dtype)
        if lora is not None:
            delta = self._delta(x.reshape(-1, self.in_features).to(self.pool.dtype), lora)
            y = y.reshape(delta.shape).add_(delta.to(y.dtype)).view(y.shape)
        if len(unit) == 1:
            return y
        mine = None
        for m, out in zip(unit, y.split(widths, -1)):
            if m is self:
                mine = out
            else:
                m._stash = (x, out)
        return mine

    def _delta(self, x2: torch.Tensor, lora: tuple) -> torch.Tensor:
        """(token rows, unit width): every row's LoRA output for each layer of the unit."""
        kind, *operands = lora
        if kind == "sparse":
            pattern, values, a_t, cols, offsets = operands
            # x·A at each row's pages, into the pattern's own values (no copy of the pattern per
            # call); zeroed first, as beta=0 still multiplies what they held (NaN · 0).
            values.zero_()
            torch.sparse.sampled_addmm(pattern, x2, a_t, beta=0.0, out=pattern)
            # Σ_pages v · B_page per (row, layer): embedding_bag reads the pages in place (mode 0:
            # sum; torch.embedding_bag, not F's, whose argument checks cost more than the kernel).
            delta = torch.embedding_bag(self.pool.b, cols, offsets, False, 0, False, values)[0]
            return delta.view(x2.shape[0], -1)
        a, b, mask = operands  # dense: the batch's distinct pages, masked per row
        return ((x2 @ a.t()) * mask) @ b


def wrap_model(model: nn.Module, *, targets: Iterable[str] = DEFAULT_WRAPPED) -> dict[str, MultiLoraLinear]:
    """Replace every targeted linear (nn.Linear or bnb Linear4bit) in place; returns them by name."""
    targets = set(targets)
    found = [(name, module) for name, module in model.named_modules()
             if name.rsplit(".", 1)[-1] in targets and hasattr(module, "in_features")]
    if not found:
        raise ValueError(f"no linear layer named one of {sorted(targets)} in the model")
    wrapped = {}
    for name, module in found:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapper = MultiLoraLinear(module)
        setattr(parent, child, wrapper)
        wrapped[name] = wrapper
    return wrapped
