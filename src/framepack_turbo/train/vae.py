"""Train the tiny model's VAE: diffusers' `AutoencoderKLHunyuanVideo` in a small configuration with the
real one's compression (8x spatial, 4x temporal, 16 latent channels), on clips of the procedural world.

Loss: L1 + MSE on the pixels plus a small KL term (a VAE, not an autoencoder: the transformer samples
its latent space). After training the latents' spread sets `scaling_factor`, so scaled latents have
unit variance, which the flow-matching sampler assumes. Checkpoints every `save_every` steps;
re-running resumes from the last one. Seeded: the same command gives the same weights on one machine.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from framepack_turbo.train import loop, world

log = logging.getLogger(__name__)

VAE_CONFIG = dict(
    latent_channels=16, block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8,
    mid_block_add_attention=False,
)  # fmt: skip


@dataclass(frozen=True)
class VaeTraining:
    steps: int = 4000
    batch: int = 4
    frames: int = 9  # 1 + 4k pixel frames -> 1 + k latent frames
    size: int = 64
    lr: float = 1e-3
    kl_weight: float = 1e-6
    seed: int = 0
    save_every: int = 250
    eval_clips: int = 16


def clip_batch(rng: np.random.Generator, n: int, frames: int, size: int) -> torch.Tensor:
    """(n, 3, frames, size, size) in [-1, 1]."""
    clips = [world.render(world.random_scene(rng, frames), frames, size) for _ in range(n)]
    return torch.from_numpy(np.stack(clips)).float().permute(0, 4, 1, 2, 3) / 127.5 - 1


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two [-1, 1] tensors, on the 0-255 scale."""
    mse = float(((a.clamp(-1, 1) - b.clamp(-1, 1)) * 127.5).pow(2).mean())
    return 10 * math.log10(255**2 / max(mse, 1e-12))


@torch.no_grad()
def evaluate(vae, cfg: VaeTraining, seed: int = 10_000) -> dict[str, float]:
    """Reconstruction PSNR on held-out clips (a data seed training never draws from), posterior means."""
    rng = np.random.default_rng(seed)
    values, latents = [], []
    for _ in range(cfg.eval_clips // 4):
        x = clip_batch(rng, 4, 17, cfg.size)
        z = vae.encode(x).latent_dist.mode()
        latents.append(z)
        values.append(psnr(vae.decode(z).sample, x))
    z = torch.cat(latents)
    return {"psnr_db": float(np.mean(values)), "latent_std": float(z.std()), "latent_mean": float(z.mean())}


def train(out_dir: Path, cfg: VaeTraining = VaeTraining(), progress: bool = True) -> dict[str, Any]:
    """Train (or resume) and write `out_dir/vae/` in diffusers' layout; returns the training record."""
    from diffusers import AutoencoderKLHunyuanVideo

    torch.manual_seed(cfg.seed)
    vae = AutoencoderKLHunyuanVideo(**VAE_CONFIG)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)

    def loss_at(step: int) -> torch.Tensor:
        x = clip_batch(np.random.default_rng([cfg.seed, step]), cfg.batch, cfg.frames, cfg.size)
        posterior = vae.encode(x).latent_dist
        rec = vae.decode(posterior.sample()).sample
        return (rec - x).abs().mean() + (rec - x).pow(2).mean() + cfg.kl_weight * posterior.kl().mean()

    info = loop.fit(
        vae, opt, Path(out_dir) / "checkpoints" / "vae", cfg.steps, cfg.save_every,
        lambda step: cfg.lr * 0.5 * (1 + math.cos(math.pi * step / cfg.steps)), loss_at, "VAE", progress,
    )  # fmt: skip
    metrics = evaluate(vae, cfg)
    vae.register_to_config(scaling_factor=round(1.0 / metrics["latent_std"], 6))
    vae.save_pretrained(Path(out_dir) / "vae", safe_serialization=True)
    record = {"config": asdict(cfg), "vae_config": VAE_CONFIG, "steps": info["step"], "seconds": round(info["seconds"], 1),
              "final_loss": float(np.mean(info["losses"][-50:])), **metrics}  # fmt: skip
    log.info("VAE: %s", record)
    return record
