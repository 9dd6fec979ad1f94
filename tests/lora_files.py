"""LoRA files in every format the loader reads, written from known low-rank factors (tests only).

Each case is a set of pairs in the file's own layout plus, independently, what every diffusers module of the
tiny transformer must receive: the rows of `up` each module gets and the scale. The original HunyuanVideo
layout's fused projections are written fused here (q, k, v stacked; linear1 with the MLP), so the loader's
split is what is tested.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

RANK = 4
ALPHA = 2.0  # kohya's alpha: scale alpha / rank = 0.5


@dataclass
class Expected:
    module: str
    down: torch.Tensor
    up: torch.Tensor  # the rows this module receives
    scale: float

    def delta(self) -> torch.Tensor:
        return self.scale * (self.up @ self.down)


def _pair(gen: torch.Generator, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(RANK, cols, generator=gen) * 0.1, torch.randn(rows, RANK, generator=gen) * 0.1


def _dims(transformer) -> tuple[int, int]:
    hidden = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    return hidden, int(hidden * transformer.config.mlp_ratio)


def diffusers_names(transformer, gen) -> tuple[dict[str, tuple], list[Expected]]:
    """Pairs on diffusers' module names (FramePack's own layout), scale 1."""
    pairs, expected = {}, []
    for name in (
        "transformer_blocks.0.attn.to_q",
        "single_transformer_blocks.1.proj_mlp",
        "proj_out",
        "image_projection.up",
    ):
        m = transformer.get_submodule(name)
        down, up = _pair(gen, m.out_features, m.in_features)
        pairs[name] = (down, up)
        expected.append(Expected(name, down, up, 1.0))
    return pairs, expected


def original_names(transformer, gen) -> tuple[dict[str, tuple], list[Expected]]:
    """Pairs on the original HunyuanVideo layout, fused where it is fused, scale 1."""
    h, mlp = _dims(transformer)
    pairs, expected = {}, []

    def fused(name: str, targets: list[tuple[str, int]], cols: int) -> None:
        down, up = _pair(gen, sum(r for _, r in targets), cols)
        pairs[name] = (down, up)
        start = 0
        for target, rows in targets:
            expected.append(Expected(target, down, up[start : start + rows], 1.0))
            start += rows

    fused("double_blocks.0.img_attn_qkv", [(f"transformer_blocks.0.attn.to_{x}", h) for x in "qkv"], h)
    fused("double_blocks.1.txt_attn_qkv", [(f"transformer_blocks.1.attn.add_{x}_proj", h) for x in "qkv"], h)
    fused("double_blocks.1.img_mlp.fc2", [("transformer_blocks.1.ff.net.2", h)], mlp)
    fused("double_blocks.0.txt_mod.linear", [("transformer_blocks.0.norm1_context.linear", 6 * h)], h)
    fused(
        "single_blocks.2.linear1",
        [(f"single_transformer_blocks.2.attn.to_{x}", h) for x in "qkv"]
        + [("single_transformer_blocks.2.proj_mlp", mlp)],
        h,
    )
    fused("single_blocks.3.linear2", [("single_transformer_blocks.3.proj_out", h)], h + mlp)
    fused(
        "txt_in.individual_token_refiner.blocks.0.self_attn_qkv",
        [(f"context_embedder.token_refiner.refiner_blocks.0.attn.to_{x}", h) for x in "qkv"],
        h,
    )
    # HunyuanVideo's final adaLN is (shift, scale); diffusers' norm_out.linear is (scale, shift)
    down, up = _pair(gen, 2 * h, h)
    pairs["final_layer.adaLN_modulation.1"] = (down, up)
    expected.append(Expected("norm_out.linear", down, torch.cat([up[h:], up[:h]]), 1.0))
    return pairs, expected


def write(
    path: Path, fmt: str, transformer, seed: int = 0, extra: dict[str, torch.Tensor] | None = None
) -> list[Expected]:
    """Write a LoRA in `fmt` for the tiny transformer; returns what each module must receive.

    fmt: diffusers (transformer. + lora_A/B), peft-bare (no prefix), kohya-framepack (lora_unet_ + diffusers
    names, alpha), kohya-hunyuan (lora_unet_ + original names, alpha), hunyuan (original names, lora_A/B),
    diffusion-pipe (diffusion_model. + original names, lora_A/B).
    """
    gen = torch.Generator().manual_seed(seed)
    original = fmt in ("kohya-hunyuan", "hunyuan", "diffusion-pipe")
    pairs, expected = (original_names if original else diffusers_names)(transformer, gen)
    tensors: dict[str, torch.Tensor] = {}
    for name, (down, up) in pairs.items():
        if fmt.startswith("kohya"):
            key = "lora_unet_" + name.replace(".", "_")
            tensors[f"{key}.lora_down.weight"] = down
            tensors[f"{key}.lora_up.weight"] = up
            tensors[f"{key}.alpha"] = torch.tensor(ALPHA)
        else:
            prefix = {"diffusers": "transformer.", "diffusion-pipe": "diffusion_model."}.get(fmt, "")
            tensors[f"{prefix}{name}.lora_A.weight"] = down
            tensors[f"{prefix}{name}.lora_B.weight"] = up
    if fmt.startswith("kohya"):
        expected = [Expected(e.module, e.down, e.up, ALPHA / RANK) for e in expected]
    tensors.update(extra or {})
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return expected


FORMATS = ("diffusers", "peft-bare", "kohya-framepack", "kohya-hunyuan", "hunyuan", "diffusion-pipe")
DETECTED = {
    "diffusers": "diffusers",
    "peft-bare": "diffusers",
    "kohya-framepack": "kohya",
    "kohya-hunyuan": "kohya",
    "hunyuan": "hunyuan",
    "diffusion-pipe": "diffusion-pipe",
}


def stub(directory: Path) -> Path:
    """A valid one-pair LoRA (diffusers layout) for tests that only need a file that exists."""
    path = Path(directory) / "stub-lora.safetensors"
    if not path.is_file():
        save_file(
            {
                "transformer.proj_out.lora_A.weight": torch.zeros(RANK, 128),
                "transformer.proj_out.lora_B.weight": torch.zeros(64, RANK),
            },
            str(path),
        )
    return path
