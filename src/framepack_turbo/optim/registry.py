"""Every optimization pass, declared once: what it is called, when it is on, what it reads, what it costs.

Torch-free. The plan, the compatibility rules' switches, the bench's lossy labels, the
optimized-model artifact's identity key, export's list of passes to turn off, `framepack doctor`
and docs/configuration.md all read these declarations; nothing else lists passes. Adding a pass is
one `PassSpec` here and one module with its implementation (see docs/architecture.md).

A pass is wanted when any of its `switch` settings differs from the value that means off; that is
the only "is it wanted" test, and it needs no model and no torch. The implementation's
`config(settings)` then reads the settings into its frozen config.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from framepack_turbo.settings import Settings

Phase = Literal["loading", "weights", "runtime", "compilation"]
PHASES: tuple[Phase, ...] = ("loading", "weights", "runtime", "compilation")
STEP_CACHE = "step cache"  # the caches that decide per step whether the blocks run at all: one at a time


def on(*names: str) -> dict[str, Any]:
    """The switch of boolean settings: each one is off when False."""
    return dict.fromkeys(names, False)


@dataclass(frozen=True)
class PassSpec:
    """One pass.

    `switch`: setting -> the value that means off; the pass is wanted when any differs (empty: always on).
    `settings`: what else it reads; set while the switch is off, they do nothing (compat says so).
    `lossy`: changes what the video shows by design (the bench labels it). `shapes_weights`: its effect
    on the transformer is stored by the optimized-model cache, so its settings key the artifact.
    `components`: the bundle components it changes. `removable`: a runtime pass that can come off a
    loaded bundle, so jobs that differ only in it reuse the models. `impl`: "module:Class" of the
    implementation; None where the loader or the API does the work (parallel loading, the artifact).
    `housekeeping`: not a change to the computation (left out of the plan's summary line).
    `identity`: "module:function" of settings -> what keys the artifact in place of the pass's settings,
    where a setting names files whose contents count (LoRA files: their hashes, not their paths).
    `only_when`: "module:function" of settings -> bool, for passes that share a switch and split its
    work (LoRA merged or unmerged): where it is False the pass is off, not skipped.
    """

    name: str
    title: str
    phase: Phase
    switch: Mapping[str, Any]
    settings: tuple[str, ...] = ()
    lossy: bool = False
    shapes_weights: bool = False
    components: tuple[str, ...] = ("transformer",)
    removable: bool = False
    family: str = ""
    impl: str | None = None
    housekeeping: bool = False
    identity: str | None = None
    only_when: str | None = None

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"pass {self.name}: phase {self.phase!r} is not one of {', '.join(PHASES)}")

    def wanted(self, settings: Settings) -> bool:
        if self.switch and all(getattr(settings, k) == off for k, off in self.switch.items()):
            return False
        if self.only_when is not None:
            module_name, _, function = self.only_when.partition(":")
            return bool(getattr(importlib.import_module(module_name), function)(settings))
        return True

    def reads(self) -> tuple[str, ...]:
        """Every setting the pass reads: its switch and the rest."""
        return (*self.switch, *self.settings)


_PASSES: list[PassSpec] = [
    # ---- loading ---------------------------------------------------------------------------------
    PassSpec(
        "loading.bnb",
        "bitsandbytes quantized loading",
        "loading",
        on("use_bnb"),
        ("bnb_load_in_4bit", "bnb_cpu_offload", "bnb_device_map", "bnb_double_quant"),
        lossy=True,
        components=("transformer", "text_encoder", "text_encoder_2"),
        impl="framepack_turbo.optim.bnb:BnbPass",
    ),
    PassSpec(
        "loading.parallel",
        "parallel component loading",
        "loading",
        {"parallel_loaders": 1, "preload_repos": False},
        ("force_parallel_loaders",),
        components=(),
        housekeeping=True,  # load_bundle does it
    ),
    PassSpec(
        "opt_cache",
        "optimized-model cache",
        "loading",
        on("enable_opt_cache"),
        ("optimized_transformer",),
        components=(),  # FramePack.load loads or saves the artifact around the weight passes
    ),
    # ---- weights ---------------------------------------------------------------------------------
    PassSpec(
        "lora.merge",
        "LoRA merged into the weights",
        "weights",
        {"loras": ()},
        ("lora_mode", "lora_allow_partial"),
        lossy=True,
        shapes_weights=True,
        impl="framepack_turbo.optim.lora:LoraMergePass",
        identity="framepack_turbo.optim.lora:merged_identity",
        only_when="framepack_turbo.settings:lora_merged",
    ),
    PassSpec(
        "precision",
        "low precision (bf16/fp16)",
        "weights",
        on("enforce_low_precision"),
        lossy=True,
        shapes_weights=True,
        components=("transformer", "text_encoder", "text_encoder_2", "image_encoder"),
        impl="framepack_turbo.optim.precision:LowPrecisionPass",
    ),
    PassSpec(
        "prune",
        "block pruning",
        "weights",
        on("enable_prune"),
        ("prune_dual_ratio", "prune_single_ratio"),
        lossy=True,
        shapes_weights=True,
        impl="framepack_turbo.optim.prune:PrunePass",
    ),
    PassSpec(
        "quant",
        "INT-N quantization",
        "weights",
        on("enable_quant"),
        ("quant_bits", "quant_int8_mode", "quant_group_size"),
        lossy=True,
        shapes_weights=True,
        impl="framepack_turbo.optim.quant:QuantPass",
    ),
    PassSpec(
        "fp8",
        "FP8 weights",
        "weights",
        on("enable_fp8"),
        ("fp8_target_keys", "fp8_exclude_keys", "fp8_use_scaled_mm"),
        lossy=True,
        shapes_weights=True,
        impl="framepack_turbo.optim.fp8:Fp8Pass",
    ),
    # ---- runtime ---------------------------------------------------------------------------------
    PassSpec(
        "lora.adapters",
        "LoRA adapters (PEFT, unmerged)",
        "runtime",
        {"loras": ()},
        ("lora_mode", "lora_allow_partial"),
        lossy=True,
        removable=True,
        impl="framepack_turbo.optim.lora:LoraAdaptersPass",
        only_when="framepack_turbo.settings:lora_unmerged",
    ),
    PassSpec(
        "attention",
        "transformer attention backend",
        "runtime",
        {"xformers_mode": "standard"},
        removable=True,
        impl="framepack_turbo.optim.attention:AttentionPass",
    ),
    PassSpec(
        "encoder_attention",
        "encoder attention (BetterTransformer)",
        "runtime",
        {"enable_bettertransformer": False, "encoder_attn_implementation": "default"},
        components=("text_encoder", "text_encoder_2", "image_encoder"),
        impl="framepack_turbo.optim.encoder_attention:EncoderAttentionPass",
    ),
    PassSpec(
        "modulecache",
        "encoder output cache",
        "runtime",
        on("enable_module_cache"),
        ("module_cache_max_mb", "module_cache_loose_match", "runtime_cache", "runtime_cache_dir"),
        components=(),
        removable=True,
        impl="framepack_turbo.optim.modulecache:ModuleCachePass",
    ),
    # before the whole-step caches, whose hooks must wrap its own: a skipped step never reaches it
    PassSpec(
        "kvcache",
        "context KV cache",
        "runtime",
        on("enable_kv_cache"),
        ("kv_cache_len", "kv_cache_verbose", "kv_cache_refresh"),
        lossy=True,
        removable=True,
        impl="framepack_turbo.optim.kvcache:ContextKVCachePass",
    ),
    PassSpec(
        "fbcache",
        "first-block cache",
        "runtime",
        on("enable_fbcache"),
        ("fbcache_threshold", "fbcache_verbose", "fbcache_max_skip"),
        lossy=True,
        removable=True,
        family=STEP_CACHE,
        impl="framepack_turbo.optim.fbcache:FirstBlockCachePass",
    ),
    PassSpec(
        "teacache",
        "TeaCache",
        "runtime",
        on("enable_teacache"),
        ("teacache_threshold", "teacache_verbose"),
        lossy=True,
        removable=True,
        family=STEP_CACHE,
        impl="framepack_turbo.optim.teacache:TeaCachePass",
    ),
    PassSpec(
        "simcache",
        "similarity cache",
        "runtime",
        on("enable_sim_cache"),
        (
            "sim_cache_threshold",
            "sim_cache_max_skip",
            "sim_cache_max_entries",
            "sim_cache_use_faiss",
            "sim_cache_verbose",
            "sim_cache_budget_mb",
            "gpu_memory_preservation",
        ),
        lossy=True,
        removable=True,
        family=STEP_CACHE,
        impl="framepack_turbo.optim.simcache:SimilarityCachePass",
    ),
    PassSpec(
        "magcache",
        "MagCache",
        "runtime",
        on("enable_magcache"),
        (
            "magcache_threshold",
            "magcache_k",
            "magcache_retention",
            "magcache_ratios",
            "magcache_calibrate",
            "magcache_verbose",
            "runtime_cache",
            "runtime_cache_dir",
        ),
        lossy=True,
        removable=True,
        family=STEP_CACHE,
        impl="framepack_turbo.optim.magcache:MagCachePass",
    ),
    # after every hooked cache: its split and gather hooks must be the outermost on the first and last blocks,
    # so the caches' hooks see each rank's share of the sequence (and reduce their decisions over the ranks)
    PassSpec(
        "parallel",
        "context parallelism (one video on several GPUs)",
        "runtime",
        {"parallel_degree": 1},
        ("parallel_mode",),
        removable=True,
        impl="framepack_turbo.optim.parallel:ContextParallelPass",
    ),
    PassSpec(
        "placement",
        "memory placement (high-VRAM / v1 / v2)",
        "runtime",
        {},
        ("memory_mode", "use_memory_v2", "gpu_memory_preservation", "high_vram_threshold_gb"),
        components=("transformer", "vae", "text_encoder", "text_encoder_2", "image_encoder"),
        impl="framepack_turbo.optim.offload:PlacementPass",
        housekeeping=True,
    ),
    # ---- compilation -----------------------------------------------------------------------------
    PassSpec(
        "compile",
        "torch.compile",
        "compilation",
        on("enable_compile"),
        ("compile_mode", "compile_scope"),
        impl="framepack_turbo.optim.compile:CompilePass",
    ),
    PassSpec(
        "jit",
        "TorchScript",
        "compilation",
        {"jit_mode": "off"},
        ("jit_artifact", "jit_save", "jit_load", "jit_strict"),
        impl="framepack_turbo.optim.jit:JitPass",
    ),
    PassSpec(
        "tensorrt",
        "TensorRT (torch-tensorrt)",
        "compilation",
        on("enable_tensorrt"),
        (
            "trt_transformer",
            "trt_text_encoders",
            "trt_workspace_mb",
            "trt_max_aux_streams",
            "tensorrt_cache_dir",
            "trt_max_cached_shapes",
        ),
        components=("transformer", "text_encoder", "text_encoder_2"),
        impl="framepack_turbo.optim.torch_trt:TensorRTPass",
    ),
    PassSpec(
        "onnx",
        "ONNX engines (onnxruntime)",
        "compilation",
        on("use_onnx_engines", "onnx_trt_enable"),
        (
            "onnx_components",
            "onnx_dir",
            "onnx_trt_fp16",
            "onnx_trt_int8",
            "onnx_trt_device_id",
            "onnx_trt_workspace_mb",
            "onnx_trt_cache_dir",
            "trt_max_cached_shapes",
            "runtime_cache_dir",
        ),
        components=("transformer", "text_encoder", "text_encoder_2", "image_encoder", "vae"),
        impl="framepack_turbo.optim.onnx_engines:OnnxPass",
    ),
]


def passes() -> tuple[PassSpec, ...]:
    """Every pass, in the order the plan applies them: by phase, then as declared."""
    return tuple(sorted(_PASSES, key=lambda p: PHASES.index(p.phase)))


def get(name: str) -> PassSpec:
    for spec in _PASSES:
        if spec.name == name:
            return spec
    raise KeyError(f"no pass named {name!r}; the passes are {', '.join(names())}")


def names() -> tuple[str, ...]:
    return tuple(p.name for p in passes())


def family(name: str) -> tuple[PassSpec, ...]:
    return tuple(p for p in passes() if p.family == name)


def register(spec: PassSpec) -> PassSpec:
    """Add a pass (a plugin's, or a test's). Names are unique."""
    if any(p.name == spec.name for p in _PASSES):
        raise ValueError(f"a pass named {spec.name!r} is already registered")
    _PASSES.append(spec)
    return spec


def unregister(name: str) -> None:
    _PASSES.remove(get(name))


@contextmanager
def registered(spec: PassSpec) -> Iterator[PassSpec]:
    """`spec` registered for the duration of the block (tests)."""
    register(spec)
    try:
        yield spec
    finally:
        unregister(spec.name)


def readers(setting: str) -> tuple[PassSpec, ...]:
    """The passes that read `setting` (as their switch or otherwise)."""
    return tuple(p for p in passes() if setting in p.reads())


def shaping_settings() -> tuple[str, ...]:
    """The settings that change the optimized transformer's saved weights (the artifact's key), but those of
    passes with an `identity` function (it keys the artifact for them)."""
    return tuple(dict.fromkeys(s for p in passes() if p.shapes_weights and not p.identity for s in p.reads()))


def switched_off_for_export(settings: Settings) -> dict[str, Any]:
    """Setting values that turn off every pass an exported graph must not record: every pass but the
    weight passes (an export holds the weights as they are) and housekeeping. A switch a weight pass shares
    stays on (the LoRA list: merged, the LoRAs are in the weights an export holds; `lora_mode` merged so)."""
    weights = {k for p in passes() if p.phase == "weights" for k in p.switch}
    off = {
        k: off
        for p in passes()
        if p.phase != "weights" and not p.housekeeping
        for k, off in p.switch.items()
        if k not in weights and getattr(settings, k) != off
    }
    if settings.loras:  # adapters would not be in the graph's identity (no hash): an export merges them
        off["lora_mode"] = "merged"
    return off
