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
    latent_channels=16,
    block_out_channels=(16, 32, 32, 32),
    layers_per_block=1,
    norm_num_groups=8,
    mid_block_add_attention=False,
)


@dataclass(frozen=True)
class VaeTraining:
    steps: int = 4000
    batch: int = 4
    frames: int = 9  # 1 + 4k pixel frames -> 1 + k latent frames
    size: int = 64
    lr: float = 1e-3
    kl_weight: float = 1e-6
    object_weight: float = 20.0  # extra loss weight on the object's pixels (3-5% of a frame, the part that matters)
    seed: int = 0
    save_every: int = 250
    eval_clips: int = 24


def clip_batch(rng: np.random.Generator, n: int, frames: int, size: int) -> torch.Tensor:
    """(n, 3, frames, size, size) in [-1, 1]."""
    clips = [world.render(world.random_scene(rng, frames), frames, size) for _ in range(n)]
    return torch.from_numpy(np.stack(clips)).float().permute(0, 4, 1, 2, 3) / 127.5 - 1


def object_mask(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, H, W) 1 where a pixel is saturated like the world's objects (the textures are muted, the
    objects are not), from the clip alone, so the loss needs nothing but pixels."""
    saturation = (x.amax(dim=1, keepdim=True) - x.amin(dim=1, keepdim=True)) * 127.5
    return (saturation > 90).float()


def reconstruction_loss(rec: torch.Tensor, x: torch.Tensor, cfg: VaeTraining) -> torch.Tensor:
    """L1 + MSE on the pixels, the object's pixels weighted `1 + object_weight`."""
    weight = 1 + cfg.object_weight * object_mask(x)
    return (weight * ((rec - x).abs() + (rec - x).pow(2))).mean() / weight.mean()


def cosine_lr(cfg: VaeTraining):
    return lambda step: cfg.lr * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two [-1, 1] tensors, on the 0-255 scale."""
    mse = float(((a.clamp(-1, 1) - b.clamp(-1, 1)) * 127.5).pow(2).mean())
    return 10 * math.log10(255**2 / max(mse, 1e-12))


@torch.no_grad()
def evaluate(vae, cfg: VaeTraining, seed: int = 10_000, frames: int = 33) -> dict[str, float]:
    """On held-out clips (a data seed training never draws from), posterior means: reconstruction PSNR, and
    the share of clips whose object the colour tracker sees do the same thing before and after the VAE."""
    rng = np.random.default_rng(seed)
    values, latents, kept = [], [], []
    for _ in range(cfg.eval_clips):
        scene = world.random_scene(rng, frames)
        clip = world.render(scene, frames, cfg.size)
        x = torch.from_numpy(clip).float().permute(3, 0, 1, 2)[None] / 127.5 - 1
        z = vae.encode(x).latent_dist.mode()
        latents.append(z)
        rec = vae.decode(z).sample
        values.append(psnr(rec, x))
        pixels = ((rec[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
        kept.append(world.observed_motion(pixels, scene.color) == world.observed_motion(clip, scene.color))
    z = torch.cat(latents)
    return {
        "psnr_db": float(np.mean(values)),
        "motion_kept": float(np.mean(kept)),
        "latent_std": float(z.std()),
        "latent_mean": float(z.mean()),
    }


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
        return reconstruction_loss(rec, x, cfg) + cfg.kl_weight * posterior.kl().mean()

    info = loop.fit(
        vae,
        opt,
        Path(out_dir) / "checkpoints" / "vae",
        cfg.steps,
        cfg.save_every,
        cosine_lr(cfg),
        loss_at,
        "VAE",
        progress,
    )
    metrics = evaluate(vae, cfg)
    vae.register_to_config(scaling_factor=round(1.0 / metrics["latent_std"], 6))
    vae.save_pretrained(Path(out_dir) / "vae", safe_serialization=True)
    record = {
        "config": asdict(cfg),
        "vae_config": VAE_CONFIG,
        "steps": info["step"],
        "seconds": round(info["seconds"], 1),
        "final_loss": float(np.mean(info["losses"][-50:])),
        **metrics,
    }
    log.info("VAE: %s", record)
    return record


def finetune_decoder(out_dir: Path, cfg: VaeTraining = VaeTraining(), progress: bool = True) -> dict[str, Any]:
    """Train (or resume) only the decoder of `out_dir/vae/`, the encoder frozen, and write it back.

    The transformer learns in the encoder's latent space; with the encoder (and `scaling_factor`) fixed,
    the decoder can keep improving while the transformer trains on latents that stay valid. Decoding
    posterior samples, not means, keeps it tolerant of latents that are close but not exact, which is
    what a sampler produces."""
    from diffusers import AutoencoderKLHunyuanVideo

    torch.manual_seed(cfg.seed)
    vae = AutoencoderKLHunyuanVideo.from_pretrained(Path(out_dir) / "vae")
    vae.encoder.requires_grad_(False)
    vae.quant_conv.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in vae.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)

    def loss_at(step: int) -> torch.Tensor:
        x = clip_batch(np.random.default_rng([cfg.seed, 3, step]), cfg.batch, cfg.frames, cfg.size)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample()
        return reconstruction_loss(vae.decode(z).sample, x, cfg)

    info = loop.fit(
        vae,
        opt,
        Path(out_dir) / "checkpoints" / "decoder",
        cfg.steps,
        cfg.save_every,
        cosine_lr(cfg),
        loss_at,
        "decoder",
        progress,
    )
    metrics = evaluate(vae, cfg)
    vae.save_pretrained(Path(out_dir) / "vae", safe_serialization=True)
    record = {
        "config": asdict(cfg),
        "steps": info["step"],
        "seconds": round(info["seconds"], 1),
        "final_loss": float(np.mean(info["losses"][-50:])),
        **metrics,
    }
    log.info("decoder: %s", record)
    return record
