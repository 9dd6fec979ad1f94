"""Video extension (`--video IN.mp4`): the input clip, read with PyAV as a stream of bucket-sized frames
at 30 fps, never whole.

What a continuation needs of the input is its end: F1 takes its context (16 + 2 + 1 latent frames, the
last 73 pixel frames) from there and the inverted variant only its last frame, as the "pre" anchor of
the new part. So only that tail is ever held and VAE-encoded; the output's copy of the input is decoded
again, frame by frame, each time the mp4 is written. A 10-minute input costs the same memory as a
5-second one.

Frame rates other than 30 fps are resampled to the nearest frame in time (a 24 fps input repeats every
fourth frame; a 60 fps one drops every other), with a note, because the output is 30 fps throughout.
"""

from __future__ import annotations

import collections
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from framepack_turbo.constants import FPS, LATENT_FRAMES_TO_PIXELS, MAX_IMAGE_SIDE, MIN_IMAGE_SIDE
from framepack_turbo.errors import InputError
from framepack_turbo.pipeline import encode
from framepack_turbo.pipeline.sections import CONTEXT_1X, CONTEXT_2X, CONTEXT_4X

# Codecs PyAV's FFmpeg decodes that cameras, phones and video tools write; anything else is refused by name.
VIDEO_CODECS = frozenset({"h264", "hevc", "vp8", "vp9", "av1", "mpeg4", "prores", "mjpeg"})
MAX_VIDEO_SECONDS = 30 * 60.0
CONTEXT_LATENTS = CONTEXT_1X + CONTEXT_2X + CONTEXT_4X
TAIL_SEEK_MARGIN_S = 2.0  # decoded before the tail: room for a seek landing late or a duration a little long
F1_TAIL_FRAMES = 1 + LATENT_FRAMES_TO_PIXELS * (CONTEXT_LATENTS - 1)  # 73: the frames of 19 latents


@dataclass(frozen=True)
class InputVideo:
    """An input clip, checked by content (PyAV reads the container, whatever the file is called)."""

    path: Path
    codec: str
    width: int
    height: int
    fps: float
    seconds: float
    frames: int  # at 30 fps, after resampling

    @property
    def resampled(self) -> bool:
        return abs(self.fps - FPS) > 0.01

    def note(self) -> str | None:
        if not self.resampled:
            return None
        return f"input video is {self.fps:g} fps: resampled to {FPS} fps ({self.frames} frames, nearest in time)"


def probe_video(path: str | os.PathLike, max_seconds: float = MAX_VIDEO_SECONDS) -> InputVideo:
    """The input's stream facts, or one line saying why it cannot be extended."""
    import av

    path = Path(path)
    if not path.is_file():
        raise InputError(f"video not found: {path}" if not path.exists() else f"video path is not a file: {path}")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise InputError(f"{path}: no video stream in it")
            stream = container.streams.video[0]
            codec = stream.codec_context.name
            width, height = stream.codec_context.width, stream.codec_context.height
            rate = stream.average_rate or stream.guessed_rate
            seconds = _duration(container, stream)
    except InputError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable video ({type(exc).__name__})") from None
    if codec not in VIDEO_CODECS:
        raise InputError(
            f"{path}: video codec {codec!r} is not one we read; use one of {', '.join(sorted(VIDEO_CODECS))}"
        )
    if not rate or not seconds:
        raise InputError(f"{path}: the video has no frame rate or duration")
    if not (MIN_IMAGE_SIDE <= min(width, height) and max(width, height) <= MAX_IMAGE_SIDE):
        raise InputError(f"{path}: {width}x{height}; sides must be {MIN_IMAGE_SIDE} to {MAX_IMAGE_SIDE} pixels")
    if seconds > max_seconds:
        raise InputError(f"{path}: {seconds:.0f} s long; the limit is {max_seconds:.0f} s")
    fps = float(rate)
    return InputVideo(path, codec, width, height, fps, seconds, max(1, round(seconds * FPS)))


def _duration(container, stream) -> float:
    if stream.duration is not None and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000
    return 0.0


def _at_30(video: InputVideo, from_s: float = 0.0) -> Iterator[tuple[int, object]]:
    """The input's decoded frames (PyAV's, not yet converted) resampled to 30 fps, as (index, frame): output
    frame i is the input frame nearest to i / 30 s (a frame repeats or is skipped where the rates differ).
    `from_s`: start at the keyframe before that time instead of the first frame; the indices are still
    counted from the stream's start (the first ones may be missing)."""
    import av

    step = Fraction(1, FPS)
    emitted = 0
    previous = None  # (time, frame)
    start: float | None = None
    with av.open(str(video.path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # FFmpeg's frame threads: decoding is most of what a long input costs
        if from_s > 0 and stream.start_time is not None and stream.time_base:
            start = float(stream.start_time * stream.time_base)
            container.seek(stream.start_time + int(from_s / stream.time_base), stream=stream, backward=True)
        for frame in container.decode(stream):
            t = float(frame.time) if frame.time is not None else (previous[0] + 1 / video.fps if previous else 0.0)
            if start is None:
                start = t
            t -= start
            if previous is None:
                # after a seek, the outputs nearer the frames before this one are theirs (the midpoint rule)
                emitted = max(0, math.ceil((t - 0.5 / video.fps) * FPS - 1e-9))
            else:
                midpoint = (previous[0] + t) / 2  # output times before it are nearer the previous frame
                while emitted * step < midpoint:
                    yield emitted, previous[1]
                    emitted += 1
            previous = (t, frame)
        if previous is None:
            raise InputError(f"{video.path}: no frame could be decoded")
        while emitted * step < previous[0] + 0.5 / video.fps:
            yield emitted, previous[1]
            emitted += 1


def _converted(frame, height: int, width: int) -> np.ndarray:
    return encode.resize_and_center_crop(frame.to_ndarray(format="rgb24"), height, width)


def frames_at_30(video: InputVideo, height: int, width: int) -> Iterator[np.ndarray]:
    """The input's frames at 30 fps, resized and centre-cropped to (height, width). A stream: one decoded
    frame is held at a time."""
    for _, frame in _at_30(video):
        yield _converted(frame, height, width)


@dataclass
class Tail:
    """The input's last frames at the bucket (T, H, W, 3) uint8, and how many frames come before them."""

    frames: np.ndarray
    before: int

    @property
    def total(self) -> int:
        return self.before + len(self.frames)


def f1_least_frames(window: int) -> int:
    """The shortest input F1 continues: one section's latents, which the first new section's decode
    overlaps (FramePack's soft append)."""
    return 1 + LATENT_FRAMES_TO_PIXELS * (window - 1)


def read_tail(video: InputVideo, height: int, width: int, variant: str, window: int = 9) -> Tail:
    """The frames a continuation is conditioned on: F1's context (73 frames, or a section's if longer; 1 + 4k
    so that they encode to whole latents), the inverted variant's last frame. Decoding starts a few seconds
    before the end (FFmpeg seeks to the keyframe before), so a long input is not decoded whole for its end;
    where the seek found too few frames (a stream whose duration is wrong), it is decoded from the start."""
    keep = max(F1_TAIL_FRAMES, f1_least_frames(window)) if variant == "f1" else 1
    for from_s in (max(0.0, video.seconds - keep / FPS - TAIL_SEEK_MARGIN_S), 0.0):
        last = collections.deque(maxlen=keep)  # PyAV frames: only these few are converted and resized
        count = first = 0
        for index, frame in _at_30(video, from_s):
            first = index if not last else first
            last.append(frame)
            count = index + 1
        if len(last) == keep or first == 0:
            break
    usable = 1 + (len(last) - 1) // LATENT_FRAMES_TO_PIXELS * LATENT_FRAMES_TO_PIXELS
    frames = np.stack([_converted(f, height, width) for f in list(last)[len(last) - usable :]])
    return Tail(frames, count - len(frames))


def head(video: InputVideo, height: int, width: int, count: int) -> Iterator[np.ndarray]:
    """The first `count` frames of the input at the bucket: the part of the output copied from it."""
    if count <= 0:
        return
    for index, frame in enumerate(frames_at_30(video, height, width)):
        yield frame
        if index + 1 == count:
            return


def describe(video: InputVideo, tail: Tail) -> dict:
    """What the run record keeps of the input."""
    return {
        "codec": video.codec,
        "size": [video.width, video.height],
        "fps": round(video.fps, 3),
        "resampled": video.resampled,
        "frames": tail.total,
        "encoded_frames": len(tail.frames),
    }


def bucket_of(video: InputVideo, resolution: int) -> tuple[int, int]:
    return encode.nearest_bucket(video.height, video.width, resolution=resolution)


def to_pixels(frames: np.ndarray, dtype) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (1, 3, T, H, W) in [-1, 1]: frames in the form the VAE decodes to."""
    return (torch.from_numpy(frames).permute(3, 0, 1, 2)[None].to(dtype) / 127.5 - 1).contiguous()


def join_after(last: np.ndarray, new: np.ndarray, fade: int) -> np.ndarray:
    """The new part of an inverted extension to follow the input's `last` frame: its first frame is that
    frame through the VAE, so it is dropped, and the difference between the real frame and its decoded copy
    is added back to the next frames, fading out over `fade` frames: no jump where the input ends."""
    residual = last.astype(np.float32) - new[0].astype(np.float32)
    out = new[1:].astype(np.float32)
    n = min(fade, len(out))
    weights = np.linspace(1, 0, fade + 1, dtype=np.float32)[1 : n + 1]
    out[:n] += weights[:, None, None, None] * residual
    return np.clip(np.round(out), 0, 255).astype(np.uint8)
