"""Write the trained tiny model into the package in the `--model-dir` layout, with a manifest, and
check it: the quality gates the tests hold it to (VAE reconstruction, direction of motion)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from framepack_turbo.train import world

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "weights" / "tiny"
MAX_SHIPPED_BYTES = 20 << 20
VAE_PSNR_BOUND_DB = 22.5  # the shipped VAE measures 23.3 dB on held-out clips (manifest); margin for other CPUs
GATE_CASES = 56  # 8 held-out prompts per motion: one case moves the accuracy 1.8 points
# Scenes no training run draws from (training uses seeds [seed, 0|1|2, ...]). Seeds 99, 98 and 97 were
# development sets: the recipe's last phases and the shipped checkpoint were chosen looking at them, so
# they flatter it. 96 was drawn once, for the shipped weights, after every choice was made.
HELD_OUT_SEED = 96
DEVELOPMENT_SEEDS = (99, 98, 97)


def held_out_scenes(count: int, seed: int = HELD_OUT_SEED, motions=world.MOTIONS) -> list[world.Scene]:
    """Scenes drawn as the training clips are (same length, so the same speeds), from a seed training
    never uses. The gate generates only their first sections; drawing them for the shorter clip instead
    would let objects move up to 35% faster than any the model saw, a test of speeds, not direction."""
    from framepack_turbo.train.transformer import TransformerTraining

    rng = np.random.default_rng([seed, 7])
    frames = TransformerTraining().clip_frames
    return [world.random_scene(rng, frames, motions[i % len(motions)]) for i in range(count)]


def direction_accuracy(
    fp,
    variant: str,
    count: int = GATE_CASES,
    seconds: float = 3.6,
    steps: int = 25,
    out_dir: Path | None = None,
    seed: int = HELD_OUT_SEED,
) -> dict[str, Any]:
    """Generate from held-out scenes' first frames with their prompts and check, by the object's colour,
    that it did what the prompt says. Returns the accuracy, the settings and every case; the clips are
    kept in `out_dir` when given."""
    import tempfile

    from framepack_turbo.pipeline.sections import section_count

    cases = []
    with tempfile.TemporaryDirectory(prefix="framepack-gate-") as tmp:
        for i, scene in enumerate(held_out_scenes(count, seed)):
            start = world.render(scene, 1, 64)[0]
            out = Path(out_dir or tmp) / f"gate-{variant}-{i:02d}.mp4"
            result = fp.generate(
                start,
                scene.prompt,
                out=out,
                seconds=seconds,
                steps=steps,
                variant=variant,
                resolution=64,
                seed=i,
                keep_frames=True,
            )
            seen = world.observed_motion(result.frames, scene.color)
            ok = seen == scene.motion
            cases.append({"prompt": scene.prompt, "motion": scene.motion, "observed": seen, "ok": ok})
    by_motion = {m: float(np.mean([c["ok"] for c in cases if c["motion"] == m])) for m in world.MOTIONS}
    return {
        "variant": variant,
        "sections": section_count(seconds, 9),
        "seconds": seconds,
        "steps": steps,
        "accuracy": float(np.mean([c["ok"] for c in cases])),
        "by_motion": by_motion,
        "cases": cases,
    }


def update_manifest(target: Path = SHIPPED, **entries: Any) -> None:
    """Add gate results to the shipped manifest, keeping what another stage wrote meanwhile."""
    path = target / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.update(entries)
    path.write_text(json.dumps(manifest, indent=2))


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, no GPU" if not torch.cuda.is_available() else torch.cuda.get_device_name()


def ship(training_dir: Path, records: dict[str, Any], target: Path = SHIPPED) -> dict[str, Any]:
    """Copy the trained VAE (float32) and transformer (float16: half the bytes, upcast on load) with the
    frozen tiny encoders into `target`, and write `target/manifest.json`."""
    from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoFramepackTransformer3DModel

    from framepack_turbo.models.random import build_models

    training_dir, target = Path(training_dir), Path(target)
    encoders = build_models("tiny", skip=frozenset({"transformer", "vae"}))
    HunyuanVideoFramepackTransformer3DModel.from_pretrained(training_dir / "transformer").to(
        torch.float16
    ).save_pretrained(target / "transformer", safe_serialization=True)
    AutoencoderKLHunyuanVideo.from_pretrained(training_dir / "vae").save_pretrained(
        target / "vae", safe_serialization=True
    )
    for name in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "image_encoder", "feature_extractor"):
        encoders[name].save_pretrained(target / name)
    files = {
        str(p.relative_to(target)): p.stat().st_size
        for p in sorted(target.rglob("*"))
        if p.is_file() and p.name != "manifest.json"
    }
    total = sum(files.values())
    if total > MAX_SHIPPED_BYTES:
        raise RuntimeError(f"shipped weights are {total / 2**20:.1f} MB, over the {MAX_SHIPPED_BYTES >> 20} MB budget")
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = ""
    manifest = {
        "model": "framepack-turbo tiny (trained on the procedural world)",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": _machine(),
        "torch": torch.__version__,
        "code_commit": commit,
        "command": "python scripts/train_tiny.py vae, then transformer and decoder (side by side), "
        + ("then timeline (its record has the runs), " if "timeline" in records else "")
        + "then ship",
        "data": {
            "world": "framepack_turbo.train.world (procedural; nothing downloaded)",
            "training_seeds": "seed 0; numpy default_rng([seed, step]) for the VAE, [seed, 1, chunk] latent dataset, [seed, 2, step] transformer, [seed, 3, step] decoder, "
            "[seed, 4, chunk] and [seed, 5, step] the timeline fine-tune",
            "held_out": f"direction gate: default_rng([{HELD_OUT_SEED}, 7]) (development sets, which chose the recipe: "
            f"seeds {', '.join(map(str, DEVELOPMENT_SEEDS))}); VAE evaluation: default_rng(10000)",
        },
        "bytes": total,
        "files": files,
        **records,
    }
    (target / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest
