"""FramePack's section schedule and packing layout, as small pure functions.

A section samples `window` latent frames (`window*4-3` pixel frames at 30 fps). The transformer sees the
noisy window together with clean context frames (the start image, recent history, and 2x / 4x
down-sampled older history), each tagged with a frame index that places it in time for RoPE.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from framepack_turbo.constants import FPS, LATENT_FRAMES_TO_PIXELS

Variant = Literal["inverted", "f1"]
VARIANTS: tuple[str, ...] = ("inverted", "f1")

CONTEXT_1X, CONTEXT_2X, CONTEXT_4X = 1, 2, 16  # clean history frames at full, 2x and 4x compression
CONTEXT_LATENTS = CONTEXT_1X + CONTEXT_2X + CONTEXT_4X


def history_kept(window: int) -> int:
    """Latent frames of history a job keeps: the context a section reads, or the two windows a decode spans."""
    return max(CONTEXT_LATENTS, 2 * window + 1)


def section_count(seconds: float, window: int) -> int:
    """Number of sections for a clip: FramePack's `max(round(seconds*30 / (window*4)), 1)`."""
    return int(max(round(seconds * FPS / (window * LATENT_FRAMES_TO_PIXELS)), 1))


def pixel_frames_per_window(window: int) -> int:
    return window * LATENT_FRAMES_TO_PIXELS - 3


def inverted_paddings(n_sections: int) -> list[int]:
    """Padding (in windows) of each section, in generation order (last section of the clip first).

    FramePack's schedule: `n-1, ..., 1, 0`; above 4 sections it repeats 2 instead of counting up,
    which the FramePack author found to look better than the plain sequence.
    """
    if n_sections > 4:
        return [3] + [2] * (n_sections - 3) + [1, 0]
    return list(reversed(range(n_sections)))


def total_latent_frames(n_sections: int, window: int) -> int:
    """Latent frames of the finished clip: every section's window plus the start frame."""
    return n_sections * window + 1


def total_pixel_frames(n_sections: int, window: int) -> int:
    """Pixel frames of the finished clip, in both variants (a 2 s request at window 9 gives 73)."""
    return (total_latent_frames(n_sections, window) - 1) * LATENT_FRAMES_TO_PIXELS + 1


@dataclass(frozen=True)
class PackedIndices:
    """Frame indices (1-D, as diffusers' transformer takes them at batch 1) of each packed group."""

    latents: torch.Tensor  # the noisy window being sampled
    clean: torch.Tensor  # clean 1x frames (start image + nearest history frame)
    clean_2x: torch.Tensor
    clean_4x: torch.Tensor

    def as_lists(self) -> dict[str, list[int]]:
        return {k: getattr(self, k).tolist() for k in ("latents", "clean", "clean_2x", "clean_4x")}


def inverted_indices(padding: int, window: int) -> PackedIndices:
    """Layout `[1 pre | padding*window blank | window noisy | 1 post | 2 2x | 16 4x]` on one time axis.

    The blank stretch is never fed to the model: it only pushes the noisy window away from the start
    frame so that the model knows how far in time the section is from it.
    """
    blank = padding * window
    sizes = [1, blank, window, CONTEXT_1X, CONTEXT_2X, CONTEXT_4X]
    pre, _blank, noisy, post, two_x, four_x = torch.arange(sum(sizes)).split(sizes)
    return PackedIndices(latents=noisy, clean=torch.cat([pre, post]), clean_2x=two_x, clean_4x=four_x)


def f1_indices(window: int) -> PackedIndices:
    """Layout `[1 start | 16 4x | 2 2x | 1 1x | window noisy]`: history before, the new window after."""
    sizes = [1, CONTEXT_4X, CONTEXT_2X, CONTEXT_1X, window]
    start, four_x, two_x, one_x, noisy = torch.arange(sum(sizes)).split(sizes)
    return PackedIndices(latents=noisy, clean=torch.cat([start, one_x]), clean_2x=two_x, clean_4x=four_x)


@dataclass(frozen=True)
class Section:
    """One step of the section loop, in generation order."""

    number: int  # 0-based, in generation order
    total: int
    padding: int  # inverted only: blank windows between the start frame and this section; 0 for F1
    is_last: bool  # the final section generated (inverted: the clip's first frames)
    indices: PackedIndices


def plan_sections(variant: Variant, seconds: float, window: int) -> list[Section]:
    """Every section of a job, in the order they are generated."""
    n = section_count(seconds, window)
    if variant == "inverted":
        paddings = inverted_paddings(n)
        return [Section(i, n, p, p == 0, inverted_indices(p, window)) for i, p in enumerate(paddings)]
    if variant == "f1":
        return [Section(i, n, 0, i == n - 1, f1_indices(window)) for i in range(n)]
    raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
