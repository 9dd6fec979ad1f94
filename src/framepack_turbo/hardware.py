"""What the machine has: device, memory (GPU and host), free disk, compute capability, which optional
backends are installed.

Queried when asked (`Hardware.detect()`), never at import. Tests build `Hardware(...)` by hand to
check rules for machines we do not have. Host memory and disk are read without torch (/proc/meminfo,
os.sysconf, shutil.disk_usage); a field left None is unknown, and no rule fires on an unknown.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import shutil
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

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
    ram_total_gb: float | None = None  # host RAM
    ram_available_gb: float | None = None  # MemAvailable: what new allocations can take without swapping
    swap_free_gb: float | None = None
    disk_path: str | None = None  # where the free disk space was measured (outputs and caches go there)
    disk_free_gb: float | None = None
    gpu_count: int | None = None  # CUDA devices this process sees (context parallelism: a rank on each)

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def has(self, backend: str) -> bool:
        return bool(self.backends.get(backend))

    def capability_at_least(self, major: int, minor: int) -> bool:
        return self.compute_capability is not None and self.compute_capability >= (major, minor)

    @staticmethod
    def detect(import_backends: bool = False, disk_path: str | os.PathLike | None = None) -> Hardware:
        """The machine. `import_backends` (doctor) imports each installed backend to prove it loads;
        otherwise presence is checked without importing. `disk_path`: the folder whose free space counts
        (the output folder; unset: the current directory, where outputs/ and Cache/ go by default)."""
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
        host = {**host_memory_gb(), **disk_free(disk_path)}
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
                **host,
                # a launched rank (torchrun, a Ray group) sees its own GPU, not the job's: the launcher placed
                # the ranks, and each checks its local GPU as it joins (distributed.start)
                gpu_count=None if "WORLD_SIZE" in os.environ else torch.cuda.device_count(),
            )
        name = platform.processor() or platform.machine()
        return Hardware("cpu", name, cpus, None, None, None, True, backends, providers, **host)

    def to_dict(self) -> dict:
        return asdict(self)


MEMINFO = Path("/proc/meminfo")


def host_memory_gb(meminfo: Path = MEMINFO) -> dict[str, float | None]:
    """Host RAM in GB: ram_total_gb, ram_available_gb, swap_free_gb (None where unknown), torch-free.

    /proc/meminfo (Linux: MemAvailable counts the reclaimable page cache as available) when it is
    there, else os.sysconf (total and free pages; no swap figure)."""
    fields: dict[str, float] = {}
    try:
        for line in meminfo.read_text().splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                fields[key] = int(parts[0]) * 1024 / 2**30  # kB
    except OSError:
        pass
    if "MemTotal" in fields:
        total = fields["MemTotal"]
        return {
            "ram_total_gb": round(total, 2),
            "ram_available_gb": round(fields.get("MemAvailable", fields.get("MemFree", total)), 2),
            "swap_free_gb": round(fields["SwapFree"], 2) if "SwapFree" in fields else None,
        }
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        total = os.sysconf("SC_PHYS_PAGES") * page / 2**30
        available = os.sysconf("SC_AVPHYS_PAGES") * page / 2**30
    except (AttributeError, ValueError, OSError):
        return {"ram_total_gb": None, "ram_available_gb": None, "swap_free_gb": None}
    return {"ram_total_gb": round(total, 2), "ram_available_gb": round(available, 2), "swap_free_gb": None}


def disk_free(path: str | os.PathLike | None = None) -> dict[str, str | float | None]:
    """disk_path and disk_free_gb: free space on the file system that holds `path` (its nearest folder
    that exists: the output folder may not be made yet; unset: the current directory)."""
    folder = Path(path if path is not None else ".").absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return {"disk_path": str(folder), "disk_free_gb": None}
    return {"disk_path": str(folder), "disk_free_gb": round(free / 2**30, 2)}


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
