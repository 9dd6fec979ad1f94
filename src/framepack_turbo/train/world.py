"""A procedural video world for training the shipped tiny model: one coloured shape on a textured
background, moving left, right, up, down, growing, shrinking or staying still at a set speed, with a
prompt that says so ("the red circle moves right"). Everything comes from a seed: no downloads.

Backgrounds are low-saturation, low-frequency textures (soft waves, gradients, blotches) so the object's
colour stands out and a VAE small enough to train on a laptop CPU can keep them (sharp stripes and
checks held a first VAE to 22 dB and cost the object its colour);
`color_centroid` finds the object again in a generated clip by that colour, which is how the quality
gate checks that the model moved the named object in the named direction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 210, 40),
}
SHAPES = ("circle", "square", "triangle")
MOTIONS = ("left", "right", "up", "down", "grow", "shrink", "still")
# Unit direction per motion, in pixels per frame times the speed; (dx, dy, d_size)
_STEP = {
    "left": (-1, 0, 0),
    "right": (1, 0, 0),
    "up": (0, -1, 0),
    "down": (0, 1, 0),
    "grow": (0, 0, 1),
    "shrink": (0, 0, -1),
    "still": (0, 0, 0),
    # Not among MOTIONS, so the shipped model never saw it: the motion the shipped LoRA teaches (train/lora.py)
    "diagonal": (0.7071067811865476, -0.7071067811865476, 0),
}


@dataclass(frozen=True)
class Scene:
    color: str
    shape: str
    motion: str
    speed: float  # pixels per frame (size: radius pixels per frame) at 64 px; scaled with the frame size
    x: float  # start centre, as a fraction of the frame
    y: float
    radius: float  # start half-size, as a fraction of the frame
    background: int  # seed of the texture
    # Later motions, as (from frame, motion): the object changes what it does mid-clip, as a timestamped
    # prompt asks ("[0s: ... moves right] [2.4s: ... moves left]").
    changes: tuple[tuple[int, str], ...] = ()

    @property
    def prompt(self) -> str:
        """The prompt of the first motion."""
        return prompt_of(self.color, self.shape, self.motion)

    def motion_at(self, frame: int) -> str:
        return next((m for at, m in reversed(self.changes) if frame >= at), self.motion)

    def prompt_at(self, frame: int) -> str:
        return prompt_of(self.color, self.shape, self.motion_at(frame))


def prompt_of(color: str, shape: str, motion: str) -> str:
    verb = {"grow": "grows", "shrink": "shrinks", "still": "stays still", "diagonal": "moves diagonally"}.get(
        motion, f"moves {motion}"
    )
    return f"the {color} {shape} {verb}"


# The README demo's scene (examples/red-circle.png is its first frame) and the bench's input on `tiny`.
DEMO_SCENE = Scene("red", "circle", "right", speed=0.35, x=0.25, y=0.5, radius=0.13, background=1346229104)


def random_scene(rng: np.random.Generator, frames: int, motion: str | None = None) -> Scene:
    """A scene whose object stays inside the frame (and visible) for `frames` frames; on a long clip
    the speed is lowered until it does."""
    motion = motion or str(rng.choice(MOTIONS))
    dx, dy, ds = _STEP[motion]
    radius = float(rng.uniform(0.09, 0.14)) if ds >= 0 else float(rng.uniform(0.16, 0.22))
    speed = float(rng.uniform(0.25, 0.5))  # 64 px frame: 8-16 px per 33-frame section
    # the largest travel (fraction of the frame over the clip) that keeps the object in view
    if ds > 0:
        limit = 2 * (0.3 - radius)  # half-size grows by travel/2, up to 0.3 of the frame
    elif ds < 0:
        limit = 2 * (radius - 0.06)  # shrinks by travel/2, down to 0.06
    else:
        limit = 1 - 2 * (radius + 0.02) if (dx or dy) else 1.0
    speed = min(speed, 0.95 * limit * 64 / max(frames - 1, 1))
    travel = speed * (frames - 1) / 64
    end_radius = radius + ds * travel * 0.5
    margin = max(radius, end_radius) + 0.02
    lo_x, hi_x = margin - min(dx, 0) * travel, 1 - margin - max(dx, 0) * travel
    lo_y, hi_y = margin - min(dy, 0) * travel, 1 - margin - max(dy, 0) * travel
    return Scene(
        color=str(rng.choice(list(COLORS))),
        shape=str(rng.choice(SHAPES)),
        motion=motion,
        speed=speed,
        x=float(rng.uniform(lo_x, hi_x)),
        y=float(rng.uniform(lo_y, hi_y)),
        radius=radius,
        background=int(rng.integers(2**31)),
    )


def background(seed: int, size: int) -> np.ndarray:
    """A muted texture (H, W, 3) float in [0, 255]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = rng.uniform(70, 170)
    tint = rng.uniform(-18, 18, size=3)
    kind = rng.integers(3)
    if kind == 0:  # soft waves
        angle, period = rng.uniform(0, np.pi), rng.uniform(0.35, 0.7)
        pattern = np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period)
    elif kind == 1:  # a gradient across the frame
        angle = rng.uniform(0, 2 * np.pi)
        pattern = 2 * ((xx - 0.5) * np.cos(angle) + (yy - 0.5) * np.sin(angle))
    else:  # blotches: a few smooth bumps
        pattern = np.zeros_like(xx)
        for _ in range(5):
            cx, cy, s = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.1, 0.3)
            pattern += rng.choice([-1, 1]) * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * s * s))
    gray = base + rng.uniform(12, 25) * pattern
    return np.clip(gray[..., None] + tint, 0, 255)


def _mask(shape: str, size: int, cx: float, cy: float, r: float) -> np.ndarray:
    """Anti-aliased coverage (H, W) in [0, 1] of the shape centred at (cx, cy) pixels, half-size r pixels."""
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    if shape == "circle":
        dist = np.hypot(xx - cx, yy - cy) - r
    elif shape == "square":
        dist = np.maximum(abs(xx - cx), abs(yy - cy)) - r
    else:  # triangle pointing up, inscribed in the square of half-size r
        top = cy - r
        slope = (yy - top) / (2 * r)  # 0 at the apex, 1 at the base
        half_width = slope * r
        dist = np.maximum(np.maximum(abs(xx - cx) - half_width, top - yy), yy - (cy + r))
    return np.clip(0.5 - dist, 0, 1)


def trajectory(scene: Scene, frames: int, size: int = 64) -> np.ndarray:
    """(frames, 3): the object's centre x, y and half-size in pixels, per frame."""
    step = scene.speed * size / 64  # pixels per frame at this size
    t = np.arange(frames, dtype=np.float64)
    if not scene.changes:  # one motion: the closed form (the shipped model's clips, bit for bit)
        dx, dy, ds = _STEP[scene.motion]
        cx, cy, r = (
            scene.x * size + dx * step * t,
            scene.y * size + dy * step * t,
            scene.radius * size + ds * step * t * 0.5,
        )
    else:  # piecewise: each frame moves by the motion of the frame it leaves
        moves = np.array([_STEP[scene.motion_at(f)] for f in range(max(frames - 1, 0))], dtype=np.float64).reshape(
            -1, 3
        )
        offsets = np.concatenate([np.zeros((1, 3)), np.cumsum(moves, axis=0)]) * step
        cx = scene.x * size + offsets[:frames, 0]
        cy = scene.y * size + offsets[:frames, 1]
        r = scene.radius * size + offsets[:frames, 2] * 0.5
    return np.stack([cx, cy, np.maximum(r, 1.5)], axis=1)


def in_view(scene: Scene, frames: int, margin: float = 0.02) -> bool:
    """Whether the object stays whole inside the frame, and between the sizes the world uses, throughout."""
    path = trajectory(scene, frames, 64) / 64
    edge = path[:, 2] + margin
    inside = (path[:, 0] >= edge) & (path[:, 0] <= 1 - edge) & (path[:, 1] >= edge) & (path[:, 1] <= 1 - edge)
    return bool(inside.all() and path[:, 2].min() >= 0.06 - 1e-9 and path[:, 2].max() <= 0.3 + 1e-9)


def changing_scene(rng: np.random.Generator, frames: int, at: int, first: str, then: str, tries: int = 400) -> Scene:
    """A scene doing `first` until frame `at`, then `then`, that stays in view for `frames` frames: drawn as
    `random_scene` draws them and retried until the path fits, each try a little slower (a size change
    next to a move also draws a mid-sized object, so it has room to grow or shrink)."""
    sized = {first, then} & {"grow", "shrink"}
    for attempt in range(tries):
        base = random_scene(rng, frames, first)
        radius = float(rng.uniform(0.12, 0.18)) if sized else base.radius
        speed = base.speed * 0.99**attempt
        scene = Scene(**{**base.__dict__, "radius": radius, "speed": speed, "changes": ((at, then),)})
        if in_view(scene, frames):
            return scene
    raise ValueError(f"no {first}-then-{then} scene of {frames} frames fits the frame")


def render(scene: Scene, frames: int, size: int = 64) -> np.ndarray:
    """The clip, (frames, size, size, 3) uint8."""
    bg = background(scene.background, size)
    color = np.array(COLORS[scene.color], dtype=np.float64)
    out = np.empty((frames, size, size, 3), np.uint8)
    for t, (cx, cy, r) in enumerate(trajectory(scene, frames, size)):
        m = _mask(scene.shape, size, cx, cy, r)[..., None]
        out[t] = np.round(bg * (1 - m) + color * m).astype(np.uint8)
    return out


def color_centroid(frames: np.ndarray, color: str, tolerance: float = 60.0) -> np.ndarray:
    """Per frame, (x, y, area) of the pixels within `tolerance` (RGB distance) of the named colour;
    NaN where none is found. Frames (T, H, W, 3) uint8."""
    target = np.array(COLORS[color], dtype=np.float32)
    dist = np.linalg.norm(frames.astype(np.float32) - target, axis=-1)
    out = np.full((len(frames), 3), np.nan)
    yy, xx = np.mgrid[0 : frames.shape[1], 0 : frames.shape[2]]
    for t, near in enumerate(dist < tolerance):
        area = near.sum()
        if area:
            out[t] = (xx[near].mean(), yy[near].mean(), area)
    return out


def observed_motion(frames: np.ndarray, color: str, min_shift: float = 2.0) -> str:
    """Which of MOTIONS the named colour's blob did over the clip (the first vs the last quarter)."""
    track = color_centroid(frames, color)
    quarter = max(len(frames) // 4, 1)
    first, last = np.nanmean(track[:quarter], axis=0), np.nanmean(track[-quarter:], axis=0)
    if np.isnan(first).any() or np.isnan(last).any():
        return "lost"
    dx, dy = last[0] - first[0], last[1] - first[1]
    growth = np.sqrt(last[2] / first[2]) if first[2] > 0 else 1.0  # ratio of sizes
    size_shift = (growth - 1) * np.sqrt(first[2])  # pixels of half-size gained, comparable to a move
    moves = {"right": dx, "left": -dx, "down": dy, "up": -dy, "grow": size_shift, "shrink": -size_shift}
    best = max(moves, key=moves.get)
    return best if moves[best] >= min_shift else "still"
