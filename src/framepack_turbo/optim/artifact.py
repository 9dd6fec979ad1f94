"""The optimized-model cache (ENABLE_OPT_CACHE, OPTIMIZED_TRANSFORMER, `framepack optimize`).

The transformer after the weight passes (low precision, pruning, INT-N, FP8) is saved as
safetensors, quantized tensors included (torchao's safetensors support flattens them into plain
tensors plus JSON metadata for an allow-list of classes: no pickle anywhere), beside a JSON manifest:

    {"format": ..., "version": 2, "identity": {preset, source, revision, config_sha256},
     "settings": {the settings that shaped the weights, and the device kind}, "settings_sha256": ...,
     "versions": {torch, diffusers, torchao}, "config": {the transformer's config}, "hooks": [...],
     "file_sha256": ..., "created": ...}

On start, an artifact loads only when identity, settings hash, library versions and the file hash
all match; it is built into a fresh module, so a failure at any point leaves nothing half-loaded.
Anything else is refused with the reason, and the caller rebuilds it. Hooks (fp32 output, fp8
layerwise casting) are not state: the manifest lists them and loading re-installs them.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from framepack_turbo.files import atomic_path, sha256_file
from framepack_turbo.hardware import library_versions
from framepack_turbo.optim import registry
from framepack_turbo.optim.backends import torchao_quantization
from framepack_turbo.optim.precision import FROM_ARTIFACT_ATTR

if TYPE_CHECKING:
    from framepack_turbo.models.loading import ModelBundle
    from framepack_turbo.settings import Settings

log = logging.getLogger(__name__)

FORMAT = "framepack-turbo-optimized-transformer"
VERSION = 2  # 2: the float32 output is proj_out alone (FramePack's), not norm_out and proj_out
VERSION_KEYS = ("torch", "diffusers", "torchao")


class ArtifactRefused(Exception):
    """The artifact cannot be used; the message says why (the caller rebuilds)."""


def manifest_path(path: Path) -> Path:
    return path.with_suffix(".json")


def _canonical_sha(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def shaping_settings(settings: Settings, device_kind: str) -> dict[str, Any]:
    """The artifact's key: the settings of the passes whose effect it stores (registry: shapes_weights).
    Anything else (caches, compile, attention) does not change the saved weights."""
    values = {k: getattr(settings, k) for k in registry.shaping_settings()}
    values = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
    for spec in registry.passes():
        if spec.shapes_weights and spec.identity:  # file contents, not paths (a LoRA's hash and weight)
            module_name, _, function = spec.identity.partition(":")
            values[spec.name] = getattr(importlib.import_module(module_name), function)(settings)
    values["device_kind"] = device_kind  # kernels and packing differ between CPU and CUDA
    return values


def stored_passes() -> frozenset[str]:
    """The passes a loaded artifact makes unnecessary: weight passes that change the transformer alone.
    (Low precision also casts the encoders, so it still runs and leaves a cached transformer alone.)"""
    return frozenset(p.name for p in registry.passes() if p.shapes_weights and p.components == ("transformer",))


def _versions() -> dict[str, str]:
    all_versions = library_versions()
    return {k: all_versions.get(k, "unknown") for k in VERSION_KEYS}


def _hooks(transformer: torch.nn.Module) -> list[dict[str, Any]]:
    from framepack_turbo.models.loading import FP32_OUTPUT_HOOK_ATTR

    hooks: list[dict[str, Any]] = []
    if hasattr(transformer, FP32_OUTPUT_HOOK_ATTR):
        hooks.append({"kind": "fp32_output"})
    cast = [
        (fqn, str(m._diffusers_hook.get_hook("layerwise_casting").compute_dtype).removeprefix("torch."))
        for fqn, m in transformer.named_modules()
        if hasattr(m, "_diffusers_hook") and m._diffusers_hook.get_hook("layerwise_casting") is not None
    ]
    if cast:
        hooks.append({"kind": "layerwise_casting", "modules": [f for f, _ in cast], "compute_dtype": cast[0][1]})
    return hooks


def save(
    bundle: ModelBundle, settings: Settings, path: Path, source_identity: dict[str, Any], reports: list[Any] = ()
) -> Path:
    """Write the transformer's weights and the manifest, each atomically (manifest last)."""
    from safetensors.torch import save_file

    path = Path(path)
    transformer = bundle.transformer
    state = transformer.state_dict()
    torchao_quantization()  # makes torchao's tensor classes importable for flattening
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    tensors, metadata = flatten_tensor_state_dict(state)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    settings_values = shaping_settings(settings, bundle.device.type)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "identity": source_identity,
        "settings": settings_values,
        "settings_sha256": _canonical_sha(settings_values),
        "versions": _versions(),
        "config": dict(transformer.config),
        "hooks": _hooks(transformer),
        "passes": [{"name": r.name, "outcome": r.outcome, "detail": r.detail} for r in reports],
        "file_sha256": sha256_file(path),
        "file_bytes": path.stat().st_size,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    with atomic_path(manifest_path(path)) as tmp, open(tmp, "w") as f:
        json.dump(manifest, f, indent=2, default=str)
    log.info("Saved optimized transformer weights to %s", path)
    return path


def check(
    path: Path,
    bundle_identity: dict[str, Any],
    settings_values: dict[str, Any],
    source_config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest if the artifact fits this run; raises ArtifactRefused with the reason otherwise.

    With `source_config` (the transformer's config as its weights have it), the manifest's config must be
    that one as the weight passes leave it (pruning changes the layer counts, nothing else does): a
    manifest edited to another architecture is refused before anything is built."""
    path = Path(path)
    if not path.is_file() or not manifest_path(path).is_file():
        raise ArtifactRefused(f"no artifact at {path}")
    try:
        manifest = json.loads(manifest_path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactRefused(f"manifest unreadable ({exc})") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ArtifactRefused(f"not a version-{VERSION} {FORMAT} manifest")
    if manifest.get("identity") != bundle_identity:
        raise ArtifactRefused(f"made from other weights ({manifest.get('identity')} vs {bundle_identity})")
    if manifest.get("settings_sha256") != _canonical_sha(settings_values):
        saved = manifest.get("settings", {})
        diff = {k: (saved.get(k), v) for k, v in settings_values.items() if saved.get(k) != v}
        raise ArtifactRefused("built for other settings: " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in diff.items()))
    if manifest.get("versions") != _versions():
        raise ArtifactRefused(f"built with {manifest.get('versions')}, this run has {_versions()}")
    if source_config is not None:
        wrong = config_mismatches(manifest.get("config", {}), source_config, settings_values)
        if wrong:
            raise ArtifactRefused("its config is not this model's: " + ", ".join(wrong))
    if path.stat().st_size != manifest.get("file_bytes") or sha256_file(path) != manifest.get("file_sha256"):
        raise ArtifactRefused("weights file does not match its manifest (truncated or modified)")
    return manifest


def config_mismatches(saved: dict[str, Any], source: dict[str, Any], settings_values: dict[str, Any]) -> list[str]:
    """The config keys where an artifact's saved config differs from its source model's after the weight
    passes; keys the source leaves out must hold the class's defaults."""
    import inspect

    from diffusers import HunyuanVideoFramepackTransformer3DModel

    from framepack_turbo.optim.prune import kept_indices

    expected = {k: v for k, v in source.items() if not k.startswith("_")}
    defaults = {
        name: p.default
        for name, p in inspect.signature(HunyuanVideoFramepackTransformer3DModel.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    if settings_values.get("enable_prune"):
        for key, ratio in (("num_layers", "prune_dual_ratio"), ("num_single_layers", "prune_single_ratio")):
            n = expected.get(key, defaults.get(key))
            expected[key] = len(kept_indices(n, settings_values[ratio]))

    def plain(value):
        return json.loads(json.dumps(value, default=str))

    wrong = []
    for key, value in saved.items():
        if key.startswith("_"):
            continue
        want = expected[key] if key in expected else defaults.get(key, value)
        if plain(value) != plain(want):
            wrong.append(f"{key} {value!r} (expected {want!r})")
    return wrong


def load(path: Path, manifest: dict[str, Any], device: torch.device) -> torch.nn.Module:
    """A new transformer with the artifact's weights and hooks. Raises ArtifactRefused on any failure."""
    from diffusers import HunyuanVideoFramepackTransformer3DModel
    from safetensors import safe_open

    try:
        torchao_quantization()
        from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        state, leftover = unflatten_tensor_state_dict(tensors, metadata)
        if leftover:
            raise ArtifactRefused(f"unexpected tensors in the file: {sorted(leftover)[:5]}")
        config = {k: v for k, v in manifest["config"].items() if not k.startswith("_")}
        with torch.device("meta"):
            model = HunyuanVideoFramepackTransformer3DModel(**config)
        model.load_state_dict(state, strict=True, assign=True)
        model.to(device).eval().requires_grad_(False)
        from framepack_turbo.models.loading import realign_cpu_tensors

        realign_cpu_tensors(model)  # safetensors offsets: same kernels, same numbers as before saving
        _reinstall_hooks(model, manifest.get("hooks", []))
        setattr(model, FROM_ARTIFACT_ATTR, True)
    except ArtifactRefused:
        raise
    except Exception as exc:  # any failure: refuse the artifact, the caller rebuilds from the weights
        raise ArtifactRefused(f"could not load ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    log.info("Loaded optimized transformer weights from %s", path)
    return model


def _reinstall_hooks(model: torch.nn.Module, hooks: list[dict[str, Any]]) -> None:
    from diffusers.hooks import apply_layerwise_casting

    from framepack_turbo.models.loading import keep_fp32_output

    modules = dict(model.named_modules())
    for hook in hooks:
        if hook["kind"] == "fp32_output":
            keep_fp32_output(model)
        elif hook["kind"] == "layerwise_casting":
            compute = getattr(torch, hook["compute_dtype"])
            for name in hook["modules"]:
                apply_layerwise_casting(modules[name], modules[name].weight.dtype, compute, skip_modules_pattern=None)
        elif hook["kind"] not in ("fp32_output", "layerwise_casting"):
            raise ArtifactRefused(f"unknown hook kind {hook['kind']!r}")
