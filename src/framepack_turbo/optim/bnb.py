"""bitsandbytes 4/8-bit (USE_BNB, BNB_*) for the transformer and both text encoders, applied while loading.

bitsandbytes quantizes weights as they are read from disk, so this pass contributes loading
arguments (`quantization_config`, `device_map`) to `from_pretrained` through the classes' own
configs: diffusers' BitsAndBytesConfig for the transformer, transformers' for LLaMA and CLIP. After
loading, `apply` checks that the modules really are quantized and reports it.

Its kernels need CUDA (compat rule `bnb-needs-cuda` skips it elsewhere) and weights on disk (rule
`bnb-needs-weights` skips it for the random presets, which have none).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from framepack_turbo.optim.base import PassContext, PassReport
from framepack_turbo.optim.select import EMBEDDERS, OUTPUT_LAYERS

if TYPE_CHECKING:
    from framepack_turbo.models.loading import ModelBundle
    from framepack_turbo.settings import Settings

BNB_COMPONENTS = ("transformer", "text_encoder", "text_encoder_2")
# Kept unquantized: the FramePack transformer's embedders and final projection (as the other passes).
TRANSFORMER_SKIP = [*EMBEDDERS, *OUTPUT_LAYERS]


@dataclass(frozen=True)
class BnbConfig:
    load_in_4bit: bool = False
    cpu_offload: bool = False
    device_map: str = "auto"
    double_quant: bool = False


def quantization_config(config: BnbConfig, component: str, compute_dtype: torch.dtype = torch.bfloat16):
    """The library's BitsAndBytesConfig for one component."""
    if component == "transformer":
        from diffusers import BitsAndBytesConfig
    else:
        from transformers import BitsAndBytesConfig
    kwargs: dict[str, Any] = {}
    if config.load_in_4bit:
        kwargs.update(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_use_double_quant=config.double_quant,
        )
    else:
        kwargs.update(load_in_8bit=True, llm_int8_enable_fp32_cpu_offload=config.cpu_offload)
    if component == "transformer":
        kwargs["llm_int8_skip_modules"] = TRANSFORMER_SKIP
    return BitsAndBytesConfig(**kwargs)


def component_kwargs(config: BnbConfig, component: str) -> dict[str, Any]:
    """Extra `from_pretrained` arguments for `component` (none for the components bnb leaves alone)."""
    if component not in BNB_COMPONENTS:
        return {}
    kwargs: dict[str, Any] = {"quantization_config": quantization_config(config, component)}
    if config.cpu_offload or config.device_map != "auto":
        # "balanced" spreads over devices; with CPU offload the modules that do not fit stay on the CPU
        kwargs["device_map"] = config.device_map if config.device_map != "auto" else "auto"
    return kwargs


def is_quantized(module: torch.nn.Module) -> bool:
    return bool(
        getattr(module, "is_loaded_in_4bit", False)
        or getattr(module, "is_loaded_in_8bit", False)
        or getattr(module, "is_quantized", False)
    )


class BnbPass:
    name = "loading.bnb"

    def config(self, settings: Settings) -> BnbConfig:
        return BnbConfig(
            settings.bnb_load_in_4bit, settings.bnb_cpu_offload, settings.bnb_device_map, settings.bnb_double_quant
        )

    def loading_kwargs(self, config: BnbConfig) -> dict[str, dict[str, Any]]:
        """Extra `from_pretrained` arguments per component (load_bundle passes them on)."""
        return {name: kwargs for name in BNB_COMPONENTS if (kwargs := component_kwargs(config, name))}

    def apply(self, bundle: ModelBundle, config: BnbConfig, context: PassContext) -> PassReport:
        done = [name for name in BNB_COMPONENTS if is_quantized(getattr(bundle, name))]
        missing = [name for name in BNB_COMPONENTS if name not in done]
        bits = 4 if config.load_in_4bit else 8
        if missing:
            return PassReport(self.name, "failed", f"not quantized after loading: {', '.join(missing)}")
        return PassReport(self.name, "applied", f"{bits}-bit bitsandbytes: {', '.join(done)}", {"bits": bits})
