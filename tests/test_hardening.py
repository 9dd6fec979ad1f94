"""What a probe of bad inputs and faults broke (issue 21), each reproduced: huge and bomb images refused from
their header, prompts that are not text, a read-only or tampered encoder cache, two servers on one data dir,
the web API's refusals reaching the client, stale temporary files, store and sidecar agreeing, a tampered
artifact config, and the same bits from two processes."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from framepack_turbo.api import FramePack
from framepack_turbo.cli import app
from framepack_turbo.errors import InputError
from framepack_turbo.pipeline.options import load_image

from .conftest import EXAMPLE_IMAGE

JOB = dict(seconds=1, steps=2, resolution=64)


def bomb_png(path: Path, width: int, height: int) -> Path:
    """A 1-bit PNG header claiming `width` x `height` with a few compressed rows: what a decompression bomb
    looks like to a reader of its header (its pixels are never needed to refuse it)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    rows = zlib.compress(b"\0" * ((width + 7) // 8 + 1) * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b""))
    return path


def real_png(path: Path, width: int, height: int) -> Path:
    from PIL import Image

    Image.new("1", (width, height)).save(path)
    return path


def _cli(*args: str):
    return CliRunner().invoke(app, ["generate", "--model", "tiny-random", "--out", "/tmp/never.mp4", *args])


def _one_line_exit_2(result, reason: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and reason in lines[0] and "Traceback" not in result.output, result.output


# ---- images: refused from the header ----------------------------------------------------------------


def test_decompression_bomb_is_a_clear_refusal(tmp_path):
    bomb = bomb_png(tmp_path / "bomb.png", 30000, 30000)
    with pytest.raises(InputError, match="far too large"):
        load_image(bomb)
    _one_line_exit_2(_cli("--image", str(bomb), "--prompt", "a cat"), "far too large")


def test_huge_image_is_refused_before_it_is_decoded(tmp_path):
    big = real_png(tmp_path / "big.png", 13000, 13000)  # 20 KB on disk, 169 MB of pixels
    code = (
        "import resource, sys\n"
        "from framepack_turbo.app.queue import check_upload\n"
        "from framepack_turbo.errors import InputError\n"
        "from framepack_turbo.pipeline.options import load_image\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "for refuse in (lambda: load_image(sys.argv[1]), lambda: check_upload(open(sys.argv[1], 'rb').read())):\n"
        "    try:\n"
        "        refuse()\n"
        "    except InputError as exc:\n"
        "        assert '13000x13000' in str(exc), exc\n"
        "    else:\n"
        "        raise SystemExit('not refused')\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(big)], capture_output=True, text=True, check=True)
    assert float(out.stdout.strip().splitlines()[-1]) < 200  # MB more than the process had before refusing
    _one_line_exit_2(_cli("--image", str(big), "--prompt", "a cat"), "13000x13000")


# ---- text -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--prompt", "--negative"])
def test_a_prompt_that_is_not_utf8_is_refused_before_loading(flag):
    # bytes that are not UTF-8 in a command line arrive as lone surrogates
    args = (
        ["--prompt", "a cat", flag, "red \udcff\udcfe circle"] if flag == "--negative" else [flag, "red \udcff circle"]
    )
    _one_line_exit_2(_cli("--image", str(EXAMPLE_IMAGE), *args), "not valid UTF-8")


def test_a_prompt_that_is_not_utf8_is_not_queued(tmp_path):
    from framepack_turbo.app.jobs import JobStore
    from framepack_turbo.app.queue import JobQueue

    from .test_queue import FakeRunner, png

    queue = JobQueue(JobStore(tmp_path / "jobs.sqlite"), FakeRunner(), tmp_path)
    with pytest.raises(InputError, match="not valid UTF-8"):
        queue.submit(png(), {"prompt": "a \ud800 cat", "options": JOB})
    assert queue.store.list() == []


# ---- the encoder output cache ----------------------------------------------------------------------------


@pytest.fixture
def cached(tmp_path):
    fp = FramePack.load("tiny-random", device="cpu", enable_module_cache=True, runtime_cache_dir=str(tmp_path / "rc"))
    first = fp.generate(EXAMPLE_IMAGE, "a cat", out=tmp_path / "first.mp4", **JOB)
    return fp, first, tmp_path


def _entries(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "rc").rglob("*.safetensors"))


def test_a_read_only_cache_is_read_with_a_warning(cached, monkeypatch, caplog):
    fp, first, tmp_path = cached
    from framepack_turbo.optim import modulecache

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(os, "utime", read_only)
    monkeypatch.setattr(modulecache, "save_file", read_only)
    again = fp.generate(EXAMPLE_IMAGE, "a cat", out=tmp_path / "again.mp4", **JOB)
    assert again.sidecar["caches"]["modulecache"]["hit"] == 2 and torch.equal(again.latents, first.latents)
    other = fp.generate(EXAMPLE_IMAGE, "a dog", out=tmp_path / "other.mp4", **JOB)  # a miss cannot be written
    assert other.status == "complete" and "could not write" in caplog.text


def _rewrite(path: Path, change) -> None:
    """Rewrite an entry with `change(tensors, meta)` applied, keeping (or not) its checksum consistent."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k).clone() for k in f.keys()}
    change(tensors, meta)
    save_file(tensors, str(path), metadata=meta)


def _consistent(tensors, meta) -> None:
    from framepack_turbo.optim.modulecache import _digest, _shapes

    meta.update(shapes=json.dumps(_shapes(tensors)), sha256=_digest(tensors))


def _flip_byte(tensors, meta):
    name = sorted(tensors)[0]
    raw = tensors[name].flatten().view(torch.uint8)
    raw[-1] ^= 0xFF


def _nan(tensors, meta):
    for t in tensors.values():
        if t.is_floating_point():
            t.fill_(float("nan"))
    _consistent(tensors, meta)


def _wrong_shape(tensors, meta):
    for name in list(tensors):
        if tensors[name].is_floating_point():
            tensors[name] = torch.zeros(*tensors[name].shape[:-1], tensors[name].shape[-1] + 1)
    _consistent(tensors, meta)


@pytest.mark.parametrize("damage", [_flip_byte, _nan, _wrong_shape], ids=["flipped-byte", "nan", "wrong-shape"])
def test_a_tampered_entry_is_ignored_and_recomputed(cached, damage, caplog):
    fp, first, tmp_path = cached
    for path in _entries(tmp_path):
        _rewrite(path, damage)
    again = fp.generate(EXAMPLE_IMAGE, "a cat", out=tmp_path / "again.mp4", **JOB)
    stats = again.sidecar["caches"]["modulecache"]
    assert stats["hit"] == 0 and stats["ignored"] == 2 and "ignoring" in caplog.text
    assert torch.equal(again.latents, first.latents)
    healed = fp.generate(EXAMPLE_IMAGE, "a cat", out=tmp_path / "healed.mp4", **JOB)  # rewritten good entries
    assert healed.sidecar["caches"]["modulecache"]["hit"] == 2


# ---- two servers on one data dir -------------------------------------------------------------------------


def test_a_second_server_on_a_data_dir_is_refused_naming_the_first(tmp_path):
    from framepack_turbo.app.jobs import DataDirLock

    data = tmp_path / "app"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom framepack_turbo.app.jobs import DataDirLock\n"
            "DataDirLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(120)",
            str(data),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        second = subprocess.run(
            [sys.executable, "-m", "framepack_turbo.cli", "serve", "--data-dir", str(data), "--model", "tiny-random"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 2
        assert f"another framepack server (pid {holder.pid})" in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1 and "Traceback" not in second.stderr
    finally:
        holder.kill()
        holder.wait()
    with DataDirLock(data):  # the lock went with its process
        pass


# ---- the web API's refusals reach the client -------------------------------------------------------------


# the page's queue_job inputs after the image: prompt, negative, seconds, resolution, seed, random seed, count,
# steps, gs, window, crf, variant, end image, end strength, prompt blend, prompt change guidance, two keyframe rows
# (time, image), the video to extend, three LoRA rows (name, weight), then the optimization panel (preset, six
# switches, attention, memory preservation)
FORM = (
    "a cat",
    "",
    1,
    64,
    1,
    False,
    1,
    2,
    10,
    9,
    16,
    "model default",
    None,
    1,
    0,
    1,
    None,
    None,
    None,
    None,
    None,
    "none",
    1,
    "none",
    1,
    "none",
    1,
    "default",
    False,
    False,
    False,
    False,
    False,
    False,
    False,
    "standard",
    6,
)


def _queue_job(url: str, image) -> str:
    from gradio_client import Client

    return Client(url, verbose=False).predict(image, *FORM, api_name="/queue_job")


def test_web_api_refusals_carry_their_reason(page):
    import httpx
    from gradio_client import handle_file

    url, queue, tmp_path = page
    text = tmp_path / "notes.png"
    text.write_bytes(b"this is not an image")
    assert "not a readable image" in _queue_job(url, handle_file(str(text)))
    assert "far too large" in _queue_job(url, handle_file(str(bomb_png(tmp_path / "bomb.png", 30000, 30000))))
    assert "13000x13000" in _queue_job(url, handle_file(str(real_png(tmp_path / "big.png", 13000, 13000))))
    assert queue.store.list() == []
    # a path the server never received: Gradio refuses it, and now says why
    body = {"data": [{"path": str(EXAMPLE_IMAGE), "meta": {"_type": "gradio.FileData"}}, *FORM]}
    event = httpx.post(url + "gradio_api/call/queue_job", json=body).json()["event_id"]
    answer = httpx.get(url + f"gradio_api/call/queue_job/{event}", timeout=60).text
    assert "event: error" in answer and "not uploaded" in answer
    # the job database is not served, the videos are
    assert httpx.get(url + f"gradio_api/file={queue.data_dir.resolve() / 'jobs.sqlite'}").status_code in (403, 404)


# ---- files and records -----------------------------------------------------------------------------------


def test_a_killed_writer_leaves_nothing_the_next_write_keeps(tmp_path):
    from framepack_turbo.files import atomic_path

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(gone.stdout)
    left = [tmp_path / f".clip.{dead}.k1ll3d.mp4", tmp_path / ".clip.0ldv3rs.mp4"]  # this and an older version's
    for path in left:
        path.write_bytes(b"half a video")
    os.utime(left[1], (time.time() - 7200, time.time() - 7200))
    live = tmp_path / f".clip.{os.getpid()}.writing.mp4"  # a write in progress in a live process stays
    live.write_bytes(b"")
    with atomic_path(tmp_path / "clip.mp4") as tmp:
        Path(tmp).write_bytes(b"a video")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "clip.mp4"])


def test_cancel_after_the_last_step_is_done_in_store_and_sidecar(tmp_path):
    from framepack_turbo.app.jobs import JobStore
    from framepack_turbo.app.queue import GenerationRunner, JobQueue
    from framepack_turbo.pipeline.events import SectionDone

    from .test_queue import png

    runner = GenerationRunner({"model": "tiny-random", "device": "cpu"})

    def late_cancel(job, cancel, on_event):
        def events(event):
            if isinstance(event, SectionDone) and event.section == event.sections:
                cancel.cancel()  # the clip is written: nothing is left to stop
            on_event(event)

        runner(job, cancel, events)

    queue = JobQueue(JobStore(tmp_path / "jobs.sqlite"), late_cancel, tmp_path)
    job = queue.submit(png(), {"prompt": "a cat", "options": {**JOB, "resolution": 128}})
    queue.run_pending()
    sidecar = json.loads(Path(job.video).with_suffix(".json").read_text())
    assert (queue.store.get(job.id).state, sidecar["status"]) == ("done", "complete")


def test_restart_recovery_marks_the_sidecar_failed_too(tmp_path):
    from framepack_turbo.app.jobs import JobStore
    from framepack_turbo.app.queue import JobQueue

    from .test_queue import FakeRunner, png

    store = JobStore(tmp_path / "jobs.sqlite")
    queue = JobQueue(store, FakeRunner(), tmp_path)
    job = queue.submit(png(), {"prompt": "a cat", "options": JOB})
    store.claim_next()  # it was running when the server died, and had written its sidecar
    Path(job.video).with_suffix(".json").write_text(json.dumps({"status": "running", "sections_done": 1}))
    JobQueue(JobStore(tmp_path / "jobs.sqlite"), FakeRunner(), tmp_path)  # the restart
    sidecar = json.loads(Path(job.video).with_suffix(".json").read_text())
    assert sidecar["status"] == "failed" == store.get(job.id).state
    assert "server stopped" in sidecar["error"]


def test_an_abort_leaves_a_final_sidecar(tiny, tmp_path):
    from framepack_turbo.pipeline.events import SectionDone

    def second_ctrl_c(event):
        if isinstance(event, SectionDone):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tiny.generate(
            EXAMPLE_IMAGE, "a cat", out=tmp_path / "a.mp4", on_event=second_ctrl_c, seconds=2, steps=1, resolution=64
        )
    sidecar = json.loads((tmp_path / "a.json").read_text())
    assert sidecar["status"] == "cancelled" and sidecar["error"] == "aborted" and sidecar["sections_done"] == 1


def test_a_manifest_edited_to_another_architecture_is_refused_before_building(tmp_path):
    from framepack_turbo.models.loading import transformer_config, transformer_identity
    from framepack_turbo.optim import artifact
    from framepack_turbo.settings import Settings

    settings = Settings.load({"model": "tiny-random", "enable_prune": True}, environ={})
    fp = FramePack.load(settings=settings)
    path = tmp_path / "t.safetensors"
    identity, source = transformer_identity("tiny-random"), transformer_config("tiny-random")
    artifact.save(fp.bundle, settings, path, identity, fp.reports)
    key = artifact.shaping_settings(settings, "cpu")
    assert artifact.check(path, identity, key, source)  # as saved: fits (pruned layer counts expected)
    manifest = json.loads(artifact.manifest_path(path).read_text())
    manifest["config"]["num_layers"] = 100000
    artifact.manifest_path(path).write_text(json.dumps(manifest))
    with pytest.raises(artifact.ArtifactRefused, match="config is not this model's: num_layers 100000"):
        artifact.check(path, identity, key, source)  # from the manifest: nothing is built


@pytest.mark.slow
def test_two_processes_give_the_same_bits(tmp_path):
    """The trained tiny model, from its files, twice in fresh processes: the same latents and frames."""
    code = (
        "import sys, torch\n"
        "from safetensors.torch import save_file\n"
        "from framepack_turbo import FramePack\n"
        "r = FramePack.load('tiny').generate('examples/red-circle.png', 'the red circle moves right', "
        "out=sys.argv[1] + '.mp4', seconds=1, steps=3, resolution=64)\n"
        "save_file({'latents': r.latents.contiguous(), 'frames': torch.from_numpy(r.frames)}, sys.argv[1])\n"
    )
    root = Path(__file__).resolve().parents[1]
    runs = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.safetensors"
        subprocess.run([sys.executable, "-c", code, str(out)], check=True, cwd=root, capture_output=True)
        from safetensors.torch import load_file

        runs.append(load_file(str(out)))
    assert torch.equal(runs[0]["latents"], runs[1]["latents"])
    assert np.array_equal(runs[0]["frames"].numpy(), runs[1]["frames"].numpy())
