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

A resume must finish the clip or refuse, before any model loads and with every file as it was: `check` holds
the parts against what the recorded options imply (variant, window, resolution bucket -> latent size, the
section count): `sections_done` a section a stopped job can stop after (1..sections-1; a finished clip is not
resumed), each tensor of the state present with its shape and dtype, every `lat-NNNN` and `seg-NNNN.mp4` the
state counts present and readable, with the frames each section leaves, and the counters agreeing with them.
The first thing wrong is named. (One job writes a clip at a time: writer.ClipLock.)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from framepack_turbo.constants import (
    LATENT_CHANNELS,
    LATENT_FRAMES_TO_PIXELS,
    MAX_IMAGE_SIDE,
    MIN_IMAGE_SIDE,
    VAE_SPATIAL_SCALE,
)
from framepack_turbo.errors import InputError
from framepack_turbo.files import atomic_path
from framepack_turbo.pipeline.sections import CONTEXT_LATENTS, history_kept, pixel_frames_per_window, section_count
from framepack_turbo.pipeline.writer import HEAD, parts_dir, segment_frames, segment_name

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


class DamagedState(InputError):
    """The parts beside a stopped clip do not add up to what its resume state says: it cannot go on."""


def _damaged(video_path: str | Path, what: str) -> DamagedState:
    return DamagedState(
        f"--resume {video_path}: {what}; the clip cannot go on from these parts (the video so far is kept "
        "as it is): make it again without --resume"
    )


# The state's metadata: each key and the type its value must have
_META = {
    "sections_done": (int, "an integer"),
    "generated": (int, "an integer"),
    "frames": (int, "an integer"),
    "fingerprint": (dict, "a mapping"),
    "record": (dict, "a mapping"),
}


def peek(video_path: str | Path) -> dict[str, Any]:
    """The saved state's metadata (no tensors), each key present with its type: for the CLI's checks before
    any model loads."""
    from safetensors import safe_open

    path = state_path(video_path)
    if not path.is_file():
        raise InputError(
            f"--resume {video_path}: no resume state ({path}): the job finished, or stopped before its "
            "first section was written"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["resume"])
    except Exception as exc:  # a state file from elsewhere, or damaged
        raise InputError(f"--resume {video_path}: unreadable resume state {path} ({type(exc).__name__})") from None
    if not isinstance(meta, dict):
        raise _damaged(video_path, f"{path.name} holds no resume record")
    for key, (kind, named) in _META.items():
        value = meta.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            got = "missing" if key not in meta else f"a {type(value).__name__}"
            raise _damaged(video_path, f"{path.name}: {key} is {got}, not {named}")
    for part in ("options", "settings"):
        if not isinstance(meta["fingerprint"].get(part), dict):
            raise _damaged(video_path, f"{path.name}: the fingerprint's {part} are missing")
    if not isinstance(meta["record"].get("rerun"), dict):
        raise _damaged(video_path, f"{path.name}: the record's rerun is missing")
    return meta


def _shape(t: torch.Tensor | tuple) -> str:
    return "x".join(map(str, tuple(t.shape if isinstance(t, torch.Tensor) else t)))


def check(video_path: str | Path, variant: str | None = None, meta: dict[str, Any] | None = None) -> ResumeState:
    """The stopped job's state, every part of it held against what the recorded options imply (module
    docstring); DamagedState naming the first thing wrong. Reads, writes nothing; loads no model. `variant`:
    the job's (its preset's default where the options leave it unset); from the state when not given."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    meta = peek(video_path) if meta is None else meta
    path = state_path(video_path)
    options = meta["fingerprint"]["options"]
    window, seconds, resolution = options.get("window"), options.get("seconds"), options.get("resolution")
    if not (isinstance(window, int) and window >= 1 and isinstance(seconds, (int, float)) and seconds > 0):
        raise _damaged(video_path, f"{path.name}: its options hold no window and length")
    if not isinstance(resolution, int) or resolution < 16:
        raise _damaged(video_path, f"{path.name}: its options hold no resolution")
    variant = variant or options.get("variant") or _default_variant(meta)
    if variant not in ("inverted", "f1"):
        raise _damaged(video_path, f"{path.name}: variant {variant!r}")
    total, done = section_count(seconds, window), meta["sections_done"]
    if done == total:
        raise _damaged(video_path, f"its state says all {total} sections are done: a finished clip is not resumed")
    if not 1 <= done < total:
        raise _damaged(
            video_path, f"sections_done {done} is outside 1..{total - 1} (a stopped job of {total} sections)"
        )
    try:
        tensors = load_file(str(path))
    except Exception as exc:
        raise _damaged(video_path, f"{path.name} is unreadable ({type(exc).__name__})") from None

    def tensor(name: str, required: bool = True) -> torch.Tensor | None:
        if name not in tensors and required:
            raise _damaged(video_path, f"{path.name} has no {name!r} tensor")
        return tensors.get(name)

    # The frame size: the start image's bucket (text-to-video: the blank square's; an extension: its video's)
    extension = options.get("video")
    text_to_video = not extension and "text_to_video" in (meta["record"].get("image") or {})
    picture = tensor("picture", required=not extension and not text_to_video)
    if picture is not None:
        if picture.dtype != torch.uint8 or picture.ndim != 3 or picture.shape[2] != 3:
            kind = str(picture.dtype).removeprefix("torch.")
            raise _damaged(video_path, f"{path.name}: picture is {kind} {_shape(picture)}, not uint8 HxWx3")
        if not all(MIN_IMAGE_SIDE <= side <= MAX_IMAGE_SIDE for side in picture.shape[:2]):
            raise _damaged(video_path, f"{path.name}: picture is {_shape(picture)}")
        height, width = _bucket(picture.shape[0], picture.shape[1], resolution)
    elif extension:
        from framepack_turbo.pipeline import extend

        height, width = extend.bucket_of(extend.probe_video(extension), resolution)
    else:
        height, width = _bucket(resolution, resolution, resolution)
    h, w = height // VAE_SPATIAL_SCALE, width // VAE_SPATIAL_SCALE

    generated, frames = meta["generated"], meta["frames"]
    first = 0 if variant == "inverted" else 1  # latent frames before the first section (F1: the start image)
    if extension and variant == "f1":  # the input's tail latents come first: at least one
        counted = generated > done * window
    else:
        counted = generated == first + done * window
    if not counted:
        raise _damaged(video_path, f"{path.name}: generated is {generated} latent frames after {done} sections")
    expected = {
        "history": (
            (1, LATENT_CHANNELS, min(CONTEXT_LATENTS + generated, history_kept(window)), h, w),
            (torch.float32,),
        ),
        "window": (
            (1, 3, pixel_frames_per_window(window), height, width),
            (torch.float32, torch.bfloat16, torch.float16),
        ),
        "rng": (tuple(torch.Generator("cpu").get_state().shape), (torch.uint8,)),
    }
    for name, (shape, dtypes) in expected.items():
        t = tensor(name)
        if tuple(t.shape) != shape or t.dtype not in dtypes:
            want = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
            raise _damaged(
                video_path,
                f"{path.name}: {name} is {str(t.dtype).removeprefix('torch.')} {_shape(t)}, the job's options imply "
                f"{want} {_shape(shape)}",
            )
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise _damaged(video_path, f"{path.name}: {name} holds values that are not finite")

    section_shape = (1, LATENT_CHANNELS, window, h, w)
    for section in range(done):
        lat = latents_path(video_path, section)
        if not lat.is_file():
            raise _damaged(video_path, f"{lat.name} is missing from {lat.parent} (the state counts {done} sections)")
        try:
            with safe_open(str(lat), framework="pt") as f:
                piece = f.get_slice("latents")
                shape, dtype = tuple(piece.get_shape()), piece.get_dtype()
        except Exception as exc:
            raise _damaged(video_path, f"{lat.name} is unreadable ({type(exc).__name__})") from None
        if shape != section_shape or dtype != "F32":
            raise _damaged(
                video_path,
                f"{lat.name} is {dtype} {_shape(shape)}, a section of this job is F32 {_shape(section_shape)}",
            )

    parts = parts_dir(video_path)
    written = 0
    for section in range(done):
        seg = parts / segment_name(section)
        # the frames a section leaves final: inverted's first none (all overlap), F1's first 4 (the start
        # image's latent and the first section's, less the overlap), then 4*window; an F1 extension's first
        # depends on its input's tail
        want = window * LATENT_FRAMES_TO_PIXELS
        if section == 0:
            want = 0 if variant == "inverted" else None if extension else LATENT_FRAMES_TO_PIXELS
        if want == 0 and not seg.exists():
            continue
        if not seg.is_file():
            raise _damaged(video_path, f"{seg.name} is missing from {parts} (the state counts {done} sections)")
        count = _frames_of(seg, video_path)
        if want is not None and count != want:
            raise _damaged(video_path, f"{seg.name} holds {count} frames, section {section + 1} leaves {want}")
        written += count
    head = parts / HEAD
    before = _frames_of(head, video_path) if head.is_file() else 0
    # an extension whose copied head is gone copies it again from its input: its length is the input's
    if not (frames >= written if extension and not head.is_file() else frames == before + written):
        raise _damaged(
            video_path, f"{path.name}: frames is {frames}, the parts hold {before + written} for {done} sections"
        )
    return ResumeState(
        sections_done=done,
        generated=generated,
        frames=frames,
        history=tensors["history"],
        window=tensors["window"],
        rng=tensors["rng"],
        picture=None if picture is None else picture.numpy(),
        fingerprint=meta["fingerprint"],
        record=meta["record"],
    )


def _bucket(height: int, width: int, resolution: int) -> tuple[int, int]:
    from framepack_turbo.pipeline.encode import nearest_bucket

    return nearest_bucket(height, width, resolution=resolution)


def _default_variant(meta: dict[str, Any]) -> str | None:
    from framepack_turbo.models.presets import get_preset

    try:
        return get_preset(meta["fingerprint"]["settings"].get("model")).default_variant
    except Exception:  # an unknown or missing model: named as the variant that is missing
        return None


def _frames_of(segment: Path, video_path: str | Path) -> int:
    try:
        return segment_frames(segment)
    except Exception as exc:
        raise _damaged(video_path, f"{segment.name} is unreadable ({type(exc).__name__})") from None


def load(video_path: str | Path, variant: str | None = None) -> ResumeState:
    """The state, checked (`check`)."""
    return check(video_path, variant)


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
