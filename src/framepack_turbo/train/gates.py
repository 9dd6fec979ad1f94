"""The timeline gates of the trained tiny model (issue 24): does a clip do what its timeline asks?

Scenes are drawn like the direction gate's (ship.held_out_scenes: the training clips' speeds and sizes,
random colour, shape and background) from seeds no training run or recipe choice used, and the object is
found again by its colour (world.color_centroid):

- prompt change: "[0s: the X moves right] [1.8s: the X moves left]" on a 3.6 s clip. 1.8 s snaps to the
  boundary at 2.4 s (half up, and the clip says so), so the object must move right before 2.4 s and left
  after it; both variants, at the defaults and with --prompt-change-cfg CHANGE_CFG.
- end frame (inverted): the object starts near one edge and the end image shows it near the opposite one;
  the last frame's object must be within 8 px of the end image's, and nearer than without the end image.
- keyframe (inverted): a 4.8 s clip with a keyframe at its middle (2.4 s, a boundary) showing the object
  where the scene has it then; the object at that frame must be within 8 px of the keyframe's, and nearer
  than without the keyframe (the end frame's measure, at the keyframe's frame).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from framepack_turbo.train import world

TIMELINE_SEED = 95  # held out: drawn once, after every choice was made
DEVELOPMENT_SEED = 94  # the set the fine-tune's recipe was looked at on
GATE_SCENES = 20
WITHIN_PX = 8.0
MIN_SHIFT_PX = 2.0
# --prompt-change-cfg of the guided prompt-change gate: the scale chosen on the development seed (94), where
# 6 turned 5 of 8 F1 scenes and 9 turned 7 of 8 (the fine-tune's weights)
CHANGE_CFG = 9.0
FPS = 30


def _position(frames: np.ndarray, color: str, at: int, span: int = 3) -> np.ndarray:
    """The object's (x, y) around frame `at` (a few frames' mean: one frame's blob is noisy)."""
    lo, hi = max(at - span // 2, 0), min(at + span // 2 + 1, len(frames))
    track = world.color_centroid(frames[lo:hi], color)[:, :2]
    return np.nanmean(track, axis=0) if np.isfinite(track).any() else np.full(2, np.nan)


def _scenes(seed: int, count: int, make) -> list:
    rng = np.random.default_rng([seed, 24])
    return [make(rng, i) for i in range(count)]


def _translation_scene(rng: np.random.Generator, frames: int, motion: str, travel: float) -> world.Scene:
    """A scene moving `motion` by `travel` of the frame over `frames` frames, from near one edge."""
    radius = float(rng.uniform(0.09, 0.13))
    edge = radius + 0.05
    dx, dy, _ = world._STEP[motion]
    start = {1: edge, -1: 1 - edge, 0: float(rng.uniform(0.3, 0.7))}
    return world.Scene(
        color=str(rng.choice(list(world.COLORS))),
        shape=str(rng.choice(world.SHAPES)),
        motion=motion,
        speed=travel * 64 / (frames - 1),
        x=start[dx],
        y=start[dy],
        radius=radius,
        background=int(rng.integers(2**31)),
    )


def prompt_change(
    fp, variant: str, seed: int = TIMELINE_SEED, count: int = GATE_SCENES, out_dir=None, steps=25, change_cfg=1.0
):
    change_frame = 72  # 1.8 s asked, 2.4 s where it lands (the record's timeline says so)

    def make(rng, i):
        return world.changing_scene(rng, 145, change_frame, "right", "left")

    cases = []
    with tempfile.TemporaryDirectory(prefix="framepack-gate-") as tmp:
        for i, scene in enumerate(_scenes(seed, count, make)):
            thing = f"the {scene.color} {scene.shape}"
            prompt = f"[0s: {thing} moves right] [1.8s: {thing} moves left]"
            out = Path(out_dir or tmp) / f"change-{variant}-cfg{change_cfg:g}-{i:02d}.mp4"
            start = world.render(scene, 1, 64)[0]
            r = _clip(fp, start, prompt, out, 3.6, steps, i, variant=variant, prompt_change_cfg=change_cfg)
            starts = r.sidecar["timeline"]["prompts"][1]["starts_s"]
            at = int(round(starts * FPS))
            x0, xm, x1 = (_position(r.frames, scene.color, f)[0] for f in (0, at, len(r.frames) - 1))
            first, second = float(xm - x0), float(x1 - xm)
            ok = bool(first >= MIN_SHIFT_PX and second <= -MIN_SHIFT_PX)
            cases.append({"prompt": prompt, "change_s": starts, "first_dx": first, "second_dx": second, "ok": ok})
    return _summary(cases, variant=variant, seconds=3.6, steps=steps, prompt_change_cfg=change_cfg)


def end_frame(fp, seed: int = TIMELINE_SEED, count: int = GATE_SCENES, out_dir=None, steps=25):
    frames = 109  # 3.6 s: 3 sections of 36 frames and the start frame

    def make(rng, i):
        return _translation_scene(rng, frames, ("right", "left", "down", "up")[i % 4], float(rng.uniform(0.45, 0.55)))

    cases = []
    with tempfile.TemporaryDirectory(prefix="framepack-gate-") as tmp:
        for i, scene in enumerate(_scenes(seed, count, make)):
            clip = world.render(scene, frames, 64)
            end_path = Path(tmp) / f"end-{i:02d}.png"
            _save(clip[-1], end_path)
            target = _position(clip[-1:], scene.color, 0)
            errors = {}
            for name, extra in (("with", {"end_image": str(end_path)}), ("without", {})):
                out = Path(out_dir or tmp) / f"end-{name}-{i:02d}.mp4"
                r = _clip(fp, clip[0], scene.prompt, out, 3.6, steps, i, variant="inverted", **extra)
                errors[name] = float(np.linalg.norm(_position(r.frames, scene.color, len(r.frames) - 1) - target))
            cases.append(_near(scene.prompt, errors))
    return _summary(cases, variant="inverted", seconds=3.6, steps=steps)


def keyframe(fp, seed: int = TIMELINE_SEED, count: int = GATE_SCENES, out_dir=None, steps=25):
    frames, middle = 145, 72  # 4.8 s; the keyframe at 2.4 s, the boundary between sections 2 and 3

    def make(rng, i):
        return _translation_scene(rng, frames, ("right", "left", "down", "up")[i % 4], float(rng.uniform(0.5, 0.62)))

    cases = []
    with tempfile.TemporaryDirectory(prefix="framepack-gate-") as tmp:
        for i, scene in enumerate(_scenes(seed + 1000, count, make)):
            clip = world.render(scene, frames, 64)
            key_path = Path(tmp) / f"key-{i:02d}.png"
            _save(clip[middle], key_path)
            target = _position(clip[middle : middle + 1], scene.color, 0)
            errors = {}
            for name, extra in (("with", {"keyframes": ((2.4, str(key_path)),)}), ("without", {})):
                out = Path(out_dir or tmp) / f"key-{name}-{i:02d}.mp4"
                r = _clip(fp, clip[0], scene.prompt, out, 4.8, steps, i, variant="inverted", **extra)
                errors[name] = float(np.linalg.norm(_position(r.frames, scene.color, middle) - target))
            cases.append(_near(scene.prompt, errors))
    return _summary(cases, variant="inverted", seconds=4.8, steps=steps)


def _near(prompt: str, errors: dict[str, float]) -> dict[str, Any]:
    """A case of a gate on a target frame: within 8 px of the target with the control, and nearer than
    without it (where the run without lost the object, any found position is nearer)."""
    return {
        "prompt": prompt,
        "error_px": errors["with"],
        "without_px": errors["without"],
        "ok": bool(errors["with"] <= WITHIN_PX),
        "nearer": bool(np.isfinite(errors["with"]) and not errors["without"] <= errors["with"]),
    }


def _clip(fp, start: np.ndarray, prompt: str, out: Path, seconds: float, steps: int, seed: int, **options):
    """One gate clip: 64 px (the size tiny knows), the scene's index as the seed."""
    return fp.generate(
        start, prompt, out=out, seconds=seconds, steps=steps, seed=seed, resolution=64, keep_frames=True, **options
    )


def _save(frame: np.ndarray, path: Path) -> None:
    from PIL import Image

    Image.fromarray(frame).save(path)


def _summary(cases: list[dict[str, Any]], **settings) -> dict[str, Any]:
    for case in cases:  # NaN (the object lost) reads as a miss, and JSON has no NaN
        for key, value in case.items():
            if isinstance(value, float):
                case[key] = None if not np.isfinite(value) else round(value, 2)
    summary = {**settings, "scenes": len(cases), "accuracy": float(np.mean([c["ok"] for c in cases])), "cases": cases}
    if cases and all("nearer" in c for c in cases):  # the gates on a target frame (`_near`)
        summary["nearer_in_all"] = all(c["nearer"] for c in cases)
    return summary


def brief(result: dict[str, Any]) -> dict[str, Any]:
    """The accuracies of `timeline_gates`' result, without the cases."""
    return {
        "seed": result["seed"],
        "prompt_change": {v: g["accuracy"] for v, g in result["prompt_change"].items()},
        "prompt_change_guided": {v: g["accuracy"] for v, g in result.get("prompt_change_guided", {}).items()},
        "end_frame": result["end_frame"]["accuracy"],
        "end_frame_nearer_in_all": result["end_frame"]["nearer_in_all"],
        "keyframe": result["keyframe"]["accuracy"],
        "keyframe_nearer_in_all": result["keyframe"].get("nearer_in_all"),
    }


def timeline_gates(fp, seed: int = TIMELINE_SEED, count: int = GATE_SCENES, out_dir=None) -> dict[str, Any]:
    """Every timeline gate, as the manifest records them."""
    return {
        "seed": seed,
        "prompt_change": {v: prompt_change(fp, v, seed, count, out_dir) for v in ("inverted", "f1")},
        "prompt_change_guided": {
            v: prompt_change(fp, v, seed, count, out_dir, change_cfg=CHANGE_CFG) for v in ("inverted", "f1")
        },
        "end_frame": end_frame(fp, seed, count, out_dir),
        "keyframe": keyframe(fp, seed, count, out_dir),
    }
