"""The Python API: `FramePack.load(...)` once, then `.generate(...)` per clip.

    from framepack_turbo import FramePack
    fp = FramePack.load(model="tiny")
    result = fp.generate("cat.png", "a cat walks", seconds=2, steps=4, resolution=128, out="cat.mp4")
    result.frames.shape, result.video_path, result.sidecar["timings"]
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from framepack_turbo.models.loading import ModelBundle, load_bundle
from framepack_turbo.pipeline.events import CancelToken, EventSink
from framepack_turbo.pipeline.generate import Generator, Result
from framepack_turbo.pipeline.options import GenerateOptions

__all__ = ["FramePack", "Result", "default_output_path"]


def default_output_path(directory: str | Path = "outputs") -> Path:
    return Path(directory) / f"framepack_{datetime.now():%Y%m%d_%H%M%S}.mp4"


class FramePack:
    """Loaded models plus the generation entry point. One instance can run many jobs, one at a time."""

    def __init__(self, bundle: ModelBundle) -> None:
        self.bundle = bundle

    @classmethod
    def load(
        cls,
        model: str = "framepack",
        model_dir: str | Path | None = None,
        device: str | torch.device | None = None,
        local_files_only: bool = False,
    ) -> FramePack:
        """Load a preset (`framepack`, `framepack-f1`, `tiny`, `small`) or a local folder laid out like the repos."""
        return cls(load_bundle(model, str(model_dir) if model_dir else None, device, local_files_only))

    def generate(
        self,
        image,
        prompt: str,
        out: str | Path | None = None,
        on_event: EventSink | None = None,
        cancel: CancelToken | None = None,
        settings: dict[str, Any] | None = None,
        **options: Any,
    ) -> Result:
        """Generate a clip from `image` (path, PIL image or uint8 array). `options` are `GenerateOptions` fields."""
        opts = GenerateOptions(prompt=prompt, **options)
        generator = Generator(self.bundle, on_event=on_event, cancel=cancel, settings=settings)
        return generator.run(image, opts, out or default_output_path())
