"""A toy optimization pass, to show that a pass is one registry declaration plus one module like this.

It changes nothing the model computes: it counts the transformer calls of each section, which the
generator hands on as the pass's section numbers without knowing what the pass is.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from pydantic import Field

from framepack_turbo.optim.base import Extension, PassContext, PassReport
from framepack_turbo.optim.registry import PassSpec, on
from framepack_turbo.settings import Settings


class ToySettings(Settings):
    """The settings a plugin would add: its switch and one value it reads."""

    enable_toy: bool = Field(False, description="The toy pass.")
    toy_strength: float = Field(0.5, ge=0, le=1, description="How hard the toy pass works.")


SPEC = PassSpec(
    "toy",
    "toy pass",
    "runtime",
    on("enable_toy"),
    ("toy_strength",),
    lossy=True,
    removable=True,
    impl="tests.toy_pass:ToyPass",
)


@dataclass(frozen=True)
class ToyConfig:
    strength: float = 0.5


class CallCounter(Extension):
    name = "toy"
    kind = "cache"

    def __init__(self) -> None:
        self.calls = 0
        self.removed = False

    def reset(self, scope) -> None:
        self.calls = 0

    @contextlib.contextmanager
    def around(self, component: str, **where):
        if component == "transformer":
            self.calls += 1
        yield

    def stats(self) -> dict:
        return {"forced": self.calls}

    def remove(self) -> None:
        self.removed = True


class ToyPass:
    name = "toy"

    def config(self, settings: ToySettings) -> ToyConfig:
        return ToyConfig(settings.toy_strength)

    def apply(self, bundle, config: ToyConfig, context: PassContext) -> PassReport:
        return PassReport(self.name, "applied", f"strength {config.strength}", extension=CallCounter())
