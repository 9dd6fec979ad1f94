"""What the machine has: device, memory, compute capability, which optional backends are installed.

Queried when asked (`Hardware.detect()`), never at import. Tests build `Hardware(...)` by hand to
check rules for machines we do not have.
"""

from __future__ import annotations

import importlib.util
import os
import platform
from dataclasses import asdict, dataclass, field
from importlib import metadata

VERSIONED_PACKAGES = ("framepack-turbo", "torch", "diffusers", "transformers", "accelerate", "torchao", "av", "numpy")

# Optional backends: import name -> what it is for. Presence is checked without importing them
# (some print or initialise CUDA at import); `framepack doctor` lists them.
OPTIONAL_BACKENDS: dict[str, str] = {
    "torchao": "INT8/INT4/FP8 quantization kernels",
    "bitsandbytes": "bitsandbytes 4/8-bit loading",
    "xformers": "xFormers attention",
    "sageattention": "SageAttention",
    "flash_attn": "FlashAttention 2",
    "flash_attn_interface": "FlashAttention 3",
    "faiss": "similarity cache index",
    "onnxruntime": "ONNX engines",
    "tensorrt": "TensorRT",
    "torch_tensorrt": "torch-tensorrt",
}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _imports(module: str) -> bool:
    """Whether an installed backend really imports (a wheel built for another torch or CUDA does not)."""
    import contextlib
    import io
    import warnings

    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(io.StringIO()),
    ):
        warnings.simplefilter("ignore")
        try:
            importlib.import_module(module)
        except Exception:  # any import failure means "not usable here", which is what we report
            return False
    return True


@dataclass(frozen=True)
class Hardware:
    device: str = "cpu"  # "cuda" or "cpu"
    device_name: str = "cpu"
    cpu_count: int = 1
    total_vram_gb: float | None = None
    free_vram_gb: float | None = None
    compute_capability: tuple[int, int] | None = None
    bf16: bool = False
    backends: dict[str, bool] = field(default_factory=dict)
    onnx_providers: tuple[str, ...] = ()

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def has(self, backend: str) -> bool:
        return bool(self.backends.get(backend))

    def capability_at_least(self, major: int, minor: int) -> bool:
        return self.compute_capability is not None and self.compute_capability >= (major, minor)

    @staticmethod
    def detect(import_backends: bool = False) -> Hardware:
        """The machine. `import_backends` (doctor) imports each installed backend to prove it loads;
        otherwise presence is checked without importing."""
        import torch

        backends = {name: _installed(name) for name in OPTIONAL_BACKENDS}
        if import_backends:
            backends = {name: ok and _imports(name) for name, ok in backends.items()}
        providers: tuple[str, ...] = ()
        if backends["onnxruntime"]:
            try:
                import onnxruntime

                providers = tuple(onnxruntime.get_available_providers())
            except ImportError:  # installed but broken: say so through the backends table
                backends["onnxruntime"] = False
        cpus = os.cpu_count() or 1
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            free, total = cuda_free_bytes(0), torch.cuda.mem_get_info(0)[1]
            return Hardware(
                "cuda",
                props.name,
                cpus,
                round(total / 2**30, 2),
                round(free / 2**30, 2),
                (props.major, props.minor),
                torch.cuda.is_bf16_supported(),
                backends,
                providers,
            )
        name = platform.processor() or platform.machine()
        return Hardware("cpu", name, cpus, None, None, None, True, backends, providers)

    def to_dict(self) -> dict:
        return asdict(self)


def cuda_free_bytes(device=0) -> int:
    """GPU memory this process can still take: the driver's free memory, lowered to what a per-process cap
    (`torch.cuda.set_per_process_memory_fraction`, which the driver does not know of) leaves above what
    PyTorch already reserved. Every decision sized from free memory reads this (placement, the VAE's chunk,
    where cache entries live), so a capped process sizes itself to its cap instead of the whole card."""
    import torch

    free, total = torch.cuda.mem_get_info(device)
    fraction_of = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    fraction = fraction_of(device) if fraction_of is not None else 1.0
    if fraction < 1.0:
        free = min(free, max(0, int(fraction * total) - torch.cuda.memory_reserved(device)))
    return int(free)


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
