"""What one generation asks for, validated at the door, and the start image loaded safely.

Defaults are FramePack's: 5 s, seed 31337, window 9, 25 steps, distilled guidance 10, real CFG 1
(off), rescale 0, 640 buckets, CRF 16.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from framepack_turbo.constants import MAX_IMAGE_SIDE, MAX_RESOLUTION, MAX_SECONDS, MIN_IMAGE_SIDE, MIN_RESOLUTION
from framepack_turbo.errors import InputError
from framepack_turbo.pipeline.sections import VARIANTS


@dataclass(frozen=True)
class GenerateOptions:
    prompt: str = ""
    negative_prompt: str = ""
    seconds: float = 5.0
    variant: str | None = None  # None: the variant the model preset was trained for
    seed: int = 31337
    steps: int = 25
    window: int = 9  # latent frames per section (FramePack's latent_window_size)
    distilled_guidance: float = 10.0  # "gs": passed to the model as guidance * 1000
    cfg: float = 1.0  # real classifier-free guidance; 1 = off (one model call per step)
    guidance_rescale: float = 0.0
    resolution: int = 640  # bucket base
    crf: int = 16

    def __post_init__(self) -> None:
        _check(isinstance(self.prompt, str), f"prompt must be text, got {type(self.prompt).__name__}")
        _check(
            math.isfinite(self.seconds) and 0 < self.seconds <= MAX_SECONDS,
            f"seconds={self.seconds}: must be > 0 and <= {MAX_SECONDS:g}",
        )
        _check(
            self.variant is None or self.variant in VARIANTS,
            f"variant={self.variant!r}: choose {' or '.join(VARIANTS)}",
        )
        _check(self.steps >= 1, f"steps={self.steps}: must be >= 1")
        _check(self.window >= 1, f"window={self.window}: must be >= 1")
        _check(0 <= self.seed < 2**63, f"seed={self.seed}: must be between 0 and 2^63-1")
        _check(
            math.isfinite(self.distilled_guidance) and self.distilled_guidance >= 0,
            f"gs={self.distilled_guidance}: must be >= 0",
        )
        _check(math.isfinite(self.cfg) and self.cfg >= 1, f"cfg={self.cfg}: must be >= 1 (1 turns real CFG off)")
        _check(0 <= self.guidance_rescale <= 1, f"guidance rescale={self.guidance_rescale}: must be in [0, 1]")
        _check(
            MIN_RESOLUTION <= self.resolution <= MAX_RESOLUTION and self.resolution % 16 == 0,
            f"resolution={self.resolution}: must be a multiple of 16 in [{MIN_RESOLUTION}, {MAX_RESOLUTION}]",
        )
        _check(0 <= self.crf <= 51, f"crf={self.crf}: must be in [0, 51] (lower is better quality)")

    def to_dict(self) -> dict:
        return asdict(self)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise InputError(message)


def load_image(source) -> np.ndarray:
    """A path, PIL image or HWC uint8 array -> RGB uint8 array, with sides checked."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise InputError(f"image not found: {path}")
        if not path.is_file():
            raise InputError(f"image path is not a file: {path}")
        try:
            with Image.open(path) as im:
                im.load()
                source = im.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise InputError(f"not a readable image: {path} ({type(exc).__name__})") from None
    if isinstance(source, Image.Image):
        array = np.asarray(source.convert("RGB"))
    elif isinstance(source, np.ndarray):
        array = source
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=2)
        if array.ndim != 3 or array.shape[2] not in (3, 4):
            raise InputError(f"image array must be HxWx3 (or HxWx4), got shape {array.shape}")
        array = array[..., :3]
        if array.dtype != np.uint8:
            raise InputError(f"image array must be uint8, got {array.dtype}")
    else:
        raise InputError(f"image must be a path, a PIL image or a uint8 array, got {type(source).__name__}")
    h, w = array.shape[:2]
    if min(h, w) < MIN_IMAGE_SIDE or max(h, w) > MAX_IMAGE_SIDE:
        raise InputError(f"image is {w}x{h}: each side must be between {MIN_IMAGE_SIDE} and {MAX_IMAGE_SIDE} pixels")
    return np.ascontiguousarray(array)
