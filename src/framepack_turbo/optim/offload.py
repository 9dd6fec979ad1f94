"""Memory placement: where the models live while a job runs (MEMORY_MODE, --use-memory-v2,
GPU_MEMORY_PRESERVATION, HIGH_VRAM_THRESHOLD_GB).

Modes, from most to least GPU memory:

- `high-vram`: everything resident on the GPU (FramePack's choice above 60 GB free).
- `v1`, FramePack's behaviour: models live on the host; the text encoders, the image encoder and
  the VAE are moved to the GPU only while they run; as many transformer blocks as fit while
  keeping `gpu_memory_preservation` GB free stay resident, the others are moved in on demand, one
  block at a time (diffusers group offloading, no stream).
- `v2`: every transformer block is streamed from pinned host memory with the next block prefetched
  on a side CUDA stream (diffusers group offloading with `use_stream`, `record_stream`); encoders
  and VAE as in v1. The least GPU memory; the copies overlap compute.
- `cpu`: no CUDA device; everything stays where it is and placement is a no-op (logged).

`auto` picks high-vram when free VRAM is above HIGH_VRAM_THRESHOLD_GB, else v1 (v2 with
--use-memory-v2). On an out-of-memory error the generator steps down one mode (high-vram -> v1 ->
v2) and retries the section once. Free-memory readings are cached for `stats_ttl_s` so the
per-component decisions of one stage do not each pay a device sync.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from framepack_turbo.optim.base import PassReport
from framepack_turbo.pipeline import vae as vae_module
from framepack_turbo.optim.select import block_stacks

if TYPE_CHECKING:
    from framepack_turbo.hardware import Hardware
    from framepack_turbo.models.loading import ModelBundle
    from framepack_turbo.settings import Settings

log = logging.getLogger(__name__)

Mode = Literal["cpu", "high-vram", "v1", "v2"]
STEP_DOWN: dict[str, str] = {"high-vram": "v1", "v1": "v2"}
ON_DEMAND = ("text_encoder", "text_encoder_2", "image_encoder", "vae")  # moved in only while they run
GROUP_OFFLOAD_HOOKS = ("group_offloading", "layer_execution_tracker", "lazy_prefetch_group_offloading")


@dataclass(frozen=True)
class PlacementConfig:
    """`mode`: auto, high-vram, v1 or v2. `preserve_gb`: GB v1 keeps free on the GPU.
    `high_vram_gb`: free VRAM above which auto keeps everything resident."""

    mode: Literal["auto", "high-vram", "v1", "v2"] = "auto"
    preserve_gb: float = 6.0
    high_vram_gb: float = 60.0
    stats_ttl_s: float = 0.5
    vae_chunk: int | None = None  # latent frames per decode chunk; None: from free memory on CUDA
    vae_reserve_gb: float = 2.0
    vae_safety: float = 1.2
    vae_upscale: int = 8


@dataclass(frozen=True)
class Placement:
    mode: Mode
    reason: str

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
        return Placement("high-vram", f"{free:.1f} GB free > HIGH_VRAM_THRESHOLD_GB {config.high_vram_gb:g}: all resident")
    return Placement(
        "v1", f"{free:.1f} GB free <= HIGH_VRAM_THRESHOLD_GB {config.high_vram_gb:g}: on-demand moves, "
        f"{config.preserve_gb:g} GB kept free (FramePack's mode; --use-memory-v2 streams blocks instead)",
    )  # fmt: skip


class FreeMemory:
    """`torch.cuda.mem_get_info` in GB, re-read at most every `ttl` seconds."""

    def __init__(self, device: torch.device, ttl: float = 0.5) -> None:
        self.device, self.ttl = device, ttl
        self._value: float | None = None
        self._at = -float("inf")

    def gb(self, fresh: bool = False) -> float:
        if self.device.type != "cuda":
            return float("inf")
        now = time.monotonic()
        if fresh or now - self._at > self.ttl:
            self._value = torch.cuda.mem_get_info(self.device)[0] / 2**30
            self._at = now
        return self._value

    def invalidate(self) -> None:
        self._at = -float("inf")


def module_gb(module: torch.nn.Module) -> float:
    return sum(p.numel() * p.element_size() for p in module.parameters()) / 2**30


class Placer:
    """Applies a placement to a bundle, moves on-demand components around their use, steps down on OOM."""

    def __init__(self, bundle: ModelBundle, config: PlacementConfig, placement: Placement) -> None:
        self.bundle = bundle
        self.config = config
        self.placement = placement
        self.gpu = bundle.device
        self.free = FreeMemory(self.gpu, config.stats_ttl_s)
        self.history: list[dict[str, str]] = [placement.to_dict()]

    # ---- applying a mode ------------------------------------------------------------------------

    def apply(self) -> str:
        mode = self.placement.mode
        if mode == "cpu":
            return "no CUDA device: placement is a no-op"
        if mode == "high-vram":
            for module in self.bundle.modules().values():
                module.to(self.gpu)
            return "every model resident on the GPU"
        host = torch.device("cpu")
        for name in ON_DEMAND:
            module = getattr(self.bundle, name, None)
            if module is not None:
                module.to(host)
        torch.cuda.empty_cache()
        if mode == "v1":
            return self._apply_v1(host)
        return self._apply_v2(host)

    def _blocks(self) -> list[torch.nn.Module]:
        transformer = self.bundle.transformer
        return [block for stack in block_stacks(transformer) for block in getattr(transformer, stack)]

    def _apply_v1(self, host: torch.device) -> str:
        from diffusers.hooks import apply_group_offloading

        self._remove_offloading()
        transformer = self.bundle.transformer.to(host)
        stacks = block_stacks(transformer)
        for name, child in transformer.named_children():  # embedders, norms, final projection: small, resident
            if name not in stacks:
                child.to(self.gpu)
        blocks = self._blocks()
        budget = self.free.gb(fresh=True) - self.config.preserve_gb
        resident = 0
        for block in blocks:  # FramePack's rule: move in until only the preserved memory is left
            size = module_gb(block)
            if size > budget:
                break
            block.to(self.gpu)
            budget -= size
            resident += 1
        for block in blocks[resident:]:
            apply_group_offloading(block, onload_device=self.gpu, offload_device=host, offload_type="block_level",
                                   num_blocks_per_group=1)  # fmt: skip
        return (f"{resident} of {len(blocks)} transformer blocks resident, the rest moved in on demand; "
                f"{self.config.preserve_gb:g} GB kept free; encoders and VAE moved in while they run")  # fmt: skip

    def _apply_v2(self, host: torch.device) -> str:
        from diffusers.hooks import apply_group_offloading

        self._remove_offloading()
        transformer = self.bundle.transformer.to(host)
        apply_group_offloading(
            transformer, onload_device=self.gpu, offload_device=host, offload_type="block_level",
            num_blocks_per_group=1, use_stream=True, record_stream=True, non_blocking=True,
        )  # fmt: skip
        return "transformer blocks streamed from pinned host memory, next block prefetched on a side stream"

    def _remove_offloading(self) -> None:
        from diffusers.hooks import HookRegistry

        for module in self.bundle.transformer.modules():
            registry = getattr(module, "_diffusers_hook", None)
            if registry is not None:
                for name in GROUP_OFFLOAD_HOOKS:
                    registry.remove_hook(name, recurse=False)
        HookRegistry.check_if_exists_or_initialize(self.bundle.transformer).invalidate_child_registries_cache()

    # ---- during a job ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def use(self, name: str):
        """Around a component's work: in v1/v2 an encoder or the VAE is on the GPU only inside."""
        module = getattr(self.bundle, name, None)
        on_demand = self.placement.mode in ("v1", "v2") and name in ON_DEMAND and module is not None
        if on_demand:
            module.to(self.gpu)
        try:
            yield
        finally:
            if on_demand:
                module.to("cpu")
                torch.cuda.empty_cache()
                self.free.invalidate()

    def vae_chunk(self, latents: torch.Tensor) -> int | None:
        """Latent frames per decode chunk: the setting, else sized from free GPU memory; on the host
        None (the VAE's own temporal tiles, what FramePack decodes with)."""
        if self.config.vae_chunk is not None:
            return self.config.vae_chunk
        if self.gpu.type != "cuda":
            return None
        vae = self.bundle.vae
        _, _, frames, height, width = latents.shape
        chunk = vae_module.chunk_frames(
            self.free.gb(), height, width, vae.config.block_out_channels[0], vae.dtype.itemsize,
            self.config.vae_reserve_gb, self.config.vae_safety, self.config.vae_upscale,
            vae.config.temporal_compression_ratio,
        )  # fmt: skip
        return min(chunk, frames)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE decode in temporal chunks; out of memory halves the chunk and retries, down to the minimum."""
        with self.use("vae"):
            chunk = self.vae_chunk(latents)
            while True:
                try:
                    return vae_module.decode(latents, self.bundle.vae, chunk)
                except Exception as exc:
                    frames = latents.shape[2]
                    current = chunk or frames
                    if not is_out_of_memory(exc) or current <= vae_module.MIN_CHUNK:
                        raise
                    chunk = max(vae_module.MIN_CHUNK, current // 2)
                    if self.gpu.type == "cuda":
                        torch.cuda.empty_cache()
                    self.free.invalidate()
                    log.warning("Out of memory in VAE decode with %d-frame chunks: retrying with %d", current, chunk)

    def step_down(self, error: BaseException) -> str | None:
        """After an out-of-memory error: the next lower mode, applied; None when there is none."""
        lower = STEP_DOWN.get(self.placement.mode)
        if lower is None:
            return None
        if self.gpu.type == "cuda":
            torch.cuda.empty_cache()
        previous = self.placement.mode
        self.placement = Placement(lower, f"stepped down from {previous} after out of memory ({_short(error)})")
        detail = self.apply()
        self.history.append(self.placement.to_dict())
        log.warning("Out of memory in %s mode: stepped down to %s (%s); retrying the section", previous, lower, detail)
        return lower


def _short(error: BaseException) -> str:
    return str(error).splitlines()[0][:160] if str(error) else type(error).__name__


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def config_from(settings: Settings) -> PlacementConfig:
    mode = "v2" if settings.use_memory_v2 and settings.memory_mode == "auto" else settings.memory_mode
    return PlacementConfig(
        mode, settings.gpu_memory_preservation, settings.high_vram_threshold_gb,
        vae_chunk=settings.vae_chunk_size, vae_reserve_gb=settings.vae_chunk_reserve_gb,
        vae_safety=settings.vae_chunk_safety, vae_upscale=settings.vae_upscale_factor,
    )  # fmt: skip


def decide(settings: Settings, hardware: Hardware, device: torch.device | None = None) -> Placement:
    """The placement this run gets on this machine (no model needed: doctor calls it)."""
    if device is None and settings.device:
        device = torch.device(settings.device)
    cuda = hardware.cuda and (device is None or device.type == "cuda")
    return choose(config_from(settings), cuda, hardware.free_vram_gb)


class PlacementPass:
    name = "placement"

    def config(self, settings: Settings) -> PlacementConfig:
        return config_from(settings)

    def apply(self, bundle: ModelBundle, config: PlacementConfig, hardware: Hardware) -> PassReport:
        free = FreeMemory(bundle.device).gb(fresh=True) if bundle.device.type == "cuda" else None
        placement = choose(config, bundle.device.type == "cuda", free)
        placer = Placer(bundle, config, placement)
        detail = placer.apply()
        bundle.placer = placer
        return PassReport(self.name, "applied", f"{placement.mode}: {placement.reason}; {detail}")
