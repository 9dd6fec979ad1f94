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

from framepack_turbo.files import sha256_file
from framepack_turbo.models.lora import LoadedLora, load_lora, merge_into, peft_config, peft_state_dict
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
    return [{"sha256": sha256_file(s.path), "weight": s.weight} for s in lora_specs(settings)]


def _entry(lora: LoadedLora, weight: float) -> dict[str, Any]:
    return {
        "name": lora.path.name,
        "sha256": lora.sha256,
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
    if transformer is None:
        return []
    return [
        f"LoRA {load_lora(s.path, transformer, settings.lora_allow_partial).summary()}, weight {s.weight:g}"
        for s in lora_specs(settings)
    ]


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
        loaded = [(load_lora(path, transformer, config.allow_partial), weight) for path, weight in config.loras]
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
    stat = path.stat()
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns


class LoraAdaptersPass:
    name = "lora.adapters"

    def config(self, settings: Settings) -> LoraConfig:
        return _config(settings)

    def apply(self, bundle: ModelBundle, config: LoraConfig, context: PassContext) -> PassReport:
        transformer = bundle.transformer
        loaded: dict[tuple, tuple[str, dict[str, Any]]] = getattr(transformer, ADAPTERS_ATTR, {})
        names, weights, entries, fresh = [], [], [], 0
        for path, weight in config.loras:
            key = _file_key(path)
            if key not in loaded:
                lora = load_lora(path, transformer, config.allow_partial)
                _warn_ignored(lora)
                count = getattr(transformer, ADAPTERS_ATTR + "_count", 0)
                setattr(transformer, ADAPTERS_ATTR + "_count", count + 1)
                name = f"lora{count}_{lora.sha256[:12]}"
                transformer.load_lora_adapter(
                    peft_state_dict(lora), prefix=None, adapter_name=name, metadata=peft_config(lora)
                )
                loaded[key] = (name, _entry(lora, 1.0))
                fresh += 1
            name, entry = loaded[key]
            names.append(name)
            weights.append(weight)
            entries.append({**entry, "weight": weight})
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
