"""Transformer attention backend (XFORMERS_MODE / --xformers-mode), through diffusers' attention dispatch.

| mode | backend | why |
|---|---|---|
| standard | `native`: PyTorch SDPA, which picks flash / memory-efficient kernels where the device has them | the default |
| aggressive | the fastest installed of SageAttention, FlashAttention 3, FlashAttention 2, xFormers (CUDA) | speed; Sage is lossy (int8 QK) |
| off | `_native_math`: plain math attention | the reference, and the slowest |

A backend asked for and missing falls back to SDPA with a compat warning (`aggressive-attention-missing`),
never a crash. Text padding needs no mask: at batch 1 the transformer trims it, as FramePack does.
The token refiner's attention (a small part) keeps diffusers' own processor, which dispatch does not reach.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from framepack_turbo.optim.base import Extension, PassContext, PassReport

if TYPE_CHECKING:
    from framepack_turbo.hardware import Hardware
    from framepack_turbo.models.loading import ModelBundle
    from framepack_turbo.settings import Settings

log = logging.getLogger(__name__)

# aggressive: (installed module, diffusers backend name), fastest first
AGGRESSIVE_ORDER: tuple[tuple[str, str], ...] = (
    ("sageattention", "sage"),
    ("flash_attn_interface", "_flash_3"),
    ("flash_attn", "flash"),
    ("xformers", "xformers"),
)
STANDARD, MATH = "native", "_native_math"


class AttentionBackend(Extension):
    """Puts the default backend back when the pass comes off a loaded bundle."""

    def __init__(self, transformer) -> None:
        self.transformer = transformer

    def remove(self) -> None:
        self.transformer.reset_attention_backend()


@dataclass(frozen=True)
class AttentionConfig:
    mode: Literal["standard", "aggressive", "off"] = "standard"


def backend_candidates(mode: str, hardware: Hardware) -> list[tuple[str, str]]:
    """(diffusers backend name, why) for a mode on this machine, best first; the last always works."""
    if mode == "off":
        return [(MATH, "plain math attention (the reference)")]
    if mode == "aggressive":
        found = []
        if hardware.cuda:
            found = [(b, f"{m} is the fastest installed kernel") for m, b in AGGRESSIVE_ORDER if hardware.has(m)]
        return [*found, (STANDARD, "no faster kernel usable here: PyTorch SDPA")]
    return [(STANDARD, "PyTorch SDPA")]


def choose_backend(mode: str, hardware: Hardware) -> tuple[str, str]:
    """The first candidate: what the pass sets unless diffusers refuses it (too old a kernel package)."""
    return backend_candidates(mode, hardware)[0]


def attention_backends(transformer) -> set[str]:
    """The dispatch backend each attention processor of the transformer uses (None: the default)."""
    return {
        str(getattr(m.processor, "_attention_backend", None))
        for m in transformer.modules()
        if hasattr(m, "processor") and hasattr(m.processor, "_attention_backend")
    }


class AttentionPass:
    name = "attention"

    def config(self, settings: Settings) -> AttentionConfig:
        return AttentionConfig(settings.xformers_mode)

    def apply(self, bundle: ModelBundle, config: AttentionConfig, context: PassContext) -> PassReport:
        from framepack_turbo.logs import quiet_logger

        refused = []
        for candidate in backend_candidates(config.mode, context.hardware):
            backend, why = candidate
            try:
                with quiet_logger("diffusers.models.modeling_utils"):  # "experimental feature" notice per call
                    bundle.transformer.set_attention_backend(backend)
                break
            except (
                RuntimeError,
                ValueError,
            ) as exc:  # installed but unusable (e.g. SageAttention 1.x: diffusers needs 2)
                refused.append(f"{backend} refused ({str(exc).splitlines()[0][:120]})")
        if refused:
            why = f"{why}; " + "; ".join(refused)
        log.info("Transformer attention: %s (%s)", backend, why)
        return PassReport(
            self.name, "applied", f"{backend}: {why}", {"backend": backend}, AttentionBackend(bundle.transformer)
        )
