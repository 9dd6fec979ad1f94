"""Optimization presets: the spec's example configurations, by name.

A preset is the layer between the defaults and the environment: `FRAMEPACK_*` variables and flags
still override each of its values. (Model presets, which name weights, are in models/presets.py.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    # "Maximum Performance (Quantized + Compiled + Cached)". Its step cache is the frontier's fastest point
    # at 40 dB PSNR against the uncached clip with the motion kept (`framepack bench --model tiny --sweep all`,
    # docs/benchmarks/tiny-cpu-frontier.md: TeaCache 0.15, FramePack's own default, 2.08x per step, 40.2 dB).
    # The spec's example stacked the first-block and similarity caches; only the first ran (they are
    # exclusive), and at its 0.035 it skipped 16% of the steps there (56 dB, 0.99x).
    "max-performance": {
        "enable_quant": True,
        "quant_bits": 8,
        "enable_compile": True,
        "enable_opt_cache": True,
        "optimized_transformer": Path("optimized_models/transformer_q8_compiled.safetensors"),
        "enable_module_cache": True,
        "enable_teacache": True,
        "teacache_threshold": 0.15,
        "xformers_mode": "aggressive",
        "use_memory_v2": True,
    },
    # A step cache and nothing else (no weights changed, no compiler, any machine): the frontier's fastest
    # point at 45 dB with the motion kept (same sweep: MagCache 0.25, K 4, 1.61x per step, 48.1 dB).
    "fast": {
        "enable_magcache": True,
        "magcache_threshold": 0.25,
        "magcache_k": 4,
        "enable_module_cache": True,
    },
    # "TensorRT Maximum Speed" (requires ONNX models exported first)
    "tensorrt": {
        "enable_tensorrt": True,
        "trt_transformer": True,
        "trt_text_encoders": True,
        "use_onnx_engines": True,
        "trt_workspace_mb": 8192,
        "tensorrt_cache_dir": Path("Cache/trt_engines"),
        "use_bnb": False,
    },
    # "FP8 Maximum Quality (Hopper GPUs)"
    "fp8-quality": {
        "enable_fp8": True,
        "fp8_use_scaled_mm": True,
        "enable_compile": True,
        "enable_opt_cache": True,
        "optimized_transformer": Path("optimized_models/transformer_fp8.safetensors"),
    },
    # "Memory-Constrained (4-bit + CPU Offload)"
    "low-vram": {
        "use_bnb": True,
        "bnb_load_in_4bit": True,
        "bnb_cpu_offload": True,
        "bnb_device_map": "balanced",
        "enable_fbcache": True,
        "enable_sim_cache": True,
        "enable_kv_cache": True,
        "use_memory_v2": True,
    },
}
