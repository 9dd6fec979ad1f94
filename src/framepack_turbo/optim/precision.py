"""Low precision (ENFORCE_LOW_PRECISION / --enforce-low-precision): bf16 weights and compute, fp16 where
the device has no bf16, keeping the layers that must stay float32.

Kept in float32, as FramePack's `high_quality_fp32_output_for_inference` does: the transformer's
final projection (`proj_out`, with its input upcast), and nothing else: the final norm runs in bf16
there too (models/loading.py `KEEP_FP32`, the same set the default CUDA load keeps). The velocity it
produces is subtracted from the latents every step, so its rounding would accumulate over the whole
sampling. The VAE keeps its dtype: decoded pixels are the output, and conv3d is the slowest op to run
in bf16 on CPUs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from framepack_turbo.models.loading import keep_fp32_output
from framepack_turbo.optim.base import PassContext, PassReport

if TYPE_CHECKING:
    from framepack_turbo.models.loading import ModelBundle
    from framepack_turbo.settings import Settings

LOW_PRECISION_COMPONENTS = ("transformer", "text_encoder", "text_encoder_2", "image_encoder")
FROM_ARTIFACT_ATTR = "_framepack_from_artifact"


@dataclass(frozen=True)
class LowPrecisionConfig:
    """`components`: what is cast (bf16, fp16 where the device has no bf16)."""

    components: tuple[str, ...] = LOW_PRECISION_COMPONENTS


def cast_keeping_fp32(module: torch.nn.Module, dtype: torch.dtype) -> list[str]:
    """Cast `module` to `dtype` except its registered float32 sub-modules; returns their names."""
    # torch's own `to`: diffusers' override warns about fp32 modules, which this function handles itself
    torch.nn.Module.to(module, dtype)
    return keep_fp32_output(module)


class LowPrecisionPass:
    name = "precision"

    def config(self, settings: Settings) -> LowPrecisionConfig:
        return LowPrecisionConfig()

    def apply(self, bundle: ModelBundle, config: LowPrecisionConfig, context: PassContext) -> PassReport:
        dtype = torch.bfloat16 if (context.hardware.bf16 or bundle.device.type == "cpu") else torch.float16
        kept: list[str] = []
        # a transformer from the optimized-model cache already has its precision (and quantized weights)
        from_cache = getattr(bundle.transformer, FROM_ARTIFACT_ATTR, False)
        components = tuple(c for c in config.components if not (c == "transformer" and from_cache))
        for name in components:
            module = getattr(bundle, name)
            kept += [f"{name}.{k}" for k in cast_keeping_fp32(module, dtype)]
        dtype_name = str(dtype).removeprefix("torch.")
        detail = f"{', '.join(components)} in {dtype_name}; kept in float32: {', '.join(kept) or 'nothing'}"
        return PassReport(self.name, "applied", detail, {"dtype": dtype_name, "kept_fp32": kept})
