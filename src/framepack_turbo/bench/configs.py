"""Named benchmark configurations: a name and the settings it turns on.

`baseline` turns nothing on. Names combine with `+` (`int8+compile+fbcache`); `preset:NAME` is an
optimization preset; users add their own in a TOML file:

    [configs.my-int4]
    enable_quant = true
    quant_bits = 4

Each optimization pass adds its names here. A name whose pass is not in this version still runs as
a row: the bench reports it skipped, with the reason, instead of timing the baseline twice.
"""

from __future__ import annotations

import difflib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from framepack_turbo.errors import InputError
from framepack_turbo.presets import PRESETS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

BUILTIN: dict[str, dict[str, Any]] = {
    "baseline": {},
    "bf16": {"enforce_low_precision": True},
    "low-precision": {"enforce_low_precision": True},
    "int8": {"enable_quant": True, "quant_bits": 8},
    "int8-wo": {"enable_quant": True, "quant_bits": 8, "quant_int8_mode": "weight-only"},
    "int4": {"enable_quant": True, "quant_bits": 4},
    "fp8": {"enable_fp8": True},
    "fp8-scaled": {"enable_fp8": True, "fp8_use_scaled_mm": True},
    "bnb8": {"use_bnb": True},
    "bnb4": {"use_bnb": True, "bnb_load_in_4bit": True},
    "prune": {"enable_prune": True},
    "compile": {"enable_compile": True},
    "jit-trace": {"jit_mode": "trace"},
    "attn-standard": {"xformers_mode": "standard"},
    "attn-aggressive": {"xformers_mode": "aggressive"},
    "attn-off": {"xformers_mode": "off"},
    "sdpa-encoders": {"enable_bettertransformer": True},
    "eager-encoders": {"encoder_attn_implementation": "eager"},
    "fbcache": {"enable_fbcache": True},
    "teacache": {"enable_teacache": True},
    "simcache": {"enable_sim_cache": True},
    "simcache-faiss": {"enable_sim_cache": True, "sim_cache_use_faiss": True},
    "kvcache": {"enable_kv_cache": True},
    "modulecache": {"enable_module_cache": True},
    "memory-v2": {"use_memory_v2": True},
    "memory-v1": {"memory_mode": "v1"},
    "high-vram": {"memory_mode": "high-vram"},
    "vae-chunk-2": {"vae_chunk_size": 2},
    "vae-one-pass": {"vae_chunk_size": 0},
    "serial-load": {"parallel_loaders": 1},
    "parallel-load": {"parallel_loaders": 4, "force_parallel_loaders": True},
    "onnx": {"use_onnx_engines": True},
    "onnx-all": {"use_onnx_engines": True, "onnx_components": "transformer,text-encoder,image-encoder,vae-decoder"},
    "onnx-trt": {"use_onnx_engines": True, "onnx_trt_enable": True},
    "tensorrt": {"enable_tensorrt": True, "trt_transformer": True},
    # with `framepack bench --lora FILE`: every row has the LoRA (merged: auto); these change how, or drop it
    "lora-merged": {"lora_mode": "merged"},
    "lora-unmerged": {"lora_mode": "unmerged"},
    "no-lora": {"loras": ()},
}


@dataclass(frozen=True)
class BenchConfig:
    name: str
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def lossy(self) -> bool:
        """Whether it turns on a pass that loses information by design (the registry says which); the
        report labels it. A row that ran says so from its plan instead (a skipped lossy pass costs nothing)."""
        from framepack_turbo.optim import registry
        from framepack_turbo.settings import Settings

        settings = Settings.load(self.settings, source="cli", environ={})
        return any(p.lossy and p.wanted(settings) for p in registry.passes())


def load_config_file(path: str | Path) -> dict[str, dict[str, Any]]:
    """`[configs.NAME]` tables of setting = value from a TOML file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--config-file {path}: no such file")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"--config-file {path}: not valid TOML ({exc})") from None
    configs = data.get("configs")
    if not isinstance(configs, dict) or not all(isinstance(v, dict) for v in configs.values()):
        raise InputError(f"--config-file {path}: expected [configs.NAME] tables of setting = value")
    return configs


def resolve(
    names: list[str], presets: list[str] = (), extra: dict[str, dict[str, Any]] | None = None
) -> list[BenchConfig]:
    """Names (with `+`) and presets -> configurations, baseline first, each validated as Settings."""
    from framepack_turbo.settings import Settings, SettingsError, setting_names

    known = {**BUILTIN, **(extra or {})}
    configs: list[BenchConfig] = []
    for spec in [*names, *(f"preset:{p}" for p in presets)]:
        spec = spec.strip()
        if not spec:
            continue
        merged: dict[str, Any] = {}
        for part in spec.split("+"):
            values = _lookup(part.strip(), known)
            for key, value in values.items():
                if key in merged and merged[key] != value:
                    raise InputError(
                        f"configuration {spec}: {part} sets {key}={value}, another part sets {merged[key]}"
                    )
                merged[key] = value
        unknown = set(merged) - set(setting_names())
        if unknown:
            raise InputError(f"configuration {spec}: unknown setting(s) {', '.join(sorted(unknown))}")
        try:
            Settings.load(merged, source="cli", environ={})
        except SettingsError as exc:
            raise InputError(f"configuration {spec}: {exc}") from None
        if spec not in [c.name for c in configs]:
            configs.append(BenchConfig(spec, merged))
    if "baseline" not in [c.name for c in configs]:
        configs.insert(0, BenchConfig("baseline", {}))
    configs.sort(key=lambda c: c.name != "baseline")  # baseline first, the rest in the order given
    return configs


def _lookup(name: str, known: dict[str, dict[str, Any]]) -> dict[str, Any]:
    if name.startswith("preset:"):
        preset = name.removeprefix("preset:")
        if preset not in PRESETS:
            raise InputError(f"unknown preset {preset!r}: choose {', '.join(PRESETS)}")
        return dict(PRESETS[preset])
    if name not in known:
        close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else f"; known: {', '.join(known)}"
        raise InputError(f"unknown configuration {name!r}{hint}")
    return dict(known[name])
