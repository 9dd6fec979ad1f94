"""Events a generation emits, as plain data. The CLI and the UI only read these; no markup here."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class StageStarted:
    stage: str  # "text_encode", "image_encode", "sampling", ...


@dataclass(frozen=True)
class StepProgress:
    step: int  # 1-based within the section
    steps: int
    section: int  # 1-based, generation order
    sections: int
    elapsed_s: float
    eta_s: float  # seconds left: measured step and decode times times what remains
    denoised: torch.Tensor | None = field(default=None, repr=False, compare=False)
    preview_factors: Any = field(default=None, repr=False, compare=False)  # the model's latent -> RGB map
    rendered: np.ndarray | None = field(default=None, repr=False, compare=False)  # preview_frames, made already

    def detached(self) -> StepProgress:
        """This event as plain data for another process: the preview rendered, no tensors (a Ray worker sends it)."""
        return replace(self, denoised=None, preview_factors=None, rendered=self.preview_frames())

    @property
    def fraction(self) -> float:
        return ((self.section - 1) * self.steps + self.step) / (self.sections * self.steps)

    def preview_frames(self) -> np.ndarray | None:
        """The current x0 estimate as rough RGB frames (T, h, w, 3) uint8 at latent size, without the VAE."""
        if self.rendered is not None:
            return self.rendered
        if self.denoised is None:
            return None
        from framepack_turbo.pipeline.vae import preview

        rgb = preview(self.denoised.float(), self.preview_factors)[0]  # (3, T, h, w)
        return (rgb.permute(1, 2, 3, 0) * 255).round().to(torch.uint8).cpu().numpy()

    def preview(self) -> np.ndarray | None:
        """`preview_frames` side by side: one strip (h, T*w, 3)."""
        frames = self.preview_frames()
        return None if frames is None else np.concatenate(list(frames), axis=1)


@dataclass(frozen=True)
class SectionDone:
    section: int  # 1-based, generation order
    sections: int
    frames: int  # pixel frames in the video so far
    video_path: Path
    caches: dict[str, dict[str, Any]] = field(default_factory=dict)  # step cache -> this section's decisions
    engines: dict[str, dict[str, Any]] = field(default_factory=dict)  # engine -> provider and calls so far

    def cache_hit_rates(self) -> dict[str, float]:
        """Each step cache's share of reused steps in this section."""
        from framepack_turbo.pipeline.record import hit_rate

        return {name: hit_rate(stats) for name, stats in self.caches.items()}


@dataclass(frozen=True)
class Notice:
    """Something the user should read (a truncated prompt, a fallback); not an error."""

    message: str


@dataclass(frozen=True)
class JobDone:
    status: str  # "complete" or "cancelled"
    video_path: Path | None
    frames: int


Event = StageStarted | StepProgress | SectionDone | Notice | JobDone
EventSink = Callable[[Any], None]


class CancelToken:
    """Set from any thread (Ctrl-C handler, UI button); the generator stops after the current step."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until cancelled (True) or `timeout` seconds pass (False)."""
        return self._event.wait(timeout)
