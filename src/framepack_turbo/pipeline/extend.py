"""Video extension (`--video IN.mp4`): the input clip, read with PyAV as a stream of bucket-sized frames
at 30 fps, never whole.

What a continuation needs of the input is its end: F1 takes its context (16 + 2 + 1 latent frames, the
last 73 pixel frames) from there and the inverted variant only its last frame, as the "pre" anchor of
the new part. So only that tail is ever held and VAE-encoded; the output's copy of the input is decoded
again, frame by frame, each time the mp4 is written. A 10-minute input costs the same memory as a
5-second one.

The container's header is not trusted for what decoding costs: every decoded frame's size is checked against
the side limits before it becomes an array (an mjpeg stream declared 64x64 may hold a 12000x12000 frame), the
frames are counted as they decode and refused past the length limit (a Matroska Duration of 1 s may hold 35
minutes), and a clip that decodes to fewer (or more) frames than its header declares gets a note saying so
(a file cut short).

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
from framepack_turbo.pipeline.sections import CONTEXT_LATENTS
from framepack_turbo.text import shown

# Codecs PyAV's FFmpeg decodes that cameras, phones and video tools write; anything else is refused by name.
VIDEO_CODECS = frozenset({"h264", "hevc", "vp8", "vp9", "av1", "mpeg4", "prores", "mjpeg"})
MAX_VIDEO_SECONDS = 30 * 60.0
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
    seconds: float  # as the header declares it
    frames: int  # at 30 fps, after resampling, as the header declares it (what decodes: `Tail.total`)
    limit_s: float = MAX_VIDEO_SECONDS  # the longest input taken: decoding stops and refuses past it

    @property
    def resampled(self) -> bool:
        return abs(self.fps - FPS) > 0.01

    def note(self) -> str | None:
        if not self.resampled:
            return None
        return f"input video is {self.fps:g} fps: resampled to {FPS} fps ({self.frames} frames, nearest in time)"


def notes(video: InputVideo, tail: Tail) -> list[str]:
    """What the user should read about the input once it is decoded: its resampling, and a frame count other
    than the header's (a file cut short: the output copies what decodes, and the new part follows it)."""
    out = [video.note()] if video.note() else []
    shortfall = video.frames - tail.total
    if abs(shortfall) > max(2, video.frames // 100):  # a rounded duration, a resampled last frame: not a note
        if shortfall > 0:
            out.append(
                f"warning: {shown(video.path)}: only {tail.total} of the {video.frames} frames its header declares "
                f"decode (the file is cut short or damaged): the clip continues from frame {tail.total}"
            )
        else:
            out.append(
                f"{shown(video.path)}: {tail.total} frames decode ({tail.total / FPS:.1f} s), its header says "
                f"{video.frames} ({video.seconds:g} s): all {tail.total} are used"
            )
    return out


def _check_sides(path: Path, width: int, height: int, what: str = "") -> None:
    """The side limits of an image, for the stream's declared size and each decoded frame's."""
    if not (MIN_IMAGE_SIDE <= min(width, height) and max(width, height) <= MAX_IMAGE_SIDE):
        raise InputError(
            f"{shown(path)}: {what}{width}x{height}; sides must be {MIN_IMAGE_SIDE} to {MAX_IMAGE_SIDE} pixels"
        )


def probe_video(path: str | os.PathLike, max_seconds: float | None = None) -> InputVideo:
    """The input's stream facts as its header declares them, or one line saying why it cannot be extended.
    `max_seconds` (default MAX_VIDEO_SECONDS): the longest input, by the header here and by what decodes later."""
    import av

    max_seconds = MAX_VIDEO_SECONDS if max_seconds is None else max_seconds
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
    _check_sides(path, width, height)
    if seconds > max_seconds:
        raise InputError(f"{path}: {seconds:.0f} s long; the limit is {max_seconds:.0f} s")
    fps = float(rate)
    return InputVideo(path, codec, width, height, fps, seconds, max(1, round(seconds * FPS)), max_seconds)


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
    counted from the stream's start (the first ones may be missing).

    Whatever the header said: each frame's size is checked before anything converts it (the decoder's own
    buffer is all it costs), and an output index past the length limit is refused (so are timestamps that
    leap ahead: the gap would be filled with copies)."""
    import av

    step = Fraction(1, FPS)
    emitted = 0
    previous = None  # (time, frame)
    start: float | None = None
    most = math.floor(video.limit_s * FPS) + 1  # output frames: 0 .. limit_s * 30 inclusive
    with av.open(str(video.path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # FFmpeg's frame threads: decoding is most of what a long input costs
        if from_s > 0 and stream.start_time is not None and stream.time_base:
            start = float(stream.start_time * stream.time_base)
            container.seek(stream.start_time + int(from_s / stream.time_base), stream=stream, backward=True)
        for frame in _decoded(video, container, stream):
            _check_sides(video.path, frame.width, frame.height, f"a frame at {frame.time or 0:.2f} s is ")
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
                    _check_length(video, emitted, most)
                    yield emitted, previous[1]
                    emitted += 1
            previous = (t, frame)
        if previous is None:
            raise InputError(f"{video.path}: no frame could be decoded")
        while emitted * step < previous[0] + 0.5 / video.fps:
            _check_length(video, emitted, most)
            yield emitted, previous[1]
            emitted += 1


def _decoded(video: InputVideo, container, stream) -> Iterator:
    """The stream's frames; a packet FFmpeg refuses to decode (an impossible frame size, broken data) is one
    line naming where, not a traceback."""
    import av

    frames = container.decode(stream)
    while True:
        try:
            frame = next(frames)
        except StopIteration:
            return
        except av.error.FFmpegError as exc:
            raise InputError(
                f"{shown(video.path)}: a frame does not decode ({type(exc).__name__}): the file is damaged or its "
                f"frames are larger than {MAX_IMAGE_SIDE} pixels a side"
            ) from None
        yield frame


def _check_length(video: InputVideo, index: int, most: int) -> None:
    if index >= most:
        raise InputError(
            f"{shown(video.path)}: more than {video.limit_s:g} s of frames decode (its header says "
            f"{video.seconds:g} s); the limit is {video.limit_s:g} s: stopped there, cut the video shorter"
        )


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
