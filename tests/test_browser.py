"""The web page in a real browser: Playwright driving the system's Chromium (headless, no browser download).

Starts `framepack serve` on the trained `tiny` model, uploads an image, sets the resolution and sees the
bucket follow, queues two clips with a random seed and sees both finish with their seeds recorded, queues
a third with a timestamped prompt (the page shows where the change lands) and an end image, a fourth with
the LoRA shipped with tiny picked from the dropdown at weight 0.8, then a long fifth one, saves a screenshot
of the page while it runs (test-artifacts/app.png; docs/app.png is one of
these) and cancels it. Needs Debian's chromium (`apt-get install chromium`; .ci/run installs it):
without it the test is skipped on a developer machine and fails in CI (CI=true).
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
    """From the queue summary line: "job 1: done · job 2: running"."""
    text = page.locator("#queue-summary").inner_text()
    return [part.split(":")[1].strip() for part in text.split("·") if ":" in part]


def _set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def test_two_clips_with_a_random_seed_then_cancel_a_third_in_the_browser(server):
    from framepack_turbo.pipeline import video

    url, data_dir = server
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 2000})
        page.goto(url)
        page.locator("#start-image input[type=file]").set_input_files(str(ROOT / "examples" / "red-circle.png"))
        page.locator("#start-image img").first.wait_for(timeout=30_000)  # the upload is shown
        assert "Plan:" in page.locator("#compat").inner_text()  # the live compatibility report and plan
        bucket = page.locator("#bucket")
        _wait_for(lambda: "96x96" in bucket.inner_text(), 30, "the bucket at the server's resolution", page)
        report = page.locator("#compat")
        assert "model-native-resolution" in report.inner_text()  # tiny knows 64 px only: the page says so at 96
        _set_number(page, "resolution", 64)
        _wait_for(lambda: "64x64" in bucket.inner_text(), 30, "the bucket at resolution 64", page)
        _wait_for(lambda: "model-native-resolution" not in report.inner_text(), 30, "the report at 64", page)

        page.locator("#prompt textarea").fill("the red circle moves right")
        page.locator("#random-seed input[type=checkbox]").check()
        _set_number(page, "count", 2)
        page.locator("#queue-btn").click()
        status = page.locator("#status")
        _wait_for(lambda: "Queued jobs 1, 2" in status.inner_text(), 30, "two clips queued", page)
        seeds = [int(s) for s in status.inner_text().split("seeds ")[1].split(";")[0].split(", ")]
        assert seeds[1] == seeds[0] + 1 and seeds[0] != 31337 and "64x64" in status.inner_text()

        _wait_for(lambda: _job_states(page).count("done") == 2, 300, "two finished clips", page)
        results = page.locator("#results")
        _wait_for(lambda: results.locator("video").count() == 2, 30, "two videos in the results", page)
        for job_id, seed in zip((1, 2), seeds):
            assert f"job {job_id} · seed {seed} · 64x64" in results.inner_text()
            clip = data_dir / "videos" / f"job-{job_id:05d}.mp4"
            assert video.read_metadata(clip)["seed"] == seed
            info = video.probe(clip)
            assert (info.width, info.height, info.frames) == (64, 64, 73)

        # A third job with a timestamped prompt and an end image: the page shows where the change lands.
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
        _wait_for(lambda: _job_states(page).count("done") == 3, 300, "the timed job done", page)
        record = json.loads((data_dir / "videos" / "job-00003.json").read_text())["timeline"]
        assert [(p["text"], p["starts_s"]) for p in record["prompts"]] == [
            ("the red circle moves right", 0.0),
            ("the red circle moves left", 1.2),
        ]
        assert record["end_image"] and (data_dir / "inputs") in Path(record["end_image"]).parents

        # A fourth job with the LoRA shipped with tiny, picked from the dropdown, at weight 0.8.
        page.locator("#prompt textarea").fill("the red circle moves diagonally")
        page.get_by_text("LoRA", exact=True).click()
        page.locator("#lora-0 input").click()
        page.get_by_role("option", name="diagonal (bundled with tiny)").click()
        _set_number(page, "lora-0-weight", 0.8)
        page.locator("#queue-btn").click()
        _wait_for(lambda: "Queued job 4 (seed 31337; 64x64)" in status.inner_text(), 30, "job 4 queued", page)
        _wait_for(lambda: _job_states(page).count("done") == 4, 300, "the LoRA job done", page)
        lora = json.loads((data_dir / "videos" / "job-00004.json").read_text())["lora"]
        assert lora["mode"] == "merged" and [(e["name"], e["weight"]) for e in lora["loras"]] == [
            ("diagonal.safetensors", 0.8)
        ]
        page.locator("#lora-0 input").click()
        page.get_by_role("option", name="none", exact=True).click()

        # A long fifth job (60 s of video): the page while it runs is the screenshot, then it is cancelled.
        _set_number(page, "seconds", 60)
        page.locator("#prompt textarea").fill("the red circle moves up")
        page.locator("#queue-btn").click()
        _wait_for(lambda: "Queued job 5 (seed 31337; 64x64)" in status.inner_text(), 30, "job 5 queued", page)

        def late_in_section_2() -> bool:  # the preview is a clear picture by then, for the screenshot
            text = page.locator("#progress").inner_text()
            return "section 2/50" in text and int(text.split("step ")[1].split("/")[0]) >= 18

        _wait_for(late_in_section_2, 120, "job 5's second section, step 18", page)
        page.locator("#preview img").wait_for(timeout=30_000)
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "app.png"), full_page=True)

        page.locator("#cancel-id input").fill("5")
        page.locator("#cancel-btn").click()
        _wait_for(lambda: "Job 5: cancel" in status.inner_text(), 30, "the cancel answer", page)
        _wait_for(lambda: "cancelled" in _job_states(page), 120, "job 5 cancelled", page)
        assert sorted(_job_states(page)) == ["cancelled", "done", "done", "done", "done"]
        assert "lora" not in json.loads((data_dir / "videos" / "job-00005.json").read_text())  # none picked
        browser.close()
    assert (ARTIFACTS / "app.png").stat().st_size > 10_000
