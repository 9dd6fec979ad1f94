"""The section loop on the tiny preset: frame counts, FramePack semantics, sidecar, events, cancel, state."""

import json

import numpy as np
import pytest
import torch

from framepack_turbo.errors import Cancelled, InputError
from framepack_turbo.pipeline import video
from framepack_turbo.pipeline.events import CancelToken, JobDone, Notice, SectionDone, StepProgress
from framepack_turbo.pipeline.generate import Generator
from framepack_turbo.pipeline.options import GenerateOptions

from .conftest import FAST


@pytest.fixture(scope="module")
def runs(tiny, example_image, tmp_path_factory):
    """One 2 s run per variant, shared by the tests that only read results."""
    out = {}
    for variant in ("inverted", "f1"):
        events = []
        path = tmp_path_factory.mktemp(variant) / "clip.mp4"
        result = tiny.generate(example_image, "a cat", out=path, variant=variant, on_event=events.append, **FAST)
        out[variant] = (result, events)
    return out


@pytest.mark.parametrize("variant", ["inverted", "f1"])
def test_two_seconds_is_73_frames_on_disk(runs, variant):
    result, _ = runs[variant]
    assert result.frames.shape[0] == 73
    info = video.probe(result.video_path)
    assert (info.frames, info.fps, info.pix_fmt, info.codec) == (73, 30.0, "yuv420p", "h264")
    assert (info.height, info.width) == tuple(result.sidecar["image"]["bucket"])
    h, w = result.sidecar["image"]["bucket"]
    assert result.latents.shape == (1, 16, 19, h // 8, w // 8)  # 2 sections of 9 + the start frame


@pytest.mark.parametrize(
    "variant, seconds, frames",
    [("inverted", 1, 37), ("f1", 1, 37), pytest.param("inverted", 5, 145, marks=pytest.mark.slow)],
)
def test_frame_counts(tiny, example_image, tmp_path, variant, seconds, frames):
    r = tiny.generate(
        example_image, "x", out=tmp_path / "c.mp4", variant=variant, seconds=seconds, steps=1, resolution=64
    )
    assert r.frames.shape[0] == frames == video.probe(r.video_path).frames


def test_sidecar(runs):
    result, _ = runs["inverted"]
    data = json.loads(result.sidecar_path.read_text())
    assert data == json.loads(json.dumps(result.sidecar, default=str))
    assert data["status"] == "complete" and data["frames"] == 73
    assert data["prompt"] == "a cat" and data["seed"] == 31337 and data["variant"] == "inverted"
    assert data["sections_done"] == data["sections_total"] == 2
    assert data["options"]["steps"] == 2 and data["options"]["window"] == 9 and data["options"]["crf"] == 16
    assert data["model"]["preset"] == "tiny-random" and data["model"]["source"] == "random:tiny"
    assert {"torch", "diffusers", "transformers", "python", "av"} <= data["versions"].keys()
    t = data["timings"]
    assert {"text_encode", "image_encode", "transformer", "vae_decode", "write", "total"} <= t.keys()
    assert t["steps"] == 4 and t["step_median"] > 0
    assert data["video"]["path"] == str(result.video_path)


def test_step_and_section_events(runs):
    _, events = runs["f1"]
    steps = [(e.section, e.step) for e in events if isinstance(e, StepProgress)]
    assert steps == [(1, 1), (1, 2), (2, 1), (2, 2)]
    sections = [(e.section, e.frames) for e in events if isinstance(e, SectionDone)]
    # frames in the file: F1's 1 + 9 latents decode to 37 frames, of which the last 33 wait for the next
    # section's cross-fade; the last section makes them all final: 73
    assert sections == [(1, 4), (2, 73)]
    assert isinstance(events[-1], JobDone) and events[-1].status == "complete"
    progress = [e for e in events if isinstance(e, StepProgress)]
    assert [e.fraction for e in progress] == [0.25, 0.5, 0.75, 1.0]
    preview = progress[-1].preview()
    assert preview.dtype == np.uint8 and preview.shape == (112 // 8, 9 * 144 // 8, 3)


def test_inverted_first_section_is_33_frames_all_held_for_the_blend(runs):
    """Inverted: the first section (the clip's end) decodes to 33 frames, all of them the overlap the next
    section cross-fades into: none is final, none is in the file yet."""
    _, events = runs["inverted"]
    assert [(e.section, e.frames) for e in events if isinstance(e, SectionDone)] == [(1, 0), (2, 73)]


def test_same_seed_same_video_other_seed_differs(tiny, example_image, tmp_path, runs):
    ref, _ = runs["inverted"]
    again = tiny.generate(example_image, "a cat", out=tmp_path / "a.mp4", **FAST)
    np.testing.assert_array_equal(ref.frames, again.frames)
    other = tiny.generate(example_image, "a cat", out=tmp_path / "b.mp4", seed=1, **FAST)
    assert not np.array_equal(ref.frames, other.frames)


class _Spy:
    """Records the transformer's inputs per call."""

    def __init__(self, transformer):
        self.calls = []
        self.handle = transformer.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        self.calls.append({k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in kwargs.items()})

    def close(self):
        self.handle.remove()


def test_inverted_packing_feeds_the_right_context(tiny, example_image, tmp_path):
    spy = _Spy(tiny.bundle.transformer)
    try:
        gen = Generator(tiny.bundle)
        gen.run(example_image, GenerateOptions(prompt="a cat", seconds=2, steps=1, resolution=128), tmp_path / "x.mp4")
    finally:
        spy.close()
    first, second = spy.calls  # one step per section, cfg 1: one call each
    assert first["indices_latents"].tolist() == list(range(10, 19))
    assert first["indices_latents_clean"].tolist() == [0, 19]
    assert second["indices_latents"].tolist() == list(range(1, 10))
    assert second["indices_latents_clean"].tolist() == [0, 10]
    # start latent is the first clean frame in both; history is zeros before the first section
    torch.testing.assert_close(first["latents_clean"][:, :, :1], second["latents_clean"][:, :, :1])
    assert torch.count_nonzero(first["latents_clean"][:, :, 1:]) == 0
    assert torch.count_nonzero(first["latents_history_2x"]) == 0
    # after it, the post frame is the first frame of what section 1 produced (nonzero)
    assert torch.count_nonzero(second["latents_clean"][:, :, 1:]) > 0
    assert first["guidance"].tolist() == [10000.0]
    assert float(first["timestep"][0]) == 1000.0  # step 0 is at sigma 1


def test_f1_context_comes_from_the_end_of_history(tiny, example_image, tmp_path):
    spy = _Spy(tiny.bundle.transformer)
    try:
        Generator(tiny.bundle).run(
            example_image,
            GenerateOptions(prompt="x", seconds=2, steps=1, resolution=128, variant="f1"),
            tmp_path / "x.mp4",
        )
    finally:
        spy.close()
    first, second = spy.calls
    assert first["indices_latents"].tolist() == list(range(20, 29))
    start = first["latents_clean"][:, :, :1]
    # before any section the 1x context frame is the start latent itself (history = zeros + start)
    torch.testing.assert_close(first["latents_clean"][:, :, 1:], start)
    assert torch.count_nonzero(first["latents_history_4x"]) == 0
    torch.testing.assert_close(second["latents_clean"][:, :, :1], start)
    assert not torch.equal(second["latents_clean"][:, :, 1:], start)


def test_real_cfg_calls_the_model_twice_per_step(tiny, example_image, tmp_path):
    spy = _Spy(tiny.bundle.transformer)
    try:
        Generator(tiny.bundle).run(
            example_image,
            GenerateOptions(prompt="a cat", negative_prompt="blurry", cfg=3.0, seconds=1, steps=2, resolution=64),
            tmp_path / "x.mp4",
        )
    finally:
        spy.close()
    assert len(spy.calls) == 4
    pos, neg = spy.calls[0], spy.calls[1]
    assert not torch.equal(pos["encoder_hidden_states"][:, :1], neg["encoder_hidden_states"][:, :1])


def test_cancel_keeps_finished_sections(tiny, example_image, tmp_path):
    token = CancelToken()
    out = tmp_path / "c.mp4"

    def on_event(e):
        if isinstance(e, StepProgress) and e.section == 2:
            token.cancel()

    with pytest.raises(Cancelled, match="after 1 of 2 sections; 33 frames kept") as stopped:
        tiny.generate(example_image, "a cat", out=out, on_event=on_event, cancel=token, **FAST)
    assert video.probe(out).frames == 33
    assert stopped.value.result.frames.shape[0] == 33 and stopped.value.result.status == "cancelled"
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["status"] == "cancelled" and data["sections_done"] == 1 and data["frames"] == 33


@pytest.mark.parametrize("seconds", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_a_cancel_in_a_batch_stops_it_and_keeps_the_clips_before(tiny, example_image, tmp_path, seconds):
    """2 s: cancelled in clip 2's second of two sections; 1 s: after clip 2's only section (clip 2 complete),
    and clip 3 never starts."""
    from framepack_turbo.pipeline.events import Notice

    token = CancelToken()
    notices = []

    def on_event(e):
        if isinstance(e, Notice) and e.message.startswith("clip "):
            notices.append(e.message)
        # 2 s: a step of clip 2's second section; 1 s: once clip 2's only section is in its file
        stop_at = isinstance(e, SectionDone) if seconds == 1 else isinstance(e, StepProgress) and e.section == 2
        if stop_at and len(notices) == 2:
            token.cancel()

    with pytest.raises(Cancelled):
        tiny.generate_batch(
            example_image, "a cat", 3, tmp_path / "b.mp4", on_event, token, seed=40, **{**FAST, "seconds": seconds}
        )
    assert [n.split(":")[0] for n in notices] == ["clip 1/3", "clip 2/3"]
    first = json.loads((tmp_path / "b-seed40.json").read_text())
    assert first["status"] == "complete" and first["seed"] == 40
    second = json.loads((tmp_path / "b-seed41.json").read_text())
    assert second["seed"] == 41 and second["status"] == ("complete" if seconds == 1 else "cancelled")
    assert not (tmp_path / "b-seed42.json").exists()


def test_cancel_mid_step_stops_after_that_step(tiny, example_image, tmp_path):
    token = CancelToken()
    seen = []

    def on_event(e):
        if isinstance(e, StepProgress):
            seen.append(e.step)
            token.cancel()

    out = tmp_path / "c.mp4"
    with pytest.raises(Cancelled, match="nothing written"):
        tiny.generate(example_image, "a cat", out=out, on_event=on_event, cancel=token, **FAST)
    assert seen == [1]
    assert not out.exists()
    assert json.loads(out.with_suffix(".json").read_text())["status"] == "cancelled"


def test_state_reset_per_section_and_job(tiny_bundle, example_image, tmp_path):
    from framepack_turbo.optim.base import Extension

    class Counter(Extension):
        def __init__(self):
            self.resets = []

        def reset(self, scope):
            self.resets.append(scope)

    c = Counter()
    gen = Generator(tiny_bundle, extensions=[c])
    gen.run(example_image, GenerateOptions(prompt="a", seconds=2, steps=1, resolution=64), tmp_path / "a.mp4")
    assert c.resets == ["job", "section", "section", "section"]  # job start, each of 2 sections, job end
    gen.run(example_image, GenerateOptions(prompt="a", seconds=1, steps=1, resolution=64), tmp_path / "b.mp4")
    assert c.resets[4:] == ["job", "section", "section"]


def test_long_prompt_notice(tiny, example_image, tmp_path):
    notes = []
    tiny.generate(
        example_image,
        "a cat " * 100,
        out=tmp_path / "x.mp4",
        seconds=1,
        steps=1,
        resolution=64,
        on_event=lambda e: notes.append(e.message) if isinstance(e, Notice) else None,
    )
    assert any("truncated" in n and "256" in n for n in notes)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(seconds=0), "seconds=0"),
        (dict(seconds=121), "seconds=121"),
        (dict(seconds=float("nan")), "seconds=nan"),
        (dict(steps=0), "steps=0"),
        (dict(window=0), "window=0"),
        (dict(variant="sideways"), "variant='sideways'"),
        (dict(cfg=0.5), "cfg=0.5"),
        (dict(crf=60), "crf=60"),
        (dict(resolution=100), "resolution=100"),
    ],
)
def test_bad_options(kwargs, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(")):
        GenerateOptions(prompt="x", **kwargs)


@pytest.mark.parametrize(
    "image, message",
    [
        ("missing.png", "image not found"),
        (np.zeros((32, 100, 3), np.uint8), "each side must be between 64 and 4096"),
        (np.zeros((64, 5000, 3), np.uint8), "each side must be between 64 and 4096"),
        (np.zeros((100, 100, 3), np.float32), "uint8"),
        (42, "must be a path"),
    ],
)
def test_bad_images(tiny, tmp_path, image, message):
    if isinstance(image, str):
        image = tmp_path / image
    with pytest.raises(InputError, match=message):
        tiny.generate(image, "x", out=tmp_path / "x.mp4", **FAST)


def test_not_an_image_file(tiny, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("hello")
    with pytest.raises(InputError, match="not a readable image"):
        tiny.generate(bad, "x", out=tmp_path / "x.mp4", **FAST)
