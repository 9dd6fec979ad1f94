"""First-block cache (ENABLE_FBCACHE, FBCACHE_THRESHOLD, FBCACHE_VERBOSE).

Every step computes the first dual-stream block. When its residual (output - input) changed by less
than the threshold (relative L1: mean|r - r_prev| / mean|r_prev|, r_prev from the last computed
step) the other blocks are skipped and their cached residual is added instead. A higher threshold
skips more steps and drifts more; 0.035 is the spec's default.

diffusers' first-block cache hooks do the residual bookkeeping (`FBCHeadBlockHook`, `FBCBlockHook`,
their shared state); its decision knows nothing of where the step is, so ours adds what a section
needs: the first and the last step of a section are always computed, and at most
`max_consecutive_skips` steps in a row reuse the residual (a slow drift never runs away). Counters
feed the sidecar.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from diffusers.hooks.first_block_cache import FBCHeadBlockHook, FBCSharedBlockState
from diffusers.hooks.hooks import StateManager

from framepack_turbo.optim.base import PassContext, PassReport
from framepack_turbo.optim.stepcache import HookedCache, blocks, hook_first_block_stack, is_boundary_step, relative_l1

if TYPE_CHECKING:
    from framepack_turbo.models.loading import ModelBundle
    from framepack_turbo.settings import Settings

HEAD_HOOK = "framepack_fbcache_head"
BLOCK_HOOK = "framepack_fbcache_block"


@dataclass(frozen=True)
class FirstBlockCacheConfig:
    """`threshold`: relative L1 change of the first block's residual under which a step reuses the rest
    (higher: faster, further from the uncached result). `max_consecutive_skips`: reuses in a row before
    a step is computed whatever the change."""

    threshold: float = 0.035
    max_consecutive_skips: int = 3
    verbose: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.threshold <= 1:
            raise ValueError(f"first-block cache threshold must be in (0, 1], got {self.threshold}")
        if self.max_consecutive_skips < 1:
            raise ValueError(f"max_consecutive_skips must be >= 1, got {self.max_consecutive_skips}")


class _State(FBCSharedBlockState):
    def __init__(self) -> None:
        super().__init__()
        self.consecutive_skips = 0

    def reset(self) -> None:
        super().reset()
        self.head_block_residual = None
        self.head_block_output = None
        self.consecutive_skips = 0


class StepAwareHeadHook(FBCHeadBlockHook):
    """diffusers' head-block hook with the section's rules and counters in the decision."""

    def __init__(self, state_manager: StateManager, config: FirstBlockCacheConfig, controller: FirstBlockCache):
        super().__init__(state_manager, config.threshold)
        self.config = config
        self.controller = controller

    @torch.compiler.disable
    def _should_compute_remaining_blocks(self, hidden_states_residual: torch.Tensor) -> bool:
        state: _State = self.state_manager.get_state()
        context = self.state_manager.context
        if is_boundary_step(context) or state.head_block_residual is None or state.tail_block_residuals is None:
            kind, detail = "forced", "first/last step of the section"
        elif state.consecutive_skips >= self.config.max_consecutive_skips:
            kind, detail = "forced", f"{state.consecutive_skips} reuses in a row"
        else:
            change = relative_l1(hidden_states_residual, state.head_block_residual)
            kind, detail = ("hit" if change < self.threshold else "miss"), f"change {change:.4f}"
        self.controller.record(kind, context, detail)
        state.consecutive_skips = state.consecutive_skips + 1 if kind == "hit" else 0
        return kind != "hit"


class FirstBlockCache(HookedCache):
    name = "fbcache"
    hooks = (HEAD_HOOK, BLOCK_HOOK)


def apply_first_block_cache(transformer: torch.nn.Module, config: FirstBlockCacheConfig) -> FirstBlockCache:
    """Hook the transformer's blocks; returns the controller the generator resets and reads."""
    controller = FirstBlockCache(transformer, config.verbose)
    state_manager = StateManager(_State)
    hook_first_block_stack(
        transformer, StepAwareHeadHook(state_manager, config, controller), state_manager, HEAD_HOOK, BLOCK_HOOK
    )
    return controller


class FirstBlockCachePass:
    name = "fbcache"

    def config(self, settings: Settings) -> FirstBlockCacheConfig:
        return FirstBlockCacheConfig(settings.fbcache_threshold, settings.fbcache_max_skip, settings.fbcache_verbose)

    def apply(self, bundle: ModelBundle, config: FirstBlockCacheConfig, context: PassContext) -> PassReport:
        cache = apply_first_block_cache(bundle.transformer, config)
        detail = (
            f"threshold {config.threshold}, at most {config.max_consecutive_skips} reuses in a row, "
            f"{len(blocks(bundle.transformer))} blocks hooked"
        )
        return PassReport(self.name, "applied", detail, extension=cache)
