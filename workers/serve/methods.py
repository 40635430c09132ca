"""Every PEFT method of the chapter, served from the one shared base in the same batch as LoRA.

Reading: ``parse_method`` turns PEFT's adapter files into the host tensors the engine needs —

- DoRA (``LoraConfig(use_dora=True)``): LoRA A/B plus the magnitude vector of each module;
- AdaLoRA: its SVD form ``B · diag(E) · A`` with pruned ranks is a LoRA of per-module rank
  (``A·E`` and ``B`` times ``lora_alpha / (init_r + 1e-5)``, as PEFT scales it): the engine's
  page pools hold each module's own rank;
- (IA)3: a scaling vector per module, on the input of feedforward modules, on the output of
  the others (the saved shape, ``(1, in)`` or ``(out, 1)``, says which);
- prompt tuning and P-tuning: the virtual-token embeddings. PEFT saves the prompt encoder's
  *output* (``get_prompt_embedding_to_save``), so P-tuning's encoder ran once, at save time;
- prefix tuning: the past keys and values of the virtual tokens, per layer.

Serving: ``RowMethods`` wraps each of the engine's batched linear layers so that every row gets
its own (IA)3 scales and DoRA factor ``m / ‖W + s·BA‖`` (computed once per adapter when it takes
a device slot), gathered per batch composition like the LoRA weights. Virtual tokens and
prefixes are placed by the engine's prefill: both put ``N`` positions before the prompt in the
row's KV cache, and the prompt's tokens take positions ``N, N+1, …`` as in PEFT.
"""

from __future__ import annotations

import copy

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from workers.serve.lora import AdapterFormatError, LoraAdapter, _checked, rewrites_base

# peft_type in adapter_config.json → the method name our manifests and API use.
METHODS = {"LORA": "lora", "ADALORA": "adalora", "IA3": "ia3", "PREFIX_TUNING": "prefix_tuning",
           "PROMPT_TUNING": "prompt_tuning", "P_TUNING": "p_tuning"}
_PREFIX = "base_model.model."
# A manifest's method (workers.spec.Method) → what its adapter_config.json may hold: DoRA and
# rsLoRA are options of LoRA and QLoRA.
_MANIFEST_SERVES = {"lora": {"lora", "dora"}, "qlora": {"lora", "dora"}}


@dataclass
class MethodParts:
    """What a non-LoRA method adds to the rows that use it (host tensors, serving dtype)."""

    ia3_in: dict[str, torch.Tensor] = field(default_factory=dict)  # module → (in,)
    ia3_out: dict[str, torch.Tensor] = field(default_factory=dict)  # module → (out,)
    dora: dict[str, torch.Tensor] = field(default_factory=dict)  # module → magnitude (out,)
    virtual: torch.Tensor | None = None  # (N, hidden): embeddings placed before the prompt
    prefix: torch.Tensor | None = None  # (layers, 2, kv_heads, N, head_dim): keys, values

    @property
    def modules(self) -> set[str]:
        return set(self.ia3_in) | set(self.ia3_out) | set(self.dora)

    @property
    def virtual_tokens(self) -> int:
        """KV positions the row holds before its prompt."""
        if self.virtual is not None:
            return self.virtual.shape[0]
        return 0 if self.prefix is None else self.prefix.shape[3]

    def prefix_kv(self) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Per layer (keys, values), each (kv_heads, N, head_dim): ``Engine.submit``'s hook."""
        return None if self.prefix is None else [(layer[0], layer[1]) for layer in self.prefix]

    @property
    def nbytes(self) -> int:
        tensors = [*self.ia3_in.values(), *self.ia3_out.values(), *self.dora.values(),
                   *(t for t in (self.virtual, self.prefix) if t is not None)]
        return sum(t.numel() * t.element_size() for t in tensors)


def parse_method(config: dict, tensors: dict[str, torch.Tensor], *, key: str, adapter_id: str,
                 dtype: torch.dtype) -> LoraAdapter:
    """A non-plain-LoRA PEFT adapter (``config["peft_type"]``, or LoRA with ``use_dora``)."""
    peft_type = config.get("peft_type")
    if peft_type not in METHODS:
        raise AdapterFormatError(f"adapter {adapter_id!r} is {peft_type}: this replica serves "
                                 f"{', '.join(sorted(METHODS))}")
    if config.get("modules_to_save"):
        raise AdapterFormatError(f"adapter {adapter_id!r} uses modules_to_save, which is not served")
    if peft_type in ("PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING"):
        return _virtual_tokens(config, tensors, key=key, adapter_id=adapter_id, dtype=dtype)
    if peft_type == "IA3":
        return _ia3(config, tensors, key=key, adapter_id=adapter_id, dtype=dtype)
    return _lora_family(config, tensors, key=key, adapter_id=adapter_id, dtype=dtype)


def check_manifest_method(manifest_method: str, adapter: LoraAdapter) -> None:
    """The manifest records the method the job trained; the files must hold that method."""
    if adapter.method not in _MANIFEST_SERVES.get(manifest_method, {manifest_method}):
        raise AdapterFormatError(f"adapter {adapter.adapter_id!r}: its files hold a {adapter.method} "
                                 f"adapter but its manifest says {manifest_method}")


def _split(adapter_id: str, name: str, parts: tuple[str, ...]) -> tuple[str, str]:
    """'base_model.model.model.layers.0.mlp.up_proj.lora_A.weight' → ('model.layers.0.mlp.up_proj',
    'lora_A'), for any suffix in ``parts``."""
    stem = name.removeprefix(_PREFIX).removesuffix(".weight")
    module, _, part = stem.rpartition(".")
    if part not in parts or not module:
        raise AdapterFormatError(f"adapter {adapter_id!r}: unexpected tensor {name!r}")
    return module, part


def _number(config: dict, adapter_id: str, name: str, default=None) -> float:
    value = config.get(name, default)
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise AdapterFormatError(f"adapter {adapter_id!r}: {name} must be a number") from None
    if not math.isfinite(value):
        raise AdapterFormatError(f"adapter {adapter_id!r}: {name} must be finite")
    return value


def _lora_family(config: dict, tensors: dict[str, torch.Tensor], *, key: str, adapter_id: str,
                 dtype: torch.dtype) -> LoraAdapter:
    """DoRA and AdaLoRA as batched-LoRA weights (A^T, B^T) per module, plus DoRA's magnitudes."""
    adalora = config["peft_type"] == "ADALORA"
    unsupported = [k for k in ("alpha_pattern", "lora_bias", "use_qalora") if config.get(k)]
    if not adalora and config.get("rank_pattern"):
        unsupported.append("rank_pattern")
    if adalora and config.get("use_dora"):
        unsupported.append("use_dora")
    if config.get("bias", "none") != "none":
        unsupported.append("bias")
    if rewrites_base(config):
        unsupported.append("init_lora_weights")
    if unsupported:
        raise AdapterFormatError(f"adapter {adapter_id!r} uses options this replica does not serve "
                                 f"with {METHODS[config['peft_type']]}: {unsupported}")
    alpha = _number(config, adapter_id, "lora_alpha", 8)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    names = ("lora_A", "lora_B", "lora_E") if adalora else ("lora_A", "lora_B", "lora_magnitude_vector")
    for name, tensor in tensors.items():
        module, part = _split(adapter_id, name, names)
        parts.setdefault(module, {})[part] = tensor
    if not parts:
        raise AdapterFormatError(f"adapter {adapter_id!r} holds no LoRA weights")
    if adalora:
        ranknum = torch.tensor(_number(config, adapter_id, "init_r", 12)) + 1e-5  # float32, as PEFT
    else:
        rank = int(_number(config, adapter_id, "r"))
        if rank < 1:
            raise AdapterFormatError(f"adapter {adapter_id!r}: r must be at least 1")
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    weights, magnitudes = {}, {}
    for module, p in parts.items():
        want = {"lora_A", "lora_B", "lora_E" if adalora else "lora_magnitude_vector"}
        if set(p) != want:
            raise AdapterFormatError(f"adapter {adapter_id!r}: {module} needs {sorted(want)}, has {sorted(p)}")
        if adalora and p["lora_A"].shape[:1] == p["lora_E"].shape[:1] == (0,):
            continue  # every rank of the module pruned: it adds nothing
        a = _checked(adapter_id, f"{module}.lora_A", p["lora_A"], torch.float32)  # (r, in)
        b = _checked(adapter_id, f"{module}.lora_B", p["lora_B"], torch.float32)  # (out, r)
        r = a.shape[0]
        if b.shape[1] != r or not (adalora or r == rank):
            raise AdapterFormatError(f"adapter {adapter_id!r}: {module} has lora_A rank {r}, lora_B rank "
                                     f"{b.shape[1]}{'' if adalora else f', r={rank}'}")
        if adalora:
            e = _checked(adapter_id, f"{module}.lora_E", p["lora_E"], torch.float32)
            if tuple(e.shape) != (r, 1):
                raise AdapterFormatError(f"adapter {adapter_id!r}: {module}.lora_E has shape "
                                         f"{tuple(e.shape)}, not ({r}, 1)")
            # PEFT: B (A·E) · scaling / ranknum; scaling is lora_alpha, or the module's rank
            # (after pruning) if lora_alpha <= 0; ranknum stays init_r when ranks are pruned.
            a, b = a * e, b * float(torch.tensor(alpha if alpha > 0 else float(r)) / ranknum)
        else:
            if not config.get("use_dora"):
                raise AdapterFormatError(f"adapter {adapter_id!r} is not DoRA")
            m = _checked(adapter_id, f"{module}.lora_magnitude_vector", p["lora_magnitude_vector"],
                         dtype, dims=1)
            if m.shape[0] != b.shape[0]:
                raise AdapterFormatError(f"adapter {adapter_id!r}: {module} magnitude has "
                                         f"{m.shape[0]} entries for {b.shape[0]} outputs")
            magnitudes[module] = m.contiguous()
        weights[module] = (a.t().to(dtype).contiguous(), b.t().to(dtype).contiguous())
    if not weights:
        raise AdapterFormatError(f"adapter {adapter_id!r}: every rank was pruned")
    rank = max(a.shape[1] for a, _ in weights.values())  # AdaLoRA: modules keep their own ranks
    if adalora:
        return LoraAdapter(key=key, adapter_id=adapter_id, rank=rank, scale=1.0, weights=weights,
                           method="adalora")
    return LoraAdapter(key=key, adapter_id=adapter_id, rank=rank, scale=scale, weights=weights,
                       method="dora", parts=MethodParts(dora=magnitudes))


def _ia3(config: dict, tensors: dict[str, torch.Tensor], *, key: str, adapter_id: str,
         dtype: torch.dtype) -> LoraAdapter:
    parts = MethodParts()
    ff = config.get("feedforward_modules") or []
    for name, tensor in tensors.items():
        module, _ = _split(adapter_id, name, ("ia3_l",))
        t = _checked(adapter_id, f"{module}.ia3_l", tensor, dtype)
        # PEFT creates (1, in) for feedforward modules, (out, 1) for the others.
        if t.shape[0] == 1 and t.shape[1] > 1:
            parts.ia3_in[module] = t.flatten().contiguous()
        elif t.shape[1] == 1:
            parts.ia3_out[module] = t.flatten().contiguous()
        else:
            raise AdapterFormatError(f"adapter {adapter_id!r}: {module}.ia3_l has shape {tuple(t.shape)}")
        if isinstance(ff, list) and any(module.endswith(f) for f in ff) != (module in parts.ia3_in):
            raise AdapterFormatError(f"adapter {adapter_id!r}: {module}.ia3_l's shape disagrees with "
                                     f"feedforward_modules")
    if not parts.modules:
        raise AdapterFormatError(f"adapter {adapter_id!r} holds no (IA)3 vectors")
    return LoraAdapter(key=key, adapter_id=adapter_id, rank=0, scale=0.0, weights={}, method="ia3",
                       parts=parts)


def _virtual_tokens(config: dict, tensors: dict[str, torch.Tensor], *, key: str, adapter_id: str,
                    dtype: torch.dtype) -> LoraAdapter:
    method = METHODS[config["peft_type"]]
    if set(tensors) != {"prompt_embeddings"}:
        raise AdapterFormatError(f"adapter {adapter_id!r}: a {method} adapter holds only "
                                 f"prompt_embeddings, not {sorted(tensors)[:3]}")
    if config.get("num_transformer_submodules", 1) != 1:
        raise AdapterFormatError(f"adapter {adapter_id!r}: only decoder-only models are served")
    emb = _checked(adapter_id, "prompt_embeddings", tensors["prompt_embeddings"], dtype)
    n = int(_number(config, adapter_id, "num_virtual_tokens"))
    if emb.shape[0] != n or n < 1:
        raise AdapterFormatError(f"adapter {adapter_id!r}: {emb.shape[0]} prompt embeddings for "
                                 f"num_virtual_tokens={n}")
    if method != "prefix_tuning":
        return LoraAdapter(key=key, adapter_id=adapter_id, rank=0, scale=0.0, weights={},
                           method=method, parts=MethodParts(virtual=emb.contiguous()))
    layers, heads = int(_number(config, adapter_id, "num_layers")), int(_number(config, adapter_id,
                                                                              "num_attention_heads"))
    token_dim = int(_number(config, adapter_id, "token_dim"))
    if layers < 1 or heads < 1 or token_dim % heads or emb.shape[1] != layers * 2 * token_dim:
        raise AdapterFormatError(f"adapter {adapter_id!r}: prompt_embeddings of width {emb.shape[1]} "
                                 f"do not hold {layers} layers × keys and values × {token_dim}")
    # PEFT get_prompt: view(N, layers*2, heads, head_dim).permute(2, 0, 3, 1, 4), split in pairs.
    prefix = emb.view(n, layers * 2, heads, token_dim // heads).permute(1, 2, 0, 3)
    prefix = prefix.reshape(layers, 2, heads, n, token_dim // heads).contiguous()
    return LoraAdapter(key=key, adapter_id=adapter_id, rank=0, scale=0.0, weights={},
                       method=method, parts=MethodParts(prefix=prefix))


# ---- serving: per-row (IA)3 scales and DoRA factors around the batched linear layers ----------

class RowScaled(nn.Module):
    """``inner(x ⊙ s_in) ⊙ s_out + add`` with each row's vectors: (IA)3 on a feedforward
    module's input or another module's output; DoRA's ``f = m / ‖W + s·BA‖`` on the output of
    base + LoRA, ``add = (1 - f) ⊙ bias`` keeping the base bias unscaled as PEFT does. A row
    whose adapter has neither reads ones; when no row of the batch has any, the layer is
    ``inner`` alone. The vectors and the products are float32 whatever the base computes in:
    DoRA's ``f`` is close to 1, and in bfloat16 it would move every output by up to 0.4%
    (PEFT keeps ``f - 1`` in float32 too)."""

    dtype = torch.float32

    def __init__(self, inner: nn.Module, slots: int):
        super().__init__()
        self.inner = inner
        self.slots = slots
        self.stack_in: torch.Tensor | None = None  # (slots, in), made on first use
        self.stack_out: torch.Tensor | None = None  # (slots, out)
        self.stack_add: torch.Tensor | None = None  # (slots, out): bias layers with DoRA only
        self.filled_in: set[int] = set()
        self.filled_out: set[int] = set()
        self._in = self._out = self._add = None  # this batch's (rows, 1, features)

    @property
    def base(self) -> nn.Module:
        return self.inner.base

    def _stack(self, name: str, width: int) -> torch.Tensor:
        stack = getattr(self, name)
        if stack is None:
            device = self.inner.base.weight.device
            fill = 0.0 if name == "stack_add" else 1.0
            stack = torch.full((self.slots, width), fill, dtype=self.dtype, device=device)
            setattr(self, name, stack)
        return stack

    def write(self, slot: int, s_in: torch.Tensor | None, s_out: torch.Tensor | None,
              add: torch.Tensor | None) -> None:
        for name, filled, vec, fill in (("stack_in", self.filled_in, s_in, 1.0),
                                        ("stack_out", self.filled_out, s_out, 1.0),
                                        ("stack_add", self.filled_out, add, 0.0)):
            if vec is not None:
                self._stack(name, vec.shape[0])[slot].copy_(vec)
                filled.add(slot)
            elif getattr(self, name) is not None:
                getattr(self, name)[slot].fill_(fill)
        if s_in is None:
            self.filled_in.discard(slot)
        if s_out is None:
            self.filled_out.discard(slot)

    def prepare(self, rows: list[int], rows_t: torch.Tensor) -> None:
        used_in = not self.filled_in.isdisjoint(rows)
        used_out = not self.filled_out.isdisjoint(rows)
        self._in = self.stack_in.index_select(0, rows_t).unsqueeze(1) if used_in else None
        self._out = self.stack_out.index_select(0, rows_t).unsqueeze(1) if used_out else None
        self._add = (self.stack_add.index_select(0, rows_t).unsqueeze(1)
                     if used_out and self.stack_add is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._in is not None:
            x = (x.to(self.dtype) * self._in).to(x.dtype)
        y = self.inner(x)
        if self._out is None:
            return y
        out = y.to(self.dtype) * self._out
        if self._add is not None:
            out = out + self._add
        return out.to(y.dtype)


def _dense_weight(base: nn.Module) -> torch.Tensor:
    """The base layer's weight (out, in) in float32, dequantized for a 4-bit layer as PEFT's
    DoRA does. On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight for its own kernel
    at the first inference forward, and ``dequantize_4bit`` does not read that layout: undo the
    packing on copies first (the module keeps its packed weight)."""
    if type(base).__name__ != "Linear4bit":
        return base.weight.detach().float()
    import bitsandbytes.functional as bnbf

    data, state = base.weight.data, base.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        data, state = bnbf._convert_weight_packed_for_cpu_inverse(data, copy.copy(state))
    return bnbf.dequantize_4bit(data, state).float()


class RowMethods:
    """Wraps every batched linear layer of the engine in ``RowScaled`` and fills each slot's
    vectors when an adapter takes it; ``prepare`` gathers them per batch composition."""

    def __init__(self, model: nn.Module, modules: dict[str, nn.Module], slots: int):
        self.model = model
        self.hidden = model.get_input_embeddings().embedding_dim
        cfg = model.config
        self.layers, self.kv_heads = cfg.num_hidden_layers, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scaled: dict[str, RowScaled] = {}
        self._places: dict[str, tuple[nn.Module, str]] = {}
        for name, module in modules.items():
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            wrapper = RowScaled(module, slots)
            setattr(parent, child, wrapper)
            self.scaled[name] = wrapper
            self._places[name] = (parent, child)
        self._occupant: list[str | None] = [None] * slots  # adapter key whose vectors a slot holds

    def check(self, adapter: LoraAdapter) -> None:
        """Refuse what this base cannot take: (IA)3/DoRA modules and widths, the hidden size of
        virtual tokens, the layers and heads of a prefix."""
        parts, who = adapter.parts, f"adapter {adapter.adapter_id!r}"
        if parts is None:
            return
        for kind, vectors, width in (("(IA)3 input scales", parts.ia3_in, "in_features"),
                                     ("(IA)3 output scales", parts.ia3_out, "out_features"),
                                     ("DoRA magnitudes", parts.dora, "out_features")):
            for name, vec in vectors.items():
                if name not in self.scaled:
                    raise AdapterFormatError(f"{who} targets {name}, which this replica does not wrap")
                want = getattr(self.scaled[name].inner, width)
                if vec.shape != (want,):
                    raise AdapterFormatError(f"{who}: {name} has {kind} of shape {tuple(vec.shape)}; "
                                             f"the base model's layer needs ({want},)")
        if parts.virtual is not None and parts.virtual.shape[1] != self.hidden:
            raise AdapterFormatError(f"{who}: virtual tokens of width {parts.virtual.shape[1]}; the "
                                     f"base model's embeddings are {self.hidden} wide")
        want = (self.layers, 2, self.kv_heads, parts.virtual_tokens, self.head_dim)
        if parts.prefix is not None and tuple(parts.prefix.shape) != want:
            raise AdapterFormatError(f"{who}: its prefix has (layers, heads, head_dim) "
                                     f"{tuple(parts.prefix.shape[i] for i in (0, 2, 4))}; this base "
                                     f"model has {(self.layers, self.kv_heads, self.head_dim)}")

    def prepare(self, slots_and_adapters: list[tuple[int, LoraAdapter | None]], rows_t: torch.Tensor) -> None:
        for slot, adapter in slots_and_adapters:
            if slot and self._occupant[slot] != adapter.key:
                self._place(slot, adapter)
        rows = [slot for slot, _ in slots_and_adapters]
        for name, module in self.scaled.items():
            module.prepare(rows, rows_t)
            # A layer no row scales is its inner layer alone in the model: one module call less.
            parent, child = self._places[name]
            want = module if module._in is not None or module._out is not None else module.inner
            if parent._modules[child] is not want:
                setattr(parent, child, want)

    def input_scaled(self) -> set[str]:
        """Wrapped layers whose input this batch scales ((IA)3 on feedforward layers)."""
        return {name for name, module in self.scaled.items() if module._in is not None}

    def _place(self, slot: int, adapter: LoraAdapter) -> None:
        parts = adapter.parts or MethodParts()
        for name, module in self.scaled.items():
            s_out = add = None
            if name in parts.dora:
                s_out = self._dora_factor(module, adapter, name)
                if getattr(module.base, "bias", None) is not None:
                    add = (1 - s_out) * module.base.bias.detach().to(s_out)
            elif name in parts.ia3_out:
                s_out = parts.ia3_out[name]
            module.write(slot, parts.ia3_in.get(name), s_out, add)
        self._occupant[slot] = adapter.key

    @staticmethod
    def _dora_factor(module: RowScaled, adapter: LoraAdapter, name: str) -> torch.Tensor:
        """m / ‖W + s·BA‖ per output row (PEFT ``DoraLinearLayer.get_weight_norm``), once per
        adapter placement."""
        a_t, b_t = adapter.weights[name]  # (in, r), (r, out)
        weight = _dense_weight(module.base)
        lora = (a_t.float().to(weight.device) @ b_t.float().to(weight.device)).t()
        norm = torch.linalg.norm(weight + adapter.scale * lora, dim=1)
        return adapter.parts.dora[name].float().to(weight.device) / norm
