"""A resume finishes the clip or refuses: one job writes a clip at a time (the clip's lock, for every entry point),
and the parts a stopped job left are held against its state before any model loads; a refused resume leaves every
file as it was."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from framepack_turbo.api import FramePack
from framepack_turbo.cli import app
from framepack_turbo.errors import InputError
from framepack_turbo.pipeline import resume as resume_state
from framepack_turbo.pipeline import video, writer
from framepack_turbo.pipeline.events import StepProgress
from framepack_turbo.settings import Settings
from framepack_turbo.train import world

from .conftest import EXAMPLE_IMAGE

LONG = dict(seconds=4.8, steps=2, resolution=64)  # 4 sections of window 9
FRAMES = 145  # the finished clip's (either variant)
VARIANTS = ("f1", "inverted")


class _Crash(RuntimeError):
    pass


def _crash_in(section: int):
    def on_event(event):
        if isinstance(event, StepProgress) and event.section == section:
            raise _Crash("the machine went away")

    return on_event


@pytest.fixture(scope="module")
def jobs(tiny_bundle):
    """A FramePack per variant whose settings are the job's (so `framepack generate --resume` alone, taking the
    recorded settings, goes on with it)."""
    values = {"model": "tiny-random", "seconds": 4.8, "steps": 2, "resolution": 64}
    return {v: FramePack(tiny_bundle, Settings.load({**values, "variant": v}, source="api")) for v in VARIANTS}


@pytest.fixture(scope="module")
def stopped_jobs(jobs, tmp_path_factory):
    """A job of each variant stopped in its third section (two done), made once; tests take copies."""
    made = {}
    for variant in VARIANTS:
        out = tmp_path_factory.mktemp(f"stopped-{variant}") / "clip.mp4"
        with pytest.raises(_Crash):
            jobs[variant].generate(EXAMPLE_IMAGE, "a cat", out=out, on_event=_crash_in(3))
        assert resume_state.peek(out)["sections_done"] == 2
        made[variant] = out
    return made


def _copy(stopped_jobs, variant: str, folder) -> os.PathLike:
    source = stopped_jobs[variant]
    out = folder / "clip.mp4"
    shutil.copy2(source, out)
    shutil.copy2(video.sidecar_path(source), video.sidecar_path(out))
    shutil.copytree(writer.parts_dir(source), writer.parts_dir(out))
    return out


def _files(folder) -> dict[str, str]:
    """Every file under `folder` (hidden ones included) and a digest of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _resume(jobs, out, variant="f1", **kwargs):
    return jobs[variant].generate(None, "a cat", out=out, resume=True, **kwargs)


# ---- one job per clip ---------------------------------------------------------------------------------------


class _Held:
    """A job of its own thread, held in its first step until `go()`: it has the clip's lock meanwhile."""

    def __init__(self, run) -> None:
        self.started, self.release = threading.Event(), threading.Event()
        self.result, self.error = None, None

        def on_event(event):
            if isinstance(event, StepProgress) and not self.started.is_set():
                self.started.set()
                assert self.release.wait(120)

        def target():
            try:
                self.result = run(on_event)
            except BaseException as exc:  # noqa: BLE001 - reported by go()
                self.error = exc
            finally:
                self.started.set()

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()
        assert self.started.wait(300)

    def go(self):
        self.release.set()
        self.thread.join(300)
        if self.error is not None:
            raise self.error
        return self.result


def test_a_second_resume_of_a_clip_being_resumed_is_refused(jobs, stopped_jobs, tmp_path):
    out = _copy(stopped_jobs, "f1", tmp_path)
    first = _Held(lambda on_event: _resume(jobs, out, on_event=on_event))
    with pytest.raises(
        writer.ClipInUse, match=rf"--resume .*clip.mp4: another job \(pid {os.getpid()} on .*\) is writ"
    ):
        _resume(jobs, out)
    done = first.go()
    assert done.status == "complete" and done.sidecar["sections_done"] == 4
    assert len(video.read_frames(out)) == done.sidecar["frames"] == FRAMES  # one clip's frames, not two
    assert not writer.parts_dir(out).exists()  # the lock went with the parts


def test_a_new_job_into_a_clip_another_job_writes_is_refused(tiny, example_image, tmp_path):
    out = tmp_path / "clip.mp4"
    first = _Held(lambda on_event: tiny.generate(example_image, "a cat", out=out, on_event=on_event, **LONG))
    with pytest.raises(writer.ClipInUse, match=r"--out .*clip.mp4: another job \(pid \d+ .*another --out"):
        tiny.generate(example_image, "a dog", out=out, **LONG)
    assert first.go().status == "complete"
    assert len(video.read_frames(out)) == FRAMES
    again = tiny.generate(example_image, "a dog", out=out, **{**LONG, "seconds": 1.2})  # the lock is free now
    assert again.status == "complete" and not writer.parts_dir(out).exists()


def test_the_cli_refuses_a_resume_another_process_holds_before_models_load(jobs, stopped_jobs, tmp_path, monkeypatch):
    out = _copy(stopped_jobs, "f1", tmp_path)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from framepack_turbo.pipeline.writer import ClipLock; ClipLock(sys.argv[1]).acquire(resume=True);"
            " print('held', flush=True); sys.stdin.read()",
            str(out),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        before = _files(tmp_path)
        monkeypatch.setattr(FramePack, "load", classmethod(lambda cls, **kw: pytest.fail("models loaded")))
        result = CliRunner().invoke(app, ["generate", "--resume", str(out)])
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: --resume"), result.output
        assert f"another job (pid {holder.pid} on " in lines[0]
        assert _files(tmp_path) == before
    finally:
        holder.send_signal(signal.SIGKILL)  # a crash: its lock goes with it, its lock file stays
        holder.wait()
    assert (writer.parts_dir(out) / writer.LOCK).exists()
    monkeypatch.undo()
    done = _resume(jobs, out)  # a dead holder's file blocks nobody
    assert done.status == "complete" and not writer.parts_dir(out).exists()


# ---- the parts held against the state, before any model loads ------------------------------------------------


def _rewrite_state(out, tensors=None, meta=None) -> None:
    path = resume_state.state_path(out)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        saved_meta = json.loads(f.metadata()["resume"])
    saved = load_file(str(path))
    saved = tensors(saved) if tensors else saved
    saved_meta = meta(saved_meta) if meta else saved_meta
    save_file({k: v.contiguous() for k, v in saved.items()}, str(path), metadata={"resume": json.dumps(saved_meta)})


def _set(key, value):
    return lambda d: {**d, key: value}


def _drop(key):
    return lambda d: {k: v for k, v in d.items() if k != key}


def _change(key, fn):
    return lambda d: {**d, key: fn(d[key])}


def _lat(section: int, fn):
    def damage(out):
        path = resume_state.latents_path(out, section)
        save_file({"latents": fn(load_file(str(path))["latents"]).contiguous()}, str(path))

    return damage


def _state(tensors=None, meta=None):
    return lambda out: _rewrite_state(out, tensors, meta)


def _parts(name, fn):
    return lambda out: fn(writer.parts_dir(out) / name)


DAMAGE = {
    # sections_done out of what a stopped job of 4 sections can hold
    "sections_done -1": (_state(meta=_set("sections_done", -1)), "sections_done -1 is outside 1..3"),
    "sections_done 0": (_state(meta=_set("sections_done", 0)), "sections_done 0 is outside 1..3"),
    "sections_done 7": (_state(meta=_set("sections_done", 7)), "sections_done 7 is outside 1..3"),
    "sections_done all": (_state(meta=_set("sections_done", 4)), "a finished clip is not resumed"),
    "sections_done 3": (_state(meta=_set("sections_done", 3)), "generated is 19 latent frames after 3 sections"),
    # the parts the state counts
    "seg-0001 missing": (_parts("seg-0001.mp4", os.unlink), "seg-0001.mp4 is missing"),
    "seg-0000 missing": (_parts("seg-0000.mp4", os.unlink), "seg-0000.mp4 is missing"),
    "seg-0001 other frames": (
        lambda out: shutil.copy(writer.parts_dir(out) / "seg-0000.mp4", writer.parts_dir(out) / "seg-0001.mp4"),
        "seg-0001.mp4 holds 4 frames, section 2 leaves 36",
    ),
    "seg-0001 garbage": (_parts("seg-0001.mp4", lambda p: p.write_bytes(b"not a video")), "seg-0001.mp4 is unreadable"),
    "lat-0001 missing": (_parts("lat-0001.safetensors", os.unlink), "lat-0001.safetensors is missing"),
    "lat-0001 shape": (_lat(1, lambda t: t[:, :, :-1]), "lat-0001.safetensors is F32 1x16x8x6x8"),
    "lat-0001 size": (_lat(1, lambda t: torch.cat([t, t], dim=3)), "lat-0001.safetensors is F32 1x16x9x12x8"),
    "lat-0001 dtype": (_lat(1, lambda t: t.half()), "lat-0001.safetensors is F16"),
    "lat-0001 garbage": (_parts("lat-0001.safetensors", lambda p: p.write_bytes(b"{}")), "lat-0001.safetensors is unr"),
    # the state's tensors
    "history frames": (_state(_change("history", lambda t: t[:, :, 1:])), "history is float32 1x16x18x6x8"),
    "history size": (_state(_change("history", lambda t: t[..., :-1])), "history is float32 1x16x19x6x7"),
    "history dtype": (_state(_change("history", lambda t: t.half())), "history is float16"),
    "history nan": (_state(_change("history", lambda t: t * float("nan"))), "history holds values that are not finite"),
    "window shape": (_state(_change("window", lambda t: t[:, :, 2:])), "window is float32 1x3x31x48x64"),
    "window dtype": (_state(_change("window", lambda t: t.to(torch.int16))), "window is int16"),
    "rng shortened": (_state(_change("rng", lambda t: t[:-8])), "rng is uint8 5048"),
    "history deleted": (_state(_drop("history")), "has no 'history' tensor"),
    "window deleted": (_state(_drop("window")), "has no 'window' tensor"),
    "rng deleted": (_state(_drop("rng")), "has no 'rng' tensor"),
    "picture deleted": (_state(_drop("picture")), "has no 'picture' tensor"),
    "picture shape": (_state(_change("picture", lambda t: t[..., :1])), "picture is uint8 "),
    # its metadata
    "generated deleted": (_state(meta=_drop("generated")), "generated is missing"),
    "generated wrong": (_state(meta=_change("generated", lambda g: g + 1)), "generated is 20 latent frames"),
    "frames wrong": (_state(meta=_change("frames", lambda f: f + 3)), "frames is 43, the parts hold 40"),
    "frames a string": (_state(meta=_set("frames", "40")), "frames is a str"),
    "fingerprint deleted": (_state(meta=_drop("fingerprint")), "fingerprint is missing"),
    "record deleted": (_state(meta=_drop("record")), "record is missing"),
    "rerun deleted": (_state(meta=_change("record", _drop("rerun"))), "the record's rerun is missing"),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_damaged_parts_are_refused_with_every_file_untouched(jobs, stopped_jobs, tmp_path, case):
    damage, message = DAMAGE[case]
    out = _copy(stopped_jobs, "f1", tmp_path)
    damage(out)
    before = _files(tmp_path)
    with pytest.raises(InputError, match="^--resume .*clip.mp4: ") as refused:
        _resume(jobs, out)
    assert message in str(refused.value), str(refused.value)
    assert _files(tmp_path) == before  # the mp4, its sidecar, the state and the parts as they were (no lock left)


@pytest.mark.parametrize("case", DAMAGE)
def test_the_cli_refuses_damaged_parts_before_models_load(stopped_jobs, tmp_path, monkeypatch, case):
    damage, message = DAMAGE[case]
    out = _copy(stopped_jobs, "f1", tmp_path)
    damage(out)
    before = _files(tmp_path)
    monkeypatch.setattr(FramePack, "load", classmethod(lambda cls, **kw: pytest.fail("models loaded")))
    result = CliRunner().invoke(app, ["generate", "--resume", str(out)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --resume") and message in lines[0], result.output
    assert _files(tmp_path) == before


def test_the_inverted_variants_first_section_leaves_no_segment_and_its_second_is_checked(jobs, stopped_jobs, tmp_path):
    """Inverted: the first section is all overlap (no seg-0000); the second's segment is one the state counts."""
    out = _copy(stopped_jobs, "inverted", tmp_path)
    assert not (writer.parts_dir(out) / "seg-0000.mp4").exists()
    (writer.parts_dir(out) / "seg-0001.mp4").unlink()
    before = _files(tmp_path)
    with pytest.raises(InputError, match="seg-0001.mp4 is missing"):
        _resume(jobs, out, variant="inverted")
    assert _files(tmp_path) == before


@pytest.mark.parametrize("variant", ["f1", pytest.param("inverted", marks=pytest.mark.slow)])
def test_a_stopped_extension_passes_the_checks_and_resumes_bit_for_bit(tiny, tmp_path, variant):
    """The checks know a video extension's parts (its copied head, F1's tail latents first)."""
    source = tmp_path / "in.mp4"
    scene = world.Scene("blue", "square", "right", speed=0.3, x=0.3, y=0.5, radius=0.12, background=7)
    video.write_mp4(world.render(scene, 40, 64), source)
    job = dict(video=str(source), variant=variant, seconds=3.6, steps=2, resolution=64)  # 3 sections
    reference = tiny.generate(None, "a square", out=tmp_path / "ref.mp4", **job)
    out = tmp_path / "clip.mp4"
    with pytest.raises(_Crash):
        tiny.generate(None, "a square", out=out, on_event=_crash_in(3), **job)
    resumed = tiny.generate(None, "a square", out=out, resume=True, **job)
    assert resumed.status == "complete" and resumed.sidecar["resumed"] == [2]
    assert np.array_equal(video.read_frames(out), video.read_frames(reference.video_path))
