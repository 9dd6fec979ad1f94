"""What one generation asks for, validated at the door, and the start image loaded safely.

Defaults are FramePack's: 5 s, seed 31337, window 9, 25 steps, distilled guidance 10, real CFG 1
(off), rescale 0, 640 buckets, CRF 16.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from framepack_turbo.constants import (
    CRF_ZERO,
    MAX_CRF,
    MAX_IMAGE_SIDE,
    MAX_RESOLUTION,
    MAX_SECONDS,
    MIN_CRF,
    MIN_IMAGE_SIDE,
    MIN_RESOLUTION,
)
from framepack_turbo.errors import InputError
from framepack_turbo.pipeline.sections import VARIANTS

# The metadata key of the options that name files on this machine (images, a video): `PATH_OPTIONS`.
PATH = {"path": True}
# Options the settings also hold (a job's defaults), where the settings name them otherwise
OPTION_SETTING_NAMES = {"distilled_guidance": "gs", "guidance_rescale": "rs"}


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
    # Over time (pipeline/timeline.py): the prompt itself may carry [Ns: ...] tags too.
    prompt_at: tuple[tuple[float, str], ...] = ()  # (seconds, text): --prompt-at TIME:TEXT
    prompt_blend_sections: int = 0  # sections a prompt change blends over (0: a hard cut)
    prompt_change_cfg: float = 1.0  # guidance away from the previous prompt where it changes (1: off)
    end_image: str | None = field(default=None, metadata=PATH)  # inverted: the clip ends on this image
    end_strength: float = 1.0  # how much of the end image's latent the first section sees
    image_embed_blend: bool = False  # blend the start and end images' SigLIP embeddings across sections
    keyframes: tuple[tuple[float, str], ...] = field(
        default=(), metadata=PATH
    )  # (seconds, image path): inverted anchors
    start_color: str | None = None  # text-to-video: the blank start frame's colour (or "noise"); no image
    video: str | None = field(
        default=None, metadata=PATH
    )  # extension: continue this clip (pipeline/extend.py); `seconds` is the new part

    def __post_init__(self) -> None:
        # (seconds, text/path) pairs arrive as lists from JSON (a job's stored request, a clip's metadata)
        object.__setattr__(self, "prompt_at", tuple((float(s), str(t)) for s, t in self.prompt_at))
        object.__setattr__(self, "keyframes", tuple((float(s), str(p)) for s, p in self.keyframes))
        check_text(self.prompt, "prompt")
        check_text(self.negative_prompt, "negative prompt")
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
        _check(self.crf != 0, f"crf=0: {CRF_ZERO}")
        _check(0 <= self.end_strength <= 1, f"end strength={self.end_strength}: must be in [0, 1]")
        _check(self.prompt_blend_sections >= 0, f"prompt blend sections={self.prompt_blend_sections}: must be >= 0")
        _check(
            math.isfinite(self.prompt_change_cfg) and self.prompt_change_cfg >= 1,
            f"prompt change cfg={self.prompt_change_cfg}: must be >= 1 (1 turns it off)",
        )
        for seconds, text in self.prompt_at:
            check_text(text, f"prompt at {seconds:g}s")
        if self.start_color is not None:
            start_color_rgb(self.start_color)  # refuses an unknown colour now
        _check(
            not (self.video and self.start_color),
            "--video continues a clip from its last frame; --start-color is for a clip without any: drop one",
        )
        _check(
            MIN_CRF <= self.crf <= MAX_CRF,
            f"crf={self.crf}: must be in [{MIN_CRF}, {MAX_CRF}] (lower is better quality)",
        )

    def to_dict(self) -> dict:
        return asdict(self)


# The options that name a file on this machine (a clip's record is never a source of them: pipeline/recipe.py)
PATH_OPTIONS = frozenset(f.name for f in fields(GenerateOptions) if f.metadata.get("path"))


def start_color_rgb(color: str) -> tuple[int, int, int] | None:
    """A text-to-video start colour: a name or #rrggbb as RGB, or None for "noise"."""
    from PIL import ImageColor

    if color == "noise":
        return None
    try:
        return ImageColor.getrgb(color)[:3]
    except ValueError:
        raise InputError(f"start color {color!r}: a colour name, #rrggbb, or noise") from None


def blank_start(color: str, resolution: int, seed: int) -> np.ndarray:
    """The start frame of a text-to-video job: a square of one colour, or seeded noise, at the resolution."""
    rgb = start_color_rgb(color)
    if rgb is None:
        return np.random.default_rng(seed).integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)
    return np.full((resolution, resolution, 3), rgb, dtype=np.uint8)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise InputError(message)


def check_text(text: str, what: str) -> None:
    """Text the tokenizers can take: a str that is valid Unicode (no lone surrogates, which is what bytes
    that are not UTF-8 become in a command line)."""
    _check(isinstance(text, str), f"{what} must be text, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(
            f"{what} is not valid UTF-8 text (character {exc.start + 1} of {len(text)}): write it in UTF-8"
        ) from None


def check_sides(width: int, height: int, what: str = "image") -> None:
    if min(width, height) < MIN_IMAGE_SIDE or max(width, height) > MAX_IMAGE_SIDE:
        raise InputError(
            f"{what} is {width}x{height}: each side must be between {MIN_IMAGE_SIDE} and {MAX_IMAGE_SIDE} pixels"
        )


def open_checked(file, what: str = "image", name: str | None = None):
    """`PIL.Image.open` with the sides checked from the header, before any pixel is decoded: a small file
    that decodes to gigabytes (a decompression bomb) is refused for the cost of its header. `what` names it
    in the messages; `name` (a path) is added where the file cannot be read."""
    from PIL import Image, UnidentifiedImageError

    where = f": {name}" if name else ""
    try:
        with warnings.catch_warnings():  # the sides are checked next: PIL's pixel-count warning says nothing more
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(file)
    except Image.DecompressionBombError:
        raise InputError(f"{what}{where} is far too large (more than {Image.MAX_IMAGE_PIXELS * 2} pixels)") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InputError(f"{what}: not a readable image{where} ({type(exc).__name__})") from None
    try:
        check_sides(*im.size, what)
    except InputError:
        im.close()
        raise
    return im


def decode_rgb(im, what: str = "image", name: str | None = None):
    """The opened image's pixels as RGB (PIL), closing it; a truncated or broken file is an InputError."""
    from PIL import Image

    where = f": {name}" if name else ""
    try:
        with im:
            im.load()
            return im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InputError(f"{what}: not a readable image{where} ({type(exc).__name__})") from None


def load_image(source) -> np.ndarray:
    """A path, PIL image or HWC uint8 array -> RGB uint8 array, with sides checked (from the file's header
    before decoding, for a path)."""
    from PIL import Image

    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise InputError(f"image not found: {path}")
        if not path.is_file():
            raise InputError(f"image path is not a file: {path}")
        source = decode_rgb(open_checked(path, "image", str(path)), "image", str(path))
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
    check_sides(w, h)
    return np.ascontiguousarray(array)
