"""What the step caches (first-block, TeaCache, similarity, context KV) share.

Each cache is diffusers hooks on the transformer's blocks plus one controller, the pass's extension,
which the generator holds. Its `around("transformer", label=..., step=..., steps=...)` runs every
transformer call inside `transformer.cache_context(label, step_index=i, num_inference_steps=n)`
(diffusers' `CacheContext`):
`name` ("cond"/"uncond") keeps the positive and the negative prediction's state apart, and the step
tells a hook where it is in the section (first and last steps are always computed).

State never outlives a section: the generator calls `reset(scope)` at job start and before every
section; it drops every cached tensor and the counters (and so, a new resolution starts from
nothing). Counters are per section: `stats()` returns them for `SectionDone` before the reset.
`remove()` takes the hooks off by name, so the cache comes off a loaded bundle.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Iterable
from typing import Any

import torch
from diffusers.hooks import HookRegistry
from diffusers.hooks._helpers import TransformerBlockRegistry
from diffusers.hooks.hooks import BaseState, ModelHook, StateManager

from framepack_turbo import distributed
from framepack_turbo.optim.base import Extension, Scope
from framepack_turbo.optim.select import block_stacks
from framepack_turbo.pipeline.record import hit_rate

log = logging.getLogger(__name__)


def blocks(transformer: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Every repeated block, in execution order, with its qualified name."""
    out = []
    for stack in block_stacks(transformer):
        out.extend((f"{stack}.{i}", block) for i, block in enumerate(getattr(transformer, stack)))
    return out


def register_hook(transformer: torch.nn.Module, module: torch.nn.Module, hook, name: str) -> None:
    """Put `hook` on `module` (a block of `transformer`, or the transformer itself).

    The transformer's registry caches the list of hooked children that `cache_context` walks; it is
    invalidated so a hook added after a first call still gets the context.
    """
    HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)
    HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()


def remove_hooks(transformer: torch.nn.Module, names: Iterable[str]) -> None:
    """Take the named hooks off the transformer and every module in it (diffusers restores each forward)."""
    names = tuple(names)
    for module in transformer.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is None:
            continue
        for name in names:
            if registry.get_hook(name) is not None:
                registry.remove_hook(name, recurse=False)
    HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()


class BlockArgsHook(ModelHook):
    """A hook on a transformer block that reads the block's call arguments by name, wherever the caller put
    them (diffusers' block registry knows each block class's signature)."""

    def __init__(self) -> None:
        super().__init__()
        self._metadata = None

    def initialize_hook(self, module):
        self._metadata = TransformerBlockRegistry.get(type(module))
        return module

    def block_args(self, args: tuple, kwargs: dict, *names: str) -> tuple:
        return tuple(self._metadata._get_parameter_from_args_kwargs(name, args, kwargs) for name in names)


class StackState(BaseState):
    """What a whole-step cache's hooks share within one prediction (cond / uncond) of a section: whether the
    blocks run this step, the hidden states entering the stack on a computed step, and the stack's residual."""

    def __init__(self) -> None:
        super().__init__()
        self.should_compute = True
        self.stack_input: torch.Tensor | None = None
        self.residual: torch.Tensor | None = None

    def reset(self) -> None:
        self.should_compute, self.stack_input, self.residual = True, None, None


def stack_residual(output: torch.Tensor, stack_input: torch.Tensor) -> torch.Tensor:
    """The block stack's residual. With the context KV cache reusing, the stack computed only the last
    (noisy) tokens, so the output is shorter than the input: the residual is that of the last tokens."""
    return output - stack_input[:, stack_input.shape[1] - output.shape[1] :]


def add_residual(hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """`hidden` with the cached residual added to its last tokens (all of them, unless the residual came from
    a step the KV cache shortened: the context tokens then pass through, and the transformer's output,
    which is the last tokens only, does not read them)."""
    if residual.shape[1] == hidden.shape[1]:
        return hidden + residual
    keep = hidden.shape[1] - residual.shape[1]
    return torch.cat([hidden[:, :keep], hidden[:, keep:] + residual], dim=1)


class StackTailHook(BlockArgsHook):
    """On the last block: on a computed step, records the whole stack's residual (and hands it to
    `on_residual(state, residual, context)` first, for calibration); on a skipped step, passes its input
    through like the other blocks."""

    def __init__(self, state_manager: StateManager, on_residual=None) -> None:
        super().__init__()
        self.state_manager = state_manager
        self.on_residual = on_residual

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        state: StackState = self.state_manager.get_state()
        if not state.should_compute:
            return self.block_args(args, kwargs, "hidden_states", "encoder_hidden_states")
        output = self.fn_ref.original_forward(*args, **kwargs)
        residual = stack_residual(output[self._metadata.return_hidden_states_index], state.stack_input)
        if self.on_residual is not None:
            self.on_residual(state, residual, self.state_manager.context)
        state.residual = residual
        return output


def hook_whole_stack(
    transformer: torch.nn.Module, head_hook, state_manager, head_name: str, block_name: str, on_residual=None
) -> None:
    """A cache that skips all blocks at once: `head_hook` on the first block decides (and, on a computed step,
    keeps the stack's input in `state.stack_input`); diffusers' `FBCBlockHook` on the blocks between passes
    their input through on a skipped step; `StackTailHook` on the last records the stack's residual. Only the
    image stream's residual is kept: the transformer's output reads the image stream alone."""
    from diffusers.hooks.first_block_cache import FBCBlockHook

    (_, head), *middle, (_, tail) = blocks(transformer)
    register_hook(transformer, head, head_hook, head_name)
    for _, block in middle:
        register_hook(transformer, block, FBCBlockHook(state_manager, is_tail=False), block_name)
    register_hook(transformer, tail, StackTailHook(state_manager, on_residual), block_name)


def hook_first_block_stack(transformer: torch.nn.Module, head_hook, state_manager, head_name: str, block_name: str):
    """diffusers' first-block cache layout: `head_hook` (an `FBCHeadBlockHook`) on the first block and
    `FBCBlockHook` on the others, the last one recording the residuals its head hook reads."""
    from diffusers.hooks.first_block_cache import FBCBlockHook

    (_, head), *rest = blocks(transformer)
    register_hook(transformer, head, head_hook, head_name)
    for i, (_, block) in enumerate(rest):
        register_hook(transformer, block, FBCBlockHook(state_manager, is_tail=i == len(rest) - 1), block_name)


def step_position(context) -> tuple[int | None, int | None]:
    """(step, steps) of the current call, or (None, None) when the caller gave none."""
    return context.step_index, context.num_inference_steps


def is_boundary_step(context) -> bool:
    """First or last step of a section (or an unknown position): always computed, never reused."""
    step, steps = step_position(context)
    return step is None or steps is None or step == 0 or step == steps - 1


class CacheCounters:
    """Hits and misses of the current section, by kind ("hit", "miss", "forced", ...)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.extra: dict[str, Any] = {}

    def add(self, kind: str, n: int = 1) -> None:
        self.counts[kind] += n

    def stats(self) -> dict[str, Any]:
        return {
            **{kind: self.counts[kind] for kind in ("hit", "miss", "forced")},
            **dict(sorted(self.counts.items())),
            "hit_rate": hit_rate(self.counts),
            **self.extra,
        }

    def clear(self) -> None:
        self.counts.clear()
        self.extra.clear()


class HookedCache(Extension):
    """Base controller: counters, verbose decision logging, the cache context around each transformer
    call, a reset that clears every hook's state, and removal of its hooks (`hooks`: their names)."""

    name = "cache"
    kind = "cache"
    hooks: tuple[str, ...] = ()

    def __init__(self, transformer: torch.nn.Module, verbose: bool = False) -> None:
        self.transformer = transformer
        self.verbose = verbose
        self.counters = CacheCounters()

    def record(self, kind: str, context, detail: str = "") -> None:
        self.counters.add(kind)
        if self.verbose:
            step, steps = step_position(context)
            log.info(
                "%s %s step %s/%s: %s%s",
                self.name,
                context.name,
                None if step is None else step + 1,
                steps,
                kind,
                f" ({detail})" if detail else "",
            )

    def reset(self, scope: Scope = "section") -> None:
        HookRegistry.check_if_exists_or_initialize(self.transformer).reset_stateful_hooks(recurse=True)
        self.counters.clear()

    def around(self, component: str, label: str | None = None, step: int | None = None, steps: int | None = None, **_):
        if component != "transformer":
            return contextlib.nullcontext()
        return self.transformer.cache_context(label, step_index=step, num_inference_steps=steps)

    def stats(self) -> dict[str, Any]:
        return self.counters.stats()

    def remove(self) -> None:
        remove_hooks(self.transformer, self.hooks)


def relative_l1(current: torch.Tensor, previous: torch.Tensor) -> float:
    """mean|a - b| / mean|b| in float32 (one host sync: the decision is made on the host). Under context
    parallelism each rank holds a share of the tokens: the two means are over every rank's tokens, so every
    rank decides on the whole sequence, and the same."""
    current, previous = current.float(), previous.float()
    if distributed.active():
        change, scale = distributed.means_over_ranks((current - previous).abs(), previous.abs())
        return change / max(scale, 1e-12)
    return float((current - previous).abs().mean() / previous.abs().mean().clamp_min(1e-12))
