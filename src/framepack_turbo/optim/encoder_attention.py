"""Encoder attention (the spec's BetterTransformer: ENABLE_BETTERTRANSFORMER / --disable-bettertransformer,
and ENCODER_ATTN_IMPLEMENTATION): transformers' `attn_implementation` of the LLaMA, CLIP and SigLIP encoders.

Off by default, as the spec says: the encoders then run as the library loads them. On, they get the
fastest implementation the machine has (FlashAttention 2 on CUDA where installed, else SDPA), or the
one named by ENCODER_ATTN_IMPLEMENTATION (eager is the reference for measuring). The spec's warning is
printed when it is turned on. The encoders run once per job, so this moves the text/image encode
stage of the bench, not the per-step time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from framepack_turbo.optim.base import PassContext, PassReport

if TYPE_CHECKING:
    from framepack_turbo.hardware import Hardware
    from framepack_turbo.models.loading import ModelBundle
    from framepack_turbo.settings import Settings

log = logging.getLogger(__name__)

ENCODERS = {"text_encoder": "LLaMA", "text_encoder_2": "CLIP", "image_encoder": "SigLIP"}
SPEC_WARNING = (
    "BETTERTRANSFORMER (encoder SDPA) is on. The spec reports severe slowdowns with memory offloading "
    "(20 s/it -> 428 s/it with memory_v2): use it when the encoders stay on the GPU, and check with framepack bench."
)


@dataclass(frozen=True)
class EncoderAttentionConfig:
    implementation: str = "auto"  # auto: flash_attention_2 where usable, else sdpa
    warn: bool = True


def resolve(implementation: str, hardware: Hardware) -> str:
    if implementation != "auto":
        return implementation
    return "flash_attention_2" if hardware.cuda and hardware.has("flash_attn") else "sdpa"


class EncoderAttentionPass:
    name = "encoder_attention"

    def config(self, settings: Settings) -> EncoderAttentionConfig:
        if settings.encoder_attn_implementation != "default":
            return EncoderAttentionConfig(settings.encoder_attn_implementation, warn=settings.enable_bettertransformer)
        return EncoderAttentionConfig("auto")

    def apply(self, bundle: ModelBundle, config: EncoderAttentionConfig, context: PassContext) -> PassReport:
        if config.warn:
            log.warning(SPEC_WARNING)
        implementation = resolve(config.implementation, context.hardware)
        changes = []
        for name, label in ENCODERS.items():
            model = getattr(bundle, name)
            before = model.config._attn_implementation
            model.set_attn_implementation(implementation)
            changes.append(f"{label} {before} -> {model.config._attn_implementation}")
        detail = "; ".join(changes)
        log.info("Encoder attention: %s", detail)
        return PassReport(self.name, "applied", detail, {"implementation": implementation})
