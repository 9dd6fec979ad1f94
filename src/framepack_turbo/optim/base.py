"""What every optimization pass looks like (docs/architecture.md, "How to add a pass").

A pass is declared once in optim/registry.py and implemented in its own module as a class with

    config(settings) -> Config            # a frozen dataclass, read from the settings once
    apply(bundle, config, context) -> PassReport

`apply` changes the models in place and says what it did. Whatever the pass keeps while jobs run
(cache entries, counters, engine sessions, where the models are) is an `Extension` it returns on its
report: the generator owns the extensions, not the bundle, and loops over them without knowing which
pass made which.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

import torch

from framepack_turbo.hardware import Hardware
from framepack_turbo.optim.plan import Plan

if TYPE_CHECKING:
    from framepack_turbo.models.loading import ModelBundle
    from framepack_turbo.settings import Settings

Scope = Literal["job", "section"]
T = TypeVar("T")


@dataclass(frozen=True)
class PassContext:
    """What a pass may read besides its config: the machine and the plan (with its placement decision)."""

    hardware: Hardware = field(default_factory=Hardware)
    plan: Plan = field(default_factory=Plan)


class Extension:
    """A pass's state while jobs run. Every method has a do-nothing default; a pass overrides what it uses.

    `reset(scope)`: before every job and every section (the generator calls it; state never leaks).
    `around(component, **where)`: a context around each call of a component ("text_encoder", "vae",
    "image_encoder", "transformer" with label/step/steps and the job's variant/resolution).
    `lookup(kind, key, compute)`: answer a deterministic computation ("prompt", "image") from a cache, or
    compute it.
    `stats()`: numbers since the last section reset, for `SectionDone` and the run record; `kind` says where
    they go ("cache": per-section decisions; "engine": calls per provider, per job; "" none).
    `recover(error)`: after an out-of-memory error, free or move something and say what (None: nothing).
    `record()`: what the run record keeps of this extension (placement history ...).
    `check_frame(height, width)`: before a job's models run, raise InputError when this pass cannot run
    frames of that size (fixed-shape engines), rather than fail mid-job.
    `remove()`: undo what `apply` installed, so the pass comes off a loaded bundle.
    """

    name: str = ""
    kind: str = ""
    verbose: bool = False

    def reset(self, scope: Scope) -> None:
        pass

    def around(self, component: str, **where: Any):
        return contextlib.nullcontext()

    def lookup(self, kind: str, key: Any, compute: Callable[[], T]) -> T:
        return compute()

    def stats(self) -> dict[str, Any]:
        return {}

    def recover(self, error: BaseException) -> str | None:
        return None

    def record(self) -> dict[str, Any] | None:
        return None

    def check_frame(self, height: int, width: int) -> None:
        pass

    def remove(self) -> None:
        pass


@dataclass(frozen=True)
class PassReport:
    name: str
    outcome: Literal["applied", "failed"]
    detail: str = ""  # what was done (kernel, modules touched) or why it failed
    counters: dict[str, Any] = field(default_factory=dict)
    extension: Extension | None = field(default=None, compare=False, repr=False)


class Pass(Protocol):
    name: str

    def config(self, settings: Settings) -> Any: ...

    def apply(self, bundle: ModelBundle, config: Any, context: PassContext) -> PassReport: ...


class StandIn(torch.nn.Module):
    """Takes another module's place (a traced, compiled or exported version of it): attribute reads it
    does not answer itself (config, dtype, device ...) go to the `original`, so callers do not notice."""

    def __init__(self, original: torch.nn.Module) -> None:
        super().__init__()
        self.original = original

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("original"), name)
