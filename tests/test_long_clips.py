"""Long clips at flat cost: each frame encoded once as it becomes final, the file playable after every
section and after a SIGKILL at any moment, the finished file an ordinary mp4, and resume bit for bit."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from framepack_turbo.errors import InputError
from framepack_turbo.pipeline import resume as resume_state
from framepack_turbo.pipeline import video, writer
from framepack_turbo.pipeline.events import SectionDone, StepProgress

LONG = dict(seconds=4.8, steps=2, resolution=64)  # 4 sections of window 9


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def _top_level_boxes(path) -> list[str]:
    boxes, data = [], path.read_bytes()
    at = 0
    while at + 8 <= len(data):
        size, kind = int.from_bytes(data[at : at + 4], "big"), data[at + 4 : at + 8].decode("latin-1")
        if size == 1:
            size = int.from_bytes(data[at + 8 : at + 16], "big")
        boxes.append(kind)
        at += size if size else len(data)
    return boxes


@pytest.mark.parametrize("variant", [pytest.param("inverted", marks=pytest.mark.slow), "f1"])
def test_partial_file_after_every_section_is_the_frames_so_far(trained, example_image, tmp_path, variant):
    """After each section the file decodes to exactly its final frames so far (the same packets the
    finished file holds), and the finished file matches a one-shot encode of the same frames."""
    out = tmp_path / "clip.mp4"
    partial = {}

    def on_event(event):
        if isinstance(event, SectionDone):
            frames = video.read_frames(out) if event.frames else np.zeros((0,), np.uint8)
            assert len(frames) == event.frames, (event.section, len(frames), event.frames)
            partial[event.section] = frames

    result = trained.generate(
        example_image, "a cat", out=out, variant=variant, on_event=on_event, keep_frames=True, **LONG
    )
    final = video.read_frames(out)
    assert len(final) == len(result.kept_frames) == result.sidecar["frames"] == 145
    assert sorted(partial) == [1, 2, 3, 4]
    counts = [len(partial[k]) for k in (1, 2, 3, 4)]
    assert counts == sorted(counts) and counts[-1] == 145 and counts[0] < 37  # the overlap waits
    for frames in partial.values():  # the same packets: the same decoded frames, at the right end
        if len(frames):
            expected = final[: len(frames)] if variant == "f1" else final[len(final) - len(frames) :]
            assert np.array_equal(frames, expected)
    raw = result.kept_frames
    one_shot = video.read_frames(video.write_mp4(raw, tmp_path / "one-shot.mp4"))
    # Encoding in segments costs nothing against the frames: the finished file is as close to them as one
    # encode of the whole clip (both ~38 dB from the frames at 48x64, crf 16). Two lossy encodes of the same
    # frames differ by their own rounding, most where a segment starts with a keyframe: ~42-44 dB here,
    # 43.7-45.5 dB at 160 px (docs/benchmarks/long-clips-cpu.md).
    assert _psnr(final, raw) >= _psnr(one_shot, raw) - 0.1
    assert _psnr(final, one_shot) >= 41
    boxes = _top_level_boxes(out)  # an ordinary mp4, its index at the front
    assert boxes.index("moov") < boxes.index("mdat")
    assert not writer.parts_dir(out).exists()  # the segments and the resume state are gone when it is done
    assert sorted(result.sidecar["writer"]) == ["median_s", "sections", "waited_s"]
    assert [s["section"] for s in result.sidecar["writer"]["sections"]] == [1, 2, 3, 4]
    assert result.sidecar["host_memory"]["peak_rss_mb"] > 0


def test_frames_are_read_back_from_the_file(tiny, example_image, tmp_path):
    result = tiny.generate(example_image, "a cat", out=tmp_path / "clip.mp4", **LONG)
    assert result.kept_frames is None  # the job held only the overlap window
    assert np.array_equal(result.frames, video.read_frames(result.video_path))
    assert result.latents.shape[2] == 1 + 4 * 9  # the clip's latents, all of them


class _Crash(RuntimeError):
    pass


@pytest.mark.parametrize("variant", [pytest.param("inverted", marks=pytest.mark.slow), "f1"])
def test_resume_after_a_crash_is_bit_for_bit(tiny, example_image, tmp_path, variant):
    reference = tiny.generate(example_image, "a cat", out=tmp_path / "ref.mp4", variant=variant, **LONG)
    out = tmp_path / "clip.mp4"

    def crash_in_section_3(event):
        if isinstance(event, StepProgress) and event.section == 3:
            raise _Crash("the machine went away")

    with pytest.raises(_Crash):
        tiny.generate(example_image, "a cat", out=out, variant=variant, on_event=crash_in_section_3, **LONG)
    stopped = json.loads(video.sidecar_path(out).read_text())
    assert stopped["status"] == "failed" and stopped["sections_done"] == 2
    assert resume_state.peek(out)["sections_done"] == 2
    assert video.probe(out).frames == stopped["frames"]  # playable, with the overlap as its edge

    resumed = tiny.generate(None, "a cat", out=out, variant=variant, resume=True, **LONG)
    assert np.array_equal(video.read_frames(out), video.read_frames(reference.video_path))
    assert torch.equal(resumed.latents, reference.latents)
    assert resumed.sidecar["resumed"] == [2] and resumed.sidecar["sections_done"] == 4
    assert not writer.parts_dir(out).exists()


def test_resume_refuses_a_setting_that_changes_the_result(tiny, example_image, tmp_path):
    out = tmp_path / "clip.mp4"

    def crash(event):
        if isinstance(event, StepProgress) and event.section == 2:
            raise _Crash("stop")

    with pytest.raises(_Crash):
        tiny.generate(example_image, "a cat", out=out, on_event=crash, **LONG)
    with pytest.raises(InputError, match="steps was 2, now 3"):
        tiny.generate(None, "a cat", out=out, resume=True, **{**LONG, "steps": 3})
    with pytest.raises(InputError, match="prompt was 'a cat', now 'a dog'"):
        tiny.generate(None, "a dog", out=out, resume=True, **LONG)
    with pytest.raises(InputError, match="no resume state"):
        tiny.generate(None, "a cat", out=tmp_path / "never.mp4", resume=True, **LONG)


def test_a_writer_failure_fails_the_job_and_keeps_what_was_written(tiny, example_image, tmp_path, monkeypatch):
    calls = []
    real = video.write_mp4

    def failing(frames, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(frames, path, *args, **kwargs)

    monkeypatch.setattr(video, "write_mp4", failing)
    out = tmp_path / "clip.mp4"
    with pytest.raises(writer.WriterError, match="No space left on device"):
        tiny.generate(example_image, "a cat", out=out, variant="f1", **LONG)
    record = json.loads(video.sidecar_path(out).read_text())
    assert record["status"] == "failed" and "No space left" in record["error"]
    assert video.probe(out).frames == 4 + 36  # the two segments joined before the failure


# ---- SIGKILL at random moments: the file on disk is always playable, and the job resumes --------------

_JOB = [
    *("--prompt", "a cat", "--model", "tiny-random", "--seconds", "6", "--steps", "3"),
    *("--resolution", "64", "--variant", "f1"),
]


def _framepack(*args: str) -> list[str]:
    return [sys.executable, "-m", "framepack_turbo.cli", *args]


@pytest.mark.slow
def test_sigkill_never_leaves_an_unplayable_file_and_resume_finishes_it(example_image, tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    reference = tmp_path / "ref.mp4"
    subprocess.run(
        _framepack("generate", "--image", str(example_image), *_JOB, "--out", str(reference)),
        check=True,
        env=env,
        capture_output=True,
    )
    expected = video.read_frames(reference)
    boundaries = {4 + 36 * k for k in range(5)} | {len(expected)}  # F1: frames in the file after k sections
    rng = random.Random(27)
    for attempt in range(4):
        out = tmp_path / f"kill-{attempt}.mp4"
        job = subprocess.Popen(
            _framepack("generate", "--image", str(example_image), *_JOB, "--out", str(out)),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        sidecar = video.sidecar_path(out)
        deadline = time.monotonic() + 120
        while not sidecar.exists() and time.monotonic() < deadline and job.poll() is None:
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.6))  # somewhere in sampling, encoding, joining or saving the state
        job.send_signal(signal.SIGKILL)
        job.wait()
        if out.exists():
            assert video.probe(out).frames in boundaries, attempt
        if not resume_state.state_path(out).exists():
            continue  # killed before the first state was saved, or after it finished
        subprocess.run(_framepack("generate", "--resume", str(out)), check=True, env=env, capture_output=True)
        assert np.array_equal(video.read_frames(out), expected), attempt


@pytest.mark.slow
def test_resume_cli_refuses_a_changed_flag(example_image, tmp_path):
    """Ctrl-C stops a CLI job after a step (its state saved); a resume with another --steps is refused."""
    out = tmp_path / "clip.mp4"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    job = subprocess.Popen(
        _framepack("generate", "--image", str(example_image), *_JOB, "--out", str(out)),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not resume_state.state_path(out).exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    job.send_signal(signal.SIGINT)
    assert job.wait(timeout=120) != 0
    assert json.loads(video.sidecar_path(out).read_text())["status"] == "cancelled"
    done = subprocess.run(_framepack("generate", "--resume", str(out), "--steps", "7"), capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: --resume")
    assert "steps was 3, now 7" in done.stderr and "Traceback" not in done.stderr


def test_without_segment_writes_nothing_is_joined(tiny, example_image, tmp_path, monkeypatch):
    """The GPU check's machine has no PyAV: it makes the segment writes no-ops. The writer then finds no
    segment and never joins (join imports PyAV), and the frames come from keep_frames."""

    def joined(*args, **kwargs):
        raise AssertionError("joined without segments")

    monkeypatch.setattr(video, "write_mp4", lambda frames, path, *args, **kwargs: None)
    monkeypatch.setattr(video, "join", joined)
    result = tiny.generate(example_image, "a cat", out=tmp_path / "clip.mp4", keep_frames=True, **LONG)
    assert len(result.kept_frames) == 145 and not result.video_path.exists()
