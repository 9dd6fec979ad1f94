"""Where the models live while a job runs: the decision, made once per run from the settings and the
machine (MEMORY_MODE, --use-memory-v2, GPU_MEMORY_PRESERVATION, HIGH_VRAM_THRESHOLD_GB).

Torch-free: `framepack doctor`, the compatibility rules and the plan read it without a model. The
plan records the decision; the placement pass (optim/offload.py) applies exactly that decision and
the generator's out-of-memory step-down records each later change.

Modes, from most to least GPU memory:

- `high-vram`: everything resident on the GPU (FramePack's choice above 60 GB free).
- `v1`, FramePack's behaviour: models live on the host; the encoders and the VAE move to the GPU only
  while they run; as many transformer blocks as fit while keeping `gpu_memory_preservation` GB free
  stay resident, the others move in on demand (diffusers group offloading, no stream).
- `v2`: every transformer block streamed from pinned host memory, the next one prefetched on a side
  CUDA stream; encoders and VAE as in v1.
- `cpu`: no CUDA device; everything stays where it is.

`auto` picks high-vram when free VRAM is above HIGH_VRAM_THRESHOLD_GB, else v1 (v2 with --use-memory-v2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from framepack_turbo.hardware import Hardware
    from framepack_turbo.settings import Settings

Mode = Literal["cpu", "high-vram", "v1", "v2"]
OFFLOADING: tuple[str, ...] = ("v1", "v2")  # modes that keep models on the host between uses
STEP_DOWN: dict[str, str] = {"high-vram": "v1", "v1": "v2"}


@dataclass(frozen=True)
class PlacementConfig:
    """`mode`: auto, high-vram, v1 or v2. `preserve_gb`: GB v1 keeps free on the GPU.
    `high_vram_gb`: free VRAM above which auto keeps everything resident."""

    mode: Literal["auto", "high-vram", "v1", "v2"] = "auto"
    preserve_gb: float = 6.0
    high_vram_gb: float = 60.0


@dataclass(frozen=True)
class Placement:
    mode: Mode
    reason: str

    @property
    def offloads(self) -> bool:
        return self.mode in OFFLOADING

    def to_dict(self) -> dict[str, str]:
        return {"mode": self.mode, "reason": self.reason}


def choose(config: PlacementConfig, cuda: bool, free_gb: float | None) -> Placement:
    """The mode for this run, and why (shown by `framepack doctor` and recorded in the sidecar)."""
    if not cuda:
        return Placement("cpu", "no CUDA device: every model stays on the CPU, nothing is offloaded")
    if config.mode != "auto":
        return Placement(config.mode, f"set by the settings (MEMORY_MODE / --use-memory-v2): {config.mode}")
    free = free_gb or 0.0
    if free > config.high_vram_gb:
        return Placement(
            "high-vram", f"{free:.1f} GB free > HIGH_VRAM_THRESHOLD_GB {config.high_vram_gb:g}: all resident"
        )
    return Placement(
        "v1",
        f"{free:.1f} GB free <= HIGH_VRAM_THRESHOLD_GB {config.high_vram_gb:g}: on-demand moves, "
        f"{config.preserve_gb:g} GB kept free (FramePack's mode; --use-memory-v2 streams blocks instead)",
    )


def config_from(settings: Settings) -> PlacementConfig:
    mode = "v2" if settings.use_memory_v2 and settings.memory_mode == "auto" else settings.memory_mode
    return PlacementConfig(mode, settings.gpu_memory_preservation, settings.high_vram_threshold_gb)


def decide(settings: Settings, hardware: Hardware) -> Placement:
    """The placement this run gets on this machine: CUDA only when the machine has it and the run's
    device (DEVICE, unset: CUDA when present) is a CUDA device."""
    cuda = hardware.cuda and (settings.device is None or settings.device.startswith("cuda"))
    return choose(config_from(settings), cuda, hardware.free_vram_gb)


# ---- host memory: what the placement keeps on the host, estimated before anything loads ----------------

GB = 2**30
RUNTIME_GB = 1.0  # the interpreter, torch and the libraries, and the CUDA context's host side: a rough floor
WORKING_SECTIONS = 3  # pixel frames held while a clip is written: the overlap window (two sections) + the new one
COMPONENT_TITLES = {
    "transformer": "transformer",
    "text_encoder": "LLaMA text encoder",
    "text_encoder_2": "CLIP text encoder",
    "image_encoder": "SigLIP image encoder",
    "vae": "VAE",
}
BNB_COMPONENTS = ("transformer", "text_encoder", "text_encoder_2")  # optim/bnb.py quantizes these while loading
LOW_PRECISION_COMPONENTS = ("transformer", "text_encoder", "text_encoder_2", "image_encoder")  # optim/precision.py


@dataclass(frozen=True)
class HostMemory:
    """The host RAM a run needs (GB), estimated from the settings and the machine without loading a model.

    `weights`: GB each component keeps on the host once loaded and placed (v1 counts every transformer
    block: those that fit on the GPU leave the host, the peak is before that). `load_gb`: every model as
    it loads, before the weight passes (INT-N and FP8 quantize after loading) and before the placement moves
    anything (even high-vram builds on the host first). `pinned_gb`: v2's page-locked copy of the
    transformer, which it makes while the unpinned one is still held. `peak_gb`: the largest of those
    phases; `need_gb` adds the generation's pixel working set (`working_gb`, a function of the resolution)
    and the runtime's floor."""

    mode: Mode
    weights: dict[str, float]
    load_gb: float
    pinned_gb: float
    peak_gb: float
    peak_phase: str
    working_gb: float
    runtime_gb: float
    need_gb: float
    notes: tuple[str, ...] = ()

    @property
    def weights_gb(self) -> float:
        return sum(self.weights.values())

    def detail(self) -> str:
        """What the need is made of, in words (doctor's line and the rule's message)."""
        parts = ", ".join(f"{COMPONENT_TITLES[n]} {size_text(gb)}" for n, gb in self.weights.items() if gb > 0)
        where = f"weights {size_text(self.weights_gb)} on the host for placement {self.mode}"
        where += f" ({parts})" if parts else ""
        extra = [f"peak {size_text(self.peak_gb)} {self.peak_phase}"] if self.peak_gb > self.weights_gb * 1.01 else []
        if self.pinned_gb:
            extra.append(f"{size_text(self.pinned_gb)} of it pinned")
        extra.append(f"generation {size_text(self.working_gb)}")
        extra.append(f"runtime {size_text(self.runtime_gb)}")
        return f"{where}; {'; '.join(extra)}"

    def to_dict(self) -> dict:
        return {
            "mode": self.mode,
            "need_gb": round(self.need_gb, 2),
            "weights_gb": round(self.weights_gb, 2),
            "weights": {n: round(gb, 3) for n, gb in self.weights.items()},
            "load_gb": round(self.load_gb, 2),
            "pinned_gb": round(self.pinned_gb, 2),
            "peak_gb": round(self.peak_gb, 2),
            "peak_phase": self.peak_phase,
            "working_gb": round(self.working_gb, 3),
            "runtime_gb": self.runtime_gb,
            "detail": self.detail(),
            "notes": list(self.notes),
        }


def size_text(gb: float) -> str:
    """A size for people: whole GB from 10 GB, one decimal from 1 GB, MB below."""
    if gb >= 10:
        return f"{gb:.0f} GB"
    if gb >= 1:
        return f"{gb:.1f} GB"
    if gb * 1024 >= 1:
        return f"{gb * 1024:.0f} MB"
    return "<1 MB" if gb > 0 else "0 GB"


def about(gb: float) -> str:
    """`size_text` as an estimate: ~12 GB, <1 MB."""
    text = size_text(gb)
    return text if text.startswith("<") else "~" + text


def working_set_gb(resolution: int, window: int) -> float:
    """The generation's pixel working set: WORKING_SECTIONS sections of float32 RGB frames at about
    resolution x resolution (the buckets keep that area), plus one section of uint8 frames for the writer."""
    from framepack_turbo.constants import LATENT_FRAMES_TO_PIXELS

    frames = window * LATENT_FRAMES_TO_PIXELS - 3  # pixel frames per section (pipeline/sections.py)
    pixels = 3 * resolution * resolution
    return (WORKING_SECTIONS * frames * pixels * 4 + frames * pixels) / GB


def _transformer_run_bytes(settings: Settings, hardware: Hardware, cuda: bool, load: float) -> tuple[float, str]:
    """Bytes per transformer parameter once the weight passes ran, and which pass made it so."""
    if settings.use_bnb and cuda and hardware.has("bitsandbytes"):
        return (0.5 if settings.bnb_load_in_4bit else 1.0), "bitsandbytes"
    if settings.enable_quant and hardware.has("torchao"):
        return (0.5 if settings.quant_bits == 4 and cuda else 1.0), f"INT{settings.quant_bits}"
    if settings.enable_fp8:
        return 1.0, "FP8"
    if settings.enforce_low_precision and not cuda:
        return 2.0, "bf16"
    return load, ""


def _bnb_runs(settings: Settings, hardware: Hardware, cuda: bool) -> bool:
    from framepack_turbo.models.presets import get_preset

    random = settings.model_dir is None and get_preset(settings.model).is_random  # compat: bnb-needs-weights
    return settings.use_bnb and cuda and hardware.has("bitsandbytes") and not random


def _opt_cache_hit(settings: Settings) -> bool:
    """The optimized-model cache holds a transformer this run would load instead of the full one (assumed to
    fit the run when the file exists; the artifact's own check decides when it loads)."""
    from pathlib import Path

    weight_pass = (
        settings.enforce_low_precision or settings.enable_prune or settings.enable_quant or settings.enable_fp8
    )
    return (
        settings.enable_opt_cache
        and not settings.fast_start
        and not settings.use_bnb
        and weight_pass
        and Path(settings.optimized_transformer).is_file()
    )


def host_memory(settings: Settings, hardware: Hardware, cached: bool | None = None) -> HostMemory:
    """The host RAM this run needs on this machine, by the placement it gets. `cached`: whether the
    optimized transformer loads from the cache (unset: whether its file exists). Torch-free."""
    from framepack_turbo.models.presets import component_params

    mode = decide(settings, hardware).mode
    cuda = mode != "cpu"
    params = component_params(settings.model, settings.model_dir)
    load_bytes = 2.0 if cuda else 4.0  # models/loading.py default_dtypes: bf16/fp16 on CUDA, float32 elsewhere
    bnb = _bnb_runs(settings, hardware, cuda)
    t_run, how = _transformer_run_bytes(settings, hardware, cuda, load_bytes)
    cached = _opt_cache_hit(settings) if cached is None else cached
    load: dict[str, float] = {}
    run: dict[str, float] = {}
    for name, count in params.items():
        if name == "transformer":
            load_b = t_run if (bnb or cached) else load_bytes
            run_b = t_run
        elif bnb and name in BNB_COMPONENTS:
            load_b = run_b = 0.5 if settings.bnb_load_in_4bit else 1.0
        else:
            load_b = load_bytes
            low = settings.enforce_low_precision and not cuda and name in LOW_PRECISION_COMPONENTS
            run_b = 2.0 if low else load_bytes
        load[name], run[name] = count * load_b / GB, count * run_b / GB
    notes: list[str] = []
    if mode == "high-vram":
        weights = dict.fromkeys(run, 0.0)  # all resident on the GPU once placed
    else:
        weights = dict(run)
    load_gb = sum(load.values())
    pinned = run.get("transformer", 0.0) if mode == "v2" else 0.0
    phases = {"while loading": load_gb, "once placed": sum(weights.values())}
    if mode == "v2":  # diffusers pins a copy of every block while the unpinned weights are still referenced
        phases["while v2 pins the transformer"] = sum(weights.values()) + pinned
    phase, peak = max(phases.items(), key=lambda kv: kv[1])
    if how and not cached and not bnb:
        notes.append(
            f"{how} applies after loading: the transformer loads at full size first "
            "(ENABLE_OPT_CACHE=1 loads the stored one from the second run)"
        )
    if mode == "high-vram":
        notes.append("High-vram builds every model on the host, then moves them to the GPU")
    if mode == "cpu":
        notes.append("On the CPU the models' activations live on the host too (not counted)")
    working = working_set_gb(settings.resolution, settings.window)
    return HostMemory(
        mode, weights, load_gb, pinned, peak, phase, working, RUNTIME_GB, peak + working + RUNTIME_GB, tuple(notes)
    )
