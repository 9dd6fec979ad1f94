"""TeaCache as FramePack ships it (ENABLE_TEACACHE, TEACACHE_THRESHOLD 0.15), for comparison.

FramePack's rule, kept exactly: every step computes the first block's modulated input
(`norm1(hidden_states, temb)`); from the second step on, the relative L1 change of that input
against the previous step's, rescaled by HunyuanVideo's fitted polynomial, is accumulated; a step is
computed when the sum reaches the threshold (and the sum restarts), otherwise the whole block stack
is replaced by the residual of the last computed step. The first and the last step of a section are
always computed; the state restarts every section (FramePack re-initialises it per section).

Unlike FramePack's, the state is kept per prediction (positive / negative), so real CFG does not
make the two predictions count each other's steps.

Built on diffusers' hook machinery (stepcache.hook_whole_stack): the head hook decides, the other
blocks pass through on a skipped step, the last records the stack's residual on a computed one. It
stacks with the context KV cache, which then shortens the computed steps (docs/optimizations.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from diffusers.hooks.hooks import StateManager

from framepack_turbo import distributed
from framepack_turbo.optim.base import PassContext, PassReport
from framepack_turbo.optim.stepcache import (
    BlockArgsHook,
    HookedCache,
    StackState,
    add_residual,
    hook_whole_stack,
    is_boundary_step,
)

if TYPE_CHECKING:
    from framepack_turbo.models.loading import ModelBundle
    from framepack_turbo.settings import Settings

HEAD_HOOK = "framepack_teacache_head"
BLOCK_HOOK = "framepack_teacache_block"

# FramePack's rescale polynomial for HunyuanVideo (highest power first), fitted by the TeaCache authors.
HUNYUAN_RESCALE = (7.33226126e02, -4.01131952e02, 6.75869174e01, -3.14987800e00, 9.61237896e-02)


@dataclass(frozen=True)
class TeaCacheConfig:
    """`threshold`: accumulated rescaled change that forces a computed step. FramePack's comment: 0.1 for
    about 1.6x, 0.15 (its default) for about 2.1x on the real model."""

    threshold: float = 0.15
    verbose: bool = False


class _State(StackState):
    def __init__(self) -> None:
        super().__init__()
        self.previous_modulated: torch.Tensor | None = None
        self.accumulated = 0.0

    def reset(self) -> None:
        super().reset()
        self.previous_modulated = None
        self.accumulated = 0.0


def rel_l1(current: torch.Tensor, previous: torch.Tensor) -> float:
    """FramePack's measure, in the tensors' own dtype (bf16 on a GPU), as FramePack computes it. Under context
    parallelism the means are over every rank's share (every rank decides the same)."""
    if distributed.active():
        change, scale = distributed.means_over_ranks((current - previous).abs().float(), previous.abs().float())
        return change / scale
    return float((current - previous).abs().mean() / previous.abs().mean())


def decide(accumulated: float, change: float | None, threshold: float, rescale) -> tuple[str, float, float]:
    """One step of FramePack's rule: (decision, the accumulator after it, the sum it reached). `change` is
    None on a step that is always computed (first and last of a section), which restarts the accumulator;
    otherwise the rescaled change accumulates, and reaching the threshold computes the step and restarts it."""
    if change is None:
        return "forced", 0.0, 0.0
    reached = accumulated + float(rescale(change))
    if reached >= threshold:
        return "miss", 0.0, reached
    return "hit", reached, reached


class TeaCacheHeadHook(BlockArgsHook):
    _is_stateful = True

    def __init__(self, state_manager: StateManager, config: TeaCacheConfig, controller: TeaCache) -> None:
        super().__init__()
        self.state_manager = state_manager
        self.config = config
        self.controller = controller
        self.rescale = np.poly1d(HUNYUAN_RESCALE)

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        hidden, encoder, temb = self.block_args(args, kwargs, "hidden_states", "encoder_hidden_states", "temb")
        state: _State = self.state_manager.get_state()
        modulated = module.norm1(hidden, emb=temb)[0]
        compute = self._should_compute(state, modulated)
        state.previous_modulated = modulated
        state.should_compute = compute
        if not compute:
            return add_residual(hidden, state.residual), encoder
        state.stack_input = hidden  # the tail hook's residual is then the whole stack's
        return self.fn_ref.original_forward(*args, **kwargs)

    @torch.compiler.disable
    def _should_compute(self, state: _State, modulated: torch.Tensor) -> bool:
        context = self.state_manager.context
        first_or_last = is_boundary_step(context) or state.residual is None
        change = (
            None if first_or_last or state.previous_modulated is None else rel_l1(modulated, state.previous_modulated)
        )
        kind, state.accumulated, reached = decide(state.accumulated, change, self.config.threshold, self.rescale)
        detail = (
            "first/last step of the section" if change is None else f"change {change:.4f}, accumulated {reached:.4f}"
        )
        self.controller.record(kind, context, detail)
        return kind != "hit"

    def reset_state(self, module):
        self.state_manager.reset()
        return module


class TeaCache(HookedCache):
    name = "teacache"
    hooks = (HEAD_HOOK, BLOCK_HOOK)


def apply_teacache(transformer: torch.nn.Module, config: TeaCacheConfig) -> TeaCache:
    controller = TeaCache(transformer, config.verbose)
    state_manager = StateManager(_State)
    hook_whole_stack(
        transformer, TeaCacheHeadHook(state_manager, config, controller), state_manager, HEAD_HOOK, BLOCK_HOOK
    )
    return controller


class TeaCachePass:
    name = "teacache"

    def config(self, settings: Settings) -> TeaCacheConfig:
        return TeaCacheConfig(settings.teacache_threshold, settings.teacache_verbose)

    def apply(self, bundle: ModelBundle, config: TeaCacheConfig, context: PassContext) -> PassReport:
        cache = apply_teacache(bundle.transformer, config)
        return PassReport(
            self.name, "applied", f"threshold {config.threshold} (FramePack's rule and polynomial)", extension=cache
        )
