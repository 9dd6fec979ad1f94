"""What every optimization pass looks like (DESIGN: "A pass").

`config(settings)` reads the settings once into a frozen dataclass (None: not wanted);
`apply(bundle, config, hardware)` changes the models in place and says what it did. Mutable state
(cache entries, counters) lives in an object with `reset()` that the generator calls per section
and per job.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch

if TYPE_CHECKING:
    from framepack_turbo.hardware import Hardware
    from framepack_turbo.models.loading import ModelBundle
    from framepack_turbo.settings import Settings


@dataclass(frozen=True)
class PassReport:
    name: str
    outcome: Literal["applied", "skipped", "failed"]
    detail: str = ""  # what was done (kernel, modules touched) or why not
    counters: dict[str, Any] = field(default_factory=dict)


class Pass(Protocol):
    name: str

    def config(self, settings: Settings) -> Any | None: ...

    def apply(self, bundle: ModelBundle, config: Any, hardware: Hardware) -> PassReport: ...


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
