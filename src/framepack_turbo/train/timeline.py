"""Teach the trained tiny transformer what a clip's timeline asks (pipeline/timeline.py): a prompt that
changes at a section boundary, an end frame, keyframes. Fine-tunes the shipped weights; the first
recipe (train/transformer.py) never showed the model any of these, and measured, it ignored them.

The data is a fresh draw of the procedural world in which some clips change motion at a section
boundary ("moves right" for two sections, then "moves left"), encoded once with the shipped VAE, plus
the latent of each section boundary's frame encoded alone, as the generator encodes an end image or a
keyframe. Each batch is one generated section, as `train/transformer.py` lays it out, with:

- the prompt of that section's own time span (a changing clip's sections see the prompt of their part),
- in the inverted variant, sometimes the end frame's latent in the history slot after the clip,
- in the inverted variant, sometimes a keyframe at a boundary b: the sections from b on take its latent
  as their clean "pre" anchor instead of the start frame's.

A share of the batches are exactly the first recipe's (one motion, no end frame, no keyframe), so the
direction gate is trained on as before. Seeded and resumable; the data and steps use seeds the first
recipe does not ([seed, 4, chunk] and [seed, 5, step]).
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
from framepack_turbo.train.transformer import TransformerTraining, encode_texts, flow_loss, prompts, section_example

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TimelineTraining:
    steps: int = 8000
    batch: int = 8
    clips: int = 800
    change_share: float = 0.6  # clips that change motion at a section boundary
    end_share: float = 0.35  # inverted batches with an end frame
    keyframe_share: float = 0.3  # inverted batches with a keyframe
    # Batches that are a section next to a change, drawn from the clips that change there. Measured after a
    # first run without them (4500 steps): F1 slowed to a stop after "moves left" and never turned, as most
    # of its sections continue the history's motion; the second run (--start-from the first) weighs them.
    after_change_share: float = 0.0
    lr: float = 1e-4
    warmup: int = 200
    motion_weight: float = 10.0
    seed: int = 0
    save_every: int = 250

    def lr_at(self, step: int) -> float:
        warm = min(1.0, (step + 1) / self.warmup)
        return self.lr * warm * 0.5 * (1 + math.cos(math.pi * min(step / self.steps, 1.0)))


def _scene(rng: np.random.Generator, frames: int, sections: int, window: int, change: bool) -> tuple[world.Scene, int]:
    """A clip's scene and the time-order section its second motion starts at (`sections`: none)."""
    if not change:
        return world.random_scene(rng, frames), sections
    boundary = int(rng.integers(1, sections))
    first = str(rng.choice(world.MOTIONS))
    then = str(rng.choice([m for m in world.MOTIONS if m != first]))
    return world.changing_scene(rng, frames, boundary * window * 4, first, then), boundary


@torch.no_grad()
def build_dataset(vae, conditioning: dict[str, Any], cfg: TimelineTraining, path: Path, chunk: int = 50):
    """Latents (N, 16, T, h, w), each section boundary's frame encoded alone (N, S, 16, 1, h, w), the prompt
    id of each time-order section (N, S) and the start frames' SigLIP embeddings; cached at `path` in
    resumable chunks (train/dataset.py)."""
    from framepack_turbo.pipeline.encode import encode_image
    from framepack_turbo.train.dataset import encoded_clips, latents, pixels

    base = TransformerTraining()
    frames, sections, window = base.clip_frames, base.max_sections, base.window
    all_prompts = prompts()
    vae.use_framewise_encoding = False

    def one_clip(rng: np.random.Generator) -> dict[str, torch.Tensor]:
        scene, _ = _scene(rng, frames, sections, window, rng.random() < cfg.change_share)
        clip = world.render(scene, frames, base.size)
        x = pixels(clip)
        at = [b * window * 4 for b in range(1, sections + 1)]  # each boundary's frame, the clip's end last
        return {
            "latents": latents(vae, x)[0],
            "boundaries": latents(vae, x[:, :, at].transpose(1, 2).reshape(len(at), 3, 1, *x.shape[-2:])),
            # a section's prompt: the motion of its first frame after the boundary
            "prompt_ids": torch.tensor(
                [all_prompts.index(scene.prompt_at(k * window * 4 + 1)) for k in range(sections)]
            ),
            "image_embeds": encode_image(clip[0], conditioning["feature_extractor"], conditioning["image_encoder"])[0],
        }

    return encoded_clips(path, cfg.clips, (cfg.seed, 4), one_clip, "encoding timeline clips", chunk)


def finetune(
    out_dir: Path,
    conditioning: dict[str, Any],
    vae,
    start_from: Path,
    cfg: TimelineTraining = TimelineTraining(),
    progress: bool = True,
) -> dict[str, Any]:
    """Fine-tune the transformer at `start_from` and write `out_dir/transformer/`; returns the record."""
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    from framepack_turbo.pipeline.sampler import flux_mu

    out_dir = Path(out_dir)
    base = TransformerTraining()
    data = build_dataset(vae, conditioning, cfg, out_dir / "checkpoints" / "timeline-latents.safetensors")
    texts = encode_texts(conditioning, prompts())
    section_prompts = data["prompt_ids"].numpy()  # (N, S)
    changed = section_prompts[:, 1:] != section_prompts[:, :-1]
    boundary_of = np.where(changed.any(axis=1), changed.argmax(axis=1) + 1, 0)  # 0: the clip never changes
    model = HunyuanVideoFramepackTransformer3DModel.from_pretrained(start_from).float()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    h = w = base.size // 8
    mu = flux_mu(base.window * h * w // 4)

    def loss_at(step: int) -> torch.Tensor:
        rng = np.random.default_rng([cfg.seed, 5, step])
        variant = "inverted" if rng.random() < 0.5 else "f1"
        clips = np.arange(len(section_prompts))
        if cfg.after_change_share and rng.random() < cfg.after_change_share:  # no draw at 0: run 1 as it ran
            # the first section after a change at boundary b; inverted, also the one before it, whose
            # "post" context already shows the second motion
            b = int(rng.choice(np.unique(boundary_of[boundary_of > 0])))
            clips = np.flatnonzero(boundary_of == b)
            n = int(rng.integers(b + 1, base.max_sections + 1))
            position = b - int(variant == "inverted" and rng.random() < 0.5)
            k = n - 1 - position if variant == "inverted" else position
        else:
            n = int(rng.integers(1, base.max_sections + 1))
            k = int(rng.integers(0, n))
            position = n - 1 - k if variant == "inverted" else k
        with_end = variant == "inverted" and rng.random() < cfg.end_share
        keyframe_at = (
            int(rng.integers(1, n)) if variant == "inverted" and n > 1 and rng.random() < cfg.keyframe_share else 0
        )
        # one prompt per batch (no text padding, as at batch 1): clips whose section here has it
        pid = int(rng.choice(np.unique(section_prompts[clips, position])))
        candidates = clips[section_prompts[clips, position] == pid]
        rows = torch.from_numpy(rng.choice(candidates, size=cfg.batch, replace=len(candidates) < cfg.batch))
        z = data["latents"][rows].float()
        alone = data["boundaries"][rows].float()  # (B, S, C, 1, h, w)
        end = alone[:, n - 1] if with_end else None
        keyframe = (keyframe_at, alone[:, keyframe_at - 1]) if keyframe_at else None
        example = section_example(z, variant, n, k, base.window, end=end, keyframe=keyframe)
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        return flow_loss(model, example, texts[pid], data["image_embeds"][rows], mu, gen, cfg.motion_weight)

    info = loop.fit(
        model,
        opt,
        out_dir / "checkpoints" / "timeline",
        cfg.steps,
        cfg.save_every,
        cfg.lr_at,
        loss_at,
        "timeline",
        progress,
    )
    model.save_pretrained(out_dir / "transformer", safe_serialization=True)
    record = {
        "config": asdict(cfg),
        "started_from": str(start_from),
        "steps": info["step"],
        "seconds": round(info["seconds"], 1),
        "final_loss": float(np.mean(info["losses"][-100:])),
    }
    log.info("timeline: %s", record)
    return record
