"""Resume: a job that stopped (Ctrl-C, a crash, a reboot, an out-of-memory) goes on from its last section.

After every section but the last, the writer's thread saves beside the video, in `clip.parts/` (atomic,
safetensors), what the next section reads: the history latents it takes its context from (bounded: the
context and the decode's span), the pixel overlap the next decode cross-fades into, the sampler's random
state, the counters, and the section's latents (`lat-0007.safetensors`, so the resumed `Result` has the
whole clip's). Those with the segments already encoded are all a resume needs: the sections it skips were
sampled from the same state, so the video comes out bit for bit as the run that did not stop.

A resume refuses what would change the result: the saved `fingerprint` is every option and every setting
except those in RESULT_FREE (where the weights rest, logging, caches of files), and the first that differs
is named.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from framepack_turbo.errors import InputError
from framepack_turbo.files import atomic_path
from framepack_turbo.pipeline.writer import parts_dir

STATE = "state.safetensors"

# Settings that do not change what the video shows: where the weights rest and how they move, what is
# logged, where files are cached, how models load. A resume may change them (a smaller GPU, another machine
# with the same device type). Everything else, and every generation option, must match.
RESULT_FREE = frozenset(
    {
        "preset",  # its expansion into settings counts, not its name
        "model_dir",
        "lora_dir",
        "offline",
        "runtime_cache",
        "runtime_cache_dir",
        "memory_mode",
        "use_memory_v2",
        "high_vram_threshold_gb",
        "gpu_memory_preservation",
        "parallel_loaders",
        "preload_repos",
        "force_parallel_loaders",
        "fast_start",
        "enable_opt_cache",
        "optimized_transformer",
        "jit_save",
        "jit_load",
        "jit_artifact",
        "jit_strict",
        "tensorrt_cache_dir",
        "onnx_dir",
        "onnx_trt_cache_dir",
        "trt_workspace_mb",
        "onnx_trt_workspace_mb",
        "onnx_trt_device_id",
        "module_cache_max_mb",
        "vae_chunk_reserve_gb",
        "fbcache_verbose",
        "teacache_verbose",
        "sim_cache_verbose",
        "kv_cache_verbose",
        "magcache_verbose",
    }
)


def fingerprint(settings_record: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """What must be equal for a resume: the options, and the settings outside RESULT_FREE (their values)."""
    values = settings_record.get("values", {}) if isinstance(settings_record, dict) else {}
    settings = {name: v.get("value") for name, v in values.items() if name not in RESULT_FREE}
    return json.loads(json.dumps({"options": options, "settings": settings}, default=str))


def refuse_changes(saved: dict[str, Any], now: dict[str, Any], video_path: str | Path) -> None:
    """InputError naming the first option or setting whose value differs from the stopped job's."""
    for part in ("options", "settings"):
        before, after = saved.get(part, {}), now.get(part, {})
        for name in sorted(set(before) | set(after)):
            if name in before and name in after and before[name] != after[name]:
                flag = name.replace("_", "-")
                raise InputError(
                    f"--resume {video_path}: {flag} was {before[name]!r}, now {after[name]!r}: the video so far "
                    f"was made with {before[name]!r}; drop the change, or start a new clip"
                )


@dataclass
class ResumeState:
    sections_done: int
    generated: int  # latent frames of the clip so far
    frames: int  # pixel frames in the file (the input's copied head included)
    history: torch.Tensor  # the bounded history latents
    window: torch.Tensor | None  # the pixel overlap, in the VAE's dtype
    rng: torch.Tensor  # torch.Generator.get_state()
    picture: np.ndarray | None  # the start image as given (None: text-to-video or an extension)
    fingerprint: dict[str, Any]
    record: dict[str, Any] = field(default_factory=dict)  # the sidecar's per-section numbers so far

    def save(self, video_path: str | Path) -> Path:
        from safetensors.torch import save_file

        tensors = {"history": self.history.contiguous(), "rng": self.rng.contiguous()}
        if self.window is not None:
            tensors["window"] = self.window.contiguous()
        if self.picture is not None:
            tensors["picture"] = torch.from_numpy(np.array(self.picture, dtype=np.uint8, copy=True))
        meta = {
            "sections_done": self.sections_done,
            "generated": self.generated,
            "frames": self.frames,
            "fingerprint": self.fingerprint,
            "record": self.record,
        }
        path = parts_dir(video_path) / STATE
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"resume": json.dumps(meta, default=str)})
        return path


def state_path(video_path: str | Path) -> Path:
    return parts_dir(video_path) / STATE


def peek(video_path: str | Path) -> dict[str, Any]:
    """The saved state's metadata (no tensors): for the CLI's checks before any model loads."""
    from safetensors import safe_open

    path = state_path(video_path)
    if not path.is_file():
        raise InputError(
            f"--resume {video_path}: no resume state ({path}): the job finished, or stopped before its "
            "first section was written"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads(f.metadata()["resume"])
    except Exception as exc:  # a state file from elsewhere, or damaged
        raise InputError(f"--resume {video_path}: unreadable resume state {path} ({type(exc).__name__})") from None


def load(video_path: str | Path) -> ResumeState:
    from safetensors.torch import load_file

    meta = peek(video_path)
    tensors = load_file(str(state_path(video_path)))
    picture = tensors.get("picture")
    return ResumeState(
        sections_done=int(meta["sections_done"]),
        generated=int(meta["generated"]),
        frames=int(meta["frames"]),
        history=tensors["history"],
        window=tensors.get("window"),
        rng=tensors["rng"],
        picture=None if picture is None else picture.numpy(),
        fingerprint=meta["fingerprint"],
        record=meta.get("record", {}),
    )


def latents_path(video_path: str | Path, section: int) -> Path:
    return parts_dir(video_path) / f"lat-{section:04d}.safetensors"


def save_latents(video_path: str | Path, section: int, latents: torch.Tensor) -> None:
    from safetensors.torch import save_file

    with atomic_path(latents_path(video_path, section)) as tmp:
        save_file({"latents": latents.contiguous()}, str(tmp))


def load_latents(video_path: str | Path, sections: int) -> list[torch.Tensor]:
    """The latents of sections 0..sections-1, generation order."""
    from safetensors.torch import load_file

    out = []
    for section in range(sections):
        path = latents_path(video_path, section)
        if not path.is_file():
            raise InputError(f"--resume {video_path}: {path.name} is missing from {path.parent}")
        out.append(load_file(str(path))["latents"])
    return out
