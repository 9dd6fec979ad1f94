"""Train the tiny model's transformer: diffusers' `HunyuanVideoFramepackTransformer3DModel` (small
config) with flow matching on exactly what our section loop feeds it.

Each training example is one section of a clip of the procedural world, laid out as the generator
lays it out (pipeline/sections.py, generate.py): for the inverted variant the section at its true time
position with FramePack's padding schedule, the later latents as 1x/2x/4x history (zeros past the end)
and the start latent as clean pre; for F1 the history so far (zeros, the start latent, the earlier
sections) with its last 16+2+1 frames as context. Both variants are trained into one model. The loss
is the flow-matching one of our sampler (x_t = (1-s) x0 + s e, the model predicts e - x0, sigma drawn
through the sampler's own shift). Text and image encoders are the tiny random ones, frozen: their
outputs for the world's 84 prompts and each clip's start frame are computed once.

Clips are encoded once with the trained VAE into a latent dataset (cached in the checkpoint folder).
Seeded and resumable like the VAE stage.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from framepack_turbo.pipeline.sections import (
    CONTEXT_1X,
    CONTEXT_2X,
    CONTEXT_4X,
    f1_indices,
    inverted_indices,
    inverted_paddings,
)
from framepack_turbo.train import loop, world

log = logging.getLogger(__name__)

GUIDANCE = 10.0  # the distilled guidance the page and CLI default to; the model is trained at this value
TRANSFORMER_CONFIG = dict(
    in_channels=16,
    out_channels=16,
    num_attention_heads=4,
    attention_head_dim=32,
    num_layers=2,
    num_single_layers=4,
    num_refiner_layers=1,
    text_embed_dim=32,
    pooled_projection_dim=32,
    rope_axes_dim=(8, 12, 12),
    has_image_proj=True,
    image_proj_dim=32,
    has_clean_x_embedder=True,
)


@dataclass(frozen=True)
class TransformerTraining:
    steps: int = 52000
    batch: int = 8
    clips: int = 800
    max_sections: int = 4
    window: int = 9
    size: int = 64
    lr: float = 4e-4
    motion_weight: float = 10.0  # extra loss weight where the latents move (the object is ~1 of 64 latent cells)
    motion_weight_from: int = 11_000  # the shipped run trained 11000 steps unweighted, then turned it on
    # Size changes are the hardest motions (a 2-3 px change of half-size per section, under the VAE's
    # blur): from `focus_from` on, this share of batches is drawn from their prompts (2/7 before).
    focus_motions: tuple[str, ...] = ("grow", "shrink")
    focus_share: float = 0.5
    focus_from: int = 42_000
    seed: int = 0
    save_every: int = 250
    # The shipped run's learning rate: cosine decays, as the run was resumed six times, each resume
    # restarting the curve. Each entry is (until step, origin, length): lr = lr0 * (1 + cos(pi * (step -
    # origin) / length)) / 2. Kept as it ran, so that training from nothing follows the shipped recipe.
    schedule: tuple[tuple[int, int, int], ...] = (
        (1500, 0, 7000),
        (11000, 0, 11000),
        (16000, 0, 16000),
        (30000, 0, 30000),
        (42000, 0, 42000),
        (46000, 34000, 12000),
        (52000, 34000, 18000),  # each from a quarter of lr0 down to 0
    )

    def lr_at(self, step: int) -> float:
        origin, length = next(((o, n) for until, o, n in self.schedule if step < until), (0, self.steps))
        warmup = min(1.0, (step + 1) / 200)
        return self.lr * warmup * 0.5 * (1 + math.cos(math.pi * min((step - origin) / length, 1.0)))

    @property
    def clip_frames(self) -> int:
        """Frames of every training clip: `max_sections` sections, plus the start frame. The world caps an
        object's speed so it stays in view this long, so this length also sets the speeds the model knows."""
        return self.max_sections * self.window * 4 + 1


def prompts() -> list[str]:
    """Every prompt of the world, in a fixed order."""
    return [
        world.Scene(color, shape, motion, 0.3, 0.5, 0.5, 0.1, 0).prompt
        for color in world.COLORS
        for shape in world.SHAPES
        for motion in world.MOTIONS
    ]


def encode_texts(conditioning: dict[str, Any], texts: list[str]) -> list:
    """The frozen text encoders' embeddings of each prompt (computed once per training run)."""
    from framepack_turbo.pipeline.encode import encode_prompt

    names = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")
    return [encode_prompt(text, *(conditioning[k] for k in names)) for text in texts]


@torch.no_grad()
def build_dataset(
    vae, conditioning: dict[str, Any], cfg: TransformerTraining, path: Path, chunk: int = 50
) -> dict[str, Any]:
    """Latents (N, 16, T, h, w) of `cfg.clips` clips, their prompt ids and SigLIP embeddings; cached at `path`
    in resumable chunks (train/dataset.py)."""
    from framepack_turbo.pipeline.encode import encode_image
    from framepack_turbo.train.dataset import encoded_clips, latents, pixels

    frames = cfg.clip_frames
    all_prompts = prompts()
    vae.use_framewise_encoding = False  # 64 px clips fit in one pass; tiles would encode overlaps twice

    def one_clip(rng: np.random.Generator) -> dict[str, torch.Tensor]:
        scene = world.random_scene(rng, frames)
        clip = world.render(scene, frames, cfg.size)
        return {
            "latents": latents(vae, pixels(clip))[0],
            "prompt_ids": torch.tensor(all_prompts.index(scene.prompt)),
            "image_embeds": encode_image(clip[0], conditioning["feature_extractor"], conditioning["image_encoder"])[0],
        }

    return encoded_clips(path, cfg.clips, (cfg.seed, 1), one_clip, "encoding clips", chunk)


def section_example(
    z: torch.Tensor,
    variant: str,
    n: int,
    k: int,
    window: int,
    end: torch.Tensor | None = None,
    keyframe: tuple[int, torch.Tensor] | None = None,
):
    """Inputs of the k-th generated section of an n-section clip whose true latents are `z` (B, C, T, h, w):
    (noisy target x0, clean, clean_2x, clean_4x, PackedIndices).

    Inverted only: `end` (B, C, 1, h, w) is the end frame's latent, in the history slot right after the
    clip as the generator puts it; `keyframe` (b, latent) replaces the start latent as the clean "pre"
    anchor of the sections from time-order section b on (pipeline/timeline.py's rule)."""
    b, c, _, h, w = z.shape
    context = CONTEXT_1X + CONTEXT_2X + CONTEXT_4X
    zeros = z.new_zeros(b, c, context, h, w)
    anchor = z[:, :, :1]
    if variant == "inverted":
        position = n - 1 - k  # generated last-to-first
        start = 1 + position * window
        later = [z[:, :, start + window : 1 + n * window], *([end] if end is not None else []), zeros]
        post, two_x, four_x = torch.cat(later, dim=2)[:, :, :context].split([CONTEXT_1X, CONTEXT_2X, CONTEXT_4X], 2)
        indices = inverted_indices(inverted_paddings(n)[k], window)
        if keyframe is not None and position >= keyframe[0]:
            anchor = keyframe[1]
    else:
        start = 1 + k * window
        history = torch.cat([zeros, z[:, :, :start]], dim=2)
        four_x, two_x, post = history[:, :, -context:].split([CONTEXT_4X, CONTEXT_2X, CONTEXT_1X], 2)
        indices = f1_indices(window)
    clean = torch.cat([anchor, post], dim=2)
    return z[:, :, start : start + window], clean, two_x, four_x, indices


def motion_weight(x0: torch.Tensor, start: torch.Tensor, strength: float) -> torch.Tensor:
    """(B, 1, T, h, w) loss weights, mean 1 per clip, higher where the section's latents differ from the
    start latent: where the object is and goes. The background is most of every latent and is easy; an
    unweighted loss is nearly satisfied by a model that leaves the object where it was."""
    change = (x0 - start).abs().mean(dim=1, keepdim=True)
    change = change / change.amax(dim=(2, 3, 4), keepdim=True).clamp_min(1e-6)
    weight = 1 + strength * change
    return weight / weight.mean(dim=(2, 3, 4), keepdim=True)


def flow_loss(model, example, text, image_embeds: torch.Tensor, mu: float, gen: torch.Generator, weight: float):
    """The flow-matching loss of one batch of sections: noise the target at sigmas drawn through the
    sampler's shift, predict `noise - x0`, square the error (motion-weighted when `weight`). `example` is
    what `section_example` returns; `text` one prompt's embeddings, shared by the batch."""
    from framepack_turbo.pipeline.sampler import shift_sigma

    x0, clean, two_x, four_x, idx = example
    b = x0.shape[0]
    sigma = shift_sigma(torch.rand(b, generator=gen), mu).view(-1, 1, 1, 1, 1)
    noise = torch.randn(x0.shape, generator=gen)
    x_t = (1 - sigma) * x0 + sigma * noise
    pred = model(
        hidden_states=x_t,
        timestep=sigma.flatten() * 1000,
        encoder_hidden_states=text.llama.expand(b, -1, -1),
        encoder_attention_mask=text.mask.expand(b, -1),
        pooled_projections=text.clip_pooled.expand(b, -1),
        image_embeds=image_embeds,
        indices_latents=idx.latents,
        guidance=torch.full((b,), GUIDANCE * 1000),
        latents_clean=clean,
        indices_latents_clean=idx.clean,
        latents_history_2x=two_x,
        indices_latents_history_2x=idx.clean_2x,
        latents_history_4x=four_x,
        indices_latents_history_4x=idx.clean_4x,
        return_dict=False,
    )[0]
    err = (pred.float() - (noise - x0)).pow(2)
    if weight:
        err = err * motion_weight(x0, clean[:, :, :1], weight)
    return err.mean()


def train(
    out_dir: Path,
    conditioning: dict[str, Any],
    vae,
    cfg: TransformerTraining = TransformerTraining(),
    progress: bool = True,
) -> dict[str, Any]:
    """Train (or resume) and write `out_dir/transformer/`; returns the training record."""
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    from framepack_turbo.pipeline.sampler import flux_mu

    out_dir = Path(out_dir)
    data = build_dataset(vae, conditioning, cfg, out_dir / "checkpoints" / "latents.safetensors")
    texts = encode_texts(conditioning, prompts())
    by_prompt: dict[int, np.ndarray] = {}
    for index, pid in enumerate(data["prompt_ids"].tolist()):
        by_prompt.setdefault(pid, []).append(index)
    by_prompt = {k: np.array(v) for k, v in by_prompt.items()}
    focused = [
        pid for pid in by_prompt if world.MOTIONS[pid % len(world.MOTIONS)] in cfg.focus_motions
    ]  # prompts(): motion varies fastest

    torch.manual_seed(cfg.seed)
    model = HunyuanVideoFramepackTransformer3DModel(**TRANSFORMER_CONFIG)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    h = w = cfg.size // 8
    mu = flux_mu(cfg.window * h * w // 4)

    def loss_at(step: int) -> torch.Tensor:
        rng = np.random.default_rng([cfg.seed, 2, step])
        pool = list(by_prompt)
        if step >= cfg.focus_from and rng.random() < cfg.focus_share:
            pool = focused
        pid = int(rng.choice(pool))  # one prompt per batch: no text padding, as at batch 1
        rows = rng.choice(by_prompt[pid], size=cfg.batch, replace=len(by_prompt[pid]) < cfg.batch)
        variant = "inverted" if rng.random() < 0.5 else "f1"
        n = int(rng.integers(1, cfg.max_sections + 1))
        k = int(rng.integers(0, n))
        z = data["latents"][torch.from_numpy(rows)].float()
        x0, clean, two_x, four_x, idx = section_example(z, variant, n, k, cfg.window)
        weight = cfg.motion_weight if step >= cfg.motion_weight_from else 0.0
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        example = (x0, clean, two_x, four_x, idx)
        return flow_loss(model, example, texts[pid], data["image_embeds"][torch.from_numpy(rows)], mu, gen, weight)

    info = loop.fit(
        model,
        opt,
        out_dir / "checkpoints" / "transformer",
        cfg.steps,
        cfg.save_every,
        cfg.lr_at,
        loss_at,
        "transformer",
        progress,
    )
    model.save_pretrained(out_dir / "transformer", safe_serialization=True)
    parameters = sum(p.numel() for p in model.parameters())
    record = {
        "config": asdict(cfg),
        "transformer_config": TRANSFORMER_CONFIG,
        "parameters": parameters,
        "steps": info["step"],
        "seconds": round(info["seconds"], 1),
        "final_loss": float(np.mean(info["losses"][-100:])),
    }
    log.info("transformer: %s", record)
    return record
