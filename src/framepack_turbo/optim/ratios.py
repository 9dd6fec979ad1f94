"""MagCache's magnitude ratios as data: where they come from, how they are keyed, how a job finds them.

A ratio list belongs to a model identity, a variant, a step count, a resolution class and a
prediction (cond, or uncond under real CFG). Three places hold lists, searched in this order:

1. the ratios file the user names (MAGCACHE_RATIOS), which calibration then writes;
2. the runtime cache (`<runtime_cache_dir>/magcache/ratios.json`), which calibration writes otherwise;
3. the lists shipped in the package (`magcache_ratios.json`): the trained `tiny` model's, calibrated
   here, and FramePack's and FramePack-F1's at 25 steps, published by the MagCache authors.

A job takes the exact key if one place has it. Otherwise the same model and variant's list nearest in
resolution class, then in step count, resized to the job's steps by nearest-neighbour interpolation
(the published code's way, diffusers' `nearest_interp`), with a warning that says so; an uncond list
that is missing borrows the cond one, also with a warning. With nothing for the model and variant,
the job's first section is computed in full and calibrates them (`magcache.MagCache`).

A file that cannot be read, is not a ratios file, or holds a malformed entry is reported (one
warning) and skipped: a job never fails on it. Writes are atomic (files.write_json).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from framepack_turbo.files import write_json

if TYPE_CHECKING:
    from framepack_turbo.models.loading import ModelBundle

log = logging.getLogger(__name__)

FORMAT = "framepack-turbo/magcache-ratios"
VERSION = 1
SHIPPED = Path(__file__).with_name("magcache_ratios.json")
RUNTIME_FILE = Path("magcache") / "ratios.json"
DECIMALS = 5  # the published lists' precision


@dataclass(frozen=True)
class Key:
    model: str
    variant: str
    steps: int
    resolution: int
    prediction: str = "cond"

    def describe(self) -> str:
        return f"{self.model} ({self.variant}, {self.steps} steps, resolution {self.resolution}, {self.prediction})"


@dataclass(frozen=True)
class Entry:
    key: Key
    ratios: tuple[float, ...]
    source: str = ""
    sections: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self.key), "ratios": list(self.ratios), "source": self.source, "sections": self.sections}


@dataclass(frozen=True)
class Found:
    ratios: tuple[float, ...]
    note: str  # why these ratios stand in for the exact key ("" when they are its own)


def model_identity(bundle: ModelBundle) -> str:
    """What the ratios belong to: the model preset's name for its own weights (hub repos, the bundled
    folder, random weights), else the preset's name and the folder the weights came from (other weights
    in the same architecture have other magnitudes)."""
    preset = bundle.preset
    own = {f"random:{preset.random_size}", ", ".join(sorted({s.repo for s in preset.sources.values()}))}
    if preset.bundled_dir is not None:
        own.add(str(Path(preset.bundled_dir).resolve()))
    return preset.name if bundle.source in own else f"{preset.name}:{bundle.source}"


def _valid(raw: Any) -> Entry:
    key = Key(str(raw["model"]), str(raw["variant"]), int(raw["steps"]), int(raw["resolution"]), str(raw["prediction"]))
    ratios = tuple(float(r) for r in raw["ratios"])
    if len(ratios) != key.steps or not all(math.isfinite(r) and r > 0 for r in ratios):
        raise ValueError(f"{len(ratios)} ratios for {key.steps} steps, or one not a positive number")
    if key.prediction not in ("cond", "uncond"):
        raise ValueError(f"prediction {key.prediction!r}")
    return Entry(key, ratios, str(raw.get("source", "")), int(raw.get("sections", 1)))


def read(path: Path) -> list[Entry]:
    """The entries of one ratios file; a missing file has none; anything wrong with it: one warning, and
    the entries that are well formed."""
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        log.warning("MagCache ratios file %s is not readable JSON (%s): ignored", path, exc)
        return []
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("entries"), list):
        log.warning("%s is not a MagCache ratios file (format %r expected): ignored", path, FORMAT)
        return []
    entries, bad = [], []
    for i, raw in enumerate(data["entries"]):
        try:
            entries.append(_valid(raw))
        except (KeyError, TypeError, ValueError) as exc:
            bad.append(f"entry {i}: {exc}")
    if bad:
        log.warning("MagCache ratios file %s: %s skipped", path, "; ".join(bad))
    return entries


def places(ratios_file: str | None, runtime_dir: str | None) -> list[Path]:
    found = [Path(ratios_file)] if ratios_file else []
    if runtime_dir:
        found.append(Path(runtime_dir) / RUNTIME_FILE)
    return [*found, SHIPPED]


def _resize(ratios: tuple[float, ...], steps: int) -> tuple[float, ...]:
    import torch
    from diffusers.hooks.mag_cache import nearest_interp

    return tuple(float(r) for r in nearest_interp(torch.tensor(ratios, dtype=torch.float64), steps))


def find(key: Key, ratios_file: str | None = None, runtime_dir: str | None = None) -> Found | None:
    """The ratios for `key` (see the module's docstring for the order), or None: calibrate."""
    entries = [e for path in places(ratios_file, runtime_dir) for e in read(path)] + _memory
    for entry in entries:
        if entry.key == key:
            return Found(entry.ratios, "")
    for prediction in dict.fromkeys((key.prediction, "cond")):
        near = [
            e for e in entries if (e.key.model, e.key.variant, e.key.prediction) == (key.model, key.variant, prediction)
        ]
        if not near:
            continue
        best = min(near, key=lambda e: (abs(e.key.resolution - key.resolution), abs(e.key.steps - key.steps)))
        why = []
        if best.key.steps != key.steps:
            why.append(f"{best.key.steps} steps interpolated to {key.steps}")
        if best.key.resolution != key.resolution:
            why.append(f"calibrated at resolution {best.key.resolution}")
        if prediction != key.prediction:
            why.append(f"the {prediction} prediction's ratios")
        note = (
            f"no ratios for {key.describe()}: using {', '.join(why)}; `framepack calibrate magcache` "
            "with these settings records exact ones"
        )
        ratios = best.ratios if best.key.steps == key.steps else _resize(best.ratios, key.steps)
        return Found(ratios, note)
    return None


_memory: list[Entry] = []  # calibrated with the runtime cache off: kept for this process


@dataclass
class Calibration:
    """One calibration run's ratios per key: the mean over the sections recorded so far."""

    sections: dict[Key, list[list[float]]] = field(default_factory=dict)

    def add(self, key: Key, measured: list[float]) -> Entry:
        self.sections.setdefault(key, []).append(list(measured))
        return self.entry(key)

    def entry(self, key: Key) -> Entry:
        runs = self.sections[key]
        mean = tuple(round(sum(col) / len(col), DECIMALS) for col in zip(*runs))
        stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        return Entry(key, mean, f"calibrated {stamp} (framepack-turbo)", len(runs))

    def latest(self) -> dict[Key, Entry]:
        return {key: self.entry(key) for key in self.sections}


def save(entry: Entry, ratios_file: str | None, runtime_dir: str | None) -> Path | None:
    """Write `entry` in place of its key's (the user's ratios file, else the runtime cache); atomically.
    A user's file that is something else is never overwritten. With nowhere to write, the entry is kept
    in this process and None is returned."""
    targets = [Path(ratios_file)] if ratios_file else []
    if runtime_dir:
        targets.append(Path(runtime_dir) / RUNTIME_FILE)
    for path in targets:
        if ratios_file and path == Path(ratios_file) and path.is_file() and not _ours(path):
            log.warning("MagCache: %s is not a ratios file; the calibrated ratios go elsewhere, it is left as is", path)
            continue
        kept = [e for e in read(path) if e.key != entry.key]
        write_json({"format": FORMAT, "version": VERSION, "entries": [e.to_dict() for e in [*kept, entry]]}, path)
        return path
    _memory[:] = [e for e in _memory if e.key != entry.key] + [entry]
    return None


def _ours(path: Path) -> bool:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT
