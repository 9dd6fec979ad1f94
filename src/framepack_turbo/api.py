"""The Python API: `FramePack.load(...)` once, then `.generate(...)` per clip.

    from framepack_turbo import FramePack
    fp = FramePack.load("tiny")                      # or FramePack.load(settings=Settings.load(...))
    result = fp.generate("cat.png", "a cat walks", seconds=2, steps=4, resolution=128, out="cat.mp4")
    result.frames.shape, result.video_path, result.sidecar["timings"]
    clips = fp.generate_batch("cat.png", "a cat walks", count=3, seed="random", out="cat.mp4")  # cat-seedN.mp4

`load` runs the whole front half of the data path: settings -> compatibility check -> plan ->
models -> passes. Keyword arguments are Settings fields (source "api"); like the CLI, it also
reads `FRAMEPACK_*` variables, below the arguments. `reconfigure(settings)` switches a loaded
instance to other settings without reloading when they differ only in runtime passes (the step
caches, the encoder output cache, the attention backend) or per-job values.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from framepack_turbo import compat, distributed
from framepack_turbo.constants import MAX_COUNT
from framepack_turbo.errors import Cancelled, FramePackError, InputError
from framepack_turbo.hardware import Hardware
from framepack_turbo.models import loading
from framepack_turbo.models.loading import (
    ModelBundle,
    default_device,
    default_dtypes,
    load_bundle,
    transformer_config,
    transformer_identity,
)
from framepack_turbo.optim import artifact, registry
from framepack_turbo.optim.apply import apply_plan, extensions, implementation, loading_kwargs, remove_passes
from framepack_turbo.optim.base import Extension, PassReport
from framepack_turbo.optim.plan import Plan, make_plan
from framepack_turbo.pipeline.events import CancelToken, EventSink, Notice
from framepack_turbo.pipeline.generate import Generator, Result
from framepack_turbo.pipeline.options import OPTION_SETTING_NAMES, GenerateOptions
from framepack_turbo.pipeline.vae import ChunkedDecode
from framepack_turbo.settings import Settings, resolve_seed

__all__ = [
    "FramePack",
    "IncompatibleSettings",
    "Result",
    "batch_outputs",
    "batch_seeds",
    "default_output_path",
    "options_from_settings",
]

log = logging.getLogger(__name__)

INCOMPATIBLE_PAUSE_S = 5.0  # the spec's pause before proceeding past critical findings


class IncompatibleSettings(FramePackError):
    """A critical compatibility rule fired; nothing was loaded."""

    exit_code = 1

    def __init__(self, report: compat.CompatReport) -> None:
        self.report = report
        lines = [f.line() for f in report.critical]
        super().__init__("incompatible settings:\n" + "\n".join(lines) + "\n(--ignore-incompatible runs anyway)")


def default_output_path(directory: str | Path = "outputs") -> Path:
    return Path(directory) / f"framepack_{datetime.now():%Y%m%d_%H%M%S}.mp4"


# Settings names of the per-job options, where they differ from GenerateOptions' field names.
_OPTION_NAMES = {setting: option for option, setting in OPTION_SETTING_NAMES.items()}
_OPTION_SETTINGS = ("seconds", "variant", "seed", "steps", "window", "gs", "cfg", "rs", "resolution", "crf")
# Read per job by the generator (how the VAE decodes), not by the loading or a pass.
_JOB_SETTINGS = (*_OPTION_SETTINGS, "vae_chunk_size", "vae_chunk_reserve_gb", "vae_chunk_safety", "vae_upscale_factor")


def options_from_settings(
    settings: Settings, prompt: str, negative_prompt: str = "", **overrides: Any
) -> GenerateOptions:
    """The per-job options: the settings' values, then `overrides` (GenerateOptions field names);
    seed="random" draws one."""
    values = {_OPTION_NAMES.get(n, n): getattr(settings, n) for n in _OPTION_SETTINGS}
    if "seed" in overrides:
        overrides = {**overrides, "seed": resolve_seed(overrides["seed"])}
    return GenerateOptions(prompt=prompt, negative_prompt=negative_prompt, **{**values, **overrides})


def batch_seeds(seed: int | str, count: int) -> list[int]:
    """The seeds of a batch of `count` clips: seed, seed+1, ... ("random" draws the first)."""
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= MAX_COUNT:
        raise InputError(f"count={count!r}: must be a whole number of clips from 1 to {MAX_COUNT}")
    first = resolve_seed(seed)
    if not isinstance(first, int) or isinstance(first, bool) or not 0 <= first <= 2**63 - count:
        raise InputError(
            f"seed={seed!r}: must be a whole number from 0 to 2^63-{count} for {count} clip(s), or 'random'"
        )
    return [first + i for i in range(count)]


def batch_outputs(out: str | Path, seeds: list[int]) -> list[Path]:
    """Where each clip of a batch goes: `out` itself for one clip, else `out` with -seedN before its suffix."""
    out = Path(out)
    if len(seeds) == 1:
        return [out]
    return [out.with_name(f"{out.stem}-seed{seed}{out.suffix}") for seed in seeds]


def _cached_transformer(plan: Plan, settings: Settings, model_dir: str | None, device: torch.device, load_device):
    """The optimized transformer from the cache when one fits this run, else None (and the reason logged).

    It is keyed by the compute `device` and loaded onto `load_device` (the host when placement offloads).
    """
    if not plan.is_active("opt_cache"):
        return None
    path = Path(settings.optimized_transformer)
    try:
        identity = transformer_identity(settings.model, model_dir)
        source_config = transformer_config(settings.model, model_dir)
        manifest = artifact.check(path, identity, artifact.shaping_settings(settings, device.type), source_config)
        return artifact.load(path, manifest, torch.device(load_device))
    except artifact.ArtifactRefused as exc:
        log.info("Optimized transformer cache not used: %s; building it", exc)
        return None


def _log_findings(report: compat.CompatReport, ignore_incompatible: bool) -> None:
    for finding in report.findings:
        level = logging.INFO if finding.severity is compat.Severity.INFO else logging.WARNING
        log.log(level, finding.line())
    if report.has_critical and ignore_incompatible:
        log.warning("Ignoring incompatible settings as asked; going on in %.0f s", INCOMPATIBLE_PAUSE_S)
        time.sleep(INCOMPATIBLE_PAUSE_S)


def _check_and_plan(
    settings: Settings, hardware: Hardware, ignore_incompatible: bool
) -> tuple[compat.CompatReport, Plan]:
    """The compatibility report (raising on a critical finding unless ignored) and the plan, logged."""
    report = compat.check(settings, hardware)
    if report.has_critical and not ignore_incompatible:
        raise IncompatibleSettings(report)  # its message carries the critical findings
    _log_findings(report, ignore_incompatible)
    plan = make_plan(settings, report, hardware)
    for line in plan.summary_lines():
        log.info(line)
    return report, plan


def _pass_config(name: str, settings: Settings) -> Any:
    spec = registry.get(name)
    if spec.impl is None:
        return tuple(getattr(settings, k) for k in spec.reads())
    return implementation(name).config(settings)


def _not_model_shaping(running: set[str]) -> set[str]:
    """The settings the loaded models do not depend on, given the passes that run: those only removable
    passes read (a setting a non-removable pass reads counts only where that pass runs: LoRA files switch
    without reloading in unmerged mode, where the merge pass is skipped), the per-job values, the preset."""
    only_runtime = {s for p in registry.passes() if p.removable for s in p.reads()} - {
        s for p in registry.passes() if not p.removable and p.name in running for s in p.reads()
    }
    return only_runtime | set(_JOB_SETTINGS) | {"preset"}


def _changed_runtime_passes(old: Settings, old_plan: Plan, new: Settings, new_plan: Plan) -> list[str] | None:
    """The removable passes whose status or config differ between two runs, when that is all that differs
    (besides per-job values); None when the models must be loaded again."""
    removable = {p.name for p in registry.passes() if p.removable}
    compiled = [p.name for p in (*old_plan.active(), *new_plan.active()) if registry.get(p.name).phase == "compilation"]
    if compiled:  # compiled or exported modules stand in for the ones the hooks would go on
        return None
    ignore = _not_model_shaping({p.name for p in (*old_plan.active(), *new_plan.active())})
    if any(getattr(old, k) != getattr(new, k) for k in old.values() if k not in ignore):
        return None
    old_status = {p.name: p.status for p in old_plan.passes}
    changed = []
    for planned in new_plan.passes:
        name = planned.name
        was, now = old_status.get(name) == "active", planned.status == "active"
        if was == now and (not now or _pass_config(name, old) == _pass_config(name, new)):
            continue
        if name not in removable:
            return None
        changed.append(name)
    return changed


def load_key(settings: Settings, hardware: Hardware | None = None) -> str:
    """What a run's loaded models depend on, as one string: two runs with equal keys can share the models
    (`reconfigure` switches the rest). The same split as `_changed_runtime_passes`, for one run alone; the
    Ray workers route a job to the worker whose models have its key. A compiled or exported transformer
    never shares (reconfigure reloads it), so its key is unique."""
    hardware = hardware or Hardware.detect()
    plan = make_plan(settings, compat.check(settings, hardware), hardware)
    active = [p.name for p in plan.active()]
    if any(registry.get(n).phase == "compilation" for n in active):
        return f"compiled:{id(plan)}"
    ignore = _not_model_shaping(set(active))
    shaping = {k: getattr(settings, k) for k in settings.values() if k not in ignore}
    weights = {n: _pass_config(n, settings) for n in active if not registry.get(n).removable}
    return json.dumps({"settings": shaping, "passes": weights}, sort_keys=True, default=repr)


def _with_later_hooks(changed: list[str], old_plan: Plan, new_plan: Plan) -> list[str]:
    """`changed` and every removable pass active in both runs that the registry orders after the first of
    them: taken off and put back, so hooks always wrap each other in the registry's order (the whole-step
    caches' around the KV cache's, whatever was switched)."""
    if not changed:
        return changed
    order = registry.names()
    first = min(order.index(n) for n in changed)
    later = [
        n
        for n in order[first + 1 :]
        if n not in changed and registry.get(n).removable and old_plan.is_active(n) and new_plan.is_active(n)
    ]
    return [*changed, *later]


class FramePack:
    """Loaded models plus the generation entry point. One instance can run many jobs, one at a time."""

    def __init__(
        self,
        bundle: ModelBundle,
        settings: Settings | None = None,
        plan: Plan | None = None,
        report: compat.CompatReport | None = None,
        reports: list[PassReport] | None = None,
    ) -> None:
        self.bundle = bundle
        self.reports: list[PassReport] = reports or []  # what each pass did, with its runtime extension
        self.settings = settings or Settings.load({"model": bundle.preset.name}, source="api")
        self.report = report or compat.CompatReport(())
        self.plan = plan or make_plan(self.settings, self.report, Hardware.detect())

    @property
    def extensions(self) -> list[Extension]:
        """The runtime state of the applied passes, in plan order (the generator loops over them)."""
        return extensions(self.reports)

    def extension(self, name: str) -> Extension | None:
        """The extension of one pass, when it is applied and has one."""
        return next((r.extension for r in self.reports if r.name == name), None)

    @classmethod
    def load(
        cls,
        model: str | None = None,
        *,
        settings: Settings | None = None,
        ignore_incompatible: bool = False,
        **overrides: Any,
    ) -> FramePack:
        """Check, plan, load and optimize. `overrides` are Settings fields (e.g. model_dir=..., device="cpu").

        Raises `IncompatibleSettings` before anything loads when a critical rule fires, unless
        `ignore_incompatible` (then it waits the spec's 5 s and goes on).
        """
        if settings is None:
            settings = Settings.load({**overrides, **({"model": model} if model else {})}, source="api")
        elif model or overrides:
            raise TypeError("pass either settings= or model/overrides, not both")
        hardware = Hardware.detect()
        report, plan = _check_and_plan(settings, hardware, ignore_incompatible)
        model_dir = str(settings.model_dir) if settings.model_dir else None
        device = torch.device(settings.device) if settings.device else default_device()
        # Offloading modes load on the host and let the placement pass move what fits: loading a 13B model
        # straight to a 6 GB GPU would fail before any pass ran.
        load_device = torch.device("cpu") if plan.placement.offloads else device
        if plan.is_active("parallel"):  # join the other ranks before loading: each loads the whole model
            distributed.start(device.type, settings.parallel_degree)
        cached = _cached_transformer(plan, settings, model_dir, device, load_device)
        bundle = load_bundle(
            settings.model,
            model_dir,
            load_device,
            local_files_only=settings.offline,
            dtypes=default_dtypes(device),  # the compute device's dtypes, wherever the weights rest until used
            component_kwargs=loading_kwargs(plan, settings),
            skip=frozenset({"transformer"}) if cached else frozenset(),
            parallel=loading.parallel_plan(settings, plan),
        )
        bundle.device = device  # the compute device, wherever the weights rest
        if cached:
            bundle.transformer = cached.to(load_device)
        reports = apply_plan(plan, bundle, settings, hardware, skip=artifact.stored_passes() if cached else frozenset())
        if plan.is_active("opt_cache") and not cached:
            identity = transformer_identity(settings.model, model_dir)
            artifact.save(bundle, settings, settings.optimized_transformer, identity, reports)
        return cls(bundle, settings, plan, report, reports)

    def generate(
        self,
        image,
        prompt: str,
        out: str | Path | None = None,
        on_event: EventSink | None = None,
        cancel: CancelToken | None = None,
        negative_prompt: str = "",
        keep_frames: bool = False,
        resume: bool = False,
        **options: Any,
    ) -> Result:
        """Generate a clip from `image` (path, PIL image or uint8 array).

        `options` are GenerateOptions fields (seconds, steps, window, seed, distilled_guidance, cfg,
        guidance_rescale, resolution, crf, variant); unset ones come from the settings.
        `keep_frames`: hold the frames as encoded for `Result.frames` (else it reads them back from the
        file; the job itself holds only the overlap window). `resume`: go on from where a stopped job
        writing to `out` left off (its state beside the video); other options or settings are refused.
        """
        opts = options_from_settings(self.settings, prompt, negative_prompt, **options)
        ranks = distributed.current()
        if distributed.active():  # one seed and one cancel for every rank; rank 0 alone reports
            opts = dataclasses.replace(opts, seed=distributed.primary_int(opts.seed))
            cancel = cancel if isinstance(cancel, distributed.SharedCancel) else distributed.SharedCancel(cancel)
            on_event = on_event if ranks.primary else None
        record = {"values": self.settings.to_json_dict(), "plan": self.plan.to_list(), "compat": self.report.to_list()}
        generator = Generator(
            self.bundle,
            on_event=on_event,
            cancel=cancel,
            extensions=self.extensions,
            settings=record,
            decode=ChunkedDecode.from_settings(self.settings),
            primary=ranks.primary,
        )
        return generator.run(image, opts, out or default_output_path(), keep_frames=keep_frames, resume=resume)

    def generate_batch(
        self,
        image,
        prompt: str,
        count: int,
        out: str | Path | None = None,
        on_event: EventSink | None = None,
        cancel: CancelToken | None = None,
        negative_prompt: str = "",
        **options: Any,
    ) -> list[Result]:
        """`count` clips of one request with seeds seed, seed+1, ... (seed="random" draws the first), one
        after the other on the loaded models; clip N goes to `out` with -seedN before its suffix.

        A cancel stops the clip that runs (its finished sections are kept, as for one clip) and the
        batch: the clips before it are complete on disk.
        """
        seeds = batch_seeds(options.pop("seed", self.settings.seed), count)
        if distributed.active():  # a drawn seed is rank 0's; a cancel between clips reaches every rank
            seeds = batch_seeds(distributed.primary_int(seeds[0]), count)
            cancel = distributed.SharedCancel(cancel)
        paths = batch_outputs(out or default_output_path(), seeds)
        results = []
        for index, (seed, path) in enumerate(zip(seeds, paths), start=1):
            if cancel is not None and cancel.cancelled:  # it came after the last step of the clip before
                stopped = Cancelled(f"batch cancelled after {index - 1} of {count} clips")
                stopped.result = results[-1] if results else None
                raise stopped
            if on_event is not None and count > 1:
                on_event(Notice(f"clip {index}/{count}: seed {seed} -> {path}"))
            results.append(self.generate(image, prompt, path, on_event, cancel, negative_prompt, seed=seed, **options))
        return results

    def reconfigure(self, settings: Settings, ignore_incompatible: bool = False) -> bool:
        """Switch to `settings` on the loaded models when they differ from the current ones only in
        removable runtime passes or per-job values: the passes that changed come off and go on again.
        Returns False, changing nothing, when the models would have to be loaded again (another model,
        another weight pass, a compiled or exported transformer)."""
        hardware = Hardware.detect()
        report = compat.check(settings, hardware)
        if report.has_critical and not ignore_incompatible:
            raise IncompatibleSettings(report)
        plan = make_plan(settings, report, hardware)
        changed = _changed_runtime_passes(self.settings, self.plan, settings, plan)
        if changed is None:
            return False
        _log_findings(report, ignore_incompatible=False)
        changed = _with_later_hooks(changed, self.plan, plan)
        kept = remove_passes(self.reports, {n for n in changed if self.plan.is_active(n)})
        added = apply_plan(plan, self.bundle, settings, hardware, only=frozenset(changed))
        order = {name: i for i, name in enumerate(registry.names())}
        self.reports = sorted(kept + added, key=lambda r: order[r.name])
        self.settings, self.plan, self.report = settings, plan, report
        return True
