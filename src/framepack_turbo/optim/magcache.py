"""MagCache (ENABLE_MAGCACHE, MAGCACHE_THRESHOLD, MAGCACHE_K, MAGCACHE_RETENTION, MAGCACHE_RATIOS,
MAGCACHE_CALIBRATE, MAGCACHE_VERBOSE), as its authors publish it for FramePack (Ma et al. 2025,
github.com/Zehong-Ma/MagCache, MagCache4FramePack).

The magnitude ratio of a step is the mean over tokens of |r_t| / |r_(t-1)|, r the whole block
stack's residual. It is calibrated once per model (it barely depends on the input) and is data
here: `ratios.py` finds it. At step t of a section, past the first `retention` fraction of the
steps, the ratio is multiplied into an accumulated ratio and |1 - accumulated| into an accumulated
error; the step reuses the last computed residual when the error is at most the threshold, at most
K steps in a row were skipped and the step's own ratio is within `guard` of 1 (the per-step guard
of the published FramePack code: it keeps the last step, whose ratio is far from 1, computed).
Otherwise the step is computed and the accumulators restart. State is per prediction (cond /
uncond) and per section.

diffusers 0.42 has a MagCache hook; it is not used as is because it counts steps itself (one
counter shared by the positive and the negative prediction, which real CFG makes two calls a step),
has no per-step guard and cannot add a residual the context KV cache shortened. What fits is used:
its ratio interpolation (`nearest_interp`), its hook registry and state manager, and the first-block
cache's pass-through hook for the blocks between the first and the last (stepcache.hook_whole_stack).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from diffusers.hooks.hooks import StateManager

from framepack_turbo import distributed
from framepack_turbo.optim import ratios as ratio_store
from framepack_turbo.optim.base import PassContext, PassReport, Scope
from framepack_turbo.optim.stepcache import (
    BlockArgsHook,
    HookedCache,
    StackState,
    add_residual,
    hook_whole_stack,
    step_position,
)

if TYPE_CHECKING:
    from framepack_turbo.models.loading import ModelBundle
    from framepack_turbo.settings import Settings

log = logging.getLogger(__name__)

HEAD_HOOK = "framepack_magcache_head"
BLOCK_HOOK = "framepack_magcache_block"
GUARD = 0.06  # the published FramePack code's per-step bound on |1 - ratio|


@dataclass(frozen=True)
class MagCacheConfig:
    """`threshold`: accumulated error up to which steps are skipped (published: 0.1 for FramePack; 0.15 is
    its faster setting). `max_skips` (K): skips in a row. `retention`: the fraction of a section's first
    steps that are always computed. `calibrate`: skip nothing, record the ratios. `where`: what keys the
    ratios besides the step count, which each call brings (model identity; the variant and resolution
    class come with each job)."""

    threshold: float = 0.1
    max_skips: int = 2
    retention: float = 0.2
    guard: float = GUARD
    calibrate: bool = False
    verbose: bool = False
    ratios_file: str | None = None
    runtime_dir: str | None = None  # where calibrated ratios are kept (None: this process only)

    def __post_init__(self) -> None:
        if not 0 < self.threshold <= 10:
            raise ValueError(f"MagCache threshold must be in (0, 10], got {self.threshold}")
        if self.max_skips < 1:
            raise ValueError(f"MagCache K must be >= 1, got {self.max_skips}")
        if not 0 <= self.retention < 1:
            raise ValueError(f"MagCache retention must be in [0, 1), got {self.retention}")


@dataclass
class Accumulator:
    """The published rule's running values since the last computed step."""

    ratio: float = 1.0
    error: float = 0.0
    steps: int = 0


def retained_steps(steps: int, retention: float) -> int:
    """Steps at the start of a section that are always computed (the published `int(retention * steps)`,
    and never fewer than one: the first step has no residual to reuse)."""
    return max(1, int(retention * steps))


def decide(acc: Accumulator, step: int, steps: int, ratio: float, config: MagCacheConfig) -> str:
    """One step of the published rule: "forced" (retained), "hit" (skip) or "miss" (computed, restart).
    Updates `acc` in place."""
    if step < retained_steps(steps, config.retention):
        return "forced"
    acc.ratio *= ratio
    acc.error += abs(1.0 - acc.ratio)
    acc.steps += 1
    if acc.error <= config.threshold and acc.steps <= config.max_skips and abs(1.0 - ratio) <= config.guard:
        return "hit"
    acc.ratio, acc.error, acc.steps = 1.0, 0.0, 0
    return "miss"


def magnitude_ratio(residual: torch.Tensor, previous: torch.Tensor) -> float:
    """mean over tokens of |r_t| / |r_(t-1)| (float32; the last tokens both have, should the KV cache have
    shortened one)."""
    n = min(residual.shape[1], previous.shape[1])
    current, before = residual[:, -n:].float(), previous[:, -n:].float()
    ratios = torch.linalg.vector_norm(current, dim=-1) / torch.linalg.vector_norm(before, dim=-1)
    if distributed.active():  # each rank has a share of the tokens: the mean over all of them
        return distributed.means_over_ranks(ratios)[0]
    return float(ratios.mean())


class _State(StackState):
    def __init__(self) -> None:
        super().__init__()
        self.acc = Accumulator()
        self.measured: list[float] = []  # calibration: this section's ratios so far

    def reset(self) -> None:
        super().reset()
        self.acc = Accumulator()
        self.measured = []


class MagCacheHeadHook(BlockArgsHook):
    _is_stateful = True

    def __init__(self, state_manager: StateManager, controller: MagCache) -> None:
        super().__init__()
        self.state_manager = state_manager
        self.controller = controller

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        hidden, encoder = self.block_args(args, kwargs, "hidden_states", "encoder_hidden_states")
        state: _State = self.state_manager.get_state()
        state.should_compute = self._should_compute(state)
        if not state.should_compute:
            return add_residual(hidden, state.residual), encoder
        state.stack_input = hidden
        return self.fn_ref.original_forward(*args, **kwargs)

    @torch.compiler.disable
    def _should_compute(self, state: _State) -> bool:
        context = self.state_manager.context
        step, steps = step_position(context)
        ratios = None if step is None else self.controller.ratios_for(context.name, steps)
        if ratios is None or state.residual is None:
            why = "calibrating" if ratios is None and step is not None else "no residual yet"
            self.controller.record("forced", context, why)
            return True
        kind = decide(state.acc, step, steps, ratios[step], self.controller.config)
        detail = f"ratio {ratios[step]:.4f}, accumulated error {state.acc.error:.4f}"
        self.controller.record(kind, context, "first steps retained" if kind == "forced" else detail)
        return kind != "hit"

    def reset_state(self, module):
        self.state_manager.reset()
        return module


class MagCache(HookedCache):
    """The controller: finds the ratios for each job (variant, resolution class) and step count, records
    them while calibrating, and keeps the counters."""

    name = "magcache"
    hooks = (HEAD_HOOK, BLOCK_HOOK)

    def __init__(self, transformer: torch.nn.Module, config: MagCacheConfig, model: str, variant: str) -> None:
        super().__init__(transformer, config.verbose)
        self.config = config
        self.model = model
        self.where = (variant, 640)  # the generator's calls bring the job's (`around`)
        self._found: dict[tuple, ratio_store.Found | None] = {}
        self.calibration = ratio_store.Calibration()
        self.saved: dict[ratio_store.Key, str] = {}  # where each calibrated key went

    def around(self, component: str, label=None, step=None, steps=None, variant=None, resolution=None, **_):
        if component == "transformer" and variant is not None:
            self.where = (variant, resolution or self.where[1])
        return super().around(component, label=label, step=step, steps=steps)

    def key(self, prediction: str, steps: int) -> ratio_store.Key:
        variant, resolution = self.where
        return ratio_store.Key(self.model, variant, int(steps), int(resolution), prediction)

    def ratios_for(self, prediction: str | None, steps: int) -> tuple[float, ...] | None:
        """The ratios for this call, or None: calibrating (asked for, or none exist: calibrate on first use)."""
        if self.config.calibrate:
            return None
        key = self.key(prediction or "cond", steps)
        if key not in self._found:
            found = ratio_store.find(key, self.config.ratios_file, self.config.runtime_dir)
            if found is None:
                log.warning(
                    "MagCache: no ratios for %s; this section is computed in full to calibrate them "
                    "(`framepack calibrate magcache` does it ahead of time)",
                    key.describe(),
                )
            elif found.note:
                log.warning("MagCache: %s", found.note)
            self._found[key] = found
        found = self._found[key]
        return None if found is None else found.ratios

    def on_residual(self, state: _State, residual: torch.Tensor, context) -> None:
        """The tail's hook on a computed step: while calibrating, measure the ratio; after a section's last
        step, keep the section's ratios (and save them)."""
        step, steps = step_position(context)
        if step is None or self.ratios_for(context.name, steps) is not None:
            return
        state.measured.append(1.0 if state.residual is None else magnitude_ratio(residual, state.residual))
        if step == steps - 1 and len(state.measured) == steps:
            key = self.key(context.name or "cond", steps)
            entry = self.calibration.add(key, state.measured)
            path = ratio_store.save(entry, self.config.ratios_file, self.config.runtime_dir)
            self._found[key] = ratio_store.Found(entry.ratios, "")  # calibrated on first use: used from now on
            self.saved[key] = str(path) if path else "kept in this process (no runtime cache)"
            log.info("MagCache: ratios for %s calibrated (%s)", key.describe(), path or "kept in this process")

    def reset(self, scope: Scope = "section") -> None:
        super().reset(scope)
        if scope == "job":
            self.calibration = ratio_store.Calibration()


def apply_magcache(
    transformer: torch.nn.Module, config: MagCacheConfig, model: str = "", variant: str = "inverted"
) -> MagCache:
    """Hook the transformer; `model` names whose ratios these are (ratios.model_identity)."""
    controller = MagCache(transformer, config, model, variant)
    state_manager = StateManager(_State)
    hook_whole_stack(
        transformer,
        MagCacheHeadHook(state_manager, controller),
        state_manager,
        HEAD_HOOK,
        BLOCK_HOOK,
        on_residual=controller.on_residual,
    )
    return controller


class MagCachePass:
    name = "magcache"

    def config(self, settings: Settings) -> MagCacheConfig:
        return MagCacheConfig(
            threshold=settings.magcache_threshold,
            max_skips=settings.magcache_k,
            retention=settings.magcache_retention,
            calibrate=settings.magcache_calibrate,
            verbose=settings.magcache_verbose,
            ratios_file=str(settings.magcache_ratios) if settings.magcache_ratios else None,
            runtime_dir=str(settings.runtime_cache_dir) if settings.runtime_cache else None,
        )

    def apply(self, bundle: ModelBundle, config: MagCacheConfig, context: PassContext) -> PassReport:
        model = ratio_store.model_identity(bundle)
        cache = apply_magcache(bundle.transformer, config, model, bundle.preset.default_variant)
        what = (
            "calibrating: nothing skipped, the ratios recorded"
            if config.calibrate
            else f"threshold {config.threshold}, K {config.max_skips}, retention {config.retention}"
        )
        return PassReport(self.name, "applied", f"{what} (ratios for {model})", extension=cache)
