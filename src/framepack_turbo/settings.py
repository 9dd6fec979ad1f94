"""Settings: every `FRAMEPACK_*` variable and flag of the spec, typed, in one object.

Precedence, highest first: CLI (or API arguments) > environment > preset > default. Every value
knows where it came from (`Settings.sources`). Each field `name` is read from `FRAMEPACK_NAME` and
from the flag `--name-with-dashes`; booleans also take `--no-name`. Bad values raise
`SettingsError` with one line per value naming the variable, the value and what is allowed.

Settings are read here and only here: `Settings.load(overrides, environ=...)` is the one reader of the
environment (`os.environ` unless given another mapping, e.g. `{}` for a run that must ignore the
shell); passes receive a `Settings` and never look at the environment. Importing this module does not
import torch.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple, get_args, get_origin

from pydantic import Field, PrivateAttr, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from framepack_turbo.constants import (
    CRF_ZERO,
    ENV_PREFIX,
    MAX_CRF,
    MAX_LORA_WEIGHT,
    MAX_RESOLUTION,
    MAX_SECONDS,
    MIN_RESOLUTION,
    ONNX_COMPONENTS,
    PRESET_ENV,
    RANDOM_SEED,
    RANDOM_SEED_BELOW,
)
from framepack_turbo.errors import InputError

log = logging.getLogger(__name__)


def resolve_seed(value: Any) -> Any:
    """ "random" (any case) becomes a freshly drawn seed, which from then on is the seed: the job, its
    sidecar and its mp4 record that number. Anything else is left to validation."""
    if isinstance(value, str) and value.strip().lower() == RANDOM_SEED:
        return secrets.randbelow(RANDOM_SEED_BELOW)
    return value


Source = Literal["default", "preset", "env", "cli", "api"]


class SettingsError(InputError):
    """One or more settings have values that are not allowed. The message has one line per value."""


def _group(name: str) -> dict[str, Any]:
    return {"group": name}


# A field whose values name files or folders on this machine but whose type is not `Path` (a list of
# PATH[:WEIGHT] texts) says so in its json_schema_extra; `path_settings()` adds it to the Path-typed ones.
PATH_MARK = "path"


CsvList = Annotated[tuple[str, ...], NoDecode]  # "attn,mlp" in env and flags, not JSON


class Settings(BaseSettings):
    """Everything a run can be configured with. Field docs are the `meaning` column of docs/configuration.md."""

    model_config = SettingsConfigDict(
        extra="forbid",
        frozen=True,
        validate_default=True,
    )

    # ---- generation -------------------------------------------------------------------------
    model: Literal["framepack", "framepack-f1", "tiny", "tiny-random", "small", "full"] = Field(
        "framepack",
        description="Model preset: the real weights (framepack, framepack-f1); tiny, trained on a "
        "procedural world and shipped in the package (64 px, CPU); or random weights: tiny-random, small (CPU), "
        "full (real size, CUDA).",
        json_schema_extra=_group("generation"),
    )
    model_dir: Path | None = Field(
        None,
        description="Local folder with one sub-folder per component, laid out like the repos; must exist.",
        json_schema_extra=_group("generation"),
    )
    variant: Literal["inverted", "f1"] | None = Field(
        None,
        description="inverted (anti-drifting) or f1; unset: the variant the model was trained for.",
        json_schema_extra=_group("generation"),
    )
    seconds: float = Field(
        5.0, gt=0, le=MAX_SECONDS, description="Clip length in seconds.", json_schema_extra=_group("generation")
    )
    steps: int = Field(
        25, ge=1, le=1000, description="Sampling steps per section.", json_schema_extra=_group("generation")
    )
    window: int = Field(
        9,
        ge=1,
        le=64,
        description="Latent frames per section (latent_window_size).",
        json_schema_extra=_group("generation"),
    )
    seed: int = Field(
        31337,
        ge=0,
        lt=2**63,
        description=f"Random seed; {RANDOM_SEED!r} draws one (the outputs record it).",
        json_schema_extra=_group("generation"),
    )
    gs: float = Field(
        10.0, ge=0, le=100, description="Distilled guidance scale.", json_schema_extra=_group("generation")
    )
    cfg: float = Field(
        1.0,
        ge=1,
        le=100,
        description="Real CFG scale; 1 = off (one model call per step).",
        json_schema_extra=_group("generation"),
    )
    rs: float = Field(0.0, ge=0, le=1, description="CFG rescale.", json_schema_extra=_group("generation"))
    resolution: int = Field(
        640,
        ge=MIN_RESOLUTION,
        le=MAX_RESOLUTION,
        multiple_of=16,
        description="Bucket base resolution.",
        json_schema_extra=_group("generation"),
    )
    crf: int = Field(
        16,
        ge=0,
        le=MAX_CRF,
        description="h264 quality (lower is better; 1 is visually lossless, 0 is refused: players cannot open it).",
        json_schema_extra=_group("generation"),
    )
    device: str | None = Field(
        None, description="cuda, cuda:N or cpu; unset: CUDA when present.", json_schema_extra=_group("generation")
    )
    offline: bool = Field(
        False, description="Never contact the Hugging Face hub.", json_schema_extra=_group("generation")
    )

    # ---- LoRA ---------------------------------------------------------------------------------
    loras: CsvList = Field(
        (),
        description="Comma list of LoRA files (.safetensors), each PATH[:WEIGHT] (weight 1 without one); "
        "--lora PATH[:WEIGHT] is the repeatable flag.",
        json_schema_extra={**_group("lora"), PATH_MARK: True},
    )
    lora_mode: Literal["auto", "merged", "unmerged"] = Field(
        "auto",
        description="merged: folded into the weights before quantization and export (a step costs what it costs "
        "without); unmerged: PEFT adapters, switched between jobs without reloading; auto: merged unless "
        "bitsandbytes (whose weights take no merge).",
        json_schema_extra=_group("lora"),
    )
    lora_allow_partial: bool = Field(
        False,
        description="Load a LoRA whose keys are not all understood or whose modules are not all in the model "
        "(the load says what it skipped); off: that is an error.",
        json_schema_extra=_group("lora"),
    )
    lora_dir: Path = Field(
        Path("loras"),
        description="The web app's LoRA folder (its dropdown lists the .safetensors there).",
        json_schema_extra=_group("lora"),
    )

    # ---- quantization and precision ----------------------------------------------------------
    enable_quant: bool = Field(
        False, description="INT-N weight quantization of the transformer.", json_schema_extra=_group("quantization")
    )
    quant_bits: Literal[4, 8] = Field(8, description="Bits for ENABLE_QUANT.", json_schema_extra=_group("quantization"))
    quant_int8_mode: Literal["dynamic", "weight-only"] = Field(
        "dynamic",
        description="INT8 kernel: dynamic int8 activations (compute-bound, CPU) or weight-only (memory-bound).",
        json_schema_extra=_group("quantization"),
    )
    quant_group_size: Literal[32, 64, 128, 256] = Field(
        128,
        description="Group size of INT4 weight quantization (smaller: more accurate, more scales).",
        json_schema_extra=_group("quantization"),
    )
    enable_fp8: bool = Field(
        False, description="FP8 weights for the transformer.", json_schema_extra=_group("quantization")
    )
    fp8_target_keys: CsvList = Field(
        (),
        description="Comma list: only modules whose name contains one of these get FP8 (empty: all eligible).",
        json_schema_extra=_group("quantization"),
    )
    fp8_exclude_keys: CsvList = Field(
        (),
        description="Comma list: modules whose name contains one of these stay in high precision.",
        json_schema_extra=_group("quantization"),
    )
    fp8_use_scaled_mm: bool = Field(
        False,
        description="FP8 matmuls (dynamic per-row activations), compute capability >= 8.9; else FP8 storage only.",
        json_schema_extra=_group("quantization"),
    )
    use_bnb: bool = Field(
        False,
        description="bitsandbytes quantization of the transformer and text encoders.",
        json_schema_extra=_group("quantization"),
    )
    bnb_load_in_4bit: bool = Field(
        False, description="bitsandbytes 4-bit (NF4) instead of 8-bit.", json_schema_extra=_group("quantization")
    )
    bnb_cpu_offload: bool = Field(
        False, description="Let bitsandbytes keep some modules on the CPU.", json_schema_extra=_group("quantization")
    )
    bnb_device_map: Literal["auto", "cpu", "balanced"] = Field(
        "auto", description="Device placement for bitsandbytes loading.", json_schema_extra=_group("quantization")
    )
    bnb_double_quant: bool = Field(
        False, description="Quantize the 4-bit quantization constants too.", json_schema_extra=_group("quantization")
    )
    enforce_low_precision: bool = Field(
        False,
        description="Cast to bf16 (fp16 without bf16), keeping the layers that must stay fp32.",
        json_schema_extra=_group("quantization"),
    )
    enable_prune: bool = Field(
        False,
        description="Drop an evenly spaced subset of transformer blocks (lossy; never default).",
        json_schema_extra=_group("quantization"),
    )
    prune_dual_ratio: float = Field(
        0.25,
        ge=0,
        le=0.9,
        description="Share of dual-stream blocks ENABLE_PRUNE removes.",
        json_schema_extra=_group("quantization"),
    )
    prune_single_ratio: float = Field(
        0.25,
        ge=0,
        le=0.9,
        description="Share of single-stream blocks ENABLE_PRUNE removes.",
        json_schema_extra=_group("quantization"),
    )

    # ---- compilation -------------------------------------------------------------------------
    enable_compile: bool = Field(
        False, description="torch.compile the transformer.", json_schema_extra=_group("compilation")
    )
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = Field(
        "default",
        description="torch.compile mode; reduce-overhead and max-autotune use CUDA graphs.",
        json_schema_extra=_group("compilation"),
    )
    compile_scope: Literal["blocks", "model"] = Field(
        "blocks",
        description="Compile each repeated block (fast to compile, reused) or the whole transformer.",
        json_schema_extra=_group("compilation"),
    )
    jit_mode: Literal["off", "trace", "script"] = Field(
        "off", description="TorchScript the transformer.", json_schema_extra=_group("compilation")
    )
    jit_artifact: Path = Field(
        Path("optimized_models/transformer_torchscript.pt"),
        description="Where the TorchScript artifact lives.",
        json_schema_extra=_group("compilation"),
    )
    jit_save: Path | None = Field(
        None, description="Save the traced/scripted transformer here.", json_schema_extra=_group("compilation")
    )
    jit_load: Path | None = Field(
        None,
        description="Load a traced/scripted transformer from here; must exist.",
        json_schema_extra=_group("compilation"),
    )
    jit_strict: bool = Field(
        False,
        description="Refuse inputs whose shapes differ from the traced ones.",
        json_schema_extra=_group("compilation"),
    )
    fast_start: bool = Field(
        False,
        description="Skip compile, optimized-model caching and optional encoder changes.",
        json_schema_extra=_group("compilation"),
    )

    # ---- attention ---------------------------------------------------------------------------
    xformers_mode: Literal["standard", "aggressive", "off"] = Field(
        "standard",
        description="Transformer attention: standard = PyTorch SDPA, aggressive = fastest installed kernel, off = math.",
        json_schema_extra=_group("attention"),
    )
    encoder_attn_implementation: Literal["default", "eager", "sdpa", "flash_attention_2"] = Field(
        "default",
        description="Encoders' attention implementation; default: as loaded (ENABLE_BETTERTRANSFORMER=1 picks the fastest).",
        json_schema_extra=_group("attention"),
    )
    enable_bettertransformer: bool = Field(
        False,
        description="SDPA attention in the text and image encoders (off by default, as the spec says).",
        json_schema_extra=_group("attention"),
    )

    # ---- caches ------------------------------------------------------------------------------
    enable_opt_cache: bool = Field(
        False,
        description="Save the optimized transformer and load it on later runs.",
        json_schema_extra=_group("caches"),
    )
    optimized_transformer: Path = Field(
        Path("optimized_models/transformer_quantized.safetensors"),
        description="Where the optimized transformer is saved.",
        json_schema_extra=_group("caches"),
    )
    runtime_cache: bool = Field(
        True, description="Persist what is safe to reuse across runs.", json_schema_extra=_group("caches")
    )
    runtime_cache_dir: Path = Field(
        Path("Cache/runtime_caches"), description="Runtime cache folder.", json_schema_extra=_group("caches")
    )
    enable_module_cache: bool = Field(
        False,
        description="Cache text/image encoder outputs on disk by content hash.",
        json_schema_extra=_group("caches"),
    )
    module_cache_max_mb: int = Field(
        2048,
        ge=1,
        le=1 << 20,
        description="Disk budget of the encoder output cache; least recently used entries go first.",
        json_schema_extra=_group("caches"),
    )
    module_cache_loose_match: bool = Field(
        False,
        description="Also reuse a cached prompt that differs only in case, spacing or punctuation (approximate: warns).",
        json_schema_extra=_group("caches"),
    )
    enable_fbcache: bool = Field(
        False,
        description="First-block cache (reuse the other blocks' residual when the first changes little).",
        json_schema_extra=_group("caches"),
    )
    fbcache_threshold: float = Field(
        0.035,
        gt=0,
        le=1,
        description="Relative L1 change under which the first-block cache reuses.",
        json_schema_extra=_group("caches"),
    )
    fbcache_verbose: bool = Field(
        False, description="Log every first-block cache decision.", json_schema_extra=_group("caches")
    )
    fbcache_max_skip: int = Field(
        3,
        ge=1,
        le=100,
        description="Steps in a row the first-block cache may reuse.",
        json_schema_extra=_group("caches"),
    )
    enable_teacache: bool = Field(
        False,
        description="TeaCache as FramePack has it (FramePack's UI turns it on; here lossy passes are opt-in).",
        json_schema_extra=_group("caches"),
    )
    teacache_threshold: float = Field(
        0.15, gt=0, le=1, description="TeaCache relative L1 threshold.", json_schema_extra=_group("caches")
    )
    teacache_verbose: bool = Field(
        False, description="Log every TeaCache decision.", json_schema_extra=_group("caches")
    )
    enable_sim_cache: bool = Field(False, description="Per-block similarity cache.", json_schema_extra=_group("caches"))
    sim_cache_threshold: float = Field(
        0.9,
        ge=0,
        le=1,
        description="Cosine similarity above which a block reuses its cached residual.",
        json_schema_extra=_group("caches"),
    )
    sim_cache_max_skip: int = Field(
        1, ge=1, le=100, description="Consecutive reuses per block.", json_schema_extra=_group("caches")
    )
    sim_cache_max_entries: int = Field(
        12, ge=1, le=4096, description="Cached entries per block.", json_schema_extra=_group("caches")
    )
    sim_cache_budget_mb: int = Field(
        1024,
        ge=1,
        le=1 << 20,
        description="Memory for all similarity cache entries; least recently used entries go first.",
        json_schema_extra=_group("caches"),
    )
    sim_cache_use_faiss: bool = Field(
        False,
        description="FAISS inner-product search (exact search otherwise; same results).",
        json_schema_extra=_group("caches"),
    )
    sim_cache_verbose: bool = Field(
        False, description="Log similarity cache decisions.", json_schema_extra=_group("caches")
    )
    enable_kv_cache: bool = Field(
        False,
        description="Reuse K/V of the context tokens across steps of a section.",
        json_schema_extra=_group("caches"),
    )
    kv_cache_len: int = Field(
        4096, ge=1, le=1 << 20, description="Maximum cached sequence length.", json_schema_extra=_group("caches")
    )
    kv_cache_refresh: int = Field(
        4,
        ge=1,
        le=1000,
        description="Steps between recomputations of the context tokens' K/V (1: every step, no reuse).",
        json_schema_extra=_group("caches"),
    )
    kv_cache_verbose: bool = Field(False, description="Log KV cache use.", json_schema_extra=_group("caches"))
    enable_magcache: bool = Field(
        False,
        description="MagCache: skip steps whose calibrated magnitude ratio says the residual barely changes.",
        json_schema_extra=_group("caches"),
    )
    magcache_threshold: float = Field(
        0.1,
        gt=0,
        le=10,
        description="Accumulated ratio error up to which MagCache skips (published: 0.1; 0.15 faster).",
        json_schema_extra=_group("caches"),
    )
    magcache_k: int = Field(
        2, ge=1, le=100, description="Steps in a row MagCache may skip (K).", json_schema_extra=_group("caches")
    )
    magcache_retention: float = Field(
        0.2,
        ge=0,
        lt=1,
        description="Fraction of each section's first steps MagCache always computes.",
        json_schema_extra=_group("caches"),
    )
    magcache_ratios: Path | None = Field(
        None,
        description="MagCache ratios file (JSON) searched first and written by calibration; "
        "default: the runtime cache, then the shipped ratios.",
        json_schema_extra=_group("caches"),
    )
    magcache_calibrate: bool = Field(
        False,
        description="Skip nothing and record this model's MagCache ratios (`framepack calibrate magcache`).",
        json_schema_extra=_group("caches"),
    )
    magcache_verbose: bool = Field(
        False, description="Log every MagCache decision.", json_schema_extra=_group("caches")
    )

    # ---- one video on several GPUs -------------------------------------------------------------
    parallel_degree: int = Field(
        1,
        ge=1,
        le=64,
        description="Context parallelism: ranks (GPUs; CPU processes with --device cpu) sharing each step of one video (1: off; --gpus).",
        json_schema_extra=_group("parallel"),
    )
    parallel_mode: Literal["ulysses", "ring"] = Field(
        "ulysses",
        description="How attention is split: ulysses (all-to-all of heads; heads must divide by the degree) or ring (K/V passed around; CUDA; --parallel).",
        json_schema_extra=_group("parallel"),
    )

    # ---- memory and loading ------------------------------------------------------------------
    use_memory_v2: bool = Field(
        False,
        description="Block offload from pinned memory with prefetch on a side CUDA stream.",
        json_schema_extra=_group("memory"),
    )
    memory_mode: Literal["auto", "high-vram", "v1", "v2"] = Field(
        "auto",
        description="Model placement: auto (from free VRAM), high-vram (all resident), v1 (on-demand moves), v2 (streamed blocks).",
        json_schema_extra=_group("memory"),
    )
    high_vram_threshold_gb: float = Field(
        60.0,
        ge=0,
        le=4096,
        description="Free VRAM (GB) above which auto keeps every model resident (FramePack's 60).",
        json_schema_extra=_group("memory"),
    )
    gpu_memory_preservation: float = Field(
        6.0,
        ge=0,
        le=128,
        description="GB of GPU memory kept free when models are moved on demand (FramePack's).",
        json_schema_extra=_group("memory"),
    )
    parallel_loaders: int = Field(
        4,
        ge=1,
        le=32,
        description="Threads reading component weights from disk (1: serial); on when the host has room.",
        json_schema_extra=_group("memory"),
    )
    preload_repos: bool = Field(
        False,
        description="Fetch every component's repo snapshot (in parallel) before loading.",
        json_schema_extra=_group("memory"),
    )
    force_parallel_loaders: bool = Field(
        False,
        description="Read weights in parallel even when the host-memory check says there is no room (builds stay serial).",
        json_schema_extra=_group("memory"),
    )
    vae_chunk_size: int | None = Field(
        None,
        ge=0,
        le=1024,
        description="Latent frames per VAE decode chunk (0: one pass; at least 2 otherwise); unset: from free GPU memory.",
        json_schema_extra=_group("memory"),
    )
    vae_chunk_reserve_gb: float = Field(
        2.0, ge=0, le=1024, description="GB kept free when sizing VAE chunks.", json_schema_extra=_group("memory")
    )
    vae_chunk_safety: float = Field(
        1.2,
        ge=1,
        le=10,
        description="Safety factor on the VAE chunk memory estimate.",
        json_schema_extra=_group("memory"),
    )
    vae_upscale_factor: int = Field(
        8, ge=1, le=64, description="Spatial upscale of the VAE (for the estimate).", json_schema_extra=_group("memory")
    )

    # ---- TensorRT / ONNX ---------------------------------------------------------------------
    enable_tensorrt: bool = Field(
        False, description="TensorRT runtime (torch-tensorrt).", json_schema_extra=_group("tensorrt")
    )
    trt_transformer: bool = Field(
        False, description="TensorRT for the transformer.", json_schema_extra=_group("tensorrt")
    )
    trt_text_encoders: bool = Field(
        False, description="TensorRT for the text encoders.", json_schema_extra=_group("tensorrt")
    )
    use_onnx_engines: bool = Field(
        False, description="Run exported ONNX components through onnxruntime.", json_schema_extra=_group("tensorrt")
    )
    onnx_components: CsvList = Field(
        ("transformer",),
        description="Comma list of components USE_ONNX_ENGINES runs through onnxruntime: "
        "transformer, text-encoder, image-encoder, vae-decoder.",
        json_schema_extra=_group("tensorrt"),
    )
    onnx_dir: Path | None = Field(
        None,
        description="Exports from `framepack export onnx --out DIR` (unset: exported on first use into "
        "RUNTIME_CACHE_DIR/onnx).",
        json_schema_extra=_group("tensorrt"),
    )
    tensorrt_cache_dir: Path = Field(
        Path("Cache/trt_cache"), description="TensorRT engine cache.", json_schema_extra=_group("tensorrt")
    )
    trt_workspace_mb: int = Field(
        4096, ge=16, le=1 << 20, description="TensorRT workspace (MB).", json_schema_extra=_group("tensorrt")
    )
    trt_max_aux_streams: int = Field(
        2, ge=0, le=64, description="TensorRT auxiliary streams.", json_schema_extra=_group("tensorrt")
    )
    trt_max_cached_shapes: int = Field(
        8,
        ge=1,
        le=1024,
        description="Engines kept per component (one per shape).",
        json_schema_extra=_group("tensorrt"),
    )
    onnx_trt_enable: bool = Field(
        False, description="onnxruntime TensorRT execution provider.", json_schema_extra=_group("tensorrt")
    )
    onnx_trt_fp16: bool = Field(
        True, description="FP16 in the TensorRT provider.", json_schema_extra=_group("tensorrt")
    )
    onnx_trt_int8: bool = Field(
        False, description="INT8 in the TensorRT provider (needs calibration).", json_schema_extra=_group("tensorrt")
    )
    onnx_trt_device_id: int = Field(
        0, ge=0, le=64, description="GPU for the TensorRT provider.", json_schema_extra=_group("tensorrt")
    )
    onnx_trt_workspace_mb: int = Field(
        4096, ge=16, le=1 << 20, description="TensorRT provider workspace (MB).", json_schema_extra=_group("tensorrt")
    )
    onnx_trt_cache_dir: Path = Field(
        Path("Cache/onnx_trt_cache"),
        description="TensorRT provider engine cache.",
        json_schema_extra=_group("tensorrt"),
    )

    preset: str = Field(
        "default",
        description="Optimization preset: values between the defaults and the environment.",
        json_schema_extra=_group("presets"),
    )

    _sources: dict[str, str] = PrivateAttr(default_factory=dict)  # name -> default/preset/env/cli/api

    @field_validator("fp8_target_keys", "fp8_exclude_keys", "onnx_components", mode="before")
    @classmethod
    def _split_csv(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("loras", mode="before")
    @classmethod
    def _split_loras(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("loras")
    @classmethod
    def _lora_files(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        specs = [parse_lora(text) for text in value]  # raises ValueError naming the bad one
        for spec in specs:
            if spec.path.is_dir():  # PEFT's save_pretrained folder (models/lora.py reads it); no other folder
                if not (spec.path / "adapter_model.safetensors").is_file():
                    raise ValueError(
                        f"{spec.path}: is a folder, not a LoRA file (a folder is read only where it holds "
                        "PEFT's adapter_model.safetensors)"
                    )
                continue
            if spec.path.suffix != ".safetensors":
                raise ValueError(f"{spec.path}: only .safetensors LoRA files are read (no pickle)")
            if not spec.path.is_file():
                raise ValueError(f"{spec.path}: no such file")
        return tuple(f"{spec.path}:{spec.weight:g}" for spec in specs)

    @field_validator("onnx_components")
    @classmethod
    def _onnx_components(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [c for c in value if c not in ONNX_COMPONENTS]
        if unknown or not value:
            raise ValueError(f"{', '.join(unknown) or 'empty'}: choose from {', '.join(ONNX_COMPONENTS)}")
        return tuple(dict.fromkeys(value))

    @field_validator("quant_bits", "quant_group_size", mode="before")
    @classmethod
    def _int_choice(cls, value: Any) -> Any:
        # Literal[4, 8] does not coerce the strings flags and variables arrive as.
        return int(value) if isinstance(value, str) and value.strip().isdigit() else value

    @field_validator("seed", mode="before")
    @classmethod
    def _random_seed(cls, value: Any) -> Any:
        return resolve_seed(value)

    @field_validator("crf")
    @classmethod
    def _playable_crf(cls, value: int) -> int:
        if value == 0:
            raise ValueError(CRF_ZERO)
        return value

    @field_validator("vae_chunk_size")
    @classmethod
    def _vae_chunk(cls, value: int | None) -> int | None:
        if value == 1:  # chunks overlap by one latent frame: a chunk of one would never advance
            raise ValueError("must be 0 (one pass) or at least 2 latent frames")
        return value

    @field_validator("model_dir", "jit_load")
    @classmethod
    def _must_exist(cls, value: Path | None, info) -> Path | None:
        if value is None:
            return value
        if info.field_name == "model_dir" and not value.is_dir():
            raise ValueError("must be an existing folder")
        if info.field_name == "jit_load" and not value.is_file():
            raise ValueError("must be an existing file")
        return value

    @field_validator("device")
    @classmethod
    def _device_name(cls, value: str | None) -> str | None:
        if value is None:
            return value
        kind, _, index = value.partition(":")
        if kind not in ("cpu", "cuda", "mps", "xpu") or (index and not index.isdigit()):
            raise ValueError("must be cpu, cuda or cuda:N")
        return value

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str) -> str:
        from framepack_turbo.presets import PRESETS

        if value not in PRESETS:
            raise ValueError(f"unknown preset; choose {', '.join(PRESETS)}")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # `load` merges preset < environment < explicit values itself (from the mapping it is given), so
        # pydantic-settings reads nothing on its own: not os.environ, not a dotenv file.
        return (init_settings,)

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        overrides: Mapping[str, Any] | None = None,
        *,
        source: Source = "cli",
        environ: Mapping[str, str] | None = None,
    ) -> Settings:
        """Build from explicit values (CLI flags or API arguments), the environment and the preset.

        `environ`: where `FRAMEPACK_*` variables are read (default `os.environ`). Raises `SettingsError`
        with one line per bad value. Unknown `FRAMEPACK_*` variables are logged as warnings with the
        nearest known name.
        """
        environ = os.environ if environ is None else environ
        overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
        names = setting_names(cls)
        unknown = set(overrides) - set(names)
        if unknown:
            raise SettingsError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        for line in unknown_env_warnings(environ, cls):
            log.warning(line)
        env_values = _env_values(environ, cls)
        from framepack_turbo.presets import PRESETS

        preset_name = overrides.get("preset") or env_values.get("preset") or "default"
        preset_values = PRESETS.get(preset_name, {})
        try:
            settings = cls(**{**preset_values, **env_values, **overrides})
        except ValidationError as exc:
            raise SettingsError("\n".join(_error_lines(exc, overrides, env_values, source, cls))) from None
        for name in names:
            if name in overrides:
                settings._sources[name] = source
            elif name in env_values:
                settings._sources[name] = "env"
            elif name in preset_values:
                settings._sources[name] = "preset"
            else:
                settings._sources[name] = "default"
        return settings

    @property
    def sources(self) -> dict[str, str]:
        return dict(self._sources)

    def source_of(self, name: str) -> str:
        return self._sources.get(name, "default")

    def explicitly_set(self, name: str) -> bool:
        """Set by the user (CLI, API or environment), not by a preset or default."""
        return self.source_of(name) in ("cli", "api", "env")

    def values(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in setting_names()}

    def to_json_dict(self) -> dict[str, Any]:
        """name -> {value, source, env}, JSON-ready: the doctor output and the sidecar's settings."""
        return {
            name: {"value": _jsonable(getattr(self, name)), "source": self.source_of(name), "env": env_name(name)}
            for name in setting_names()
        }


# ---- names, flags and the environment --------------------------------------------------------------


class LoraSpec(NamedTuple):
    path: Path
    weight: float


def parse_lora(text: str) -> LoraSpec:
    """PATH[:WEIGHT] (a weight only when what follows the last colon is a number, so C:\\x.safetensors works)."""
    path, sep, tail = text.rpartition(":")
    weight = 1.0
    if sep:
        try:
            weight = float(tail)
        except ValueError:
            path, weight = text, 1.0
    else:
        path = text
    if not math.isfinite(weight) or not -MAX_LORA_WEIGHT <= weight <= MAX_LORA_WEIGHT:
        raise ValueError(f"{text}: the weight must be a number from -{MAX_LORA_WEIGHT:g} to {MAX_LORA_WEIGHT:g}")
    if not path:
        raise ValueError(f"{text}: no file before the weight")
    return LoraSpec(Path(path), weight)


def lora_specs(settings: Settings) -> tuple[LoraSpec, ...]:
    return tuple(parse_lora(text) for text in settings.loras)


def resolved_lora_mode(settings: Settings) -> Literal["merged", "unmerged"] | None:
    """How this run's LoRAs go on (None: no LoRA): auto merges unless bitsandbytes quantizes at load."""
    if not settings.loras:
        return None
    if settings.lora_mode == "auto":
        return "unmerged" if settings.use_bnb else "merged"
    return settings.lora_mode


def lora_merged(settings: Settings) -> bool:
    return resolved_lora_mode(settings) == "merged"


def lora_unmerged(settings: Settings) -> bool:
    return resolved_lora_mode(settings) == "unmerged"


def setting_names(settings_cls: type[Settings] | None = None) -> list[str]:
    return list((settings_cls or Settings).model_fields)


def _mentions_path(annotation: Any) -> bool:
    if annotation is Path or (isinstance(annotation, type) and issubclass(annotation, Path)):
        return True
    return any(_mentions_path(arg) for arg in get_args(annotation))


def path_settings(settings_cls: type[Settings] | None = None) -> tuple[str, ...]:
    """The settings that name a file or folder on this machine (where to read or write): every field whose
    type holds a `Path`, and those marked `PATH_MARK`. A clip's record is never a source of these
    (pipeline/recipe.py): a new path setting is covered by its type alone."""
    out = []
    for name, field in (settings_cls or Settings).model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if _mentions_path(field.annotation) or extra.get(PATH_MARK):
            out.append(name)
    return tuple(out)


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def known_env(settings_cls: type[Settings] | None = None) -> list[str]:
    return [env_name(n) for n in setting_names(settings_cls)]


def _env_values(environ: Mapping[str, str], settings_cls: type[Settings] | None = None) -> dict[str, str]:
    """Setting name -> raw text, for the `FRAMEPACK_*` variables given a value (names are case-insensitive;
    `export FRAMEPACK_X=` means unset, not invalid)."""
    names = {env_name(n): n for n in setting_names(settings_cls)}
    return {names[k.upper()]: v for k, v in sorted(environ.items()) if k.upper() in names and v != ""}


def _closest(word: str, candidates: list[str]) -> str | None:
    """The nearest candidate by edit similarity, compared without the shared prefix (which would make
    every name look alike)."""
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.75)
    return close[0] if close else None


def unknown_env_warnings(environ: Mapping[str, str], settings_cls: type[Settings] | None = None) -> list[str]:
    """A line per FRAMEPACK_* variable we do not know, with the nearest known name."""
    known = known_env(settings_cls)
    lines = []
    for key in sorted(environ):
        upper = key.upper()
        if upper.startswith(ENV_PREFIX) and upper not in known:
            close = _closest(upper.removeprefix(ENV_PREFIX), [k.removeprefix(ENV_PREFIX) for k in known])
            hint = (
                f"; did you mean {ENV_PREFIX}{close}?" if close else "; see docs/configuration.md for the known names"
            )
            lines.append(f"unknown variable {key} is ignored{hint}")
    return lines


def allowed(name: str, settings_cls: type[Settings] | None = None) -> str:
    """What a setting accepts, in words: for error lines and the docs."""
    field = (settings_cls or Settings).model_fields[name]
    annotation = field.annotation
    args = [a for a in get_args(annotation) if a is not type(None)]
    optional = type(None) in get_args(annotation)
    if get_origin(annotation) is Literal or (args and get_origin(args[0]) is Literal):
        choices = get_args(annotation if get_origin(annotation) is Literal else args[0])
        text = " or ".join(str(c) for c in choices)
    elif annotation is bool:
        text = "1 or 0 (also true/false, yes/no, on/off)"
    elif annotation in (int, float) or (args and args[0] in (int, float)):
        kind = "an integer" if int in (annotation, *args) else "a number"
        text = kind + _range_text(field)
    elif name == "loras":
        text = "a comma-separated list of PATH[:WEIGHT] (.safetensors files)"
    elif name in ("fp8_target_keys", "fp8_exclude_keys"):
        text = "a comma-separated list of module-name parts"
    elif name == "model_dir":
        text = "an existing folder"
    elif name == "jit_load":
        text = "an existing file"
    elif name == "device":
        text = "cpu, cuda or cuda:N"
    elif name == "preset":
        from framepack_turbo.presets import PRESETS

        text = " or ".join(PRESETS)
    else:
        text = "a path" if Path in (annotation, *args) else "text"
    return text + (" (unset: automatic)" if optional and name not in ("model_dir", "jit_save", "jit_load") else "")


def _range_text(field: FieldInfo) -> str:
    bounds, multiple = [], None
    for m in field.metadata:
        for attr, symbol in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            if getattr(m, attr, None) is not None:
                bound = getattr(m, attr)
                bounds.append(f"{symbol} {bound}" if isinstance(bound, int) else f"{symbol} {bound:g}")
        if getattr(m, "multiple_of", None) is not None:
            multiple = m.multiple_of
    text = " " + " and ".join(bounds) if bounds else ""
    return text + (f", a multiple of {multiple}" if multiple else "")


def _error_lines(
    exc: ValidationError, overrides: Mapping[str, Any], env_values: Mapping[str, str], source: str, settings_cls
) -> list[str]:
    lines = []
    for err in exc.errors():
        name = str(err["loc"][0]) if err["loc"] else "?"
        if name not in settings_cls.model_fields:
            lines.append(f"{name}: {err['msg']}")
            continue
        value = err.get("input")
        if name in overrides:
            label = f"{flag_name(name)} {value}" if source == "cli" else f"{name}={value!r}"
        elif name in env_values:
            label = f"{env_name(name)}={env_values[name]}"
        else:
            label = f"{name}={value!r} (from preset)"
        custom = err["msg"].removeprefix("Value error, ") if err["type"] == "value_error" else None
        lines.append(f"{label}: {custom}" if custom else f"{label}: allowed {allowed(name, settings_cls)}")
    return lines


def _env_text(value: Any) -> str:
    """A value as it would be written in an env file."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, tuple):
        return ",".join(value)
    return str(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value


# ---- CLI flags ----------------------------------------------------------------------------------------

FLAG_ALIASES = {"--disable-bettertransformer": ("enable_bettertransformer", False)}


def parse_flags(args: list[str]) -> dict[str, Any]:
    """`--quant-bits 4 --enable-compile --no-runtime-cache --fp8-target-keys=attn,mlp` -> raw values.

    Values stay strings: validation (and its error lines) happens in `Settings.load`. Unknown flags
    raise `SettingsError` with the nearest known flag.
    """
    flags = {flag_name(n): n for n in setting_names()}
    bools = {flag_name(n) for n in setting_names() if Settings.model_fields[n].annotation is bool}
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        key, eq, inline = arg.partition("=")
        if key in FLAG_ALIASES and not eq:
            name, value = FLAG_ALIASES[key]
            out[name] = value
        elif key.startswith("--no-") and "--" + key[5:] in bools and not eq:
            out[flags["--" + key[5:]]] = False
        elif key in flags:
            name = flags[key]
            if eq:
                out[name] = inline
            elif key in bools:
                out[name] = True
            elif i + 1 < len(args):
                i += 1
                out[name] = args[i]
            else:
                raise SettingsError(f"{key} needs a value: allowed {allowed(name)}")
        else:
            candidates = [*flags, *FLAG_ALIASES, *(f"--no-{b[2:]}" for b in bools)]
            close = _closest(key.removeprefix("--"), [c.removeprefix("--") for c in candidates])
            hint = f"; did you mean --{close}?" if close else ""
            raise SettingsError(f"unknown option {key}{hint}")
        i += 1
    return out


def flags_help() -> str:
    """Every settings flag with its variable and default, one per line, for `--help`."""
    lines = []
    for name in setting_names():
        field = Settings.model_fields[name]
        default = _jsonable(field.get_default(call_default_factory=True))
        lines.append(f"{flag_name(name):32} {env_name(name):36} default {default!s:>8}  {allowed(name)}")
    return "\n".join(lines)


GROUP_TITLES = {
    "generation": "Generation",
    "quantization": "Quantization and precision",
    "compilation": "Compilation",
    "attention": "Attention",
    "caches": "Caches",
    "parallel": "One video on several GPUs",
    "memory": "Memory and loading",
    "tensorrt": "TensorRT and ONNX",
    "presets": "Preset",
}


def markdown_table() -> str:
    """docs/configuration.md, generated from the fields (a test keeps the file up to date)."""
    from framepack_turbo.presets import PRESETS

    out = [
        "# Configuration",
        "",
        "Generated from `framepack_turbo.settings.Settings` by `python -m framepack_turbo.settings`;",
        "a test fails when this file is out of date.",
        "",
        "Every setting is read from its environment variable and from its flag (booleans also take",
        "`--no-NAME`; `--disable-bettertransformer` is `--no-enable-bettertransformer`). Precedence:",
        "flag (or Python argument) > environment > preset > default. `framepack doctor` shows each",
        "value with its source. Unknown `FRAMEPACK_*` variables are reported with the nearest known name.",
        "",
        f"Presets (`--preset NAME` or `{PRESET_ENV}`): "
        + ", ".join(f"`{p}`" for p in PRESETS)
        + ". See [what each preset sets](#what-each-preset-sets) below.",
        "",
    ]
    group = None
    for name in setting_names():
        field = Settings.model_fields[name]
        g = (field.json_schema_extra or {}).get("group", "other")
        if g != group:
            group = g
            out += [
                "",
                f"## {GROUP_TITLES.get(g, g)}",
                "",
                "| variable | flag | default | allowed | meaning |",
                "|---|---|---|---|---|",
            ]
        default = _jsonable(field.get_default(call_default_factory=True))
        default_text = "unset" if default is None else ("" if default == [] else str(default))
        flag = flag_name(name) + (" / --disable-bettertransformer" if name == "enable_bettertransformer" else "")
        out.append(f"| `{env_name(name)}` | `{flag}` | `{default_text}` | {allowed(name)} | {field.description} |")
    out += _passes_table()
    out += [
        "",
        "## What each preset sets",
        "",
        "Named after the spec's example configurations. A preset sets the values below; the",
        "environment and flags still override each.",
        "",
    ]
    for pname, values in PRESETS.items():
        body = ", ".join(f"`{env_name(k)}={_env_text(v)}`" for k, v in values.items()) or "nothing: every default"
        out.append(f"- `{pname}`: {body}")
    return "\n".join(out) + "\n"


def _passes_table() -> list[str]:
    """Which settings switch which pass, from the pass registry (optim/registry.py)."""
    from framepack_turbo.optim import registry

    out = [
        "",
        "## Passes",
        "",
        "Each optimization pass, in the order the plan applies them, with the settings that turn it on",
        "(any of them away from its off value) and the others it reads. Lossy passes change what the video",
        "shows by design; removable ones can be switched between jobs without loading the models again.",
        "",
        "| pass | phase | switched on by | also reads | lossy | removable |",
        "|---|---|---|---|---|---|",
    ]
    for p in registry.passes():
        switch = ", ".join(f"`{env_name(k)}`" for k in p.switch) or "always on"
        reads = ", ".join(f"`{env_name(k)}`" for k in p.settings) or "-"
        lossy, removable = ("yes" if p.lossy else "no"), ("yes" if p.removable else "no")
        out.append(f"| {p.title} (`{p.name}`) | {p.phase} | {switch} | {reads} | {lossy} | {removable} |")
    return out


if __name__ == "__main__":
    print(markdown_table(), end="")
