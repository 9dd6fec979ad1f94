"""Fit the latent preview's linear map (16 latent channels -> RGB) for the trained `tiny` VAE.

The per-step preview maps latents to colours with a fixed linear map, no VAE. The map FramePack uses
(ComfyUI's factors) belongs to HunyuanVideo's VAE; on the tiny VAE's latents it gives noise-coloured
tiles. This fits the map by least squares on clips of the procedural world: each latent frame's 8x8
cells against the mean colour of the pixels they cover (its last pixel frame), with a bias. It prints
the held-out PSNR of both maps and the fitted constants for models/presets.py (TINY_LATENT_PREVIEW).

    python scripts/fit_latent_preview.py [--clips 48]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from framepack_turbo.constants import LATENT_FRAMES_TO_PIXELS, VAE_SPATIAL_SCALE
from framepack_turbo.models.loading import load_bundle
from framepack_turbo.pipeline import vae as vae_ops
from framepack_turbo.train import world


def pairs(vae, clips: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 16) latent cells and (N, 3) mean colours in [0, 1] of the pixels each one covers."""
    rng = np.random.default_rng(seed)
    latents, colours = [], []
    for index in range(clips):
        frames = world.render(world.random_scene(rng, 33), 33, 64)  # (T, H, W, 3) uint8
        pixels = torch.from_numpy(frames).float().permute(3, 0, 1, 2)[None] / 127.5 - 1
        with torch.no_grad():
            z = vae_ops.encode(pixels, vae, torch.Generator().manual_seed(index))[0]  # (16, T', h, w)
        # latent 0 is pixel frame 0; latent k (k > 0) covers frames 4k-3 .. 4k: its last frame stands for it
        last = [0] + [LATENT_FRAMES_TO_PIXELS * k for k in range(1, z.shape[1])]
        target = torch.from_numpy(frames[last]).float().permute(0, 3, 1, 2) / 255
        target = torch.nn.functional.avg_pool2d(target, VAE_SPATIAL_SCALE).permute(0, 2, 3, 1)
        latents.append(z.permute(1, 2, 3, 0).reshape(-1, z.shape[0]))
        colours.append(target.reshape(-1, 3))
    return torch.cat(latents).double(), torch.cat(colours).double()


def psnr(predicted: torch.Tensor, target: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / ((predicted.clamp(0, 1) - target) ** 2).mean()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=48)
    args = parser.parse_args()
    vae = load_bundle("tiny", device="cpu").vae
    x, y = pairs(vae, args.clips, seed=123)
    held_x, held_y = pairs(vae, max(args.clips // 4, 4), seed=456)  # other scenes: the PSNR is held out
    design = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    solution = torch.linalg.lstsq(design, y).solution
    weight, bias = solution[:-1], solution[-1]
    comfy_w = torch.tensor(vae_ops.HUNYUAN_LATENT_PREVIEW[0], dtype=torch.float64)
    comfy_b = torch.tensor(vae_ops.HUNYUAN_LATENT_PREVIEW[1], dtype=torch.float64)
    print(f"held-out PSNR: fitted map {psnr(held_x @ weight + bias, held_y):.1f} dB, ", end="")
    print(f"HunyuanVideo's map {psnr(held_x @ comfy_w + comfy_b, held_y):.1f} dB")
    rows = ", ".join("(" + ", ".join(f"{v:.4f}" for v in row) + ")" for row in weight.tolist())
    print(f"TINY_LATENT_PREVIEW = (({rows}), ({', '.join(f'{v:.4f}' for v in bias.tolist())}))")


if __name__ == "__main__":
    main()
