"""FP8 weights for the transformer (ENABLE_FP8, FP8_TARGET_KEYS, FP8_EXCLUDE_KEYS, FP8_USE_SCALED_MM).

Two modes, chosen by the hardware:
- FP8 compute (FP8_USE_SCALED_MM=1 on compute capability >= 8.9): torchao
  Float8DynamicActivationFloat8WeightConfig with per-row scales: weights and activations in
  float8_e4m3fn, matmuls in `torch._scaled_mm`. Faster and half the bf16 weight memory.
- FP8 storage (otherwise): diffusers' layerwise casting keeps each selected weight in float8_e4m3fn
  and upcasts it to the compute dtype just for its forward. Half the bf16 weight memory, no speed-up
  (a little slower: the upcast). A compatibility warning says so when compute was asked for.

Module selection: linears of the block stacks whose name contains a FP8_TARGET_KEYS part (empty:
all) and no FP8_EXCLUDE_KEYS part. Norms, embedders and the final projection stay in high precision
unless a target key names them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from framepack_turbo.constants import FP8_COMPUTE_CAPABILITY
from framepack_turbo.optim.backends import torchao_quantization
from framepack_turbo.optim.base import PassContext, PassReport
from framepack_turbo.optim.select import DEFAULT_EXCLUDE, LinearFilter, block_stacks, selected, weight_bytes

if TYPE_CHECKING:
    from framepack_turbo.models.loading import ModelBundle
    from framepack_turbo.settings import Settings

log = logging.getLogger(__name__)
STORAGE_DTYPE = torch.float8_e4m3fn


@dataclass(frozen=True)
class Fp8Config:
    target_keys: tuple[str, ...] = ()
    exclude_keys: tuple[str, ...] = ()
    scaled_mm: bool = False

    def exclusions(self) -> tuple[str, ...]:
        """Default exclusions the targets do not name, plus the user's."""
        defaults = tuple(d for d in DEFAULT_EXCLUDE if not any(d in t or t in d for t in self.target_keys))
        return defaults + self.exclude_keys


def fp8_filter(transformer: torch.nn.Module, config: Fp8Config) -> LinearFilter:
    return LinearFilter(block_stacks(transformer), include=config.target_keys, exclude=config.exclusions())


class Fp8Pass:
    name = "fp8"

    def config(self, settings: Settings) -> Fp8Config:
        return Fp8Config(settings.fp8_target_keys, settings.fp8_exclude_keys, settings.fp8_use_scaled_mm)

    def apply(self, bundle: ModelBundle, config: Fp8Config, context: PassContext) -> PassReport:
        transformer = bundle.transformer
        keep = fp8_filter(transformer, config)
        names = selected(transformer, keep)
        modules = dict(transformer.named_modules())
        before = weight_bytes(transformer, names)
        compute = (
            config.scaled_mm
            and bundle.device.type == "cuda"
            and context.hardware.capability_at_least(*FP8_COMPUTE_CAPABILITY)
        )
        if compute:
            from torchao.quantization.granularity import PerRow

            q = torchao_quantization()
            q.quantize_(transformer, q.Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()), filter_fn=keep)
            mode = "fp8 compute: dynamic per-row fp8 activations x fp8 weights (torch._scaled_mm)"
        else:
            from diffusers.hooks import apply_layerwise_casting

            compute_dtype = transformer.dtype
            for name in names:
                apply_layerwise_casting(modules[name], STORAGE_DTYPE, compute_dtype, skip_modules_pattern=None)
            mode = f"fp8 storage, {str(compute_dtype).removeprefix('torch.')} compute (layerwise casting)"
        after = weight_bytes(transformer, names)
        log.info("FP8 optimization active")
        detail = f"{mode}; {len(names)} linears, weights {before / 2**20:.1f} -> {after / 2**20:.1f} MiB"
        return PassReport(
            self.name,
            "applied",
            detail,
            {"modules": len(names), "compute": compute, "weight_bytes_before": before, "weight_bytes_after": after},
        )
