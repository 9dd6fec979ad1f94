from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_IMAGE = ROOT / "examples" / "start.png"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No test sees the shell's FRAMEPACK_* variables (a test that needs one sets it)."""
    for key in list(os.environ):
        if key.upper().startswith("FRAMEPACK_"):
            monkeypatch.delenv(key)


@pytest.fixture
def decisions(monkeypatch):
    """Every step-cache decision as (cache, prediction, step, kind, detail), in order."""
    from framepack_turbo.optim.stepcache import HookedCache

    seen = []
    original = HookedCache.record

    def spy(self, kind, context, detail=""):
        seen.append((self.name, context.name, context.step_index, kind, str(detail)))
        original(self, kind, context, detail)

    monkeypatch.setattr(HookedCache, "record", spy)
    return seen


@pytest.fixture(scope="session")
def example_image() -> Path:
    return EXAMPLE_IMAGE


@pytest.fixture(scope="session")
def tiny_bundle():
    from framepack_turbo.models.loading import load_bundle

    return load_bundle("tiny-random", device="cpu")


@pytest.fixture(scope="session")
def tiny(tiny_bundle):
    from framepack_turbo.api import FramePack

    return FramePack(tiny_bundle)


@pytest.fixture(scope="session")
def trained():
    """The shipped, trained tiny model: the one whose clips mean something (behaviour gates)."""
    from framepack_turbo.api import FramePack

    return FramePack.load("tiny", device="cpu")


# Small, fast generation settings shared by the tests: 2 s at window 9 = 2 sections.
FAST = dict(seconds=2, steps=2, resolution=128)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def page(tmp_path):
    """A served page on a fake runner: (its URL, the queue, the folder whose app/ is the data dir)."""
    pytest.importorskip("gradio")
    from framepack_turbo.app.jobs import JobStore
    from framepack_turbo.app.queue import JobQueue
    from framepack_turbo.app.ui import build, launch_options
    from framepack_turbo.hardware import Hardware

    from .test_queue import FakeRunner

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    queue = JobQueue(JobStore(tmp_path / "app" / "jobs.sqlite"), FakeRunner(), tmp_path / "app")
    blocks = build(queue, {"model": "tiny-random", "resolution": 64}, Hardware())
    port = _free_port()
    blocks.launch(server_port=port, prevent_thread_lock=True, quiet=True, **launch_options(queue))
    try:
        yield f"http://127.0.0.1:{port}/", queue, tmp_path
    finally:
        blocks.close()
