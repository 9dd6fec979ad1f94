"""Block pruning (ENABLE_PRUNE): keep an evenly spaced subset of the dual- and single-stream blocks.

Lossy by design and never on by default: the transformer was trained with every block. The first
and the last block of each stack are always kept (they map into and out of the stack's
representation); the removed ones are spread evenly between them. The bench's fidelity columns
say what it costs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from framepack_turbo.optim.base import PassContext, PassReport
from framepack_turbo.optim.select import block_stacks

if TYPE_CHECKING:
    from framepack_turbo.models.loading import ModelBundle
    from framepack_turbo.settings import Settings


@dataclass(frozen=True)
class PruneConfig:
    dual_ratio: float = 0.25
    single_ratio: float = 0.25


def kept_indices(n: int, ratio: float) -> list[int]:
    """Indices kept when removing `round(n * ratio)` of `n` blocks, evenly spaced, first and last kept."""
    keep = max(min(n, 2), n - round(n * ratio))
    if keep >= n:
        return list(range(n))
    if keep == 1:
        return [0]
    return sorted({round(i * (n - 1) / (keep - 1)) for i in range(keep)})


def prune_stack(model: torch.nn.Module, stack: str, ratio: float) -> list[int]:
    """Replace `model.<stack>` by the kept blocks; returns the removed indices."""
    blocks = getattr(model, stack)
    keep = kept_indices(len(blocks), ratio)
    setattr(model, stack, torch.nn.ModuleList(blocks[i] for i in keep))
    return [i for i in range(len(blocks)) if i not in keep]


class PrunePass:
    name = "prune"

    def config(self, settings: Settings) -> PruneConfig:
        return PruneConfig(settings.prune_dual_ratio, settings.prune_single_ratio)

    def apply(self, bundle: ModelBundle, config: PruneConfig, context: PassContext) -> PassReport:
        transformer = bundle.transformer
        dual, single = block_stacks(transformer)
        removed = {
            dual: prune_stack(transformer, dual, config.dual_ratio),
            single: prune_stack(transformer, single, config.single_ratio),
        }
        # the config must describe the model as it now is, for saving and for anyone reading it
        transformer.register_to_config(
            num_layers=len(getattr(transformer, dual)), num_single_layers=len(getattr(transformer, single))
        )
        detail = ", ".join(f"{stack}: removed {len(idx)} ({idx})" for stack, idx in removed.items())
        return PassReport(self.name, "applied", detail, {"removed": removed})
