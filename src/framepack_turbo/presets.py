"""Optimization presets: the spec's example configurations, by name.

A preset is the layer between the defaults and the environment: `FRAMEPACK_*` variables and flags
still override each of its values. (Model presets, which name weights, are in models/presets.py.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    # "Maximum Performance (Quantized + Compiled + Cached)"
    "max-performance": {
        "enable_quant": True,
        "quant_bits": 8,
        "enable_compile": True,
        "enable_opt_cache": True,
        "optimized_transformer": Path("optimized_models/transformer_q8_compiled.safetensors"),
        "enable_module_cache": True,
        "enable_fbcache": True,
        "enable_sim_cache": True,
        "sim_cache_use_faiss": True,
        "xformers_mode": "aggressive",
        "use_memory_v2": True,
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
