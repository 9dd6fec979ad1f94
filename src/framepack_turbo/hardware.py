"""What the machine has. Queried when asked, never at import."""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass
from importlib import metadata

import torch

VERSIONED_PACKAGES = ("framepack-turbo", "torch", "diffusers", "transformers", "accelerate", "av", "numpy")


@dataclass(frozen=True)
class Hardware:
    device: str  # "cuda" or "cpu"
    device_name: str
    cpu_count: int
    total_vram_gb: float | None
    compute_capability: tuple[int, int] | None

    @staticmethod
    def detect() -> Hardware:
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            return Hardware(
                "cuda", props.name, os.cpu_count() or 1, round(props.total_memory / 2**30, 2),
                (props.major, props.minor),
            )  # fmt: skip
        return Hardware("cpu", platform.processor() or platform.machine(), os.cpu_count() or 1, None, None)

    def to_dict(self) -> dict:
        return asdict(self)


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
