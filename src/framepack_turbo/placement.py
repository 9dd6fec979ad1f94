"""Where the models live while a job runs: the decision, made once per run from the settings and the
machine (MEMORY_MODE, --use-memory-v2, GPU_MEMORY_PRESERVATION, HIGH_VRAM_THRESHOLD_GB).

Torch-free: `framepack doctor`, the compatibility rules and the plan read it without a model. The
plan records the decision; the placement pass (optim/offload.py) applies exactly that decision and
the generator's out-of-memory step-down records each later change.

Modes, from most to least GPU memory:

- `high-vram`: everything resident on the GPU (FramePack's choice above 60 GB free).
- `v1`, FramePack's behaviour: models live on the host; the encoders and the VAE move to the GPU only
  while they run; as many transformer blocks as fit while keeping `gpu_memory_preservation` GB free
  stay resident, the others move in on demand (diffusers group offloading, no stream).
- `v2`: every transformer block streamed from pinned host memory, the next one prefetched on a side
  CUDA stream; encoders and VAE as in v1.
- `cpu`: no CUDA device; everything stays where it is.

`auto` picks high-vram when free VRAM is above HIGH_VRAM_THRESHOLD_GB, else v1 (v2 with --use-memory-v2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from framepack_turbo.hardware import Hardware
    from framepack_turbo.settings import Settings

Mode = Literal["cpu", "high-vram", "v1", "v2"]
OFFLOADING: tuple[str, ...] = ("v1", "v2")  # modes that keep models on the host between uses
STEP_DOWN: dict[str, str] = {"high-vram": "v1", "v1": "v2"}


@dataclass(frozen=True)
class PlacementConfig:
    """`mode`: auto, high-vram, v1 or v2. `preserve_gb`: GB v1 keeps free on the GPU.
    `high_vram_gb`: free VRAM above which auto keeps everything resident."""

    mode: Literal["auto", "high-vram", "v1", "v2"] = "auto"
    preserve_gb: float = 6.0
    high_vram_gb: float = 60.0


@dataclass(frozen=True)
class Placement:
    mode: Mode
    reason: str

    @property
    def offloads(self) -> bool:
        return self.mode in OFFLOADING

    def to_dict(self) -> dict[str, str]:
        return {"mode": self.mode, "reason": self.reason}


def choose(config: PlacementConfig, cuda: bool, free_gb: float | None) -> Placement:
    """The mode for this run, and why (shown by `framepack doctor` and recorded in the sidecar)."""
    if not cuda:
        return Placement("cpu", "no CUDA device: every model stays on the CPU, nothing is offloaded")
    if config.mode != "auto":
        return Placement(config.mode, f"set by the settings (MEMORY_MODE / --use-memory-v2): {config.mode}")
    free = free_gb or 0.0
    if free > config.high_vram_gb:
        return Placement(
            "high-vram", f"{free:.1f} GB free > HIGH_VRAM_THRESHOLD_GB {config.high_vram_gb:g}: all resident"
        )
    return Placement(
        "v1",
        f"{free:.1f} GB free <= HIGH_VRAM_THRESHOLD_GB {config.high_vram_gb:g}: on-demand moves, "
        f"{config.preserve_gb:g} GB kept free (FramePack's mode; --use-memory-v2 streams blocks instead)",
    )


def config_from(settings: Settings) -> PlacementConfig:
    mode = "v2" if settings.use_memory_v2 and settings.memory_mode == "auto" else settings.memory_mode
    return PlacementConfig(mode, settings.gpu_memory_preservation, settings.high_vram_threshold_gb)


def decide(settings: Settings, hardware: Hardware) -> Placement:
    """The placement this run gets on this machine: CUDA only when the machine has it and the run's
    device (DEVICE, unset: CUDA when present) is a CUDA device."""
    cuda = hardware.cuda and (settings.device is None or settings.device.startswith("cuda"))
    return choose(config_from(settings), cuda, hardware.free_vram_gb)
