"""Video extension (`--video`): the input read as a stream at 30 fps and the bucket, the output = the input's
frames then the new ones with no jump at the seam, on the trained tiny model; bad inputs refused in one line;
a 10-minute input extended in bounded host memory."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import textwrap
from fractions import Fraction

import av
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from framepack_turbo.cli import app
from framepack_turbo.errors import InputError
from framepack_turbo.pipeline import extend, video
from framepack_turbo.pipeline.events import Notice
from framepack_turbo.train import world

from .conftest import EXAMPLE_IMAGE

SCENE = world.Scene("blue", "square", "right", speed=0.3, x=0.3, y=0.5, radius=0.12, background=7)
SEAM_PAIRS = 2  # frame pairs each side of the seam whose mean change is the seam's


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255**2 / max(mse, 1e-12)))


def frame_changes(frames: np.ndarray) -> np.ndarray:
    """Mean absolute change (0-255) from each frame to the next."""
    return np.abs(np.diff(frames.astype(np.float32), axis=0)).mean(axis=(1, 2, 3))


def seam_change(frames: np.ndarray, seam: int) -> float:
    """The mean change over the frame pairs around the seam (the first new frame is `seam`)."""
    changes = frame_changes(frames)
    return float(changes[seam - 1 - SEAM_PAIRS + 1 : seam + SEAM_PAIRS].mean())


@pytest.fixture(scope="module")
def two_seconds(tmp_path_factory):
    path = tmp_path_factory.mktemp("extend") / "in.mp4"
    video.write_mp4(world.render(SCENE, 60, 64), path)
    return path


@pytest.mark.parametrize("variant", ["f1", "inverted"])
def test_a_two_second_clip_extended_by_two_keeps_its_frames_and_joins_without_a_jump(
    trained, two_seconds, tmp_path, variant
):
    given = video.read_frames(two_seconds)  # the input after its own encode
    out = tmp_path / f"{variant}.mp4"
    result = trained.generate(
        None, SCENE.prompt, out=out, video=str(two_seconds), seconds=2, steps=12, variant=variant, resolution=64
    )
    frames = video.read_frames(out)
    new = 2 * 36  # two sections of 9 latent frames
    assert len(frames) == len(given) + new == result.frames_before + len(result.frames) == result.sidecar["frames"]
    # F1 cross-fades the last section's worth of input frames (33) into the new part, as FramePack joins
    # sections; the inverted variant keeps every input frame.
    kept = len(given) - (33 if variant == "f1" else 0)
    assert psnr(frames[:kept], given[:kept]) >= 40
    seam = len(given)
    median = float(np.median(frame_changes(frames)))
    assert seam_change(frames, seam) <= 2 * median, (seam_change(frames, seam), median)
    assert result.sidecar["image"]["source"] == str(two_seconds) and "text_to_video" not in result.sidecar["image"]
    extends = result.sidecar["image"]["extends"]
    assert extends["frames"] == 60 and extends["fps"] == 30 and not extends["resampled"]
    assert extends["encoded_frames"] == (57 if variant == "f1" else 1)  # only the tail: 1 + 4k frames, or one


def test_another_frame_rate_is_resampled_to_30_nearest_in_time(tmp_path):
    frames = np.stack([np.full((64, 64, 3), 10 * i, np.uint8) for i in range(24)])  # 1 s at 24 fps
    path = tmp_path / "24.mp4"
    video.write_mp4(frames, path, fps=24)
    source = extend.probe_video(path)
    assert source.fps == 24 and source.frames == 30 and "resampled to 30 fps" in source.note()
    out = np.stack(list(extend.frames_at_30(source, 64, 64)))
    shown = np.round(out[:, 0, 0, 0] / 10).astype(int).tolist()
    assert len(out) == 30 and shown == [round(i * 24 / 30) for i in range(30)]  # 0.8 i is never a tie


def test_the_tail_is_the_context_only(tmp_path):
    path = tmp_path / "long.mp4"
    video.write_mp4(world.render(SCENE, 100, 64), path)
    source = extend.probe_video(path)
    f1 = extend.read_tail(source, 64, 64, "f1")
    assert len(f1.frames) == 73 and f1.before == 27 and f1.total == 100  # 19 latents' worth: 1 + 4 * 18
    inverted = extend.read_tail(source, 64, 64, "inverted")
    assert len(inverted.frames) == 1 and inverted.before == 99
    assert np.array_equal(inverted.frames[0], f1.frames[-1])


@pytest.mark.parametrize("fps", [30, 24])
def test_a_long_inputs_tail_is_read_after_a_seek_and_equals_a_whole_decode(tmp_path, monkeypatch, fps):
    # 20 s: x264 puts keyframes 250 frames apart, so the tail's seek skips most of the clip
    frames = np.zeros((20 * fps, 64, 64, 3), np.uint8)
    for i in range(len(frames)):
        frames[i, :, i % 64] = 255
        frames[i, : 8 + (i // 64) * 3] = 90
    path = tmp_path / f"long-{fps}.mp4"
    video.write_mp4(frames, path, fps=fps)
    source = extend.probe_video(path)
    whole = np.stack(list(extend.frames_at_30(source, 64, 64)))
    decoded = []
    real = extend._at_30

    def counted(v, from_s=0.0):
        for item in real(v, from_s):
            decoded.append(item[0])
            yield item

    monkeypatch.setattr(extend, "_at_30", counted)
    for variant, keep in (("f1", 73), ("inverted", 1)):
        decoded.clear()
        tail = extend.read_tail(source, 64, 64, variant)
        assert tail.total == len(whole) == 600 and tail.before == 600 - keep
        assert np.array_equal(tail.frames, whole[-keep:])
        assert len(decoded) < 300  # from the keyframe before the end's few seconds, not from frame 0


def test_bad_videos_are_refused_in_one_line(tmp_path, two_seconds):
    not_video = tmp_path / "fake.mp4"
    not_video.write_bytes(b"this is not a video at all" * 40)
    with pytest.raises(InputError, match="not a readable video"):
        extend.probe_video(not_video)
    with pytest.raises(InputError, match="video not found"):
        extend.probe_video(tmp_path / "none.mp4")
    with pytest.raises(InputError, match="2 s long; the limit is 1 s"):
        extend.probe_video(two_seconds, max_seconds=1)
    still = tmp_path / "still.png.mp4"
    still.write_bytes(EXAMPLE_IMAGE.read_bytes())  # an image is a one-frame "video" to FFmpeg: its codec is refused
    with pytest.raises(InputError, match="video codec 'png' is not one we read"):
        extend.probe_video(still)


@pytest.mark.parametrize(
    "extra, message",
    [
        (lambda v: ["--video", str(v), "--image", str(EXAMPLE_IMAGE)], "--video continues the clip from its own"),
        (lambda v: ["--video", str(v), "--start-color", "red"], "--start-color is for a clip without any"),
        (lambda v: ["--video", str(v.with_name("none.mp4"))], "video not found"),
        (lambda v: ["--video", str(v), "--variant", "f1", "--end-image", str(EXAMPLE_IMAGE)], "needs the inverted"),
    ],
)
def test_bad_extension_requests_exit_2_one_line(tmp_path, two_seconds, extra, message):
    args = [
        "generate",
        "--prompt",
        "x",
        "--model",
        "tiny-random",
        "--out",
        str(tmp_path / "o.mp4"),
        *extra(two_seconds),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output


def test_the_cli_extends_a_clip_and_says_so(tmp_path, two_seconds):
    out = tmp_path / "longer.mp4"
    args = ["generate", "--model", "tiny-random", "--video", str(two_seconds), "--prompt", "x", "--seconds", "1"]
    result = CliRunner().invoke(app, [*args, "--steps", "1", "--resolution", "64", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "continuing" in result.output and "(96 frames, 3.20 s, 60 of them the input's" in result.output
    assert video.probe(out).frames == 96


def test_f1_needs_a_section_of_input(tiny, tmp_path):
    short = tmp_path / "short.mp4"
    video.write_mp4(world.render(SCENE, 20, 64), short)
    with pytest.raises(InputError, match="F1 continues from at least 33"):
        tiny.generate(
            None, "x", out=tmp_path / "o.mp4", video=str(short), seconds=1, steps=1, variant="f1", resolution=64
        )
    done = tiny.generate(
        None, "x", out=tmp_path / "i.mp4", video=str(short), seconds=1, steps=1, variant="inverted", resolution=64
    )
    assert done.sidecar["frames"] == 20 + 36


# ---- hostile inputs: what the header declares is not what decodes ------------------------------------------------


def cut_short(path, frames=90, keep=0.6):
    """A faststart mp4 (its index, declaring every frame, at the front) cut at `keep` of its bytes."""
    whole = path.with_name("whole-" + path.name)
    video.write_mp4(world.render(SCENE, frames, 64), path.with_name("seg-" + path.name))
    video.join([path.with_name("seg-" + path.name)], whole, index_first=True)
    path.write_bytes(whole.read_bytes()[: int(whole.stat().st_size * keep)])
    return path


def jpeg(width: int, height: int, value: int, sof: tuple[int, int] | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), value, np.uint8)).save(buf, "JPEG")
    data = buf.getvalue()
    if sof is not None:  # a start-of-frame header claiming another size (height, width) than the data
        at = data.index(b"\xff\xc0")
        data = data[: at + 5] + struct.pack(">HH", *sof) + data[at + 9 :]
    return data


def mjpeg(path, frames: list[bytes]):
    """An mjpeg stream declared 64x64 whose packets are the given JPEGs, whatever their size."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mjpeg", rate=30)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuvj420p"
        for i, data in enumerate(frames):
            packet = av.Packet(data)
            packet.stream, packet.time_base, packet.pts, packet.dts, packet.duration = stream, Fraction(1, 30), i, i, 1
            container.mux(packet)
    return path


def lying_mkv(path, frames=120, says_s=1.0):
    """A Matroska file of `frames` frames at 30 fps whose segment Duration says `says_s`."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for frame in world.render(SCENE, frames, 64):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    data = path.read_bytes()
    at = data.index(b"\x44\x89\x88") + 3  # Duration: an 8-byte float, in milliseconds (the default scale)
    path.write_bytes(data[:at] + struct.pack(">d", says_s * 1000) + data[at + 8 :])
    return path


def test_a_cut_short_mp4_is_extended_with_a_warning_saying_how_many_frames_decode(tiny, tmp_path, capfd):
    path = cut_short(tmp_path / "cut.mp4")
    source = extend.probe_video(path)
    assert source.frames == 90  # what the index at the front declares
    notices = []
    done = tiny.generate(
        None,
        "x",
        tmp_path / "o.mp4",
        notices.append,
        video=str(path),
        seconds=1,
        steps=1,
        variant="inverted",
        resolution=64,
    )
    decoded = done.frames_before
    assert 0 < decoded < 90 and done.sidecar["image"]["extends"]["frames"] == decoded
    said = [n.message for n in notices if isinstance(n, Notice) and "frames its header declares" in n.message]
    assert said == [
        f"warning: {path}: only {decoded} of the 90 frames its header declares decode (the file is cut short or "
        f"damaged): the clip continues from frame {decoded}"
    ]
    # the CLI shows it (and the page: a Notice is what the queue keeps in the job's notices)
    args = ["generate", "--model", "tiny-random", "--video", str(path), "--prompt", "x", "--seconds", "1"]
    result = CliRunner().invoke(app, [*args, "--steps", "1", "--resolution", "64", "--out", str(tmp_path / "c.mp4")])
    shown = " ".join((result.output + capfd.readouterr().err).split())  # the progress console writes to stderr
    assert result.exit_code == 0 and f"only {decoded} of the 90 frames its header declares" in shown, shown


def test_a_whole_file_and_a_rounded_duration_say_nothing(two_seconds):
    source = extend.probe_video(two_seconds)
    assert extend.notes(source, extend.read_tail(source, 64, 64, "inverted")) == []


def test_a_frame_beyond_the_side_limit_is_refused_before_it_becomes_an_array(tmp_path, monkeypatch):
    converted = []
    real = av.VideoFrame.to_ndarray
    monkeypatch.setattr(av.VideoFrame, "to_ndarray", lambda f, **kw: converted.append(f.width) or real(f, **kw))
    last_big = mjpeg(tmp_path / "big.mkv", [jpeg(64, 64, 10 * i) for i in range(9)] + [jpeg(4100, 64, 200)])
    source = extend.probe_video(last_big)
    assert (source.width, source.height, source.frames) == (64, 64, 10)  # the header's size: within the limit
    for variant in ("inverted", "f1"):
        with pytest.raises(InputError, match="a frame at 0.30 s is 4100x64; sides must be 64 to 4096 pixels"):
            extend.read_tail(source, 64, 64, variant)
    # a large frame before the tail: the output's copy of the input stops on it
    early_big = mjpeg(tmp_path / "early.mkv", [jpeg(64, 64, 0), jpeg(4100, 64, 9)] + [jpeg(64, 64, 50)] * 148)
    with pytest.raises(InputError, match="a frame at 0.03 s is 4100x64"):
        list(extend.head(extend.probe_video(early_big), 64, 64, 150))
    assert 4100 not in converted
    # a size FFmpeg will not even allocate (24000 x 24000 as the header claims): one line, not a traceback
    huge = mjpeg(tmp_path / "huge.mkv", [jpeg(64, 64, 0)] * 9 + [jpeg(64, 64, 0, sof=(24000, 24000))])
    with pytest.raises(InputError, match="a frame does not decode"):
        extend.read_tail(extend.probe_video(huge), 64, 64, "inverted")


def test_a_large_frame_on_the_command_line_is_one_line_exit_2(tmp_path):
    path = mjpeg(tmp_path / "big.mkv", [jpeg(64, 64, 10 * i) for i in range(9)] + [jpeg(4100, 64, 200)])
    args = ["generate", "--model", "tiny-random", "--video", str(path), "--prompt", "x", "--seconds", "1"]
    result = CliRunner().invoke(app, [*args, "--steps", "1", "--resolution", "64", "--out", str(tmp_path / "o.mp4")])
    lines = [line for line in result.output.strip().splitlines() if line.startswith("error")]
    assert result.exit_code == 2 and len(lines) == 1 and "4100x64; sides must be" in lines[0], result.output
    assert not (tmp_path / "o.mp4").exists()


def test_a_stream_longer_than_its_header_says_is_counted_and_stopped_at_the_cap(tmp_path, monkeypatch):
    path = lying_mkv(tmp_path / "lies.mkv", frames=120, says_s=1.0)
    source = extend.probe_video(path)
    assert source.seconds == 1 and source.frames == 30
    tail = extend.read_tail(source, 64, 64, "inverted")
    assert tail.total == 120  # counted as decoded, not taken from the header
    assert extend.notes(source, tail) == [
        f"{path}: 120 frames decode (4.0 s), its header says 30 (1 s): all 120 are used"
    ]
    monkeypatch.setattr(extend, "MAX_VIDEO_SECONDS", 3.0)  # the 30-minute cap, low: 3 s of 4 pass it
    capped = extend.probe_video(path)  # the header's 1 s is within it
    for read in (lambda: extend.read_tail(capped, 64, 64, "f1"), lambda: list(extend.head(capped, 64, 64, 10**6))):
        with pytest.raises(
            InputError, match=r"more than 3 s of frames decode \(its header says 1 s\); the limit is 3 s"
        ):
            read()
    # the page's own limit (probe_video's max_seconds) is the cap its decode stops at too
    with pytest.raises(InputError, match="the limit is 2 s"):
        extend.read_tail(extend.probe_video(path, max_seconds=2), 64, 64, "inverted")


@pytest.mark.slow
def test_a_ten_minute_input_is_extended_in_bounded_host_memory(tmp_path):
    """18000 frames of 256 x 256 are 3.5 GB held whole; the extension streams them (the bucket is 64 px)."""
    source = tmp_path / "ten-minutes.mp4"
    out = tmp_path / "extended.mp4"
    script = textwrap.dedent(
        f"""
        import json, resource
        import numpy as np
        from framepack_turbo.api import FramePack
        from framepack_turbo.pipeline import video

        yy, xx = np.mgrid[0:256, 0:256]
        def frames():
            for t in range(18000):  # a soft pattern drifting right, one pixel a frame
                v = 128 + 60 * np.sin((xx - t) / 20.0) * np.cos(yy / 30.0)
                yield np.repeat(v[..., None], 3, axis=2).astype(np.uint8)
        video.write_mp4(np.zeros((0, 256, 256, 3), np.uint8), {str(source)!r}, crf=28, before=frames())
        fp = FramePack.load("tiny", device="cpu")
        r = fp.generate(None, "the red circle moves right", out={str(out)!r}, video={str(source)!r}, seconds=1,
                        steps=2, variant="inverted", resolution=64)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps({{"frames": r.sidecar["frames"], "peak": peak}}))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["frames"] == 18000 + 36 == video.probe(out).frames
    assert report["peak"] < 2 * 2**30, report


def _drifting(minutes: float, side: int = 64):
    """`minutes` of a soft pattern drifting right, one pixel a frame, as a stream of frames."""
    yy, xx = np.mgrid[0:side, 0:side]
    for t in range(round(minutes * 60 * 30)):
        v = 128 + 60 * np.sin((xx - t) / 10.0) * np.cos(yy / 15.0)
        yield np.repeat(v[..., None], 3, axis=2).astype(np.uint8)


@pytest.mark.slow
def test_peak_host_memory_does_not_grow_with_the_inputs_length(tmp_path):
    """The CLI extending a 2- and an 8-minute 64 x 64 input by 1 s: the same peak RSS. It once grew ~20 KB per
    output frame (the result's frames were read back from the whole output, the input's copy included,
    to count them: 735 -> 963 MB here); what is held per frame now is nothing."""
    peaks = {}
    for minutes in (2, 8):
        source, out = tmp_path / f"in-{minutes}.mp4", tmp_path / f"out-{minutes}.mp4"
        video.write_mp4(np.zeros((0, 64, 64, 3), np.uint8), source, crf=28, before=_drifting(minutes))
        args = ["generate", "--model", "tiny-random", "--video", str(source), "--prompt", "x", "--seconds", "1"]
        args += ["--steps", "1", "--resolution", "64", "--variant", "inverted", "--out", str(out)]
        script = textwrap.dedent(
            f"""
            import json, resource
            from framepack_turbo.cli import app
            app({args!r}, standalone_mode=False)
            print(json.dumps({{"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
            """
        )
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-2000:]
        peaks[minutes] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_mb"]
        assert video.probe(out).frames == minutes * 60 * 30 + 36
    assert peaks[8] - peaks[2] < 80, peaks  # 10800 more frames: 16 KB each would be 170 MB
