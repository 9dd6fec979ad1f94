"""The shipped LoRA: teach the trained tiny transformer a motion it never saw, "moves diagonally" (up and to
the right), with PEFT adapters on its blocks and the first recipe's loss (train/transformer.py).

The base model's world has 84 prompts (4 colours, 3 shapes, 7 motions: train/world.py `MOTIONS`); diagonal
motion and the word "diagonally" are in none of them, so the base model cannot do it: its gate below shows
how rarely it does by chance. The data is a fresh draw of diagonal clips (`world._STEP["diagonal"]`),
encoded once with the shipped VAE; each batch is one generated section of either variant, as the first
recipe lays it out. Only the adapters train (rank `rank` on every linear layer of the double and single
blocks); the result is saved as a diffusers/PEFT LoRA file (`transformer.<module>.lora_A/B.weight`, fp16),
the format `--lora` reads first.

Gate (`lora_gate`): on held-out diagonal scenes, the share whose object moves up and to the right (the
compass octant 22.5-67.5 degrees, at least 4 px between the first and the last quarter) with the LoRA, and
without it (the base model, same prompt).
"""

from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from framepack_turbo.train import loop, world
from framepack_turbo.train.transformer import TransformerTraining, encode_texts, flow_loss, section_example

log = logging.getLogger(__name__)

MOTION = "diagonal"
SHIPPED_LORA = Path(__file__).resolve().parents[1] / "models" / "weights" / "tiny" / "loras" / "diagonal.safetensors"
# Held-out scenes of the gate. 97 was the first, with a weaker measure (at least 2 px right and 2 px up:
# it counted the base model's rightward moves that drift up, 30% of inverted clips); the measure is now
# the compass octant, and the gate ran once more on 91, which nothing had seen.
LORA_SEED = 91
FIRST_SEED = 97
DEVELOPMENT_SEED = 98
GATE_SCENES = 20
MIN_TRAVEL_PX = 4.0  # a clip's object must travel this far (first quarter to last) to have a direction
# The first gate as it ran (seed 97, the weaker measure), kept in the record beside the one that counts.
FIRST_GATE = {
    "seed": FIRST_SEED,
    "measure": "at least 2 px right and 2 px up (first vs last quarter)",
    "inverted": {"with": 0.9, "without": 0.3},
    "f1": {"with": 1.0, "without": 0.05},
}
# every linear layer of the block stacks (anchored: the embedders and the final layer stay as they are)
TARGETS = (
    r"^(?:transformer_blocks|single_transformer_blocks)\.\d+\..*(?:to_q|to_k|to_v|add_q_proj|add_k_proj|"
    r"add_v_proj|to_out\.0|to_add_out|proj|net\.2|proj_mlp|proj_out|linear)$"
)


@dataclass(frozen=True)
class LoraTraining:
    steps: int = 2000
    batch: int = 8
    clips: int = 240
    rank: int = 8
    lr: float = 1e-3
    warmup: int = 100
    motion_weight: float = 10.0
    seed: int = 0
    save_every: int = 250

    def lr_at(self, step: int) -> float:
        warm = min(1.0, (step + 1) / self.warmup)
        return self.lr * warm * 0.5 * (1 + math.cos(math.pi * min(step / self.steps, 1.0)))


def prompts() -> list[str]:
    return [world.prompt_of(c, s, MOTION) for c in world.COLORS for s in world.SHAPES]


@torch.no_grad()
def build_dataset(vae, conditioning: dict[str, Any], cfg: LoraTraining, path: Path, chunk: int = 40):
    """Latents of `cfg.clips` diagonal clips, their prompt ids and SigLIP embeddings; cached at `path`."""
    from framepack_turbo.pipeline.encode import encode_image
    from framepack_turbo.train.dataset import encoded_clips, latents, pixels

    base = TransformerTraining()
    frames, all_prompts = base.clip_frames, prompts()
    vae.use_framewise_encoding = False

    def one_clip(rng: np.random.Generator) -> dict[str, torch.Tensor]:
        scene = world.random_scene(rng, frames, MOTION)
        clip = world.render(scene, frames, base.size)
        return {
            "latents": latents(vae, pixels(clip))[0],
            "prompt_ids": torch.tensor(all_prompts.index(scene.prompt)),
            "image_embeds": encode_image(clip[0], conditioning["feature_extractor"], conditioning["image_encoder"])[0],
        }

    return encoded_clips(path, cfg.clips, (cfg.seed, 6), one_clip, "encoding diagonal clips", chunk)


def train(
    out_dir: Path,
    conditioning: dict[str, Any],
    vae,
    start_from: Path,
    cfg: LoraTraining = LoraTraining(),
    progress=True,
) -> dict[str, Any]:
    """Train (or resume) the adapters on the transformer at `start_from`; writes `out_dir/lora.safetensors`."""
    from diffusers import HunyuanVideoFramepackTransformer3DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    from framepack_turbo.pipeline.sampler import flux_mu

    out_dir = Path(out_dir)
    base = TransformerTraining()
    data = build_dataset(vae, conditioning, cfg, out_dir / "checkpoints" / "lora-latents.safetensors")
    texts = encode_texts(conditioning, prompts())
    by_prompt: dict[int, list[int]] = {}
    for index, pid in enumerate(data["prompt_ids"].tolist()):
        by_prompt.setdefault(pid, []).append(index)
    torch.manual_seed(cfg.seed)
    model = HunyuanVideoFramepackTransformer3DModel.from_pretrained(start_from).float()
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.rank, target_modules=TARGETS, init_lora_weights=True))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=0.0)
    h = w = base.size // 8
    mu = flux_mu(base.window * h * w // 4)

    def loss_at(step: int) -> torch.Tensor:
        rng = np.random.default_rng([cfg.seed, 7, step])
        pid = int(rng.choice(list(by_prompt)))  # one prompt per batch: no text padding, as at batch 1
        rows = torch.from_numpy(rng.choice(by_prompt[pid], size=cfg.batch, replace=len(by_prompt[pid]) < cfg.batch))
        variant = "inverted" if rng.random() < 0.5 else "f1"
        n = int(rng.integers(1, base.max_sections + 1))
        k = int(rng.integers(0, n))
        example = section_example(data["latents"][rows].float(), variant, n, k, base.window)
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        return flow_loss(model, example, texts[pid], data["image_embeds"][rows], mu, gen, cfg.motion_weight)

    info = loop.fit(
        model, opt, out_dir / "checkpoints" / "lora", cfg.steps, cfg.save_every, cfg.lr_at, loss_at, "lora", progress
    )
    state = get_peft_model_state_dict(model)
    tensors = {f"transformer.{k}": v.detach().half().contiguous() for k, v in state.items()}
    save_file(tensors, out_dir / "lora.safetensors", metadata={"format": "pt", "motion": MOTION})
    record = {
        "config": asdict(cfg),
        "started_from": str(start_from).replace(str(Path(__file__).resolve().parents[1]) + "/", ""),
        "targets": TARGETS,
        "parameters": sum(p.numel() for p in trainable),
        "steps": info["step"],
        "seconds": round(info["seconds"], 1),
        "final_loss": float(np.mean(info["losses"][-100:])),
    }
    log.info("lora: %s", record)
    return record


# ---- the gate -------------------------------------------------------------------------------------------


def _scene(rng: np.random.Generator, frames: int) -> world.Scene:
    return world.random_scene(rng, frames, MOTION)


def _moved_diagonally(frames: np.ndarray, color: str) -> tuple[bool, float, float]:
    track = world.color_centroid(frames, color)[:, :2]
    quarter = max(len(frames) // 4, 1)
    head, tail = track[:quarter], track[-quarter:]
    if not (np.isfinite(head).any() and np.isfinite(tail).any()):  # the object lost: a miss
        return False, math.nan, math.nan
    first, last = np.nanmean(head, axis=0), np.nanmean(tail, axis=0)
    dx, dy = float(last[0] - first[0]), float(last[1] - first[1])
    # the up-right octant of the compass (22.5-67.5 degrees; image y points down), far enough to count
    angle = math.degrees(math.atan2(-dy, dx))
    ok = bool(math.hypot(dx, dy) >= MIN_TRAVEL_PX and 22.5 <= angle <= 67.5)
    return ok, dx, dy


def lora_gate(
    with_lora, without, seed: int = LORA_SEED, count: int = GATE_SCENES, variant: str = "inverted", steps: int = 25
) -> dict[str, Any]:
    """Held-out diagonal scenes generated with and without the LoRA (two loaded FramePacks); the share of
    each whose object went right and up."""
    frames = 109  # 3.6 s
    rng = np.random.default_rng([seed, 25])
    cases = []
    with tempfile.TemporaryDirectory(prefix="framepack-lora-gate-") as tmp:
        for i in range(count):
            scene = _scene(rng, frames)
            start = world.render(scene, 1, 64)[0]
            case: dict[str, Any] = {"prompt": scene.prompt}
            for name, fp in (("with", with_lora), ("without", without)):
                r = fp.generate(
                    start,
                    scene.prompt,
                    out=Path(tmp) / f"{name}-{i:02d}.mp4",
                    seconds=3.6,
                    steps=steps,
                    seed=i,
                    resolution=64,
                    variant=variant,
                    keep_frames=True,  # the gate measures the frames as made, not their encode
                )
                ok, dx, dy = _moved_diagonally(r.frames, scene.color)
                case[name] = {
                    "ok": ok,
                    "dx": round(dx, 2) if math.isfinite(dx) else None,
                    "dy": round(dy, 2) if math.isfinite(dy) else None,
                }
            cases.append(case)
    return {
        "seed": seed,
        "variant": variant,
        "steps": steps,
        "scenes": count,
        "with": float(np.mean([c["with"]["ok"] for c in cases])),
        "without": float(np.mean([c["without"]["ok"] for c in cases])),
        "cases": cases,
    }


def ship(path: Path, record: dict[str, Any] | None, gate: dict[str, Any]) -> Path:
    """Copy the LoRA into the package beside the tiny model, with its training record and gate."""
    import json
    import shutil

    SHIPPED_LORA.parent.mkdir(parents=True, exist_ok=True)
    if Path(path).resolve() != SHIPPED_LORA:
        shutil.copyfile(path, SHIPPED_LORA)
    manifest = {
        "motion": MOTION,
        "prompt": "the <colour> <shape> moves diagonally",
        "training": record,
        "gate": gate,
        "gate_measure": "the compass octant 22.5-67.5 degrees (up and right), at least 4 px, first vs last quarter",
        "first_gate": FIRST_GATE,
        "command": "python scripts/train_tiny.py lora && python scripts/train_tiny.py lora-gate --ship",
    }
    SHIPPED_LORA.with_suffix(".json").write_text(json.dumps(manifest, indent=2) + "\n")
    # the tiny model's manifest lists every shipped file under its budget, the LoRAs included
    from framepack_turbo.train import ship as model_ship

    root = model_ship.SHIPPED
    files = {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}
    files.pop("manifest.json", None)
    if sum(files.values()) > model_ship.MAX_SHIPPED_BYTES:
        raise RuntimeError(f"shipped files are over the {model_ship.MAX_SHIPPED_BYTES >> 20} MB budget")
    model_ship.update_manifest(files=files, bytes=sum(files.values()))
    return SHIPPED_LORA
