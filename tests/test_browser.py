"""The web page in a real browser: Playwright driving the system's Chromium (headless, no browser download).

Starts `framepack serve` on the tiny preset, uploads an image, queues two jobs and sees both finish
with videos, queues a long third one and cancels it, and saves a screenshot of the page to
test-artifacts/app.png. Needs Debian's chromium (`apt-get install chromium`; .ci/run installs it):
without it the test is skipped on a developer machine and fails in CI (CI=true).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

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


@pytest.fixture
def server(tmp_path):
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
        "tiny-random",
        "--resolution",
        "128",
        "--steps",
        "2",
        "--seconds",
        "1",
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


def test_queue_two_jobs_and_cancel_a_third_in_the_browser(server, example_image):
    url, data_dir = server
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1600})
        page.goto(url)
        page.locator("#start-image input[type=file]").set_input_files(str(example_image))
        page.locator("#start-image img").first.wait_for(timeout=30_000)  # the upload is shown
        assert "Plan:" in page.locator("#compat").inner_text()  # the live compatibility report and plan

        for n, prompt in enumerate(("a cat walks", "a dog runs"), start=1):
            page.locator("#prompt textarea").fill(prompt)
            page.locator("#queue-btn").click()
            _wait_for(
                lambda n=n: f"Queued job {n}" in page.locator("#status").inner_text(), 30, f"job {n} queued", page
            )

        _wait_for(lambda: _job_states(page).count("done") == 2, 300, "two finished jobs", page)
        page.locator("#video video").wait_for(timeout=30_000)  # the newest finished video is on the page
        for job_id in (1, 2):
            assert (data_dir / "videos" / f"job-{job_id:05d}.mp4").stat().st_size > 0

        # A long third job (60 s of video), cancelled while it waits or runs.
        page.locator("#seconds input[type=number]").fill("60")
        page.locator("#seconds input[type=number]").press("Enter")
        page.locator("#prompt textarea").fill("a very long clip")
        page.locator("#queue-btn").click()
        _wait_for(lambda: "Queued job 3" in page.locator("#status").inner_text(), 30, "job 3 queued", page)
        page.locator("#cancel-id input").fill("3")
        page.locator("#cancel-btn").click()
        _wait_for(lambda: "Job 3: cancel" in page.locator("#status").inner_text(), 30, "the cancel answer", page)
        _wait_for(lambda: "cancelled" in _job_states(page), 120, "job 3 cancelled", page)
        assert sorted(_job_states(page)) == ["cancelled", "done", "done"]

        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "app.png"), full_page=True)
        browser.close()
    assert (ARTIFACTS / "app.png").stat().st_size > 10_000
