"""The compatibility engine: rules as data, checked before anything loads. Nothing else decides this.

A rule has an id, a severity, a condition on (settings, hardware), a message that says what is
true, and the fix. `critical` stops `generate` before any model loads (`--ignore-incompatible`
proceeds after a 5 s pause); `warning` runs, usually without the pass it names (`disables`);
`info` is worth knowing. Every rule states a fact backed by a test in tests/test_compat.py; rules
about hardware we cannot run in CI say why in a comment. A rule that would make a pass skip itself
while it applies is written here instead, so the plan that `framepack doctor` prints is the plan that
runs. Which settings switch which pass comes from the pass registry (optim/registry.py); a rule that
names a pass the registry does not have fails at import.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import Enum

from framepack_turbo import placement
from framepack_turbo.constants import FP8_COMPUTE_CAPABILITY, FPS
from framepack_turbo.errors import FramePackError
from framepack_turbo.hardware import Hardware
from framepack_turbo.optim import registry
from framepack_turbo.settings import Settings, env_name, resolved_lora_mode


class Severity(str, Enum):
    CRITICAL = "critical"
    WARNING = "warning"
    INFO = "info"


Condition = Callable[[Settings, Hardware], bool]
Text = str | Callable[[Settings, Hardware], str]


@dataclass(frozen=True)
class Rule:
    id: str
    severity: Severity
    when: Condition
    message: Text
    fix: Text
    # plan passes that do not run when this rule fires (or a function of the settings naming them)
    disables: tuple[str, ...] | Callable[[Settings, Hardware], tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        if not callable(self.disables):
            unknown = [n for n in self.disables if n not in registry.names()]
            if unknown:
                raise ValueError(f"rule {self.id} disables {', '.join(unknown)}: no such pass in optim/registry.py")


@dataclass(frozen=True)
class Finding:
    id: str
    severity: Severity
    message: str
    fix: str
    disables: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, str]:
        return {"id": self.id, "severity": self.severity.value, "message": self.message, "fix": self.fix}

    def line(self) -> str:
        return f"[{self.severity.value}] {self.id}: {self.message} Fix: {self.fix}"


@dataclass(frozen=True)
class CompatReport:
    findings: tuple[Finding, ...]

    @property
    def critical(self) -> list[Finding]:
        return [f for f in self.findings if f.severity is Severity.CRITICAL]

    @property
    def has_critical(self) -> bool:
        return bool(self.critical)

    def ids(self) -> list[str]:
        return [f.id for f in self.findings]

    def disabled_passes(self) -> dict[str, str]:
        """pass name -> why it is skipped (the first rule that disables it)."""
        out: dict[str, str] = {}
        for f in self.findings:
            for name in f.disables:
                out.setdefault(name, f"{f.message} (rule {f.id})")
        return out

    def to_list(self) -> list[dict[str, str]]:
        return [f.to_dict() for f in self.findings]


# ---- facts used by several rules -----------------------------------------------------------------

CUDA_GRAPH_COMPILE_MODES = ("reduce-overhead", "max-autotune")
ATTENTION_KERNELS = ("sageattention", "flash_attn_interface", "flash_attn", "xformers")


def _compiling(s: Settings) -> bool:
    return s.enable_compile and not s.fast_start and s.jit_mode == "off"


def _moves_weights(s: Settings) -> bool:
    return s.use_memory_v2 or (s.use_bnb and s.bnb_cpu_offload)


def _trt_any(s: Settings) -> bool:
    return s.enable_tensorrt or s.use_onnx_engines or s.onnx_trt_enable


def _onnx_transformer(s: Settings) -> bool:
    return (s.use_onnx_engines or s.onnx_trt_enable) and "transformer" in s.onnx_components


def _onnx_offloaded(s: Settings, h: Hardware) -> bool:
    return registry.get("onnx").wanted(s) and h.cuda and placement.decide(s, h).offloads


def _trt_runs(s: Settings, h: Hardware) -> bool:
    return s.enable_tensorrt and h.cuda and h.has("torch_tensorrt")


def _trt_modules(s: Settings) -> set[str]:
    return ({"transformer"} if s.trt_transformer else set()) | ({"text-encoder"} if s.trt_text_encoders else set())


def _onnx_left(s: Settings, h: Hardware) -> list[str]:
    """The ONNX components TensorRT (which goes first) does not take."""
    taken = _trt_modules(s) if _trt_runs(s, h) else set()
    return [c for c in s.onnx_components if c not in taken]


def _quant_methods(s: Settings) -> list[str]:
    names = {"enable_quant": s.enable_quant, "enable_fp8": s.enable_fp8, "use_bnb": s.use_bnb}
    return [env_name(n) for n, on in names.items() if on]


def _step_cache_passes(s: Settings) -> list[registry.PassSpec]:
    """The whole-step caches turned on, in the order of precedence (the first one runs)."""
    return [p for p in registry.family(registry.STEP_CACHE) if p.wanted(s)]


def _switches(passes: list[registry.PassSpec]) -> list[str]:
    return [", ".join(env_name(k) for k in p.switch) for p in passes]


def _step_caches(s: Settings) -> list[str]:
    return _switches(_step_cache_passes(s))


# the caches whose hooks decide per step in Python: the whole-step family and the context KV cache
def _hooked_cache_passes(s: Settings) -> list[registry.PassSpec]:
    kv = registry.get("kvcache")
    return _step_cache_passes(s) + ([kv] if kv.wanted(s) else [])


def _hooked_caches(s: Settings) -> list[str]:
    return _switches(_hooked_cache_passes(s))


def _all_hooked_caches(s: Settings, h: Hardware) -> tuple[str, ...]:
    return (*(p.name for p in registry.family(registry.STEP_CACHE)), "kvcache")


# whole-step caches that compare or reuse per block what the KV cache shortens to the noisy tokens
KV_EXCLUSIVE = ("fbcache", "simcache")
KV_STACKS = ("teacache", "magcache")  # decide before the blocks run and keep the residual of the noisy tokens


def _kv_with(s: Settings, names: tuple[str, ...]) -> list[str]:
    if not registry.get("kvcache").wanted(s):
        return []
    return [p.name for p in _step_cache_passes(s)[:1] if p.name in names]


def _idle(s: Settings, name: str) -> bool:
    """A setting that does nothing here: passes read it (besides as their switch) and all of them are off."""
    readers = [p for p in registry.readers(name) if not p.switch or name not in p.switch]
    return bool(readers) and not any(p.wanted(s) for p in readers)


def _native_resolution(s: Settings) -> int | None:
    from framepack_turbo.models.presets import PRESETS

    return None if s.model_dir is not None else PRESETS[s.model].native_resolution


def _random_preset(s: Settings) -> bool:
    from framepack_turbo.models.presets import PRESETS

    return PRESETS[s.model].is_random


def _idle_settings(s: Settings) -> list[str]:
    return [env_name(n) for n in type(s).model_fields if s.explicitly_set(n) and _idle(s, n)]


# ---- host memory and disk, before anything loads ----------------------------------------------------


def _host_room(h: Hardware) -> float | None:
    """GB new allocations can take: available RAM (total where unknown) plus free swap; None: unknown."""
    ram = h.ram_available_gb if h.ram_available_gb is not None else h.ram_total_gb
    return None if ram is None else ram + (h.swap_free_gb or 0.0)


def _host_ram_short(s: Settings, h: Hardware) -> bool:
    room = _host_room(h)
    if room is None:
        return False
    need = placement.host_memory(s, h)
    ram = h.ram_available_gb if h.ram_available_gb is not None else h.ram_total_gb
    return need.need_gb > room or need.pinned_gb > ram  # page-locked memory cannot go to swap


def _host_ram_message(s: Settings, h: Hardware) -> str:
    need = placement.host_memory(s, h)
    size = placement.size_text
    has = f"{size(h.ram_total_gb)} total" if h.ram_total_gb is not None else "unknown total"
    if h.ram_available_gb is not None:
        has += f" / {size(h.ram_available_gb)} available"
    if h.swap_free_gb:
        has += f" (+ {size(h.swap_free_gb)} free swap)"
    text = f"This run needs {placement.about(need.need_gb)} of host RAM ({need.detail()}); the machine has {has}."
    if need.notes:
        text += " " + "; ".join(need.notes) + "."
    return text


def _is_random(s: Settings) -> bool:
    return s.model_dir is None and _random_preset(s)


def _host_ram_fix(s: Settings, h: Hardware) -> str:
    """The changes that lower this run's host RAM, each with what it would need (the estimate run again)."""
    current = placement.host_memory(s, h)
    room = _host_room(h) or 0.0
    mode = current.mode
    with_torchao = replace(h, backends={**h.backends, "torchao": True})
    with_bnb = replace(h, backends={**h.backends, "bitsandbytes": True})
    quantized = s.enable_quant or s.enable_fp8 or s.use_bnb
    cached = {"enable_opt_cache": True} if (s.enable_quant or s.enable_fp8) else {}
    # (label, settings changed, machine assumed, transformer from the optimized-model cache, why)
    candidates = []
    if mode == "v2":
        candidates.append(
            (
                "FRAMEPACK_MEMORY_MODE=v1 without --use-memory-v2",
                {"use_memory_v2": False, "memory_mode": "v1"},
                h,
                None,
                "--use-memory-v2 saves GPU memory, not host RAM: it pins a second copy of the transformer as it sets up",
            )
        )
    if not quantized:
        candidates.append(("FRAMEPACK_ENABLE_QUANT=1", {"enable_quant": True, "quant_bits": 8}, with_torchao, None, ""))
    if not s.use_bnb and not current.load_gb < current.peak_gb:
        candidates.append(
            (
                "FRAMEPACK_ENABLE_QUANT=1 FRAMEPACK_ENABLE_OPT_CACHE=1"
                if not cached
                else "FRAMEPACK_ENABLE_OPT_CACHE=1",
                cached or {"enable_quant": True, "quant_bits": 8, "enable_opt_cache": True},
                with_torchao,
                True,
                "from the second run, which loads the stored quantized transformer instead of the full one",
            )
        )
    if mode != "cpu" and not _is_random(s) and not s.use_bnb:
        bnb = {"use_bnb": True, "enable_quant": False, "enable_fp8": False, "enable_opt_cache": False}
        why = "bitsandbytes quantizes the transformer and text encoders while they load" + (
            "; pip install bitsandbytes" if not h.has("bitsandbytes") else ""
        )
        candidates.append(("FRAMEPACK_USE_BNB=1", bnb, with_bnb, False, why))
        candidates.append(
            (
                "FRAMEPACK_USE_BNB=1 FRAMEPACK_BNB_LOAD_IN_4BIT=1",
                {**bnb, "bnb_load_in_4bit": True},
                with_bnb,
                False,
                why,
            )
        )
    options, quant_alone_helps = [], True
    for label, update, machine, from_cache, why in candidates:
        need = placement.host_memory(s.model_copy(update=update), machine, from_cache).need_gb
        if label == "FRAMEPACK_ENABLE_QUANT=1":
            quant_alone_helps = need < current.need_gb - 0.5
        if need < current.need_gb - 0.5:
            fits = "fits" if need <= room else "still short"
            options.append(f"{label} ({placement.about(need)}, {fits}{': ' + why if why else ''})")
    text = (
        "; ".join(options)
        + ("; or " if options else "")
        + "a machine with more RAM, or swap (slow; pinned memory cannot use it)."
    )
    if not quant_alone_helps and not quantized:
        text += " ENABLE_QUANT / ENABLE_FP8 alone do not lower the peak: the transformer loads at full size before it is quantized."
    return text[0].upper() + text[1:]


# The output video's size at a CRF, a stated rough estimate: h264 at crf 16 spends about 0.1 bit per pixel per
# frame on FramePack's clips (smooth motion), and every 6 CRF steps halve (or double) the bitrate (x264's scale).
MP4_BITS_PER_PIXEL_CRF16 = 0.1
CRF_HALVING_STEPS = 6
# Beside the video while it runs (pipeline/resume.py, writer.py): its segments and the joined copy (about twice
# the final video), every section's latents (float32) and the resume state (one section's pixel overlap).
RESUME_FACTOR = 2.0
DISK_HEADROOM_GB = 0.5  # left free beside: the encoder's temporary files, logs, the sidecar


@dataclass(frozen=True)
class DiskNeed:
    """Disk (GB) a run writes: the video, the resume parts and state beside it, the caches it may fill."""

    video_gb: float
    resume_gb: float
    cache_gb: float

    @property
    def need_gb(self) -> float:
        return self.video_gb + self.resume_gb + self.cache_gb

    def detail(self) -> str:
        about = placement.about
        text = f"video {about(self.video_gb)}, resume parts and state beside it {about(self.resume_gb)}"
        return text + (f", encoder output cache up to {placement.size_text(self.cache_gb)}" if self.cache_gb else "")

    def to_dict(self) -> dict:
        return {
            "need_gb": round(self.need_gb, 4),
            "video_gb": round(self.video_gb, 4),
            "resume_gb": round(self.resume_gb, 4),
            "cache_gb": round(self.cache_gb, 4),
            "headroom_gb": DISK_HEADROOM_GB,
            "detail": self.detail(),
        }


def video_gb(resolution: int, seconds: float, crf: int) -> float:
    """The mp4's rough size: about resolution^2 pixels (the buckets keep that area) per frame at FPS."""
    bits_per_pixel = MP4_BITS_PER_PIXEL_CRF16 * 2 ** ((16 - crf) / CRF_HALVING_STEPS)
    frames = seconds * FPS + 1
    return resolution * resolution * frames * bits_per_pixel / 8 / 2**30


def resume_parts_gb(resolution: int, seconds: float, window: int, crf: int) -> float:
    """The parts folder at its largest: RESUME_FACTOR x the video, the clip's latents, one section's pixels."""
    from framepack_turbo.constants import LATENT_CHANNELS, LATENT_FRAMES_TO_PIXELS, VAE_SPATIAL_SCALE

    latent_frames = seconds * FPS / LATENT_FRAMES_TO_PIXELS + 1
    latents = LATENT_CHANNELS * latent_frames * (resolution / VAE_SPATIAL_SCALE) ** 2 * 4
    overlap = (window * LATENT_FRAMES_TO_PIXELS - 3) * 3 * resolution * resolution * 4
    return RESUME_FACTOR * video_gb(resolution, seconds, crf) + (latents + overlap) / 2**30


def disk_need(s: Settings) -> DiskNeed:
    cache = s.module_cache_max_mb / 1024 if s.enable_module_cache else 0.0
    return DiskNeed(
        video_gb(s.resolution, s.seconds, s.crf), resume_parts_gb(s.resolution, s.seconds, s.window, s.crf), cache
    )


def _disk_short(s: Settings, h: Hardware) -> bool:
    return h.disk_free_gb is not None and disk_need(s).need_gb + DISK_HEADROOM_GB > h.disk_free_gb


def _disk_message(s: Settings, h: Hardware) -> str:
    need, size = disk_need(s), placement.size_text
    return (
        f"A {s.seconds:g} s clip at {s.resolution} px, crf {s.crf} needs {placement.about(need.need_gb)} of disk "
        f"({need.detail()}) "
        f"and {size(DISK_HEADROOM_GB)} to spare; {h.disk_path or 'the output folder'} has {size(h.disk_free_gb)} free."
    )


def _disk_fix(s: Settings, h: Hardware) -> str:
    short = disk_need(s).need_gb + DISK_HEADROOM_GB - (h.disk_free_gb or 0.0)
    text = f"Free at least {placement.size_text(short)} at {h.disk_path or 'the output folder'}, or write the video to another disk (--out)"
    if s.enable_module_cache:
        text += ", or a smaller FRAMEPACK_MODULE_CACHE_MAX_MB"
    return text + ", or a shorter clip (--seconds), a lower --resolution or a higher --crf."


# ---- context parallelism -------------------------------------------------------------------------


def _parallel(s: Settings) -> bool:
    return s.parallel_degree > 1


def _heads(s: Settings) -> int | None:
    from framepack_turbo.models.presets import transformer_heads

    try:
        return transformer_heads(s.model, s.model_dir)
    except FramePackError:  # an unknown preset is the loader's message to give
        return None


def _heads_do_not_divide(s: Settings, h: Hardware) -> bool:
    heads = _heads(s)
    return _parallel(s) and s.parallel_mode == "ulysses" and heads is not None and heads % s.parallel_degree != 0


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(2, n + 1) if n % d == 0)


def _exported_transformer(s: Settings) -> list[str]:
    found = []
    if _onnx_transformer(s):
        found.append("ONNX engines (USE_ONNX_ENGINES)")
    if s.enable_tensorrt and s.trt_transformer:
        found.append("TensorRT (ENABLE_TENSORRT)")
    if s.jit_mode != "off":
        found.append(f"TorchScript (--jit-mode {s.jit_mode})")
    return found


RULES: tuple[Rule, ...] = (
    # ---- the spec's five -------------------------------------------------------------------------
    # Not reproducible in CI (needs CUDA): CUDA graphs replay the device addresses recorded at capture;
    # offloading frees and re-allocates weights, so a replay would read stale memory (torch's CUDA graph
    # docs require static addresses). The default compile mode captures no graphs: info below.
    Rule(
        "compile-cudagraphs-offload",
        Severity.CRITICAL,
        lambda s, h: _compiling(s) and s.compile_mode in CUDA_GRAPH_COMPILE_MODES and _moves_weights(s),
        lambda s, h: (
            f"torch.compile mode {s.compile_mode} records CUDA graphs, which replay fixed device addresses; "
            "--use-memory-v2 / BNB_CPU_OFFLOAD move weights between host and GPU, so a replay would read memory "
            "that has moved."
        ),
        "FRAMEPACK_COMPILE_MODE=default (or max-autotune-no-cudagraphs), or turn off --use-memory-v2.",
    ),
    Rule(
        "compile-offload-without-cudagraphs",
        Severity.INFO,
        lambda s, h: _compiling(s) and s.compile_mode not in CUDA_GRAPH_COMPILE_MODES and _moves_weights(s),
        "torch.compile with offloading: the spec's conflict comes from CUDA graphs, which this compile mode "
        "does not use.",
        "Nothing to do; FRAMEPACK_COMPILE_MODE=reduce-overhead would bring the conflict back.",
    ),
    Rule(
        "tensorrt-bitsandbytes",
        Severity.CRITICAL,
        lambda s, h: _trt_any(s) and s.use_bnb,
        "TensorRT and ONNX export trace the model into standard operators; bitsandbytes' 4/8-bit layers are "
        "custom CUDA kernels with packed weights that neither can express.",
        "FRAMEPACK_USE_BNB=0 (use ENABLE_QUANT or ENABLE_FP8 for smaller weights), or turn TensorRT/ONNX off.",
    ),
    Rule(
        "compile-torchscript",
        Severity.WARNING,
        lambda s, h: s.enable_compile and s.jit_mode != "off",
        "torch.compile and TorchScript both compile the transformer; as the spec says, TorchScript is used and "
        "torch.compile is skipped.",
        "Choose one: FRAMEPACK_ENABLE_COMPILE=0, or --jit-mode off.",
        disables=("compile",),
    ),
    Rule(
        "multiple-quantization",
        Severity.CRITICAL,
        lambda s, h: len(_quant_methods(s)) > 1,
        lambda s, h: (
            f"{' and '.join(_quant_methods(s))} each replace the transformer's linear weights with their own "
            "format; they cannot stack."
        ),
        "Keep one quantization method.",
    ),
    Rule(
        "fp8-without-fp8-hardware",
        Severity.WARNING,
        lambda s, h: (
            s.enable_fp8 and s.fp8_use_scaled_mm and not (h.cuda and h.capability_at_least(*FP8_COMPUTE_CAPABILITY))
        ),
        lambda s, h: (
            "FP8 matmuls (FP8_USE_SCALED_MM=1) need a GPU of compute capability 8.9 or newer (Ada, Hopper); "
            f"this machine has {h.device_name}"
            + (f" ({h.compute_capability[0]}.{h.compute_capability[1]})" if h.compute_capability else "")
            + ". Weights are stored in FP8 and computed in bf16 instead: less memory, no speed-up."
        ),
        "Run on an H100/L40/RTX 40xx for FP8 compute, or FRAMEPACK_FP8_USE_SCALED_MM=0 to silence this.",
    ),
    # ---- hardware and installed backends ----------------------------------------------------------
    Rule(
        "tensorrt-needs-gpu",
        Severity.WARNING,
        lambda s, h: (s.enable_tensorrt or s.onnx_trt_enable) and not h.cuda,
        "TensorRT runs on NVIDIA GPUs only; there is no CUDA device here, so it is skipped.",
        "Run on a CUDA machine, or turn ENABLE_TENSORRT / ONNX_TRT_ENABLE off.",
        disables=("tensorrt",),
    ),
    Rule(
        "tensorrt-not-installed",
        Severity.WARNING,
        lambda s, h: s.enable_tensorrt and h.cuda and not h.has("torch_tensorrt"),
        "ENABLE_TENSORRT needs the torch-tensorrt package, which is not installed; skipped.",
        "pip install torch-tensorrt (matching your torch), or FRAMEPACK_ENABLE_TENSORRT=0.",
        disables=("tensorrt",),
    ),
    Rule(
        "tensorrt-nothing-selected",
        Severity.WARNING,
        lambda s, h: s.enable_tensorrt and not (s.trt_transformer or s.trt_text_encoders),
        "ENABLE_TENSORRT is on for no module: TRT_TRANSFORMER and TRT_TEXT_ENCODERS are both off, so it is skipped.",
        "FRAMEPACK_TRT_TRANSFORMER=1 and/or FRAMEPACK_TRT_TEXT_ENCODERS=1, or FRAMEPACK_ENABLE_TENSORRT=0.",
        disables=("tensorrt",),
    ),
    Rule(
        "onnx-components-taken-by-tensorrt",
        Severity.INFO,
        lambda s, h: (
            registry.get("onnx").wanted(s) and _trt_runs(s, h) and bool(_trt_modules(s) & set(s.onnx_components))
        ),
        lambda s, h: (
            f"TensorRT (torch-tensorrt) runs {', '.join(sorted(_trt_modules(s) & set(s.onnx_components)))}; "
            + (
                f"ONNX engines run {', '.join(_onnx_left(s, h))}."
                if _onnx_left(s, h)
                else "no ONNX engine is left to run."
            )
        ),
        "Nothing to do; drop those components from FRAMEPACK_ONNX_COMPONENTS to silence this.",
        disables=lambda s, h: () if _onnx_left(s, h) else ("onnx",),
    ),
    Rule(
        "onnx-needs-onnxruntime",
        Severity.WARNING,
        lambda s, h: (s.use_onnx_engines or s.onnx_trt_enable) and not h.has("onnxruntime"),
        "ONNX engines run through onnxruntime, which is not installed; the PyTorch models are used.",
        "pip install onnxruntime (onnxruntime-gpu for CUDA/TensorRT), or turn USE_ONNX_ENGINES off.",
        disables=("onnx",),
    ),
    Rule(
        "onnx-trt-provider-missing",
        Severity.WARNING,
        lambda s, h: s.onnx_trt_enable and h.has("onnxruntime") and "TensorrtExecutionProvider" not in h.onnx_providers,
        lambda s, h: (
            "onnxruntime has no TensorRT execution provider here (it has "
            f"{', '.join(h.onnx_providers) or 'none'}); the next provider in TensorRT -> CUDA -> CPU is used."
        ),
        "Install onnxruntime-gpu with TensorRT, or FRAMEPACK_ONNX_TRT_ENABLE=0.",
    ),
    Rule(
        "bnb-needs-cuda",
        Severity.WARNING,
        lambda s, h: s.use_bnb and not h.cuda,
        "bitsandbytes 4/8-bit layers are loaded for CUDA; there is no CUDA device here, so USE_BNB is skipped.",
        "Run on a CUDA machine, or use FRAMEPACK_ENABLE_QUANT=1 (torchao has CPU kernels).",
        disables=("loading.bnb",),
    ),
    Rule(
        "bnb-not-installed",
        Severity.WARNING,
        lambda s, h: s.use_bnb and h.cuda and not h.has("bitsandbytes"),
        "USE_BNB needs the bitsandbytes package, which is not installed; skipped.",
        "pip install bitsandbytes, or FRAMEPACK_USE_BNB=0.",
        disables=("loading.bnb",),
    ),
    Rule(
        "bnb-needs-weights",
        Severity.WARNING,
        lambda s, h: s.use_bnb and s.model_dir is None and _random_preset(s),
        lambda s, h: (
            f"bitsandbytes quantizes while weights load from disk; --model {s.model} builds random weights in "
            "memory, so USE_BNB is skipped."
        ),
        "Save the model (`FramePack.load(...).bundle.save_pretrained(DIR)`) and pass --model-dir DIR, or "
        "FRAMEPACK_USE_BNB=0.",
        disables=("loading.bnb",),
    ),
    Rule(
        "memory-v2-needs-cuda",
        Severity.WARNING,
        lambda s, h: s.use_memory_v2 and not h.cuda,
        "--use-memory-v2 offloads through pinned host memory and CUDA streams; without CUDA there is nothing to "
        "offload to: every model stays on the CPU (placement mode cpu).",
        "Drop --use-memory-v2 on this machine.",
    ),
    Rule(
        "quant-needs-torchao",
        Severity.WARNING,
        lambda s, h: s.enable_quant and not h.has("torchao"),
        "ENABLE_QUANT uses torchao's quantized kernels; torchao is not installed, so it is skipped.",
        "pip install torchao, or FRAMEPACK_ENABLE_QUANT=0.",
        disables=("quant",),
    ),
    Rule(
        "int4-on-cpu",
        Severity.WARNING,
        lambda s, h: s.enable_quant and s.quant_bits == 4 and not h.cuda,
        "INT4 on CPU: this torchao build has no packed int4 CPU kernel, so int4 values are stored one per byte "
        "and dequantized per matmul: weights 4x smaller than fp32, steps slower (see docs/optimizations.md).",
        "FRAMEPACK_QUANT_BITS=8 for speed on CPU; INT4 is worth it on CUDA (packed tinygemm kernel).",
    ),
    Rule(
        "aggressive-attention-missing",
        Severity.WARNING,
        lambda s, h: s.xformers_mode == "aggressive" and not any(h.has(k) for k in ATTENTION_KERNELS),
        "XFORMERS_MODE=aggressive picks SageAttention, FlashAttention 3/2 or xFormers; none is installed, so "
        "PyTorch SDPA (standard) is used.",
        "Install one of sageattention, flash-attn, xformers, or use --xformers-mode standard.",
    ),
    Rule(
        "faiss-missing",
        Severity.INFO,
        lambda s, h: s.enable_sim_cache and s.sim_cache_use_faiss and not h.has("faiss"),
        "SIM_CACHE_USE_FAISS=1 but faiss is not installed: exact search is used (the same results).",
        "pip install faiss-cpu (or faiss-gpu), or FRAMEPACK_SIM_CACHE_USE_FAISS=0.",
    ),
    # ---- settings that work against each other ----------------------------------------------------
    # The spec's max-performance and low-vram presets stack them; they run, with the first one only.
    Rule(
        "step-caches-exclusive",
        Severity.WARNING,
        lambda s, h: len(_step_caches(s)) > 1,
        lambda s, h: (
            f"{' and '.join(_step_caches(s))} each decide per step what the transformer blocks compute, from "
            "their own measurements of the previous steps; stacked, one would record what another skipped (a reused "
            f"residual, a token set that changes between steps). Only {_step_caches(s)[0]} runs; the others are "
            "skipped."
        ),
        "Keep one step cache; `framepack bench --sweep` draws each one's speed against its fidelity.",
        disables=lambda s, h: tuple(p.name for p in _step_cache_passes(s)[1:]),
    ),
    Rule(
        "kvcache-step-cache",
        Severity.WARNING,
        lambda s, h: bool(_kv_with(s, KV_EXCLUSIVE)),
        lambda s, h: (
            f"The context KV cache shortens computed steps to the noisy tokens; {_switches([registry.get(n) for n in _kv_with(s, KV_EXCLUSIVE)])[0]} "
            "compares or reuses per-block results over the whole token set, which then changes between steps. The KV "
            "cache is skipped."
        ),
        "Stack the KV cache with TeaCache or MagCache instead (FRAMEPACK_ENABLE_TEACACHE=1 or FRAMEPACK_ENABLE_MAGCACHE=1).",
        disables=lambda s, h: ("kvcache",),
    ),
    Rule(
        "kvcache-stacked",
        Severity.INFO,
        lambda s, h: bool(_kv_with(s, KV_STACKS)),
        lambda s, h: (
            f"{_switches([registry.get(n) for n in _kv_with(s, KV_STACKS)])[0]} skips whole steps and the context KV cache "
            "shortens the steps it computes: both run (docs/optimizations.md has what the pair measures)."
        ),
        "Nothing to fix; FRAMEPACK_ENABLE_KV_CACHE=0 runs the whole-step cache alone.",
    ),
    Rule(
        "step-caches-torchscript",
        Severity.WARNING,
        lambda s, h: bool(_hooked_caches(s)) and s.jit_mode != "off",
        lambda s, h: (
            f"TorchScript records one pass through the Python code; {', '.join(_hooked_caches(s))} decide per step in "
            "Python, so the trace would freeze the first step's decision: the cache is skipped."
        ),
        "Use torch.compile (FRAMEPACK_ENABLE_COMPILE=1) with a step cache, or --jit-mode off.",
        disables=_all_hooked_caches,
    ),
    Rule(
        "onnx-step-caches",
        Severity.WARNING,
        lambda s, h: bool(_hooked_caches(s)) and _onnx_transformer(s),
        lambda s, h: (
            f"The ONNX transformer is one graph: {', '.join(_hooked_caches(s))} decide per block and per step in "
            "Python hooks, which an onnxruntime session does not run; the cache is skipped."
        ),
        "Keep the transformer in PyTorch for a step cache (FRAMEPACK_ONNX_COMPONENTS without transformer), or "
        "turn the cache off.",
        disables=_all_hooked_caches,
    ),
    Rule(
        "onnx-compiled-transformer",
        Severity.WARNING,
        lambda s, h: _onnx_transformer(s) and (s.enable_compile or s.jit_mode != "off"),
        "The ONNX engine replaces the transformer; torch.compile / TorchScript would compile a module that no "
        "longer runs, so they are skipped.",
        "Choose one: ONNX engines, torch.compile or TorchScript (`framepack bench` compares them).",
        disables=("compile", "jit"),
    ),
    Rule(
        "onnx-quantized-transformer",
        Severity.WARNING,
        lambda s, h: _onnx_transformer(s) and (s.enable_quant or s.enable_fp8),
        "torchao's INT-N / FP8 weights are tensor subclasses with their own kernels; the ONNX exporter cannot "
        "write them as standard operators, so the ONNX engines are skipped and the quantized PyTorch model runs.",
        "Quantize or export, not both (ONNX_TRT_FP16 gives TensorRT its own reduced precision).",
        disables=("onnx",),
    ),
    Rule(
        "onnx-trt-int8-uncalibrated",
        Severity.WARNING,
        lambda s, h: s.onnx_trt_enable and s.onnx_trt_int8,
        "ONNX_TRT_INT8 needs a calibration table (or a model with quantize/dequantize nodes), which this version "
        "does not build; the TensorRT provider runs in FP16/FP32 instead.",
        "FRAMEPACK_ONNX_TRT_INT8=0; for 8-bit weights use FRAMEPACK_ENABLE_QUANT=1 without ONNX.",
    ),
    Rule(
        "onnx-with-offload",
        Severity.WARNING,
        _onnx_offloaded,
        "This GPU gets an offloading placement (v1/v2); an onnxruntime session holds its whole graph in GPU "
        "memory and cannot be offloaded, so the ONNX engines are skipped.",
        "FRAMEPACK_MEMORY_MODE=high-vram if the models fit, or keep the PyTorch models with offloading.",
        disables=("onnx",),
    ),
    Rule(
        "bettertransformer-with-offload",
        Severity.WARNING,
        lambda s, h: s.enable_bettertransformer and s.use_memory_v2,
        "The spec reports a slowdown from 20 s/it to 428 s/it with encoder SDPA and the memory-v2 backend "
        "(reported there, not measured here).",
        "FRAMEPACK_ENABLE_BETTERTRANSFORMER=0 (the default) unless `framepack bench` shows a gain on your machine.",
    ),
    Rule(
        "fast-start-skips",
        Severity.INFO,
        lambda s, h: s.fast_start and (s.enable_compile or s.enable_opt_cache or s.enable_bettertransformer),
        "--fast-start skips torch.compile, the optimized-model cache and the encoder attention change, as the spec "
        "says.",
        "Drop --fast-start to use them.",
        disables=("compile", "opt_cache", "encoder_attention"),
    ),
    Rule(
        "prune-is-lossy",
        Severity.WARNING,
        lambda s, h: s.enable_prune,
        "ENABLE_PRUNE removes transformer blocks: faster and smaller, and visibly lower quality; its cost is in the "
        "bench fidelity table.",
        "FRAMEPACK_ENABLE_PRUNE=0 for full quality.",
    ),
    Rule(
        "opt-cache-bitsandbytes",
        Severity.WARNING,
        lambda s, h: s.enable_opt_cache and s.use_bnb,
        "bitsandbytes quantizes while the weights load, and its layers are not stored in the optimized-model "
        "cache; the cache is skipped for this run.",
        "Use ENABLE_QUANT or ENABLE_FP8 with the cache, or FRAMEPACK_ENABLE_OPT_CACHE=0.",
        disables=("opt_cache",),
    ),
    Rule(
        "opt-cache-nothing-to-store",
        Severity.INFO,
        lambda s, h: (
            s.enable_opt_cache and not (s.enforce_low_precision or s.enable_prune or s.enable_quant or s.enable_fp8)
        ),
        "ENABLE_OPT_CACHE stores the transformer after low precision, pruning, INT-N or FP8; none is on, so there "
        "is nothing to cache (compiled code is not stored).",
        "Turn on a weight pass, or FRAMEPACK_ENABLE_OPT_CACHE=0.",
        disables=("opt_cache",),
    ),
    # ---- LoRA (settings.resolved_lora_mode: auto merges unless bitsandbytes) --------------------------
    Rule(
        "lora-merged",
        Severity.INFO,
        lambda s, h: resolved_lora_mode(s) == "merged",
        lambda s, h: (
            f"{len(s.loras)} LoRA(s) merged into the transformer's weights before any quantization or export: a "
            "step costs what it costs without them; another LoRA or weight loads the model again."
        ),
        "--lora-mode unmerged switches LoRAs and weights between jobs without reloading (each step a little slower).",
    ),
    Rule(
        "lora-unmerged",
        Severity.INFO,
        lambda s, h: resolved_lora_mode(s) == "unmerged",
        lambda s, h: (
            "LoRAs as PEFT adapters"
            + (" (bitsandbytes weights take no merge)" if s.lora_mode == "auto" else "")
            + ": switching them or their weights between jobs reloads nothing; each step also computes the adapters."
        ),
        "--lora-mode merged for the fastest steps (not with bitsandbytes).",
    ),
    Rule(
        "lora-merge-bitsandbytes",
        Severity.CRITICAL,
        lambda s, h: s.lora_mode == "merged" and bool(s.loras) and s.use_bnb,
        "bitsandbytes quantizes the transformer while it loads; its packed 4/8-bit weights cannot take a LoRA merge.",
        "--lora-mode unmerged (or auto), or FRAMEPACK_USE_BNB=0 and ENABLE_QUANT/ENABLE_FP8, which run after a merge.",
    ),
    Rule(
        "lora-adapters-quantized",
        Severity.CRITICAL,
        lambda s, h: resolved_lora_mode(s) == "unmerged" and (s.enable_quant or s.enable_fp8),
        "Unmerged LoRA adapters do not go on INT-N or FP8 weights here (their layers hold torchao / FP8 tensors, "
        "which PEFT does not wrap in this tool).",
        "--lora-mode merged (the LoRA is folded in before quantizing), or turn ENABLE_QUANT/ENABLE_FP8 off.",
    ),
    Rule(
        "lora-adapters-exported",
        Severity.CRITICAL,
        lambda s, h: (
            resolved_lora_mode(s) == "unmerged"
            and (s.jit_mode != "off" or (s.enable_tensorrt and s.trt_transformer) or _onnx_transformer(s))
        ),
        "TorchScript, TensorRT and ONNX hold the transformer's weights as they were exported; unmerged adapters "
        "would not be in them.",
        "--lora-mode merged: the LoRA is merged before the export (and its hash keys the export).",
    ),
    Rule(
        "model-native-resolution",
        Severity.WARNING,
        lambda s, h: _native_resolution(s) not in (None, s.resolution),
        lambda s, h: (
            f"--model {s.model} was trained at {_native_resolution(s)} px only; at --resolution {s.resolution} its "
            "clips are not what it learned (and cost more)."
        ),
        lambda s, h: f"--resolution {_native_resolution(s)}.",
    ),
    # ---- host memory and disk: before anything loads (placement.host_memory, disk_need) ---------------------
    # ---- context parallelism (one video on several GPUs) -------------------------------------------
    Rule(
        "parallel-ranks-exceed-gpus",
        Severity.CRITICAL,
        lambda s, h: _parallel(s) and h.cuda and h.gpu_count is not None and s.parallel_degree > h.gpu_count,
        lambda s, h: f"--gpus {s.parallel_degree} puts one rank on each GPU; this machine has {h.gpu_count}.",
        lambda s, h: f"--gpus {max(h.gpu_count or 1, 1)} or fewer.",
    ),
    Rule(
        "parallel-heads-not-divisible",
        Severity.CRITICAL,
        _heads_do_not_divide,
        lambda s, h: (
            f"Ulysses gives each rank whole attention heads; the transformer has {_heads(s)}, which "
            f"{s.parallel_degree} ranks do not divide."
        ),
        lambda s, h: f"--gpus one of {_divisors(_heads(s) or 1)}, or --parallel ring (any number of ranks).",
    ),
    # Not reproducible in CI: the ring needs the log-sum-exp of each partial attention to merge them, which
    # diffusers takes from torch's flash kernel (CUDA, bf16/fp16); PyTorch SDPA on a CPU does not return it.
    Rule(
        "parallel-ring-needs-cuda",
        Severity.CRITICAL,
        lambda s, h: _parallel(s) and s.parallel_mode == "ring" and not h.cuda,
        "Ring attention merges each rank's partial attention by its softmax log-sum-exp, which diffusers gets "
        "from torch's flash kernel on CUDA only; there is no CUDA device here.",
        "--parallel ulysses (runs on CPU processes too), or run on GPUs.",
    ),
    Rule(
        "parallel-attention-backend",
        Severity.CRITICAL,
        lambda s, h: _parallel(s) and s.xformers_mode != "standard",
        lambda s, h: (
            f"--xformers-mode {s.xformers_mode} picks an attention kernel the ranks cannot share; with context "
            "parallelism the kernel follows the mode (Ulysses: PyTorch SDPA, ring: torch's flash kernel)."
        ),
        "--xformers-mode standard.",
    ),
    Rule(
        "parallel-offload",
        Severity.CRITICAL,
        lambda s, h: _parallel(s) and (_moves_weights(s) or (h.cuda and placement.decide(s, h).offloads)),
        "Context parallelism keeps the whole model resident on every rank's GPU; offloading moves weights per "
        "block and steps down on out-of-memory on one rank alone, which the others would wait for forever.",
        "FRAMEPACK_MEMORY_MODE=high-vram on GPUs that hold the model (bf16 ~26 GB for the transformer; "
        "FRAMEPACK_ENABLE_FP8=1 or ENABLE_QUANT=1 halve it), or fewer, larger GPUs.",
    ),
    Rule(
        "parallel-exported-transformer",
        Severity.CRITICAL,
        lambda s, h: _parallel(s) and bool(_exported_transformer(s)),
        lambda s, h: (
            f"{', '.join(_exported_transformer(s))} run the transformer as an exported graph; the split and "
            "gather of context parallelism are hooks on the PyTorch blocks, which an exported graph does not run."
        ),
        "Turn the transformer's engine off (FRAMEPACK_ONNX_COMPONENTS without transformer, "
        "FRAMEPACK_TRT_TRANSFORMER=0, --jit-mode off), or --gpus 1.",
    ),
    Rule(
        "parallel-kv-cache",
        Severity.WARNING,
        lambda s, h: _parallel(s) and s.enable_kv_cache,
        "The context KV cache shortens the sequence to the noisy tokens on reuse steps, which the ranks' split "
        "does not follow; it is skipped under context parallelism.",
        "FRAMEPACK_ENABLE_KV_CACHE=0 to silence this; the step caches (TeaCache, MagCache, first-block) work "
        "across ranks.",
        disables=("kvcache",),
    ),
    Rule(
        "parallel-similarity-cache",
        Severity.WARNING,
        lambda s, h: _parallel(s) and s.enable_sim_cache,
        "The similarity cache looks up each block's input among cached ones; a rank holds a share of it, and "
        "the ranks could pick different entries. It is skipped under context parallelism.",
        "Use TeaCache, MagCache or the first-block cache, whose decisions are summed over the ranks.",
        disables=("simcache",),
    ),
    Rule(
        "parallel-cpu-processes",
        Severity.INFO,
        lambda s, h: _parallel(s) and not h.cuda,
        lambda s, h: (
            f"{s.parallel_degree} CPU processes (gloo) share this machine's {h.cpu_count} cores: a check that the "
            "split is right, not a speed-up."
        ),
        "Nothing to do; on GPUs each rank gets its own.",
    ),
    Rule("host-ram-short", Severity.WARNING, _host_ram_short, _host_ram_message, _host_ram_fix),
    Rule("disk-space-short", Severity.WARNING, _disk_short, _disk_message, _disk_fix),
    Rule(
        "setting-without-switch",
        Severity.WARNING,
        lambda s, h: bool(_idle_settings(s)),
        lambda s, h: f"{', '.join(_idle_settings(s))} set, but the switch that uses it is off: no effect.",
        "Turn on the matching ENABLE_* / USE_* switch, or remove the variable.",
    ),
)

RULES_BY_ID = {r.id: r for r in RULES}


def _text(value: Text, s: Settings, h: Hardware) -> str:
    return value(s, h) if callable(value) else value


def check(settings: Settings, hardware: Hardware) -> CompatReport:
    """Every rule that applies, most severe first."""
    order = {Severity.CRITICAL: 0, Severity.WARNING: 1, Severity.INFO: 2}
    findings = [
        Finding(
            r.id,
            r.severity,
            _text(r.message, settings, hardware),
            _text(r.fix, settings, hardware),
            r.disables(settings, hardware) if callable(r.disables) else r.disables,
        )
        for r in RULES
        if r.when(settings, hardware)
    ]
    return CompatReport(tuple(sorted(findings, key=lambda f: order[f.severity])))
