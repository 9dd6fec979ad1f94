"""The outputs: an h264/yuv420p mp4 at 30 fps and a JSON sidecar, both written atomically.

Frames are encoded once, in segments (`write_mp4`), as they become final; `join` makes the playable
file from the segments by copying their packets (no re-encoding), so a job that stops leaves a
playable file of the sections that finished (pipeline/writer.py drives this beside the sampler).
PyAV (FFmpeg with libx264 in its wheels) does the encoding: no system ffmpeg needed.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from framepack_turbo.constants import CRF_ZERO, FPS, MAX_CRF, MIN_CRF
from framepack_turbo.files import atomic_path

CODEC = "libx264"
PIX_FMT = "yuv420p"
_CONVERT_CHUNK = 64  # frames


def to_uint8_frames(pixels: torch.Tensor) -> np.ndarray:
    """(1, 3, T, H, W) in [-1, 1] -> (T, H, W, 3) uint8."""
    if pixels.dim() != 5 or pixels.shape[0] != 1:
        raise ValueError(f"expected pixels of shape (1, 3, T, H, W), got {tuple(pixels.shape)}")
    _, _, t, h, w = pixels.shape
    out = np.empty((t, h, w, 3), np.uint8)
    for start in range(0, t, _CONVERT_CHUNK):  # in chunks: a float32 copy of a long clip is gigabytes
        chunk = pixels[0, :, start : start + _CONVERT_CHUNK].float().clamp(-1, 1) * 127.5 + 127.5
        out[start : start + _CONVERT_CHUNK] = chunk.round().to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()
    return out


METADATA_TAG = "framepack-turbo"  # the "format" key of the JSON the mp4's comment carries


def write_mp4(
    frames: np.ndarray,
    path: str | os.PathLike,
    crf: int = 16,
    fps: int = FPS,
    metadata: dict | None = None,
    before: Iterable[np.ndarray] = (),
) -> Path:
    """Encode (T, H, W, 3) uint8 frames as h264 yuv420p; replaces `path` only once the file is complete.

    `metadata` (what the clip was made with) goes into the container's comment as JSON, so the file alone
    can be read back (`read_metadata`, `framepack info`) and re-run (`framepack generate --from`).
    `before`: frames of the same size written first, as a stream (the input of a video extension, which is
    never held whole)."""
    import av

    if not MIN_CRF <= crf <= MAX_CRF:
        raise ValueError(f"crf {crf}: {CRF_ZERO}" if crf == 0 else f"crf {crf}: must be in [{MIN_CRF}, {MAX_CRF}]")
    path = Path(path)
    t, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"yuv420p needs even sides, got {w}x{h}")
    with atomic_path(path) as tmp, av.open(tmp, mode="w", format="mp4") as container:
        _set_metadata(container, metadata)
        # cpu-independent: x264's switch for bit-exact output whatever the CPU and its earlier work; without it,
        # the same frames encoded twice in one process (after a generation) came out different here (x264 in
        # PyAV 17-18's wheels: decoded frames up to 23 levels apart), and `--from` could not remake a clip.
        options = {"crf": str(int(crf)), "x264-params": "cpu-independent=1"}
        stream = container.add_stream(CODEC, rate=fps, options=options)
        stream.width, stream.height, stream.pix_fmt = w, h, PIX_FMT
        for frame in itertools.chain(before, frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _set_metadata(container, metadata: dict | None) -> None:
    if metadata is not None:
        container.metadata["comment"] = json.dumps({"format": METADATA_TAG, **metadata}, default=str)
        container.metadata["title"] = str(metadata.get("prompt", ""))[:200]


def join(
    segments: Iterable[str | os.PathLike],
    path: str | os.PathLike,
    metadata: dict | None = None,
    index_first: bool = False,
    fps: int = FPS,
) -> int:
    """One mp4 from segments `write_mp4` made with the same size and crf, by copying their packets: each
    segment starts with an IDR frame and carries the same SPS/PPS, so the joined stream decodes to exactly
    the segments' frames. Replaces `path` only once complete; returns the frames it holds.

    `index_first`: the index (moov) at the front (FFmpeg's faststart, a second pass over the file), for
    the finished clip; the partial files skip it. The cost is per packet (tens of microseconds here),
    three orders of magnitude below encoding the frames again."""
    import av

    path = Path(path)
    frames = 0
    options = {"movflags": "faststart"} if index_first else {}
    with atomic_path(path) as tmp, av.open(tmp, mode="w", format="mp4", options=options) as out:
        _set_metadata(out, metadata)
        stream = None
        for segment in segments:
            with av.open(str(segment)) as source:
                video = source.streams.video[0]
                if stream is None:
                    stream = out.add_stream_from_template(video)
                offset = round(frames / (fps * video.time_base))  # this segment starts after the frames so far
                count = 0
                for packet in source.demux(video):
                    if packet.dts is None:  # the demuxer's empty flush packet
                        continue
                    packet.pts += offset
                    packet.dts += offset
                    packet.stream = stream
                    out.mux(packet)
                    count += 1
                frames += count
        if stream is None:
            raise ValueError("join: no segments")
    return frames


@dataclass(frozen=True)
class VideoInfo:
    frames: int
    fps: float
    width: int
    height: int
    codec: str
    pix_fmt: str
    profile: str = ""  # h264 profile ("High"; "High 4:4:4 Predictive" is what most players refuse)


def probe(path: str | os.PathLike) -> VideoInfo:
    """Read a video back and count its frames by decoding (container metadata can be wrong)."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        ctx = stream.codec_context
        count = sum(1 for _ in container.decode(stream))
        return VideoInfo(
            count, float(stream.average_rate), ctx.width, ctx.height, ctx.name, ctx.pix_fmt, ctx.profile or ""
        )


def read_metadata(path: str | os.PathLike) -> dict | None:
    """What `write_mp4` recorded in the file's comment; None for a video without it."""
    import av

    with av.open(str(path)) as container:
        comment = container.metadata.get("comment", "")
    try:
        data = json.loads(comment)
    except (TypeError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == METADATA_TAG else None


def read_frames(path: str | os.PathLike, skip: int = 0) -> np.ndarray:
    """All frames as (T, H, W, 3) uint8; `skip`: from that frame on (the ones before are decoded, never held:
    an extension's result reads its new part without the input's copy)."""
    import av

    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in itertools.islice(container.decode(video=0), skip, None)]
    return np.stack(frames) if frames else np.zeros((0, 0, 0, 3), np.uint8)


def sidecar_path(video_path: str | os.PathLike) -> Path:
    return Path(video_path).with_suffix(".json")
