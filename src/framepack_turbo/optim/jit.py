"""TorchScript of the transformer (--jit-mode trace|script, JIT_ARTIFACT, JIT_SAVE, JIT_LOAD, JIT_STRICT).

Tracing needs real inputs, so the transformer is wrapped and traced on its first call, once per input
signature (the shapes and dtypes of its tensor arguments). A trace records one path through the
model: the text-length trim and other size-dependent branches are fixed at the traced sizes, which
is why a new signature gets its own trace. With JIT_STRICT=1 a call whose signature differs from the
traced one is refused with a clear error instead (a fixed-shape deployment that must not re-trace).

`script` compiles the model's Python instead of recording a run; diffusers' transformer uses Python
features TorchScript does not support, so scripting falls back to tracing and the report says why.

JIT_SAVE (or JIT_ARTIFACT) receives the first trace plus a JSON file with its signature; JIT_LOAD
starts from a saved trace, checked against that signature. TorchScript archives hold TorchScript code
and tensors, not Python pickles of arbitrary objects, but loading one runs its code: load only your own.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from framepack_turbo.errors import FramePackError
from framepack_turbo.optim.base import PassContext, PassReport, StandIn

if TYPE_CHECKING:
    from framepack_turbo.models.loading import ModelBundle
    from framepack_turbo.settings import Settings

log = logging.getLogger(__name__)

Signature = tuple[tuple[str, tuple[int, ...], str], ...]


class JitShapeError(FramePackError):
    """JIT_STRICT refused inputs whose shapes differ from the traced ones."""

    exit_code = 2


@dataclass(frozen=True)
class JitConfig:
    mode: Literal["trace", "script"] = "trace"
    save: Path | None = None
    load: Path | None = None
    strict: bool = False


def signature(kwargs: dict[str, Any]) -> Signature:
    return tuple(
        (name, tuple(v.shape), str(v.dtype).removeprefix("torch."))
        for name, v in sorted(kwargs.items())
        if torch.is_tensor(v)
    )


def _signature_path(path: Path) -> Path:
    return Path(path).with_suffix(".signature.json")


class _Positional(torch.nn.Module):
    """The transformer with positional tensor arguments (what tracing records), returning the sample."""

    def __init__(self, model: torch.nn.Module, names: list[str], constants: dict[str, Any]) -> None:
        super().__init__()
        self.model, self.names, self.constants = model, names, constants

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.names, tensors)), **self.constants, return_dict=False)[0]


class TracedTransformer(StandIn):
    """Stands in for the transformer: same attributes (config, dtype, ...), forward through TorchScript."""

    def __init__(self, original: torch.nn.Module, config: JitConfig) -> None:
        super().__init__(original)
        self.jit_config = config
        self.traces: dict[Signature, torch.jit.ScriptModule] = {}
        self.traced_count = 0
        if config.load is not None:
            saved = json.loads(_signature_path(config.load).read_text())
            sig = tuple((n, tuple(s), d) for n, s, d in saved["signature"])
            self.traces[sig] = torch.jit.load(str(config.load), map_location=next(original.parameters()).device)
            log.info("Loaded TorchScript transformer from %s", config.load)

    def forward(self, return_dict: bool = False, **kwargs: Any):
        sig = signature(kwargs)
        traced = self.traces.get(sig)
        if traced is None:
            if self.jit_config.strict and self.traces:
                known = next(iter(self.traces))
                raise JitShapeError(
                    "JIT_STRICT: the TorchScript transformer was traced for "
                    f"{_describe(known)}; this call has {_describe(sig)}. Keep the traced resolution and "
                    "prompt length, or set FRAMEPACK_JIT_STRICT=0 to trace the new shapes"
                )
            traced = self._trace(kwargs, sig)
        names = [n for n, _, _ in sig]
        out = traced(*[kwargs[n] for n in names])
        return (out,)

    def _trace(self, kwargs: dict[str, Any], sig: Signature) -> torch.jit.ScriptModule:
        names = [n for n, _, _ in sig]
        constants = {k: v for k, v in kwargs.items() if not torch.is_tensor(v)}
        wrapper = _Positional(self.original, names, constants).eval()
        with torch.no_grad(), warnings.catch_warnings():
            # "converting a tensor to a Python boolean": size-dependent branches, fixed per signature by design
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            traced = torch.jit.trace(wrapper, tuple(kwargs[n] for n in names), check_trace=False)
        self.traces[sig] = traced
        self.traced_count += 1
        log.info("Traced the transformer for %s (trace %d)", _describe(sig), self.traced_count)
        if self.traced_count == 1 and self.jit_config.save is not None:
            save_trace(traced, sig, self.jit_config.save)
        return traced


def save_trace(traced: torch.jit.ScriptModule, sig: Signature, path: Path) -> None:
    from framepack_turbo.files import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        torch.jit.save(traced, tmp)
    with atomic_path(_signature_path(path)) as tmp, open(tmp, "w") as f:
        json.dump({"signature": [list(x) for x in sig]}, f)
    log.info("Saved TorchScript transformer to %s", path)


def _describe(sig: Signature) -> str:
    return ", ".join(f"{n} {list(s)}" for n, s, _ in sig if n in ("hidden_states", "encoder_hidden_states"))


class JitPass:
    name = "jit"

    def config(self, settings: Settings) -> JitConfig:
        save = settings.jit_save or (settings.jit_artifact if settings.jit_load is None else None)
        return JitConfig(settings.jit_mode, save, settings.jit_load, settings.jit_strict)

    def apply(self, bundle: ModelBundle, config: JitConfig, context: PassContext) -> PassReport:
        note = ""
        if config.mode == "script":
            try:
                scripted = torch.jit.script(bundle.transformer)
            except Exception as exc:  # TorchScript cannot compile diffusers' Python: say so and trace
                note = f"script is not possible for this model ({type(exc).__name__}); tracing instead"
                log.warning("TorchScript: %s", note)
            else:  # pragma: no cover - diffusers' transformer does not script today
                bundle.transformer = scripted
                return PassReport(self.name, "applied", "scripted")
        bundle.transformer = TracedTransformer(bundle.transformer, config)
        detail = ", ".join(
            x
            for x in (
                note,
                "traced on first call per input shape",
                "strict shapes" if config.strict else "re-traces new shapes",
                f"saves to {config.save}" if config.save else "",
                f"loaded {config.load}" if config.load else "",
            )
            if x
        )
        return PassReport(self.name, "applied", detail)
