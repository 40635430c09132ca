"""Creating exports and blends: every check a request can fail happens here, before anything is
written (bad input changes nothing)."""

from __future__ import annotations

import hashlib
import json
import math
import re

from sqlalchemy.orm import Session

from service.catalog import repository as catalog
from service.db.models import Adapter, Operation
from service.errors import ValidationFailed
from service.exports.repository import create_operation
from workers.spec import VIRTUAL_TOKEN_METHODS
from workers.storage import ObjectNotFound, ObjectStore, get_bytes
# LoRA-family methods: their adapters are A/B pairs that PEFT's add_weighted_adapter combines
# and the serving engine stacks (a live blend). AdaLoRA's per-layer ranks are not served.
BLENDABLE_METHODS = frozenset({"lora", "qlora"})
SAME_RANK = frozenset({"linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"})
NEED_DENSITY = frozenset({"ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd",
                          "magnitude_prune", "magnitude_prune_svd"})
MAX_BLEND_ADAPTERS = 8


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def export_prefix(tenant_id: str, export_id: str) -> str:
    return f"tenants/{tenant_id}/exports/{export_id}"


def blend_adapter_id(base_model_id: str, name: str, blend_id: str) -> str:
    """``bl-<base short>-<name>-<16 hex>``, as trained adapters are ``ft-…`` (service.jobs.naming)."""
    base = _slug(base_model_id.rsplit("/", 1)[-1]) or "model"
    return f"bl-{base}-{_slug(name) or 'blend'}-{hashlib.sha256(blend_id.encode()).hexdigest()[:16]}"


def create_export(session: Session, *, tenant_id: str, adapter_id: str, dtype: str,
                  max_shard_size: str) -> Operation:
    adapter = catalog.get_adapter_for_tenant(session, tenant_id=tenant_id, adapter_id=adapter_id,
                                             param="adapter_id")
    if adapter.method in VIRTUAL_TOKEN_METHODS:  # virtual tokens: nothing to merge into the base
        raise ValidationFailed(
            f"adapter {adapter_id!r} was trained with {adapter.method}, which learns virtual tokens "
            f"put before the prompt, not weight updates: there is nothing to merge into the base "
            f"model. Serve it as an adapter instead.", code="not_mergeable", param="adapter_id")
    return create_operation(
        session, tenant_id=tenant_id, kind="export", base_model_id=adapter.base_model_id, method=adapter.method,
        adapter_id=adapter.id, request={"dtype": dtype, "max_shard_size": max_shard_size,
                                        "adapter_prefix": adapter.key_prefix},
        key_prefix_of=lambda op_id: export_prefix(tenant_id, op_id))


def adapter_rank(store: ObjectStore, adapter: Adapter) -> int:
    """``r`` from the adapter's own adapter_config.json (PEFT's file: the truth serving reads)."""
    try:
        return int(json.loads(get_bytes(store, f"{adapter.key_prefix}/adapter_config.json"))["r"])
    except (ObjectNotFound, ValueError, KeyError, TypeError):
        raise ValidationFailed(f"adapter {adapter.id!r} has no readable LoRA rank", code="adapter_invalid",
                               param="adapters") from None


def blend_inputs(session: Session, *, tenant_id: str, refs: list[tuple[str, float]],
                 param: str = "adapters") -> list[Adapter]:
    """The tenant's adapters named in ``refs`` (model, weight): all LoRA-family, one base model.
    Another tenant's adapter is a 404 like a missing one; shared by offline and live blends."""
    if not 1 <= len(refs) <= MAX_BLEND_ADAPTERS:
        raise ValidationFailed(f"a blend takes 1 to {MAX_BLEND_ADAPTERS} adapters", param=param)
    if len({model for model, _ in refs}) != len(refs):
        raise ValidationFailed("each adapter may appear once in a blend", param=param)
    adapters = []
    for i, (model, weight) in enumerate(refs):
        if not math.isfinite(weight):
            raise ValidationFailed("a weight must be a finite number", param=f"{param}[{i}].weight")
        adapter = catalog.get_adapter_for_tenant(session, tenant_id=tenant_id, adapter_id=model,
                                                 param=f"{param}[{i}].model")
        if adapter.method not in BLENDABLE_METHODS:
            raise ValidationFailed(f"adapter {model!r} was trained with {adapter.method}; only LoRA and "
                                   f"QLoRA adapters can be blended", code="not_blendable",
                                   param=f"{param}[{i}].model")
        adapters.append(adapter)
    bases = {a.base_model_id for a in adapters}
    if len(bases) > 1:
        raise ValidationFailed(f"the adapters were trained on different base models ({', '.join(sorted(bases))}); "
                               f"only adapters of one base model can be blended", code="adapter_base_mismatch",
                               param=param)
    return adapters


def create_blend(session: Session, store: ObjectStore, *, tenant_id: str, refs: list[tuple[str, float]],
                 combination: str, name: str, density: float | None) -> Operation:
    adapters = blend_inputs(session, tenant_id=tenant_id, refs=refs)
    if combination in NEED_DENSITY and density is None:
        raise ValidationFailed(f"combination {combination!r} needs a density (0 < density <= 1)", param="density")
    ranks = [adapter_rank(store, a) for a in adapters]
    if combination in SAME_RANK and len(set(ranks)) > 1:
        raise ValidationFailed(f"combination {combination!r} adds the adapters' matrices entry by entry and needs "
                               f"equal ranks; these have {ranks}. Use cat or svd.", param="combination")
    base = catalog.get_base_model(session, model_id=adapters[0].base_model_id)
    rank = sum(ranks) if combination == "cat" else max(ranks)
    if rank > base.max_rank:
        raise ValidationFailed(f"the blend would have rank {rank}; {base.id} serves ranks up to {base.max_rank}",
                               param="adapters")
    # A blend of QLoRA adapters was trained against the 4-bit base: it is served on it.
    method = "qlora" if any(a.method == "qlora" for a in adapters) else "lora"
    inputs = [{"id": a.id, "prefix": a.key_prefix, "weight": w} for a, (_, w) in zip(adapters, refs, strict=True)]

    def adapter_id_of(op_id: str) -> str:
        return blend_adapter_id(base.id, name, op_id)

    return create_operation(
        session, tenant_id=tenant_id, kind="blend", base_model_id=base.id, method=method,
        request={"adapters": inputs, "combination": combination, "density": density, "name": name},
        result_adapter_id_of=adapter_id_of,
        key_prefix_of=lambda op_id: f"tenants/{tenant_id}/adapters/{adapter_id_of(op_id)}/v1")
