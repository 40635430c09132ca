"""A new adapter from several of one base's LoRA adapters, weighted (chapter 6.5.1, way 2).

PEFT's ``add_weighted_adapter`` does the arithmetic: ``cat`` stacks the adapters along the rank
(exact: the blend's update is Σ wᵢ·sᵢ·Bᵢ Aᵢ, rank Σ rᵢ, scale 1), ``svd`` / ``*_svd`` re-factor
the weighted sum of the updates, ``linear`` / ``ties`` / ``dare_*`` / ``magnitude_prune`` combine
the A and B matrices themselves (same ranks only). The base model only gives PEFT the layers to
hang the adapters on, so it is loaded in full precision whatever the adapters' method.

Runnable without Ray: ``python -m workers.ops.blend --base DIR --adapter DIR:0.7 --adapter DIR:0.3
--combination cat --out DIR``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

# Combinations that add A and B matrices entry by entry: every adapter must have the same rank.
SAME_RANK = {"linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"}
# Combinations that prune or drop entries at random: they need a density.
NEED_DENSITY = {"ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd",
                "magnitude_prune", "magnitude_prune_svd"}
BLEND = "blend"


def blend_local(base_dir: Path, adapters: list[tuple[Path, float]], out_dir: Path, *, combination: str,
                density: float | None = None, seed: int = 0) -> dict:
    """Write the blended adapter's PEFT files to ``out_dir``; returns its adapter_config.

    ``seed``: dare_* drop entries at random; a fixed seed makes a blend reproducible."""
    import torch
    from peft import PeftModel

    from workers.ops.export import full_precision_base

    torch.manual_seed(seed)
    names = [f"a{i}" for i in range(len(adapters))]
    model = PeftModel.from_pretrained(full_precision_base(base_dir), adapters[0][0], adapter_name=names[0])
    for name, (directory, _) in zip(names[1:], adapters[1:], strict=True):
        model.load_adapter(directory, adapter_name=name)
    kw = {"density": density} if combination in NEED_DENSITY else {}
    model.add_weighted_adapter(names, [w for _, w in adapters], BLEND, combination_type=combination, **kw)
    with tempfile.TemporaryDirectory(prefix="lorafleet-blend-") as tmp:
        model.save_pretrained(tmp, selected_adapters=[BLEND])
        written = Path(tmp) / BLEND  # PEFT puts an adapter not named "default" in its own folder
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copyfile(written / name, out_dir / name)
    return json.loads((out_dir / "adapter_config.json").read_text())


def _adapter_arg(text: str) -> tuple[Path, float]:
    path, _, weight = text.rpartition(":")
    return Path(path), float(weight)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Blend LoRA adapters of one base model")
    parser.add_argument("--base", required=True, type=Path)
    parser.add_argument("--adapter", required=True, action="append", type=_adapter_arg,
                        help="DIR:WEIGHT, once per adapter")
    parser.add_argument("--combination", default="cat")
    parser.add_argument("--density", type=float)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    config = blend_local(args.base, args.adapter, args.out, combination=args.combination, density=args.density)
    print(f"wrote a rank-{config['r']} adapter to {args.out}")


if __name__ == "__main__":
    main()
