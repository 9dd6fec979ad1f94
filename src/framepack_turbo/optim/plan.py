"""The plan: every registered pass in its fixed order, and whether this run applies it. Torch-free.

A pass is `active` when its switch is on and no compatibility finding skips it (the finding names the
pass in `disables`); `skipped` says which rule and why; `off` is the rest. The plan also carries the
memory placement decided for this run, so the plan `framepack doctor` prints is the plan that runs:
the passes are applied from it (optim/apply.py), and the sidecar records it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from framepack_turbo import placement as placement_rules
from framepack_turbo.optim import registry
from framepack_turbo.placement import Placement

if TYPE_CHECKING:
    from framepack_turbo.compat import CompatReport
    from framepack_turbo.hardware import Hardware
    from framepack_turbo.settings import Settings

Status = Literal["off", "active", "skipped"]


@dataclass(frozen=True)
class PlannedPass:
    name: str
    title: str
    status: Status
    reason: str = ""
    lossy: bool = False

    def to_dict(self) -> dict[str, str | bool]:
        return {
            "name": self.name,
            "title": self.title,
            "status": self.status,
            "reason": self.reason,
            "lossy": self.lossy,
        }


@dataclass(frozen=True)
class Plan:
    passes: tuple[PlannedPass, ...] = field(default_factory=tuple)
    placement: Placement = Placement("cpu", "no CUDA device: every model stays on the CPU, nothing is offloaded")

    def active(self) -> list[PlannedPass]:
        return [p for p in self.passes if p.status == "active"]

    def is_active(self, name: str) -> bool:
        return any(p.name == name for p in self.active())

    @property
    def lossy(self) -> bool:
        """Whether an active pass changes what the video shows by design."""
        return any(p.lossy for p in self.active())

    def to_list(self) -> list[dict[str, str | bool]]:
        return [p.to_dict() for p in self.passes]

    def summary_lines(self) -> list[str]:
        """One screen: what runs, what was asked for and does not, and why."""
        active = [p for p in self.active() if not registry.get(p.name).housekeeping]
        lines = ["Active optimizations: " + (", ".join(p.title for p in active) if active else "none (baseline)")]
        lines += [f"  {p.title}: skipped: {p.reason}" for p in self.passes if p.status == "skipped"]
        return lines


def make_plan(settings: Settings, report: CompatReport, hardware: Hardware) -> Plan:
    """Decide each pass's status from the settings and the compatibility findings, and the placement."""
    disabled = report.disabled_passes()
    planned = []
    for spec in registry.passes():
        if not spec.wanted(settings):
            status, reason = "off", ""
        elif spec.name in disabled:
            status, reason = "skipped", disabled[spec.name]
        else:
            status, reason = "active", ""
        planned.append(PlannedPass(spec.name, spec.title, status, reason, spec.lossy))
    return Plan(tuple(planned), placement_rules.decide(settings, hardware))
