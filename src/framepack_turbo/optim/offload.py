"""Memory placement: applying the decision placement.py made for this run, and changing it on out-of-memory.

The decision (mode and why) is made once, before loading, and carried by the plan; this pass applies
exactly that one. Its extension moves the encoders and the VAE onto the GPU around their use in the
offloading modes, and after an out-of-memory error steps the placement down one mode (high-vram ->
v1 -> v2) and re-applies it, so the generator can retry the section; every change is in the
extension's record (the sidecar's `placement`). Free-memory readings are cached for `STATS_TTL_S` seconds so
the per-component decisions of one stage do not each pay a device sync.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import TYPE_CHECKING

import torch

from framepack_turbo.hardware import cuda_free_bytes
from framepack_turbo.optim.base import Extension, PassContext, PassReport
from framepack_turbo.optim.select import block_stacks
from framepack_turbo.pipeline.vae import is_out_of_memory
from framepack_turbo.placement import STEP_DOWN, Placement, PlacementConfig, config_from

if TYPE_CHECKING:
    from framepack_turbo.models.loading import ModelBundle
    from framepack_turbo.settings import Settings

log = logging.getLogger(__name__)

ON_DEMAND = ("text_encoder", "text_encoder_2", "image_encoder", "vae")  # moved in only while they run
GROUP_OFFLOAD_HOOKS = ("group_offloading", "layer_execution_tracker", "lazy_prefetch_group_offloading")
STATS_TTL_S = 0.5


class FreeMemory:
    """Free GPU memory in GB (`hardware.cuda_free_bytes`: a per-process cap counts), re-read at most every
    `ttl` seconds."""

    def __init__(self, device: torch.device, ttl: float = 0.5) -> None:
        self.device, self.ttl = device, ttl
        self._value: float | None = None
        self._at = -float("inf")

    def gb(self, fresh: bool = False) -> float:
        if self.device.type != "cuda":
            return float("inf")
        now = time.monotonic()
        if fresh or now - self._at > self.ttl:
            self._value = cuda_free_bytes(self.device) / 2**30
            self._at = now
        return self._value

    def invalidate(self) -> None:
        self._at = -float("inf")


def module_gb(module: torch.nn.Module) -> float:
    return sum(p.numel() * p.element_size() for p in module.parameters()) / 2**30


class Placer(Extension):
    """Applies a placement to a bundle, moves on-demand components around their use, steps down on OOM."""

    name = "placement"
    kind = "placement"

    def __init__(self, bundle: ModelBundle, config: PlacementConfig, placement: Placement) -> None:
        self.bundle = bundle
        self.config = config
        self.placement = placement
        self.gpu = bundle.device
        self.free = FreeMemory(self.gpu, STATS_TTL_S)
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
            apply_group_offloading(
                block, onload_device=self.gpu, offload_device=host, offload_type="block_level", num_blocks_per_group=1
            )
        return (
            f"{resident} of {len(blocks)} transformer blocks resident, the rest moved in on demand; "
            f"{self.config.preserve_gb:g} GB kept free; encoders and VAE moved in while they run"
        )

    def _apply_v2(self, host: torch.device) -> str:
        from diffusers.hooks import apply_group_offloading

        self._remove_offloading()
        transformer = self.bundle.transformer.to(host)
        apply_group_offloading(
            transformer,
            onload_device=self.gpu,
            offload_device=host,
            offload_type="block_level",
            num_blocks_per_group=1,
            use_stream=True,
            record_stream=True,
            non_blocking=True,
        )
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
    def around(self, component: str, **where):
        """Around a component's work: in v1/v2 an encoder or the VAE is on the GPU only inside."""
        module = getattr(self.bundle, component, None)
        on_demand = self.placement.offloads and component in ON_DEMAND and module is not None
        if on_demand:
            module.to(self.gpu)
        try:
            yield
        finally:
            if on_demand:
                module.to("cpu")
                torch.cuda.empty_cache()
                self.free.invalidate()

    def recover(self, error: BaseException) -> str | None:
        """After an out-of-memory error: the next lower mode, applied (what changed, in words); None when
        there is no lower mode, or the error is not out-of-memory."""
        if not is_out_of_memory(error):
            return None
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
        return f"stepped down to placement {lower}"

    def record(self) -> dict:
        return {"mode": self.placement.mode, "reason": self.placement.reason, "history": list(self.history)}


def _short(error: BaseException) -> str:
    return str(error).splitlines()[0][:160] if str(error) else type(error).__name__


class PlacementPass:
    name = "placement"

    def config(self, settings: Settings) -> PlacementConfig:
        return config_from(settings)

    def apply(self, bundle: ModelBundle, config: PlacementConfig, context: PassContext) -> PassReport:
        placement = context.plan.placement  # decided once, before loading; applied as decided
        placer = Placer(bundle, config, placement)
        detail = placer.apply()
        return PassReport(self.name, "applied", f"{placement.mode}: {placement.reason}; {detail}", extension=placer)
