"""The page's "Use these settings" (app/ui.py: `clip_settings`, `settings_of_job`): a clip's recorded recipe back
into the Generate tab's controls, by the recipe rule (pipeline/recipe.py): never a path from the clip, LoRAs
only by the recorded SHA-256 of a file the page's dropdown offers, one escaped status line. In process, on
forged metadata and on a small mp4 carrying it (the browser test does it on clips of the tiny model)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from .test_app import HOSTILE, _rendered

pytest.importorskip("gradio")

PLACES = ("/home/someone", "/secret/models", "/mnt/loras")


def _meta(**changes) -> dict:
    """A clip's metadata as `RunRecord.reproduction` writes it (the page's job 12 of another machine)."""
    meta = {
        "prompt": "a fox runs [1.2s: the fox jumps]",
        "negative_prompt": "blurry",
        "seed": 4242,
        "variant": "inverted",
        "options": {
            "prompt": "a fox runs [1.2s: the fox jumps]",
            "negative_prompt": "blurry",
            "seconds": 3.0,
            "variant": "f1",
            "seed": 4242,
            "steps": 12,
            "window": 5,
            "distilled_guidance": 7.5,
            "resolution": 128,
            "crf": 20,
            "prompt_blend_sections": 2,
            "prompt_change_cfg": 2.0,
            "end_image": "/home/someone/inputs/end.png",
            "end_strength": 0.5,
            "keyframes": [[1.0, "/home/someone/inputs/key.png"]],
            "video": None,
        },
        "model": {"preset": "tiny", "source": "/secret/models/tiny"},
        "passes": ["teacache"],
        "settings": {
            "model": "tiny",
            "model_dir": "/secret/models",
            "lora_dir": "/mnt/loras",
            "preset": "default",
            "enable_teacache": True,
            "teacache_threshold": 0.2,
            "gpu_memory_preservation": 8.0,
        },
        "lora": [],
        "created": "2026-12-07T11:42:52+00:00",
    }
    meta.update(changes)
    return meta


@pytest.fixture
def page_loras(tmp_path):
    """The page's LoRA dropdown (tiny's bundled LoRA and one file of the LoRA folder) and that file's hash."""
    from framepack_turbo.app.ui import lora_choices

    folder = tmp_path / "loras"
    folder.mkdir()
    data = b"not really a LoRA, but its bytes have a hash"
    (folder / "mine-v2.safetensors").write_bytes(data)
    return lora_choices(folder, "tiny"), hashlib.sha256(data).hexdigest()


def _start(**values):
    from framepack_turbo.settings import Settings

    return Settings.load({"model": "tiny", "resolution": 64, **values}, source="api", environ={})


def _no_place(values: dict) -> None:
    text = json.dumps(values, default=str)
    assert not any(place in text for place in PLACES), text


def test_the_recipe_fills_the_controls_and_no_path_is_taken(page_loras):
    from framepack_turbo.app.ui import CLEARED_UPLOADS, NO_LORA, clip_settings

    choices, sha = page_loras
    lora = [
        {"name": "mine.safetensors", "sha256": sha, "weight": 0.7},  # renamed here: found by its contents
        {"name": "gone.safetensors", "sha256": "ab" * 32, "weight": 1.0},  # no file offered has it
    ]
    got = clip_settings(_meta(lora=lora), "job 12's clip", choices, _start())
    values = got.values
    assert values["prompt"] == "a fox runs [1.2s: the fox jumps]" and values["negative"] == "blurry"
    assert (values["seed"], values["random_seed"], values["count"]) == (4242, False, 1)
    assert {k: values[k] for k in ("seconds", "steps", "gs", "window", "crf", "resolution", "variant")} == {
        "seconds": 3.0,
        "steps": 12,
        "gs": 7.5,
        "window": 5,
        "crf": 20,
        "resolution": 128,
        "variant": "f1",
    }
    assert (values["end_strength"], values["blend"], values["change_cfg"]) == (0.5, 2, 2.0)
    assert values["enable_teacache"] is True and values["enable_magcache"] is False
    assert values["gpu_memory_preservation"] == 8.0 and values["preset"] == "default"
    assert (values["lora-0"], values["lora-0-weight"]) == ("mine-v2", 0.7)
    assert (values["lora-1"], values["lora-2"]) == (NO_LORA, NO_LORA)
    # the paths: the end image, the keyframe's image, the model and LoRA folders are not taken; the page's own
    # upload fields are emptied (the clip's recipe has none of them)
    assert all(values[key] is None for key in CLEARED_UPLOADS)
    _no_place(values)
    status = got.status
    assert "\n" not in status and not any(place in status for place in PLACES)
    for named in ("end image", "keyframe at 1 s", "model\\_dir", "lora\\_dir", "gone\\.safetensors"):
        assert named in status, (named, status)
    assert "teacache\\_threshold 0\\.2" in status  # a recorded setting with no control here, named
    assert "1 found by SHA\\-256" in status


def test_a_lora_without_its_file_is_dropped_and_one_recorded_by_path_only_too(tmp_path):
    from framepack_turbo.app.ui import NO_LORA, clip_settings, lora_choices

    choices = lora_choices(tmp_path / "none-here", "tiny")  # tiny's bundled LoRA only
    bundled_sha = hashlib.sha256(open(next(iter(choices.values())), "rb").read()).hexdigest()
    found = clip_settings(
        _meta(lora=[{"name": "diagonal.safetensors", "sha256": bundled_sha, "weight": -0.5}]), "c", choices, _start()
    )
    assert (found.values["lora-0"], found.values["lora-0-weight"]) == ("diagonal (bundled with tiny)", -0.5)
    absent = clip_settings(
        _meta(lora=[{"name": "x.safetensors", "sha256": "cd" * 32, "weight": 1.0}]), "c", {}, _start()
    )
    assert absent.values["lora-0"] == NO_LORA and "x\\.safetensors" in absent.status
    old = _meta()
    old["settings"]["loras"] = ["/mnt/loras/old.safetensors:1"]  # before LoRAs were recorded by hash
    by_path = clip_settings(old, "c", choices, _start())
    assert by_path.values["lora-0"] == NO_LORA and "no SHA\\-256" in by_path.status
    _no_place(by_path.values)


def test_values_the_controls_cannot_hold_and_another_model_are_named_not_filled():
    from framepack_turbo.app.ui import clip_settings

    meta = _meta(variant="f1", prompt="a fox")
    meta["options"].update(prompt="a fox", seconds=0.5, steps=150, variant=None)
    meta["model"]["preset"] = "tiny-random"
    got = clip_settings(meta, "c", {}, _start())
    assert "seconds" not in got.values and "steps" not in got.values  # the page's sliders: 1-120 s, 1-100 steps
    assert "seconds 0\\.5" in got.status and "steps 150" in got.status
    assert "model tiny\\-random" in got.status  # this server runs tiny
    assert got.values["variant"] == "f1"  # the clip's model ran f1 by default; tiny would not


def test_a_hostile_prompt_and_names_are_escaped_in_the_status_line(page_loras):
    from framepack_turbo.app.ui import clip_settings

    choices, _ = page_loras
    meta = _meta(prompt=HOSTILE, lora=[{"name": HOSTILE[:30], "sha256": "ef" * 32, "weight": 1.0}])
    meta["options"]["prompt"] = HOSTILE
    got = clip_settings(meta, "job 3's clip", choices, _start())
    assert got.values["prompt"] == HOSTILE  # the prompt box gets the text as recorded: a textbox shows it as text
    rendered = _rendered(got.status)
    assert "<img" not in rendered and "<a " not in rendered and "\x1b" not in rendered and "\r" not in rendered
    assert "&lt;img src=x onerror=alert(1)&gt;" in rendered and rendered.count("<strong>") == 1  # its own label


def test_a_clip_edited_to_wrong_types_is_refused_naming_it():
    from framepack_turbo.app.ui import clip_settings
    from framepack_turbo.errors import InputError

    with pytest.raises(InputError, match="job 9's clip: its recorded options is not valid"):
        clip_settings(_meta(options=[1, 2]), "job 9's clip", {}, _start())
    bad = _meta()
    bad["options"]["window"] = 0
    with pytest.raises(InputError, match="job 9's clip: its recorded window is not valid"):
        clip_settings(bad, "job 9's clip", {}, _start())


def test_by_job_id_from_the_clip_the_server_wrote(tmp_path, page_loras):
    """`settings_of_job` reads the job's own mp4 (the file the server named) with `video.read_metadata`."""
    from framepack_turbo.app.jobs import JobStore
    from framepack_turbo.app.queue import JobQueue
    from framepack_turbo.app.ui import settings_of_job
    from framepack_turbo.errors import InputError
    from framepack_turbo.pipeline.video import write_mp4

    from .test_queue import FakeRunner, png

    choices, sha = page_loras
    queue = JobQueue(JobStore(tmp_path / "app" / "jobs.sqlite"), FakeRunner(), tmp_path / "app")
    job = queue.submit(png(), {"prompt": "the fox"})
    with pytest.raises(InputError, match="job 1 is queued"):
        settings_of_job(queue, job.id, choices, _start())
    assert queue.store.claim(job.id) and queue.store.finish(job.id, "done")
    with pytest.raises(InputError, match="left no clip"):
        settings_of_job(queue, job.id, choices, _start())
    frames = np.zeros((3, 16, 16, 3), np.uint8)
    write_mp4(frames, job.video, metadata=_meta(lora=[{"name": "m.safetensors", "sha256": sha, "weight": 1.5}]))
    got = settings_of_job(queue, float(job.id), choices, _start())
    assert got.values["seed"] == 4242 and got.values["lora-0"] == "mine-v2" and got.values["lora-0-weight"] == 1.5
    assert got.status.startswith("**Use these settings:** Filled from job 1") and got.values["end_image"] is None
    write_mp4(frames, job.video)  # a video without a record
    with pytest.raises(InputError, match="carries no record"):
        settings_of_job(queue, job.id, choices, _start())
    for wrong, reason in ((None, "enter a job id"), (99, "no job 99"), (float("nan"), "job id")):
        with pytest.raises(InputError, match=reason):
            settings_of_job(queue, wrong, choices, _start())
