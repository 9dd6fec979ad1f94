"""Running the plan over a bundle: each active pass's `apply`, in order, and taking runtime passes off again.

`apply_plan` returns the reports and the extensions (the runtime state the generator owns).
`remove_passes` takes removable passes off a loaded bundle, newest first, so a job that differs
from the last one only in runtime passes (a cache on or off, another threshold) reuses the models.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

from framepack_turbo.optim import registry
from framepack_turbo.optim.base import Extension, Pass, PassContext, PassReport

if TYPE_CHECKING:
    from framepack_turbo.hardware import Hardware
    from framepack_turbo.models.loading import ModelBundle
    from framepack_turbo.optim.plan import Plan
    from framepack_turbo.settings import Settings

log = logging.getLogger(__name__)


def implementation(name: str) -> Pass:
    """A new instance of the pass's implementation class (imported on first use)."""
    spec = registry.get(name)
    if spec.impl is None:
        raise ValueError(f"pass {name} has no implementation over the bundle (it works while loading)")
    module_name, _, cls_name = spec.impl.partition(":")
    return getattr(importlib.import_module(module_name), cls_name)()


def applied_passes(plan: Plan, skip: frozenset[str] = frozenset()) -> list[str]:
    """The active passes `apply_plan` runs, in order."""
    return [p.name for p in plan.active() if p.name not in skip and registry.get(p.name).impl is not None]


def apply_plan(
    plan: Plan,
    bundle: ModelBundle,
    settings: Settings,
    hardware: Hardware,
    skip: frozenset[str] = frozenset(),
    only: frozenset[str] | None = None,
) -> list[PassReport]:
    """Run every active pass on the bundle, in order (but those in `skip`; with `only`, just those)."""
    context = PassContext(hardware, plan)
    reports = []
    for name in applied_passes(plan, skip):
        if only is not None and name not in only:
            continue
        pass_ = implementation(name)
        report = pass_.apply(bundle, pass_.config(settings), context)
        title = registry.get(name).title
        log.info("%s: %s%s", title, report.outcome, f" ({report.detail})" if report.detail else "")
        reports.append(report)
    return reports


def extensions(reports: list[PassReport]) -> list[Extension]:
    return [r.extension for r in reports if r.extension is not None]


def remove_passes(reports: list[PassReport], names: set[str]) -> list[PassReport]:
    """Take the named (removable) passes off, newest first; returns the reports of what stays."""
    for report in reversed(reports):
        if report.name in names:
            if not registry.get(report.name).removable:
                raise ValueError(f"pass {report.name} cannot be removed from a loaded bundle")
            if report.extension is not None:
                report.extension.remove()
            log.info("%s: removed", registry.get(report.name).title)
    return [r for r in reports if r.name not in names]


def loading_kwargs(plan: Plan, settings: Settings) -> dict[str, dict[str, Any]]:
    """Extra `from_pretrained` arguments per component from the active passes that work while loading."""
    out: dict[str, dict[str, Any]] = {}
    for planned in plan.active():
        spec = registry.get(planned.name)
        if spec.phase != "loading" or spec.impl is None:
            continue
        pass_ = implementation(planned.name)
        for component, kwargs in pass_.loading_kwargs(pass_.config(settings)).items():
            out.setdefault(component, {}).update(kwargs)
    return out
