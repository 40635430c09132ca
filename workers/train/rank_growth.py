"""Progressive rank growth (chapter 6.5.2): ``rank_schedule`` [[epoch, rank], ...] trains a LoRA
adapter at a small rank first and grows every A and B at the epoch boundaries.

PEFT creates the adapter at the final rank with its own initialisation (A kaiming-uniform or
gaussian, B zero); it is then cut to the first rank, and the rows of A not yet in use are kept
aside. Growing appends the next of those rows to A and as many zero columns to B: B·A is
unchanged, so the model computes the same function across a switch, and the new directions
learn (B's new columns get gradients through A's non-zero new rows; were both zero, neither
would). The scale is alpha / final rank (alpha / sqrt(final rank) with rsLoRA) for the whole run,
so nothing is rescaled at a switch and the published adapter (r = final rank, lora_alpha) makes
PEFT compute exactly what was trained. Drawn once at the start, the reserved rows make a resumed
run grow exactly as the uninterrupted one did.

The optimizer keeps its state across a switch: the moments of the existing entries as they
were, zeros for the new ones, the step count untouched. The parameter objects change shape,
so each is replaced at its own place in the optimizer's param groups (the LR scheduler holds the
optimizer, not the parameters, and carries on).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from workers.spec import GROWABLE_INITS, Hyperparameters
from workers.train.errors import TrainingError

ADAPTER = "default"


def rank_at(schedule: list[list[int]], epoch: int) -> int:
    return next(r for e, r in reversed(schedule) if e <= epoch)


def check(hp: Hyperparameters) -> None:
    """What the API refuses at create (service.catalog.limits), for a spec made elsewhere."""
    (last_epoch, final) = hp.rank_schedule[-1]
    if hp.r != final or last_epoch >= hp.n_epochs or hp.init_lora_weights not in GROWABLE_INITS:
        raise TrainingError("invalid_hyperparameters",
                            f"rank_schedule {hp.rank_schedule} needs r = its final rank (r={hp.r}), its last "
                            f"stage before n_epochs={hp.n_epochs} and init_lora_weights in {GROWABLE_INITS}",
                            param="rank_schedule")


class RankGrowth:
    """One PEFT LoRA model's adapter rank over a run (``model`` freshly made at the final rank)."""

    def __init__(self, model, hp: Hyperparameters):
        from peft.tuners.lora import LoraLayer

        check(hp)
        self.schedule, self.final = hp.rank_schedule, hp.rank_schedule[-1][1]
        self.alpha, self.rslora = hp.alpha, hp.use_rslora
        self.layers = [m for m in model.modules() if isinstance(m, LoraLayer) and ADAPTER in m.lora_A]
        self.rank = self.final
        self.reserve: dict[nn.Module, torch.Tensor] = {}
        first = self.schedule[0][1]
        for layer in self.layers:
            a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
            assert not b.any(), "rank growth needs B to start at zero"
            self.reserve[layer] = a.detach()[first:].clone()
            self._set(layer, a.detach()[:first].clone(), b.detach()[:, :first].clone())
        self._set_rank(model, first)

    def grow_to(self, model, rank: int) -> list[tuple[nn.Parameter, nn.Parameter]]:
        """Grow every adapter to ``rank``: (old, new) parameter pairs, none if already there."""
        if rank == self.rank:
            return []
        if rank < self.rank:
            raise ValueError(f"rank {rank} is below the current rank {self.rank}: ranks only grow")
        extra, pairs = rank - self.rank, []
        for layer in self.layers:
            a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
            rows, self.reserve[layer] = self.reserve[layer][:extra], self.reserve[layer][extra:]
            cols = torch.zeros(b.shape[0], extra, dtype=b.dtype, device=b.device)
            self._set(layer, torch.cat([a.detach(), rows]), torch.cat([b.detach(), cols], dim=1))
            pairs += [(a, layer.lora_A[ADAPTER].weight), (b, layer.lora_B[ADAPTER].weight)]
        self._set_rank(model, rank)
        return pairs

    @staticmethod
    def _set(layer, a: torch.Tensor, b: torch.Tensor) -> None:
        lin_a, lin_b = layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]
        grad = lin_a.weight.requires_grad
        lin_a.weight, lin_b.weight = nn.Parameter(a, requires_grad=grad), nn.Parameter(b, requires_grad=grad)
        lin_a.out_features = lin_b.in_features = a.shape[0]

    def _set_rank(self, model, rank: int) -> None:
        """PEFT's record of the rank, and an alpha that gives the run's fixed scale at this rank:
        a checkpoint's adapter files then load with PEFT as what was being trained."""
        self.rank = rank
        ratio = rank / self.final
        alpha = self.alpha * (math.sqrt(ratio) if self.rslora else ratio)
        config = model.peft_config[ADAPTER]
        config.r, config.lora_alpha = rank, alpha
        for layer in self.layers:
            layer.r[ADAPTER], layer.lora_alpha[ADAPTER] = rank, alpha


def replace_parameters(optimizer: torch.optim.Optimizer, pairs: list[tuple[nn.Parameter, nn.Parameter]]) -> None:
    """Put each new parameter where its old one was in ``optimizer`` with the old one's state:
    tensors of the old parameter's shape zero-padded to the new one's, the rest (the step) as is."""
    new_of = {id(old): new for old, new in pairs}
    for group in optimizer.param_groups:
        group["params"] = [new_of.get(id(p), p) for p in group["params"]]
    for old, new in pairs:
        state = optimizer.state.pop(old, None)
        if state:
            optimizer.state[new] = {k: _padded(optimizer, v, old, new) for k, v in state.items()}


def _padded(optimizer, value, old: nn.Parameter, new: nn.Parameter):
    if not (torch.is_tensor(value) and value.shape == old.shape):
        return value
    # bitsandbytes' optimizers allocate (paged) state buffers themselves
    alloc = getattr(optimizer, "get_state_buffer", None)
    buf = alloc(new, dtype=value.dtype) if alloc else torch.zeros_like(new, dtype=value.dtype)
    buf.zero_()
    buf[tuple(slice(0, n) for n in value.shape)] = value
    return buf
