"""The web page in a real browser: Playwright driving the system's Chromium (headless, no browser download).

Starts `framepack serve` on the trained `tiny` model and goes through the page's four tabs as a user does:
on Generate uploads an image, sets the resolution and sees the bucket follow (and the Settings tab's report
follow it), queues two clips with a random seed and sees both finish on the Queue tab and in the Outputs
gallery with their seeds, queues a third with a timestamped prompt (the page shows where the change lands)
and an end image, a fourth with the LoRA shipped with tiny picked on the Settings tab at weight 0.8. On
Outputs, "Use these settings" fills Generate from a clip (by job id: the LoRA found by its hash; picked in the
gallery: the prompt and seed) and never its end image. A long fifth job runs; the Queue tab while it runs is
the screenshot (test-artifacts/app.png; docs/app.png is one of these), then it is cancelled there. Needs
Debian's chromium (`apt-get install chromium`; .ci/run installs it): without it the test is skipped on a
developer machine and fails in CI (CI=true).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from .conftest import ROOT

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = ROOT / "test-artifacts"

if CHROMIUM is None and not os.environ.get("CI"):
    pytest.skip("no system chromium (apt-get install chromium)", allow_module_level=True)
pytest.importorskip("gradio")
sync_api = pytest.importorskip("playwright.sync_api")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(params=["embedded", "ray"])
def server(request, tmp_path):
    """`framepack serve` with its one in-process worker, and with `--ray` (a local Ray cluster, one CPU worker)."""
    if request.param == "ray" and importlib.util.find_spec("ray") is None:
        assert not os.environ.get("CI"), "CI installs Ray with the test extra"
        pytest.skip("Ray is not installed")
    assert CHROMIUM, "CI needs the system chromium: .ci/run installs it with apt-get"
    port = _free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    env = {k: v for k, v in env.items() if not k.startswith("FRAMEPACK_")}
    cmd = [
        sys.executable,
        "-m",
        "framepack_turbo.cli",
        "serve",
        "--port",
        str(port),
        "--data-dir",
        str(tmp_path / "app"),
        "--model",
        "tiny",
        "--resolution",
        "96",  # the page sets 64, what tiny was trained at
        "--seconds",
        "2.4",
        *(["--ray"] if request.param == "ray" else []),
    ]
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(url, timeout=2).status == 200:
                break
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.5)
    else:
        proc.kill()
    if proc.poll() is not None:
        pytest.fail("framepack serve did not start:\n" + (tmp_path / "serve.log").read_text()[-3000:])
    yield url, tmp_path / "app"
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def _wait_for(predicate, timeout: float, what: str, page=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    text = page.locator("body").inner_text()[-2000:] if page is not None else ""
    raise AssertionError(f"timed out waiting for {what}\n{text}")


def _job_states(page) -> list[str]:
    """From the Queue tab's summary line: "job 1: done · job 2: running"."""
    text = page.locator("#queue-summary").inner_text()
    return [part.split(":")[1].strip() for part in text.split("·") if ":" in part]


def _set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


# Each tab and a control only it holds: visible once the tab is clicked.
TABS = {"Generate": "#queue-btn", "Queue": "#jobs", "Outputs": "#use-settings-btn", "Settings": "#compat"}


def _tab(page, name: str) -> None:
    page.get_by_role("tab", name=name, exact=True).click()
    page.locator(TABS[name]).wait_for(state="visible", timeout=30_000)


def _wait_done(page, count: int, what: str, timeout: float = 300) -> None:
    _tab(page, "Queue")
    _wait_for(lambda: _job_states(page).count("done") == count, timeout, what, page)


def _lora_row(page) -> tuple[str, float]:
    return (
        page.locator("#lora-0 input").input_value(),
        float(page.locator("#lora-0-weight input[type=number]").input_value()),
    )


@pytest.mark.cluster
def test_two_clips_with_a_random_seed_then_cancel_a_third_in_the_browser(server):
    from framepack_turbo.pipeline import video

    url, data_dir = server
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url)
        for name in ("Generate", "Queue", "Outputs", "Settings"):  # each tab shows its own controls
            _tab(page, name)
            for other, control in TABS.items():
                if other != name:
                    assert not page.locator(control).is_visible(), (name, control)
        _tab(page, "Generate")
        page.locator("#start-image input[type=file]").set_input_files(str(ROOT / "examples" / "red-circle.png"))
        page.locator("#start-image img").first.wait_for(timeout=30_000)  # the upload is shown
        bucket = page.locator("#bucket")
        _wait_for(lambda: "96x96" in bucket.inner_text(), 30, "the bucket at the server's resolution", page)
        _tab(page, "Settings")
        report = page.locator("#compat")
        assert "Plan:" in report.inner_text()  # the live compatibility report and plan
        assert "model-native-resolution" in report.inner_text()  # tiny knows 64 px only: the page says so at 96
        _tab(page, "Generate")
        _set_number(page, "resolution", 64)
        _wait_for(lambda: "64x64" in bucket.inner_text(), 30, "the bucket at resolution 64", page)
        _tab(page, "Settings")
        _wait_for(lambda: "model-native-resolution" not in report.inner_text(), 30, "the report at 64", page)

        _tab(page, "Generate")
        page.locator("#prompt textarea").fill("the red circle moves right")
        page.locator("#random-seed input[type=checkbox]").check()
        _set_number(page, "count", 2)
        page.locator("#queue-btn").click()
        status = page.locator("#status")
        _wait_for(lambda: "Queued jobs 1, 2" in status.inner_text(), 30, "two clips queued", page)
        seeds = [int(s) for s in status.inner_text().split("seeds ")[1].split(";")[0].split(", ")]
        assert seeds[1] == seeds[0] + 1 and seeds[0] != 31337 and "64x64" in status.inner_text()

        _wait_done(page, 2, "two finished clips")
        _tab(page, "Outputs")
        results = page.locator("#results")
        _wait_for(lambda: results.locator("video").count() == 2, 30, "two videos in the results", page)
        for job_id, seed in zip((1, 2), seeds):
            assert f"job {job_id} · seed {seed} · 64x64" in results.inner_text()
            clip = data_dir / "videos" / f"job-{job_id:05d}.mp4"
            assert video.read_metadata(clip)["seed"] == seed
            info = video.probe(clip)
            assert (info.width, info.height, info.frames) == (64, 64, 73)

        # A third job with a timestamped prompt and an end image: the page shows where the change lands.
        _tab(page, "Generate")
        page.locator("#random-seed input[type=checkbox]").uncheck()
        _set_number(page, "count", 1)
        page.locator("#prompt textarea").fill("[0s: the red circle moves right] [1.8s: the red circle moves left]")
        timeline = page.locator("#timeline")
        _wait_for(lambda: "1.2 s (asked 1.8 s)" in timeline.inner_text(), 30, "the snapped prompt time", page)
        page.get_by_text("End frame and keyframes (inverted variant)").click()
        page.locator("#end-image input[type=file]").set_input_files(str(ROOT / "examples" / "red-circle.png"))
        page.locator("#end-image img").first.wait_for(timeout=30_000)
        page.locator("#queue-btn").click()
        _wait_for(lambda: "Queued job 3 (seed 31337; 64x64)" in status.inner_text(), 30, "job 3 queued", page)
        _wait_done(page, 3, "the timed job done")
        record = json.loads((data_dir / "videos" / "job-00003.json").read_text())["timeline"]
        assert [(p["text"], p["starts_s"]) for p in record["prompts"]] == [
            ("the red circle moves right", 0.0),
            ("the red circle moves left", 1.2),
        ]
        assert record["end_image"] and (data_dir / "inputs") in Path(record["end_image"]).parents

        # A fourth job with the LoRA shipped with tiny, picked on the Settings tab, at weight 0.8.
        _tab(page, "Settings")
        page.locator("#lora-0 input").click()
        page.get_by_role("option", name="diagonal (bundled with tiny)").click()
        _set_number(page, "lora-0-weight", 0.8)
        _tab(page, "Generate")
        assert "LoRA: diagonal (bundled with tiny) (0.8)" in page.locator("#active-settings").inner_text()
        page.locator("#prompt textarea").fill("the red circle moves diagonally")
        page.locator("#queue-btn").click()
        _wait_for(lambda: "Queued job 4 (seed 31337; 64x64)" in status.inner_text(), 30, "job 4 queued", page)
        _wait_done(page, 4, "the LoRA job done")
        lora = json.loads((data_dir / "videos" / "job-00004.json").read_text())["lora"]
        assert lora["mode"] == "merged" and [(e["name"], e["weight"]) for e in lora["loras"]] == [
            ("diagonal.safetensors", 0.8)
        ]

        # "Use these settings": from a clip's own record into the Generate tab, never a path. Job 4 by its id:
        # its LoRA found by the recorded hash among the dropdown's, its end image (still in the field when it
        # was queued) named as not filled, and the field emptied.
        _tab(page, "Generate")
        page.locator("#prompt textarea").fill("something else")
        _set_number(page, "seed", 7)
        _tab(page, "Settings")
        page.locator("#lora-0 input").click()
        page.get_by_role("option", name="none", exact=True).click()
        _tab(page, "Outputs")
        _wait_for(lambda: results.locator("video").count() == 4, 30, "four videos in the results", page)
        _set_number(page, "use-id", 4)
        page.locator("#use-settings-btn").click()
        page.locator("#queue-btn").wait_for(state="visible", timeout=30_000)  # it opens the Generate tab
        _wait_for(lambda: "Filled from job 4" in status.inner_text(), 30, "job 4's settings", page)
        assert "end image" in status.inner_text().split("Not filled")[1]
        assert page.locator("#prompt textarea").input_value() == "the red circle moves diagonally"
        assert float(page.locator("#seed input").input_value()) == 31337
        assert page.locator("#end-image img").count() == 0  # the end image is not taken from the clip
        _tab(page, "Settings")
        assert _lora_row(page) == ("diagonal (bundled with tiny)", 0.8)
        # Job 2 picked in the gallery: its prompt and its (random) seed; no LoRA.
        _tab(page, "Outputs")
        results.locator(".thumbnail-item").filter(has_text="job 2 ·").click()
        _wait_for(lambda: page.locator("#use-id input").input_value() == "2", 30, "job 2 picked", page)
        page.locator("#use-settings-btn").click()
        page.locator("#queue-btn").wait_for(state="visible", timeout=30_000)
        _wait_for(lambda: "Filled from job 2" in status.inner_text(), 30, "job 2's settings", page)
        assert page.locator("#prompt textarea").input_value() == "the red circle moves right"
        assert int(float(page.locator("#seed input").input_value())) == seeds[1]
        assert not page.locator("#random-seed input[type=checkbox]").is_checked()
        assert page.locator("#end-image img").count() == 0
        _tab(page, "Settings")
        assert _lora_row(page) == ("none", 1.0)

        # A long fifth job (60 s of video): the Queue tab while it runs is the screenshot, then it is cancelled.
        _tab(page, "Generate")
        _set_number(page, "seconds", 60)
        page.locator("#prompt textarea").fill("the red circle moves up")
        page.locator("#queue-btn").click()
        queued = f"Queued job 5 (seed {seeds[1]}; 64x64)"
        _wait_for(lambda: queued in status.inner_text(), 30, "job 5 queued", page)
        # the running job beside the controls too
        _wait_for(lambda: "Job 5" in page.locator("#current-progress").inner_text(), 120, "job 5 beside", page)

        _tab(page, "Queue")

        def late_in_section_2() -> bool:  # the preview is a clear picture by then, for the screenshot
            text = page.locator("#progress").inner_text()
            return "section 2/50" in text and int(text.split("step ")[1].split("/")[0]) >= 18

        _wait_for(late_in_section_2, 120, "job 5's second section, step 18", page)
        page.locator("#preview img").wait_for(timeout=30_000)
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "app.png"), full_page=True)

        page.locator("#cancel-id input").fill("5")
        page.locator("#cancel-btn").click()
        answer = page.locator("#queue-status")
        _wait_for(lambda: "Job 5: cancel" in answer.inner_text(), 30, "the cancel answer", page)
        _wait_for(lambda: "cancelled" in _job_states(page), 120, "job 5 cancelled", page)
        assert sorted(_job_states(page)) == ["cancelled", "done", "done", "done", "done"]
        job5 = json.loads((data_dir / "videos" / "job-00005.json").read_text())
        assert "lora" not in job5 and job5["seed"] == seeds[1]  # as "Use these settings" filled it
        assert not job5.get("timeline", {}).get("end_image")
        browser.close()
    assert (ARTIFACTS / "app.png").stat().st_size > 10_000
