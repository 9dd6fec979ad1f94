"""LoRA (--lora PATH[:WEIGHT], FRAMEPACK_LORAS, LORA_MODE, LORA_ALLOW_PARTIAL): two passes, one per mode.

- `lora.merge` (weights phase, first): W + weight * scale * B A folded into the transformer before low
  precision, pruning, INT-N, FP8, compile, TorchScript and ONNX export, so a step costs what it costs
  without LoRA. Its artifact identity is each file's SHA-256 and weight (`merged_identity`), not its path.
- `lora.adapters` (runtime, removable): diffusers' `load_lora_adapter` puts each LoRA on as a PEFT adapter
  and `set_adapters` weighs them. Switching LoRAs or weights between jobs (`FramePack.reconfigure`) loads
  only files not yet on the transformer: a change of weight loads nothing. Taking the pass off disables
  the adapters (PEFT then runs the base layers alone); they stay loaded for the next job that names them.

The mode picks the pass (settings.resolved_lora_mode, the registry's `only_when`: the other is off);
compat.py says which runs and why, and refuses the combinations that cannot work (a merge into
bitsandbytes weights, adapters on INT-N/FP8 or in an export).
The files are read and mapped onto the model's modules by models/lora.py.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from framepack_turbo.models.lora import (
    LoadedLora,
    check_weight_sum,
    load_lora,
    lora_file,
    lora_identity,
    merge_into,
    merged_weights,
    peft_config,
    peft_state_dict,
    per_file,
)
from framepack_turbo.optim.base import Extension, PassContext, PassReport
from framepack_turbo.settings import lora_specs, resolved_lora_mode

if TYPE_CHECKING:
    from framepack_turbo.models.loading import ModelBundle
    from framepack_turbo.settings import Settings

log = logging.getLogger(__name__)
MERGED_ATTR = "_framepack_loras"  # on a transformer with merged LoRAs: [{name, sha256, weight}] (export identity)
ADAPTERS_ATTR = "_framepack_lora_adapters"  # file key -> (adapter name, its record) for the adapters loaded


@dataclass(frozen=True)
class LoraConfig:
    loras: tuple[tuple[Path, float], ...]
    allow_partial: bool = False


def _config(settings: Settings) -> LoraConfig:
    return LoraConfig(tuple((s.path, s.weight) for s in lora_specs(settings)), settings.lora_allow_partial)


def merged_identity(settings: Settings) -> list[dict[str, Any]] | None:
    """What keys an optimized-model artifact built with these LoRAs merged: each file's hash and weight."""
    if resolved_lora_mode(settings) != "merged":
        return None
    return [{**lora_identity(s.path), "weight": s.weight} for s in lora_specs(settings)]


def _entry(lora: LoadedLora, weight: float) -> dict[str, Any]:
    return {
        "name": lora.path.name,
        "sha256": lora.sha256,
        **({"config_sha256": lora.config_sha256} if lora.config_sha256 else {}),
        "weight": weight,
        "format": lora.format,
        "modules": len({d.module for d in lora.deltas}),
        "ranks": lora.ranks,
        "text_encoder_keys_ignored": len(lora.text_encoder_keys),
        "skipped": len(lora.not_understood) + len(lora.not_in_model),
    }


def _warn_ignored(lora: LoadedLora) -> None:
    if lora.text_encoder_keys:  # said plainly (issue: load them or say so): the text encoders stay as they are
        log.warning(
            "LoRA %s: its %d text-encoder keys are ignored (this tool applies LoRAs to the transformer only)",
            lora.path.name,
            len(lora.text_encoder_keys),
        )
    skipped = lora.not_understood + lora.not_in_model
    if skipped:
        log.warning("LoRA %s: partial load, %d keys skipped (first: %s)", lora.path.name, len(skipped), skipped[0])


def preflight(settings: Settings) -> list[str]:
    """Every LoRA of the settings read and mapped onto the model's modules before its weights load (on the
    meta device), so a partial, mismatched or corrupt file is refused in a second, not after a 13B load.
    Returns one summary line per file; nothing where the model's config is not on this machine."""
    if not settings.loras:
        return []
    from framepack_turbo.models.loading import empty_transformer

    model_dir = str(settings.model_dir) if settings.model_dir else None
    transformer = empty_transformer(settings.model, model_dir)
    specs = lora_specs(settings)
    if transformer is None:  # the weight cap per file still holds
        sums: dict[tuple, tuple[str, list[float]]] = {}
        for s in specs:
            identity = lora_identity(s.path)
            sums.setdefault(tuple(identity.values()), (s.path.name, []))[1].append(s.weight)
        for name, weights in sums.values():
            check_weight_sum(name, weights)
        return []
    loaded = _load_each(specs, transformer, settings.lora_allow_partial)
    return [f"LoRA {lora.summary()}, weight {weight:g}" for lora, weight in loaded]


def _load_each(specs, transformer, allow_partial: bool) -> list[tuple[LoadedLora, float]]:
    """Each file read once (a file named twice is one, its weights added: `per_file`, capped)."""
    read: dict[Path, LoadedLora] = {}
    loaded = []
    for path, weight in specs:
        key = lora_file(path).resolve()
        if key not in read:
            read[key] = load_lora(path, transformer, allow_partial)
        loaded.append((read[key], weight))
    return per_file(loaded)


class LoraRecord(Extension):
    """What the run record keeps of the LoRAs: each file's name, hash, weight, format and modules."""

    name = kind = "lora"

    def __init__(self, mode: str, entries: list[dict[str, Any]]) -> None:
        self.mode, self.entries = mode, entries

    def record(self) -> dict[str, Any]:
        return {"mode": self.mode, "loras": self.entries}


class LoraMergePass:
    name = "lora.merge"

    def config(self, settings: Settings) -> LoraConfig:
        return _config(settings)

    def apply(self, bundle: ModelBundle, config: LoraConfig, context: PassContext) -> PassReport:
        transformer = bundle.transformer
        loaded = _load_each(config.loras, transformer, config.allow_partial)
        for lora, _ in loaded:
            _warn_ignored(lora)
        modules = merge_into(transformer, loaded)
        entries = [_entry(lora, weight) for lora, weight in loaded]
        setattr(transformer, MERGED_ATTR, [{k: e[k] for k in ("name", "sha256", "weight")} for e in entries])
        detail = "; ".join(f"{lora.summary()}, weight {w:g}" for lora, w in loaded) + f" -> {modules} modules merged"
        counters = {"modules": modules, "loras": entries}
        return PassReport(self.name, "applied", detail, counters, LoraRecord("merged", entries))


class LoraAdapters(LoraRecord):
    """The adapters of the current job; `remove` disables them (they stay loaded, so the next job that names
    them loads nothing)."""

    def __init__(self, transformer, entries: list[dict[str, Any]]) -> None:
        super().__init__("unmerged", entries)
        self.transformer = transformer

    def remove(self) -> None:
        self.transformer.disable_adapters()


def _file_key(path: Path) -> tuple[str, int, int]:
    file = lora_file(path)
    stat = file.stat()
    config = file.with_name("adapter_config.json")
    config_mtime = config.stat().st_mtime_ns if config.is_file() else 0
    return str(file.resolve()), stat.st_size, stat.st_mtime_ns + config_mtime


class LoraAdaptersPass:
    name = "lora.adapters"

    def config(self, settings: Settings) -> LoraConfig:
        return _config(settings)

    def apply(self, bundle: ModelBundle, config: LoraConfig, context: PassContext) -> PassReport:
        transformer = bundle.transformer
        loaded: dict[tuple, tuple[str, dict[str, Any]]] = getattr(transformer, ADAPTERS_ATTR, {})
        files: dict[tuple, float] = {}  # a file named twice is one adapter, its weights added
        for path, weight in config.loras:
            key = _file_key(path)
            files[key] = files.get(key, 0.0) + weight
        names, weights, entries = [], [], []
        pending: dict[tuple, tuple[str, dict[str, Any], LoadedLora, float]] = {}  # read now, not on yet
        by_content: dict[tuple, tuple[str, list[float]]] = {}
        for (path, _), (key, weight) in zip(_first_paths(config.loras), files.items()):
            if key in loaded:
                name, entry = loaded[key]
            else:
                lora = load_lora(path, transformer, config.allow_partial)
                _warn_ignored(lora)
                count = getattr(transformer, ADAPTERS_ATTR + "_count", 0)
                setattr(transformer, ADAPTERS_ATTR + "_count", count + 1)
                name, entry = f"lora{count}_{lora.sha256[:12]}", _entry(lora, 1.0)
                pending[key] = (name, entry, lora, weight)
            content = (entry["sha256"], entry.get("config_sha256"))
            by_content.setdefault(content, (entry["name"], []))[1].append(weight)
            names.append(name)
            weights.append(weight)
            entries.append({**entry, "weight": weight})
        for shown_name, file_weights in by_content.values():  # copies of one file under two paths
            check_weight_sum(shown_name, file_weights)
        # a new file's update must be finite in the weights' dtype (the adapters add it at each step); nothing
        # goes on before every check passed
        merged_weights(transformer, [(lora, weight) for _, _, lora, weight in pending.values()], write=False)
        for key, (name, entry, lora, _) in pending.items():
            transformer.load_lora_adapter(
                peft_state_dict(lora), prefix=None, adapter_name=name, metadata=peft_config(lora)
            )
            loaded[key] = (name, entry)
        fresh = len(pending)
        wanted = set(names)
        stale = [(k, n) for k, (n, _) in loaded.items() if n not in wanted]
        if stale:  # files no job names any more: their memory back
            transformer.delete_adapters([n for _, n in stale])
            for key, _ in stale:
                del loaded[key]
        setattr(transformer, ADAPTERS_ATTR, loaded)
        transformer.enable_adapters()
        transformer.set_adapters(names, weights)
        detail = f"{len(names)} adapter(s), {fresh} loaded now, {len(names) - fresh} already on: " + ", ".join(
            f"{e['name']} x{e['weight']:g}" for e in entries
        )
        return PassReport(
            self.name, "applied", detail, {"loaded": fresh, "loras": entries}, LoraAdapters(transformer, entries)
        )


def _first_paths(loras: tuple[tuple[Path, float], ...]) -> list[tuple[Path, float]]:
    """The first path naming each file, in order (one per `_file_key`)."""
    seen, out = set(), []
    for path, weight in loras:
        key = _file_key(path)
        if key not in seen:
            seen.add(key)
            out.append((path, weight))
    return out
