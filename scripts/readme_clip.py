"""The README's moving picture: four clips of the bundled, trained `tiny` model, one prompt each, tiled 2x2
into one small animated WebP.

    python scripts/readme_clip.py docs/tiny-demo.webp

The clips are the direction gate's first four cases, made as the gate makes them (train/ship.py
`direction_accuracy`: held-out scenes no training clip was drawn from, case i with seed i, 3.6 s, 25 steps,
64 px, the inverted variant), not picked for looking good: each is `framepack generate --model tiny --image
START.png --prompt PROMPT --seed I --seconds 3.6 --resolution 64` from the scene's first frame. The script
prints the motion each clip shows, measured as the gate measures it (world.observed_motion). The tiles are scaled up
2x (nearest, so the pixels stay the model's) and every second frame is kept (15 fps) to keep the file small.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
CASES = 4  # the gate cycles through world.MOTIONS: left, right, up, down
SCALE, EVERY, LABEL_H = 2, 2, 14


def main(out: Path) -> None:
    from framepack_turbo import FramePack
    from framepack_turbo.train import ship, world

    fp = FramePack.load("tiny", device="cpu", resolution=64)
    tiles = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, scene in enumerate(ship.held_out_scenes(CASES)):
            start = world.render(scene, 1, 64)[0]
            result = fp.generate(start, scene.prompt, seconds=3.6, resolution=64, seed=i, out=Path(tmp) / f"{i}.mp4")
            print(f"{scene.prompt!r}: the clip shows {world.observed_motion(result.frames, scene.color)!r}")
            tiles.append(_labelled(result.frames[::EVERY], scene.prompt.split(" ", 3)[3]))  # "moves left"
    top, bottom = np.concatenate(tiles[:2], axis=2), np.concatenate(tiles[2:], axis=2)
    grid = np.concatenate([top, bottom], axis=1)
    frames = [Image.fromarray(f) for f in grid]
    out.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(out, save_all=True, append_images=frames[1:], duration=1000 * EVERY // 30, loop=0, quality=80)
    print(f"{out}: {len(frames)} frames, {grid.shape[2]}x{grid.shape[1]}, {out.stat().st_size // 1024} KB")


def _labelled(frames: np.ndarray, label: str) -> np.ndarray:
    """The clip scaled up, with its prompt written under it."""
    big = frames.repeat(SCALE, axis=1).repeat(SCALE, axis=2)
    strip = Image.new("RGB", (big.shape[2], LABEL_H), "white")
    ImageDraw.Draw(strip).text((4, 1), label, fill="black")
    strip = np.broadcast_to(np.asarray(strip), (len(big), LABEL_H, big.shape[2], 3))
    return np.concatenate([big, strip], axis=1)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "docs" / "tiny-demo.webp"))
