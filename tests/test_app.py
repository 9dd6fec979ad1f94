"""`framepack serve` refusals and the page's live compatibility report (the browser test is test_browser.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from framepack_turbo.cli import app

pytest.importorskip("gradio")


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["--host", "0.0.0.0"], "refusing to serve on 0.0.0.0 without --auth"),
        (["--share", "yes"], "refusing to serve on a share link without --auth"),
        (["--auth", "nopassword"], "--auth must be user:pass"),
        (["--share", "maybe"], "--share maybe: yes or no"),
        (["--steps", "0"], "steps"),
    ],
)
def test_serve_refuses_before_starting(args, reason, tmp_path):
    result = CliRunner().invoke(app, ["serve", "--data-dir", str(tmp_path), *args])
    assert result.exit_code == 2 and reason in result.output


def test_compat_report_follows_the_panel():
    from framepack_turbo.app.ui import compat_markdown
    from framepack_turbo.hardware import Hardware

    base = {"model": "tiny-random"}
    assert "No compatibility findings" in compat_markdown(base, {}, Hardware())
    both = compat_markdown(base, {"enable_teacache": True, "enable_fbcache": True}, Hardware())
    assert "step-caches-exclusive" in both and "first-block cache" in both
    assert "Settings error" in compat_markdown(base, {"gpu_memory_preservation": -1}, Hardware())


def test_critical_settings_are_not_queued():
    from framepack_turbo.app.ui import critical_findings
    from framepack_turbo.hardware import Hardware

    assert critical_findings({"model": "tiny-random"}, Hardware()) == []
    found = critical_findings({"model": "tiny-random", "enable_quant": True, "enable_fp8": True}, Hardware())
    assert len(found) == 1 and found[0].startswith("multiple-quantization")


def test_preview_grid_keeps_every_frame_in_place_and_enlarges_it():
    import numpy as np

    from framepack_turbo.app.ui import preview_grid

    frames = np.arange(9 * 8 * 8 * 3, dtype=np.uint8).reshape(9, 8, 8, 3)
    grid = preview_grid(frames, tile=96)
    assert grid.shape == (3 * 8 * 12, 3 * 8 * 12, 3)  # 3x3 tiles, 12x nearest enlargement
    small = grid[::12, ::12]
    for i, frame in enumerate(frames):
        r, c = divmod(i, 3)
        assert np.array_equal(small[r * 8 : (r + 1) * 8, c * 8 : (c + 1) * 8], frame)
    five = preview_grid(frames[:5], tile=8)
    assert five.shape == (16, 24, 3) and not five[8:, 16:].any()  # 2 rows of 3, the sixth tile empty
    assert preview_grid(None) is None


def test_the_bucket_shown_is_the_one_the_generator_uses(tmp_path):
    from PIL import Image

    from framepack_turbo.app.ui import bucket_markdown
    from framepack_turbo.pipeline.encode import nearest_bucket

    path = tmp_path / "wide.png"
    Image.new("RGB", (1280, 720)).save(path)
    h, w = nearest_bucket(720, 1280, resolution=640)
    assert (h, w) == (480, 832)  # FramePack's 640 bucket for 16:9
    assert f"**{w}x{h}**" in bucket_markdown(str(path), 640) and "1280x720" in bucket_markdown(str(path), 640)
    h, w = nearest_bucket(720, 1280, resolution=320)
    assert f"**{w}x{h}**" in bucket_markdown(str(path), 320.0)
    assert "upload an image" in bucket_markdown(None, 640)
    (tmp_path / "bad.png").write_text("no")
    assert "not a readable image" in bucket_markdown(str(tmp_path / "bad.png"), 640)


def test_the_lora_rows_list_bundled_and_folder_loras_and_make_the_setting(tmp_path):
    from framepack_turbo.app.ui import NO_LORA, lora_choices, lora_settings
    from framepack_turbo.models.presets import PRESETS

    (tmp_path / "mine.safetensors").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not a LoRA")
    choices = lora_choices(tmp_path, "tiny")
    bundled = {f"{p.stem} (bundled with tiny)": str(p) for p in PRESETS["tiny"].bundled_loras()}
    assert choices == {**bundled, "mine": str(tmp_path / "mine.safetensors")}
    assert lora_choices(tmp_path / "missing", "small") == {}
    rows = ("mine", 0.5, NO_LORA, 1.0, None, 1.0)
    assert lora_settings(rows, choices) == {"loras": (f"{tmp_path / 'mine.safetensors'}:0.5",)}
    assert lora_settings((NO_LORA, 1.0) * 3, choices) == {}


# ---- what the page shows and serves ---------------------------------------------------------------------

HOSTILE = "a cat <img src=x onerror=alert(1)> [click](http://e.vil) **loud** www.e.vil \x1b]0;pwned\x07\x1b[2J\r"


def _rendered(markdown: str) -> str:
    """The page's Markdown as a CommonMark renderer makes it (Gradio's is marked: the same escapes hold)."""
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": True}).render(markdown)


def test_text_from_requests_and_files_is_shown_not_rendered(tmp_path):
    """A job's prompt, an error quoting a file, a worker's model name and the timeline reach the page with
    control characters escaped and no markup: no tag, link or emphasis comes of them."""
    from framepack_turbo.app.jobs import Job
    from framepack_turbo.app.ui import job_row, md_text, progress_line, result_caption, workers_markdown

    rendered = _rendered(md_text(HOSTILE))
    assert "<img" not in rendered and "<a " not in rendered and "<strong>" not in rendered
    assert "&lt;img src=x onerror=alert(1)&gt;" in rendered and "[click](http://e.vil)" in rendered
    assert "\x1b" not in rendered and "\r" not in rendered and "\\x1b]0;pwned\\x07" in rendered
    error = "InputError: lora.safetensors: header names \x1b[31mred\x1b[0m"
    job = Job(1, "failed", 0, {"prompt": HOSTILE}, "i", str(tmp_path / "v.mp4"), error=error, worker="<b>w</b>")
    row = job_row(job)
    assert all("\x1b" not in str(cell) and "\r" not in str(cell) for cell in row)
    assert "\\x1b[31mred" in row[-1] and "\x1b" not in result_caption(job)
    assert "<b>" not in progress_line(job, None) and "&lt;b&gt;w&lt;/b&gt;" in progress_line(job, None)

    class Worker:
        def describe(self):
            return {"name": "worker-0", "state": "idle", "device": "cpu", "host": "h", "model": HOSTILE}

    class Queue:
        workers = [Worker()]

    shown = _rendered(workers_markdown(Queue()))
    assert "<img" not in shown and "<a " not in shown and "\x1b" not in shown and "<strong>worker-0</strong>" in shown


def test_the_timeline_line_shows_a_prompt_as_text():
    from framepack_turbo.app.ui import timeline_markdown

    line = timeline_markdown("a dog [1s: <img src=x> **big** \x1bc]", 2, 9, "inverted", {"model": "tiny-random"})
    rendered = _rendered(line)
    assert "<img" not in rendered and "<strong>" not in rendered and "\x1b" not in line and "\\x1bc" in rendered


def test_only_the_videos_and_their_sidecars_are_servable(tmp_path):
    from framepack_turbo.app.ui import servable

    data = tmp_path / "app"
    for rel in ("videos/job-00001.mp4", "videos/job-00001.json", "videos/job-00001.parts/state.safetensors"):
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        (data / rel).write_bytes(b"x")
    assert servable(data / "videos/job-00001.mp4", data) and servable(data / "videos/job-00001.json", data)
    assert servable(tmp_path / "elsewhere.png", data)  # not ours: Gradio's own rules decide
    for refused in (
        "videos/job-00001.parts/state.safetensors",
        "videos/job-00001.parts/seg-0000.mp4",
        "videos/job-00001.parts/../job-00001.parts/state.safetensors",
        "jobs.sqlite",
        "JOBS.SQLITE",
        "inputs/input-1.png",
        "workers.json",
        "videos/.job-00001.mp4.tmp",
        "videos/notes.txt",
        "videos",
    ):
        assert not servable(data / refused, data), refused


def test_the_server_serves_videos_and_sidecars_not_inputs_state_or_segments(page):
    """Over HTTP: a job's mp4 and sidecar are served; its resume state (which holds the uploaded image), its
    segments, the job database and the stored inputs are refused."""
    import httpx

    from .test_queue import png

    url, queue, _ = page
    job = queue.submit(png(), {"prompt": "a cat"})
    video = Path(job.video)
    video.write_bytes(b"\x00\x00\x00\x18ftypmp42")
    video.with_suffix(".json").write_text('{"status": "running"}')
    parts = video.with_suffix(".parts")
    parts.mkdir()
    (parts / "state.safetensors").write_bytes(b"the uploaded image's latents")
    (parts / "seg-0000.mp4").write_bytes(b"a segment")

    def get(path: Path) -> httpx.Response:
        return httpx.get(f"{url}gradio_api/file={path.resolve()}", timeout=30)

    assert get(video).status_code == 200 and get(video).content.endswith(b"mp42")
    assert get(video.with_suffix(".json")).json() == {"status": "running"}
    for refused in (
        parts / "state.safetensors",
        parts / "seg-0000.mp4",
        queue.data_dir / "jobs.sqlite",
        Path(job.image),
    ):
        assert refused.is_file()
        answer = get(refused)
        assert answer.status_code in (403, 404) and b"latents" not in answer.content, refused
    relative = httpx.get(f"{url}gradio_api/file={parts.resolve()}/../{parts.name}/state.safetensors", timeout=30)
    assert relative.status_code in (403, 404)


@pytest.mark.parametrize(
    ("index", "value", "field"),
    [
        (7, float("nan"), "steps"),
        (2, float("nan"), "seconds"),
        (4, 1e308, "seed"),
        (4, float("inf"), "seed"),
        (9, float("nan"), "window"),
        (14, float("nan"), "prompt blend"),
    ],
)
def test_nan_and_huge_numbers_through_the_web_api_are_refused_naming_the_field(page, index, value, field):
    """Raw JSON (gradio_client refuses to send NaN; any HTTP client can): answered "cannot convert float NaN to
    integer" before, now the page's one line naming the field."""
    import json

    import httpx

    from .conftest import EXAMPLE_IMAGE
    from .test_hardening import FORM

    url, queue, _ = page
    with open(EXAMPLE_IMAGE, "rb") as f:
        (uploaded,) = httpx.post(url + "gradio_api/upload", files={"files": f}, timeout=30).json()
    form = list(FORM)
    form[index] = value
    body = json.dumps({"data": [{"path": uploaded, "meta": {"_type": "gradio.FileData"}}, *form]})  # NaN as JS has it
    headers = {"content-type": "application/json"}
    event = httpx.post(url + "gradio_api/call/queue_job", content=body, headers=headers, timeout=30).json()
    answer = httpx.get(url + f"gradio_api/call/queue_job/{event['event_id']}", timeout=60).text
    assert "event: complete" in answer, answer
    (data,) = json.loads(answer.split("data: ", 1)[1].strip())
    assert data.startswith("**Not queued:** ") and field in data and "convert" not in data, data
    assert "\n" not in data and queue.store.list() == []
