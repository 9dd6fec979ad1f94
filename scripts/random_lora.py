"""A random LoRA for a preset's transformer, in the diffusers/PEFT layout: for `framepack bench --lora`, where
what matters is its cost per step and how exactly each mode applies it, not what it shows.

    python scripts/random_lora.py --model small --rank 32 --out small-lora.safetensors

Every linear layer of the double and single blocks gets a pair: lora_A ~ N(0, 1/in), lora_B ~ N(0, std),
so the update is small next to the weights (a trained LoRA's size), and seeded.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--std", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    import torch
    from safetensors.torch import save_file

    from framepack_turbo.models.loading import empty_transformer

    transformer = empty_transformer(args.model)
    if transformer is None:
        raise SystemExit(f"--model {args.model}: its transformer config is not on this machine")
    gen = torch.Generator().manual_seed(args.seed)
    blocks = re.compile(r"^(?:transformer_blocks|single_transformer_blocks)\.\d+\.")
    tensors = {}
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and blocks.match(name):
            tensors[f"transformer.{name}.lora_A.weight"] = torch.randn(args.rank, module.in_features, generator=gen) / (
                module.in_features**0.5
            )
            tensors[f"transformer.{name}.lora_B.weight"] = (
                torch.randn(module.out_features, args.rank, generator=gen) * args.std
            )
    save_file(tensors, str(args.out))
    print(f"{args.out}: {len(tensors) // 2} modules, rank {args.rank}")


if __name__ == "__main__":
    main()
