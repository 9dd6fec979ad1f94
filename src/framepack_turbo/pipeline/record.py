"""The run record: what a job did, typed, serialised once as the JSON sidecar beside the video.

The generator fills one `RunRecord` as the job goes (settings, model, sections done, each section's
cache decisions, engine calls, placement changes, timings, status) and writes `to_dict()` after every
section, so a stopped job leaves a record of what finished. `hit_rate` is the one definition of a
cache's hit rate: reuses over decisions (hits, misses and forced computations).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

DECISIONS = ("hit", "miss", "forced")


def hit_rate(counts: Mapping[str, Any]) -> float:
    decisions = sum(int(counts.get(k, 0) or 0) for k in DECISIONS)
    return round(int(counts.get("hit", 0) or 0) / decisions, 4) if decisions else 0.0


@dataclass
class CacheRecord:
    """One step cache over a job: its numbers per section, and the totals."""

    sections: list[dict[str, Any]] = field(default_factory=list)

    def add(self, section_stats: Mapping[str, Any]) -> None:
        self.sections.append(dict(section_stats))

    def totals(self) -> dict[str, int]:
        return {k: sum(int(s.get(k, 0)) for s in self.sections) for k in DECISIONS}

    def to_dict(self) -> dict[str, Any]:
        totals = self.totals()
        return {"sections": self.sections, **totals, "hit_rate": hit_rate(totals)}


@dataclass
class RunRecord:
    prompt: str
    negative_prompt: str
    seed: int
    variant: str
    options: dict[str, Any]
    settings: dict[str, Any]
    image: dict[str, Any]
    model: dict[str, Any]
    video: dict[str, Any]
    sections_total: int
    hardware: dict[str, Any]
    versions: dict[str, str]
    status: str = "running"
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    sections_done: int = 0
    frames: int = 0
    placement: dict[str, Any] | None = None
    lora: dict[str, Any] | None = None  # merged or unmerged, and each file's name, hash, weight, modules
    parallel: dict[str, Any] | None = None  # context parallelism: mode, ranks, where the sequence is split
    timeline: dict[str, Any] | None = None  # timed prompts as snapped, keyframes, end image
    step_caches: dict[str, CacheRecord] = field(default_factory=dict)
    job_caches: dict[str, dict[str, Any]] = field(default_factory=dict)  # per job (the encoder output cache)
    engines: dict[str, dict[str, Any]] = field(default_factory=dict)
    timings: dict[str, Any] | None = None
    error: str | None = None
    writer: dict[str, Any] | None = None  # the video writer: encode and join seconds per section, its waits
    host_memory: dict[str, Any] | None = None  # peak resident memory of the process
    resumed: list[int] = field(default_factory=list)  # sections done when the job was resumed, per resume

    def resumable(self, sidecar: dict[str, Any]) -> dict[str, Any]:
        """What a resume carries over of the sidecar: per-section numbers and what was given."""
        return {k: sidecar.get(k) for k in ("caches", "engines", "image", "resumed", "created", "writer")}

    def restore(self, saved: Mapping[str, Any], sections_done: int) -> None:
        """A resume: the stopped job's per-section numbers, so the sidecar covers the whole clip."""
        for name, cache in (saved.get("caches") or {}).items():
            if "sections" not in cache:  # a job cache (the encoder outputs): this run counts its own
                continue
            self.step_caches[name] = CacheRecord(list(cache.get("sections", []))[:sections_done])
        self.engines.update(saved.get("engines") or {})
        if saved.get("image"):
            self.image = dict(saved["image"])
        self.created = saved.get("created") or self.created
        self.resumed = [*(saved.get("resumed") or []), sections_done]
        self.sections_done = sections_done

    def add_section(self, caches: Mapping[str, Mapping[str, Any]], engines: Mapping[str, Mapping[str, Any]]) -> None:
        for name, stats in caches.items():
            self.step_caches.setdefault(name, CacheRecord()).add(stats)
        self.engines.update({k: dict(v) for k, v in engines.items()})

    def reproduction(self) -> dict[str, Any]:
        """What the mp4 itself carries (its container metadata): enough to read what made it and run it again.
        `settings`: the values that were not defaults (from the settings record the API passes), `passes`:
        the optimization passes that ran, `lora`: each LoRA's name, SHA-256 and weight. Its schema, and what a
        re-run takes of it (a recipe, never a path on this machine), are in pipeline/recipe.py."""
        values = self.settings.get("values", {}) if isinstance(self.settings, dict) else {}
        changed = {name: v["value"] for name, v in values.items() if v.get("source") not in (None, "default")}
        plan = self.settings.get("plan", []) if isinstance(self.settings, dict) else []
        return {
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "seed": self.seed,
            "variant": self.variant,
            "options": self.options,
            "model": {k: self.model.get(k) for k in ("preset", "source")},
            "passes": [p["name"] for p in plan if p.get("status") == "active"],
            "settings": changed,
            # each LoRA by its contents (name, hash, weight), never by where it was: `--from` finds it by hash
            "lora": [
                {k: entry.get(k) for k in ("name", "sha256", "weight")} for entry in (self.lora or {}).get("loras", [])
            ],
            "created": self.created,
        }

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "status": self.status,
            "created": self.created,
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "seed": self.seed,
            "variant": self.variant,
            "options": self.options,
            "settings": self.settings,
            "image": self.image,
            "model": self.model,
            "video": self.video,
            "sections_total": self.sections_total,
            "sections_done": self.sections_done,
            "frames": self.frames,
            "placement": self.placement,
            "timeline": self.timeline,
            "hardware": self.hardware,
            "versions": self.versions,
        }
        caches = {**self.job_caches, **{name: c.to_dict() for name, c in self.step_caches.items()}}
        if caches:
            out["caches"] = caches
        if self.lora is not None:
            out["lora"] = self.lora
        if self.parallel is not None:
            out["parallel"] = self.parallel
        if self.engines:
            out["engines"] = self.engines
        if self.timings is not None:
            out["timings"] = self.timings
        if self.error is not None:
            out["error"] = self.error
        if self.writer is not None:
            out["writer"] = self.writer
        if self.host_memory is not None:
            out["host_memory"] = self.host_memory
        if self.resumed:
            out["resumed"] = self.resumed
        return out
