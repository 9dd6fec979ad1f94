"""torch.compile of the transformer (ENABLE_COMPILE): per repeated block by default, whole model as an option.

Regional compilation compiles one dual-stream and one single-stream block and reuses the code for
every other block of the stack (same shapes, same code), so the first run pays seconds, not
minutes, and a new resolution recompiles two small graphs. Quantized linears (torchao) compile
with it: inductor fuses the activation quantization that eager int8 pays for separately.

A compiler failure of a kind known to be the compiler's fault (dynamo/inductor errors, the
"duplicate template name" bug the spec mentions) makes that block fall back to eager, logged once,
instead of killing the job.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

from framepack_turbo.optim.base import Extension, PassContext, PassReport
from framepack_turbo.optim.select import block_stacks

if TYPE_CHECKING:
    from framepack_turbo.models.loading import ModelBundle
    from framepack_turbo.settings import Settings

log = logging.getLogger(__name__)

KNOWN_COMPILER_FAILURE_TEXT = ("duplicate template name",)


@dataclass(frozen=True)
class CompileConfig:
    mode: str = "default"
    scope: Literal["blocks", "model"] = "blocks"


def _is_compiler_failure(exc: BaseException) -> bool:
    dynamo_exc = getattr(getattr(torch, "_dynamo", None), "exc", None)
    base = getattr(dynamo_exc, "TorchDynamoException", None)
    if base is not None and isinstance(exc, base):
        return True
    return any(text in str(exc) for text in KNOWN_COMPILER_FAILURE_TEXT)


class CompiledModules(Extension):
    """Which modules were compiled and which fell back to eager (read by the bench and its report)."""

    name = "compile"

    def __init__(self, states: dict[str, _Fallback]) -> None:
        self.states = states

    def record(self) -> dict[str, Any]:
        return {name: {"failed": s.failed, "reason": s.reason, **s.calls} for name, s in self.states.items()}


@dataclass
class _Fallback:
    """Per compiled module: whether it fell back to eager, and why (for the report)."""

    failed: bool = False
    reason: str = ""
    calls: dict[str, int] = field(default_factory=lambda: {"compiled": 0, "eager": 0})


def guarded_compile(module: torch.nn.Module, mode: str, name: str) -> _Fallback:
    """Compile `module` in place, with an eager fallback on a known compiler failure.

    Works like `nn.Module.compile` (which sets `_compiled_call_impl`, the hook `__call__` consults),
    with the compiled callable wrapped so that a compiler bug downgrades this module, not the job.
    """
    state = _Fallback()
    compiled = torch.compile(module._call_impl, mode=None if mode == "default" else mode)

    def call(*args: Any, **kwargs: Any):
        if not state.failed:
            try:
                out = compiled(*args, **kwargs)
                state.calls["compiled"] += 1
                return out
            except Exception as exc:
                if not _is_compiler_failure(exc):
                    raise
                state.failed, state.reason = True, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                log.warning("torch.compile failed for %s; running it eagerly from now on (%s)", name, state.reason)
        state.calls["eager"] += 1
        return module._call_impl(*args, **kwargs)

    module._compiled_call_impl = call
    return state


def compiled_graph_count() -> int:
    """Graphs dynamo has compiled in this process so far (first compilations and recompilations)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class CompilePass:
    name = "compile"

    def config(self, settings: Settings) -> CompileConfig:
        return CompileConfig(settings.compile_mode, settings.compile_scope)

    def apply(self, bundle: ModelBundle, config: CompileConfig, context: PassContext) -> PassReport:
        transformer = bundle.transformer
        states: dict[str, _Fallback] = {}
        if config.scope == "model":
            states["transformer"] = guarded_compile(transformer, config.mode, "transformer")
        else:
            for stack in block_stacks(transformer):
                for i, block in enumerate(getattr(transformer, stack)):
                    states[f"{stack}.{i}"] = guarded_compile(block, config.mode, f"{stack}.{i}")
        log.info("torch.compile enabled for transformer")
        detail = f"{config.scope} ({len(states)} modules), mode {config.mode}"
        return PassReport(self.name, "applied", detail, {"modules": len(states)}, CompiledModules(states))
