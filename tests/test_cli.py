"""The `framepack` command: the bar from the issue, bad input, Ctrl-C."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from framepack_turbo.cli import _InterruptToCancel, app
from framepack_turbo.pipeline import video
from framepack_turbo.pipeline.events import CancelToken

from .conftest import EXAMPLE_IMAGE

BAR = ["--model", "tiny-random", "--prompt", "a cat", "--seconds", "2", "--steps", "4", "--resolution", "128"]


def _framepack(*args: str, **kwargs) -> subprocess.CompletedProcess:
    """The installed entry point, as a user runs it."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "framepack_turbo.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        **kwargs,
    )


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["inverted", "f1"])
def test_the_bar(example_image, tmp_path, variant):
    out = tmp_path / "out.mp4"
    proc = _framepack("generate", "--image", str(example_image), *BAR, "--variant", variant, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    info = video.probe(out)
    assert (info.frames, info.pix_fmt, info.fps, info.codec) == (73, "yuv420p", 30.0, "h264")
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["variant"] == variant and sidecar["frames"] == 73 and sidecar["status"] == "complete"
    assert "Traceback" not in proc.stderr
    assert "73 frames" in proc.stdout


def test_missing_image_is_one_line_exit_2(tmp_path):
    proc = _framepack("generate", "--image", str(tmp_path / "missing.png"), *BAR, "--out", str(tmp_path / "o.mp4"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: image not found: {tmp_path / 'missing.png'}"]
    assert proc.stdout == ""


def _bad_image(tmp_path: Path) -> Path:
    p = tmp_path / "bad.png"
    p.write_text("not an image")
    return p


def _small_image(tmp_path: Path) -> Path:
    from PIL import Image

    p = tmp_path / "small.png"
    Image.new("RGB", (32, 80)).save(p)
    return p


@pytest.mark.parametrize(
    "extra, message",
    [
        (lambda t, img: ["--image", str(_bad_image(t))], "not a readable image"),
        (lambda t, img: ["--image", str(_small_image(t))], "image is 32x80"),
        (lambda t, img: ["--image", str(img), "--seconds", "0"], "--seconds 0: allowed a number > 0 and <= 120"),
        (lambda t, img: ["--image", str(img), "--seconds", "121"], "--seconds 121: allowed"),
        (lambda t, img: ["--image", str(img), "--seconds", "-3"], "--seconds -3: allowed"),
        (lambda t, img: ["--image", str(img), "--steps", "0"], "--steps 0: allowed an integer >= 1"),
        (lambda t, img: ["--image", str(img), "--window", "0"], "--window 0: allowed an integer >= 1"),
        (
            lambda t, img: ["--image", str(img), "--model", "gigantic"],
            "--model gigantic: allowed framepack or framepack-f1 or tiny or tiny-random or small",
        ),
        (lambda t, img: ["--image", str(img), "--variant", "sideways"], "--variant sideways: allowed inverted or f1"),
        (lambda t, img: ["--image", str(img), "--out", str(t)], "must be an .mp4 file"),
        (lambda t, img: ["--image", str(img), "--out", "/proc/no/such/out.mp4"], "cannot write there"),
        (lambda t, img: ["--image", str(img), "--model-dir", str(t / "nope")], "must be an existing folder"),
        (lambda t, img: ["--image", str(img), "--steps", "many"], "--steps many: allowed an integer"),
        (
            lambda t, img: ["--image", str(img), "--qant-bits", "4"],
            "unknown option --qant-bits; did you mean --quant-bits?",
        ),
        (lambda t, img: ["--image", str(img), "--quant-bits", "3"], "--quant-bits 3: allowed 4 or 8"),
        (lambda t, img: ["--image", str(img), "--count", "0"], "count=0: must be a whole number of clips from 1 to"),
        (lambda t, img: ["--image", str(img), "--count", "101"], "count=101"),
        (
            lambda t, img: ["--image", str(img), "--count", "2", "--seed", str(2**63 - 1)],
            "must be a whole number from 0 to 2^63-2 for 2 clip(s)",
        ),
        (lambda t, img: ["--image", str(img), "--seed", "randm"], "--seed randm: allowed an integer"),
        (
            lambda t, img: ["--image", str(img), "--variant", "f1", "--end-image", str(img)],
            "an end frame needs the inverted variant",
        ),
        (lambda t, img: ["--image", str(img), "--keyframe", f"9:{img}"], "the time must be in (0, 5] seconds"),
        (
            lambda t, img: ["--image", str(img), "--keyframe", f"1.3:{img}", "--keyframe", f"1.5:{img}"],
            "one keyframe per section",
        ),
        (lambda t, img: ["--image", str(img), "--keyframe", f"1:{_bad_image(t)}"], "not a readable image"),
        (lambda t, img: ["--image", str(img), "--end-image", str(t / "none.png")], "none.png"),
        (lambda t, img: ["--image", str(img), "--prompt-at", "soon:x"], "write TIME:TEXT"),
        (
            lambda t, img: ["--image", str(img), "--prompt-at", "0:a", "--prompt-at", "0.2:b"],
            "both land on the section starting at 0s",
        ),
        (lambda t, img: ["--image", str(img), "--start-color", "red"], "--start-color is for text-to-video"),
        (lambda t, img: ["--start-color", "plaid"], "start color 'plaid'"),
        (lambda t, img: ["--image", str(img), "--end-strength", "2", "--end-image", str(img)], "end strength=2.0"),
    ],
)
def test_bad_input_exit_2_one_line(tmp_path, example_image, extra, message):
    args = ["generate", "--prompt", "a cat", "--out", str(tmp_path / "o.mp4"), *extra(tmp_path, example_image)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert not (tmp_path / "o.mp4").exists()


def test_output_under_a_file_is_refused(tmp_path, example_image):
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a file where the output's folder should be: unwritable even for root
    args = ["generate", "--prompt", "x", "--image", str(example_image), "--out", str(blocker / "o.mp4")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "cannot write there" in result.output, result.output


def test_offline_missing_weights_is_one_line(tmp_path, example_image):
    args = ["generate", "--prompt", "x", "--image", str(example_image), "--model", "framepack", "--offline"]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "o.mp4")])
    # Either a developer has the real weights cached (then this would load 13B: don't) or the error names the repo.
    assert result.exit_code == 2
    assert "lllyasviel/FramePackI2V_HY" in result.output and "--model-dir" in result.output


def test_interrupt_handler_cancels_then_aborts():
    token = CancelToken()
    handler = _InterruptToCancel(token)
    handler._handle(signal.SIGINT, None)
    assert token.cancelled
    with pytest.raises(KeyboardInterrupt):
        handler._handle(signal.SIGINT, None)
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.mark.slow
def test_ctrl_c_keeps_the_finished_sections(example_image, tmp_path):
    out = tmp_path / "out.mp4"
    args = [
        "generate",
        "--image",
        str(example_image),
        "--model",
        "tiny-random",
        "--prompt",
        "a cat",
        "--seconds",
        "4",
        "--steps",
        "8",
        "--resolution",
        "128",
        "--out",
        str(out),
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "framepack_turbo.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    deadline = time.monotonic() + 300
    stderr_lines = []
    try:
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            stderr_lines.append(line)
            if "section 1/3 done" in line:
                proc.send_signal(signal.SIGINT)
                break
        _, rest = proc.communicate(timeout=300)
    finally:
        proc.kill()
    stderr = "".join(stderr_lines) + rest
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "stopped by the user after" in stderr
    info = video.probe(out)
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["status"] == "cancelled"
    assert info.frames == sidecar["frames"] and sidecar["sections_done"] >= 1
    assert info.frames in (33, 69)  # one or two finished sections of three (inverted: 33, then +36)


def test_a_clip_carries_what_made_it_and_runs_again_from_the_file(tmp_path):
    """The mp4's container metadata holds prompt, seed and settings: `info` prints them, `--from` re-runs them."""
    from framepack_turbo.pipeline import video

    first = tmp_path / "first.mp4"
    args = ["--model", "tiny-random", "--seconds", "1", "--steps", "3", "--resolution", "64", "--seed", "11"]
    made = CliRunner().invoke(
        app,
        [
            "generate",
            "--image",
            str(EXAMPLE_IMAGE),
            "--prompt",
            "a cat",
            "--negative",
            "blur",
            "--out",
            str(first),
            *args,
            "--enable-teacache",
        ],
    )
    assert made.exit_code == 0, made.output
    meta = video.read_metadata(first)
    assert meta["prompt"] == "a cat" and meta["seed"] == 11 and meta["negative_prompt"] == "blur"
    assert meta["options"]["steps"] == 3 and "teacache" in meta["passes"] and meta["settings"]["enable_teacache"]
    shown = CliRunner().invoke(app, ["info", str(first)])
    assert shown.exit_code == 0 and "prompt: a cat" in shown.output and "teacache" in shown.output
    again = tmp_path / "again.mp4"
    rerun = CliRunner().invoke(
        app, ["generate", "--from", str(first), "--image", str(EXAMPLE_IMAGE), "--out", str(again)]
    )
    assert rerun.exit_code == 0, rerun.output
    assert np.array_equal(video.read_frames(first), video.read_frames(again))
    other = CliRunner().invoke(app, ["info", str(EXAMPLE_IMAGE)])
    assert other.exit_code == 2 and "error:" in other.output


def test_count_makes_clips_with_consecutive_seeds_and_random_is_recorded(tmp_path):
    """--count 2 --seed random: two clips, seeds s and s+1 in their names, sidecars and mp4 metadata; clip 1 is
    exactly the clip a single run with --seed s makes, and clip 2 is another clip."""
    from framepack_turbo.pipeline import video

    args = ["--model", "tiny-random", "--seconds", "1", "--steps", "2", "--resolution", "64"]
    base = ["generate", "--image", str(EXAMPLE_IMAGE), "--prompt", "a cat", *args]
    made = CliRunner().invoke(app, [*base, "--count", "2", "--seed", "random", "--out", str(tmp_path / "c.mp4")])
    assert made.exit_code == 0, made.output
    clips = sorted(tmp_path.glob("c-seed*.mp4"), key=lambda p: int(p.stem.removeprefix("c-seed")))
    assert len(clips) == 2 and not (tmp_path / "c.mp4").exists()
    seeds = [video.read_metadata(c)["seed"] for c in clips]
    assert seeds[1] == seeds[0] + 1 and seeds[0] != 31337
    assert [json.loads(c.with_suffix(".json").read_text())["seed"] for c in clips] == seeds
    assert [c.name for c in clips] == [f"c-seed{s}.mp4" for s in seeds]
    assert f"seed {seeds[0]}" in made.output and f"seed {seeds[1]}" in made.output
    single = tmp_path / "single.mp4"
    alone = CliRunner().invoke(app, [*base, "--seed", str(seeds[0]), "--out", str(single)])
    assert alone.exit_code == 0, alone.output
    first, second = (video.read_frames(c) for c in clips)
    assert np.array_equal(first, video.read_frames(single))
    assert not np.array_equal(first, second)


def test_from_carries_the_timeline_of_a_clip(tmp_path):
    """A clip made with a timed prompt, an end image and a keyframe re-runs from its file with all three: the
    timed prompt and the blend from the clip, the images (which a clip never supplies) passed again."""
    from framepack_turbo.pipeline import video

    first, again = tmp_path / "timed.mp4", tmp_path / "again.mp4"
    args = ["--model", "tiny-random", "--seconds", "2.4", "--steps", "2", "--resolution", "64", "--seed", "5"]
    made = CliRunner().invoke(
        app,
        [
            "generate",
            "--image",
            str(EXAMPLE_IMAGE),
            "--prompt",
            "[0s: a cat sits] [1.2s: a cat jumps]",
            "--end-image",
            str(EXAMPLE_IMAGE),
            "--end-strength",
            "0.5",
            "--keyframe",
            f"1.2:{EXAMPLE_IMAGE}",
            "--prompt-blend-sections",
            "1",
            "--out",
            str(first),
            *args,
        ],
    )
    assert made.exit_code == 0, made.output
    options = video.read_metadata(first)["options"]
    assert options["end_strength"] == 0.5 and options["keyframes"] == [[1.2, str(EXAMPLE_IMAGE)]]
    assert options["prompt_blend_sections"] == 1 and options["end_image"] == str(EXAMPLE_IMAGE)
    images = ["--end-image", str(EXAMPLE_IMAGE), "--keyframe", f"1.2:{EXAMPLE_IMAGE}"]
    rerun = CliRunner().invoke(
        app, ["generate", "--from", str(first), "--image", str(EXAMPLE_IMAGE), *images, "--out", str(again)]
    )
    assert rerun.exit_code == 0, rerun.output
    assert "not used" not in rerun.output  # both passed again: nothing dropped to name
    assert (
        json.loads(again.with_suffix(".json").read_text())["timeline"]
        == json.loads(first.with_suffix(".json").read_text())["timeline"]
    )
    assert np.array_equal(video.read_frames(first), video.read_frames(again))


def test_version_and_the_grouped_command_list():
    import typer.main

    from framepack_turbo import __version__
    from framepack_turbo.cli import COMMAND_GROUPS

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"framepack-turbo {__version__}"
    text = CliRunner().invoke(app, ["--help"]).output
    headings = [line[:-1] for line in text.splitlines() if line.endswith(":") and not line.startswith(" ")]
    assert headings == ["Options", *COMMAND_GROUPS]  # no "Other": every command has its group
    grouped = [name for names in COMMAND_GROUPS.values() for name in names]
    assert sorted(grouped) == sorted(typer.main.get_command(app).commands)
    for name in grouped:  # one line each, not cut short
        (line,) = [ln for ln in text.splitlines() if ln.strip().startswith(name + " ")]
        assert not line.rstrip().endswith("...")
