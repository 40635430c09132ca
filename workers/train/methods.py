"""What each training method adds to the one train loop: a registry from ``method`` to a
``TrainMethod`` that builds the PEFT config and hooks the loop where the method needs it.

- LoRA / QLoRA (DoRA, rsLoRA, initialisations): PiSSA and OLoRA move the top singular directions
  out of the base weights into the adapter, so the trained adapter is relative to a *rewritten*
  base. A shared base is never rewritten: at publish the adapter is converted (PEFT's
  ``path_initial_model_for_weight_conversion``) into a plain LoRA of rank 2r relative to the
  original base, which is what serving and ``PeftModel.from_pretrained`` apply. With a
  ``rank_schedule`` the adapter's A and B grow at epoch boundaries (``workers.train.rank_growth``).
- AdaLoRA: ``update_and_allocate`` after each optimizer step (its budget schedule needs the
  job's total steps), and its orthogonal regulariser added to the loss (PEFT adds it only when
  the model computes the loss itself; the loop computes it from selected logits).
- Prefix / prompt tuning, P-tuning: virtual tokens before every row, so padded batches only;
  prompt and P-tuning put their tokens into the sequence (the logits to keep shift by them),
  prefix tuning into the KV cache (no shift).

Checkpoints hold PEFT's adapter file; where that file does not restore training exactly (an
AdaLoRA adapter resized by its rank pattern, a prompt encoder saved as its output), the method
also puts its trainable tensors and own state into the trainer state.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from workers.spec import (
    AdaLoraHyperparameters,
    Hyperparameters,
    IA3Hyperparameters,
    PrefixTuningHyperparameters,
    PromptTuningHyperparameters,
    PTuningHyperparameters,
    TrainingHyperparameters,
)
from workers.train.rank_growth import RankGrowth, rank_at


class TrainMethod:
    """The plain case (LoRA-like: adapter weights in layers, nothing extra in the loop)."""

    # Positions PEFT inserts before the input in the logits (prompt tuning / P-tuning).
    virtual_tokens = 0
    # Whether the trainer state must carry the trainable tensors (PEFT's file does not restore them).
    keeps_tensors = False

    def __init__(self, hp: TrainingHyperparameters, *, total_steps: int, model_path: Path):
        self.hp, self.total_steps, self.model_path = hp, total_steps, model_path

    def config(self):
        raise NotImplementedError

    def wrapped(self, model) -> None:
        """Called once the PEFT model exists, before any training."""

    def extra_loss(self, model) -> torch.Tensor | None:
        """A term added to each optimizer step's loss (not reported as train loss)."""
        return None

    def reshaped(self, model, *, epoch: int | None = None, state: dict | None = None) -> list[tuple]:
        """Parameters this method replaced with new ones of another shape (LoRA's rank growth), as
        (old, new) pairs: at the start of ``epoch``, or to the shapes a checkpoint's method
        ``state`` was saved with (before it is loaded). The loop moves the optimizer over."""
        return []

    def after_step(self, model, step: int) -> None:
        """After ``optimizer.step()``, before the gradients are cleared; ``step``: the 0-based index
        of the step just taken (AdaLoRA's schedule counts as PEFT's examples do: its last step is
        total_steps - 1, so with tfinal=0 the ranks are still being budgeted at the end)."""

    def state(self, model) -> dict:
        if not self.keeps_tensors:
            return {}
        return {"tensors": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}}

    def load_state(self, model, weights: dict, state: dict) -> None:
        """Restore a checkpoint: PEFT's adapter ``weights`` and this method's ``state``."""
        from peft import set_peft_model_state_dict

        if not self.keeps_tensors:
            set_peft_model_state_dict(model, weights)
            return
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, tensor in state["tensors"].items():
                params[name].copy_(tensor)

    def save(self, model, directory: Path) -> None:
        model.save_pretrained(directory, save_embedding_layers=False)


class LoraMethod(TrainMethod):
    hp: Hyperparameters
    # Initialisations that rewrite the base weights' residual (converted at publish).
    REWRITES_BASE = ("pissa", "olora")

    def config(self):
        from peft import LoraConfig

        init = True if self.hp.init_lora_weights == "default" else self.hp.init_lora_weights
        return LoraConfig(r=self.hp.r, lora_alpha=self.hp.alpha, lora_dropout=self.hp.lora_dropout,
                          bias=self.hp.bias, target_modules=self.hp.target_modules,
                          use_dora=self.hp.use_dora, use_rslora=self.hp.use_rslora, init_lora_weights=init,
                          modules_to_save=self.hp.modules_to_save, task_type="CAUSAL_LM")

    def wrapped(self, model) -> None:
        from peft import get_peft_model_state_dict

        # Deterministic for a given base (a full SVD / QR), so a resumed run recomputes the same.
        self.initial = ({k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
                        if self.hp.init_lora_weights in self.REWRITES_BASE else None)
        self.growth = RankGrowth(model, self.hp) if self.hp.rank_schedule else None

    def reshaped(self, model, *, epoch: int | None = None, state: dict | None = None) -> list[tuple]:
        if self.growth is None:
            return []
        rank = state["rank"] if state is not None else rank_at(self.hp.rank_schedule, epoch)
        return self.growth.grow_to(model, rank)

    def state(self, model) -> dict:
        return {"rank": self.growth.rank} if self.growth is not None else {}

    def save(self, model, directory: Path) -> None:
        if self.initial is None:
            return super().save(model, directory)
        from safetensors.torch import save_file

        with tempfile.TemporaryDirectory(prefix="lorafleet-init-") as tmp:
            initial = Path(tmp) / "initial"
            initial.mkdir()
            save_file(self.initial, initial / "adapter_model.safetensors")
            # PEFT writes the initial config itself and loads the pair to compute the difference.
            model.save_pretrained(directory, save_embedding_layers=False,
                                  path_initial_model_for_weight_conversion=str(initial))


class IA3Method(TrainMethod):
    hp: IA3Hyperparameters

    def config(self):
        from peft import IA3Config

        return IA3Config(target_modules=self.hp.target_modules,
                         feedforward_modules=self.hp.feedforward_modules, task_type="CAUSAL_LM")


class AdaLoraMethod(TrainMethod):
    hp: AdaLoraHyperparameters
    keeps_tensors = True  # once ranks are final, PEFT saves the adapter cut to them

    def config(self):
        from peft import AdaLoraConfig

        return AdaLoraConfig(init_r=self.hp.init_r, target_r=self.hp.target_r, lora_alpha=self.hp.alpha,
                             target_modules=self.hp.target_modules, tinit=self.hp.tinit,
                             tfinal=self.hp.tfinal, deltaT=self.hp.delta_t, beta1=self.hp.beta1,
                             beta2=self.hp.beta2, orth_reg_weight=self.hp.orth_reg_weight,
                             total_step=self.total_steps, task_type="CAUSAL_LM")

    def extra_loss(self, model) -> torch.Tensor | None:
        """AdaLoRA's orthogonality penalty on P (lora_A) and Q (lora_B), as PEFT computes it."""
        if self.hp.orth_reg_weight == 0:
            return None
        terms = []
        for name, p in model.named_parameters():
            if ("lora_A" in name or "lora_B" in name) and p.requires_grad:
                cov = p @ p.T if "lora_A" in name else p.T @ p
                terms.append(torch.linalg.matrix_norm(cov - torch.eye(*cov.shape, device=cov.device,
                                                                      dtype=cov.dtype)))
        return self.hp.orth_reg_weight * torch.stack(terms).mean() if terms else None

    def after_step(self, model, step: int) -> None:
        model.base_model.update_and_allocate(step)

    def state(self, model) -> dict:
        alloc = model.base_model.rankallocator
        return {**super().state(model), "rank_pattern": model.peft_config["default"].rank_pattern,
                "ipt": dict(alloc.ipt), "exp_avg_ipt": dict(alloc.exp_avg_ipt),
                "exp_avg_unc": dict(alloc.exp_avg_unc)}

    def load_state(self, model, weights: dict, state: dict) -> None:
        super().load_state(model, weights, state)
        model.peft_config["default"].rank_pattern = state["rank_pattern"]
        alloc = model.base_model.rankallocator
        alloc.ipt, alloc.exp_avg_ipt, alloc.exp_avg_unc = (dict(state["ipt"]), dict(state["exp_avg_ipt"]),
                                                           dict(state["exp_avg_unc"]))


class _VirtualTokenMethod(TrainMethod):
    keeps_tensors = True  # P-tuning and projected prefixes are saved as their encoder's output


class PrefixTuningMethod(_VirtualTokenMethod):
    hp: PrefixTuningHyperparameters

    def config(self):
        from peft import PrefixTuningConfig

        return PrefixTuningConfig(num_virtual_tokens=self.hp.num_virtual_tokens,
                                  prefix_projection=self.hp.prefix_projection,
                                  encoder_hidden_size=self.hp.encoder_hidden_size, task_type="CAUSAL_LM")


class PromptTuningMethod(_VirtualTokenMethod):
    hp: PromptTuningHyperparameters

    @property
    def virtual_tokens(self) -> int:
        return self.hp.num_virtual_tokens

    def config(self):
        from peft import PromptTuningConfig

        text = self.hp.init == "text"
        return PromptTuningConfig(num_virtual_tokens=self.hp.num_virtual_tokens,
                                  prompt_tuning_init="TEXT" if text else "RANDOM",
                                  prompt_tuning_init_text=self.hp.init_text,
                                  tokenizer_name_or_path=str(self.model_path) if text else None,
                                  task_type="CAUSAL_LM")


class PTuningMethod(_VirtualTokenMethod):
    hp: PTuningHyperparameters

    @property
    def virtual_tokens(self) -> int:
        return self.hp.num_virtual_tokens

    def config(self):
        from peft import PromptEncoderConfig, PromptEncoderReparameterizationType

        # The enum, not its string: PEFT's MLP encoder reads `.value` when the layer count is not 2.
        kind = PromptEncoderReparameterizationType(self.hp.encoder_reparameterization_type)
        return PromptEncoderConfig(num_virtual_tokens=self.hp.num_virtual_tokens,
                                   encoder_reparameterization_type=kind,
                                   encoder_hidden_size=self.hp.encoder_hidden_size,
                                   encoder_num_layers=self.hp.encoder_num_layers,
                                   encoder_dropout=self.hp.encoder_dropout, task_type="CAUSAL_LM")


REGISTRY: dict[str, type[TrainMethod]] = {
    "lora": LoraMethod, "qlora": LoraMethod, "ia3": IA3Method, "adalora": AdaLoraMethod,
    "prefix_tuning": PrefixTuningMethod, "prompt_tuning": PromptTuningMethod, "p_tuning": PTuningMethod}


def train_method(method: str, hp: TrainingHyperparameters, *, total_steps: int, model_path: Path) -> TrainMethod:
    return REGISTRY[method](hp, total_steps=total_steps, model_path=model_path)
