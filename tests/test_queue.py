"""The job queue: order, persistence across a restart, cancel, failure isolation, upload checks."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest
from PIL import Image

from framepack_turbo.app.jobs import JobStore
from framepack_turbo.app.queue import GenerationRunner, JobQueue, check_upload
from framepack_turbo.errors import Cancelled, InputError
from framepack_turbo.pipeline.events import SectionDone

from .conftest import FAST

PICTURE = (np.indices((96, 128)).sum(0) % 255).astype(np.uint8)[..., None].repeat(3, axis=2)


def png(array=PICTURE, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


class FakeRunner:
    """Records the order; 'fail' in a prompt raises; 'block' waits until cancelled."""

    def __init__(self):
        self.ran = []
        self.started = threading.Event()

    def __call__(self, job, cancel, on_event):
        self.ran.append(job.prompt)
        self.started.set()
        if "fail" in job.prompt:
            raise RuntimeError("boom")
        if "block" in job.prompt:
            while not cancel.cancelled:
                cancel._event.wait(0.05)
            raise Cancelled("stopped")
        on_event(SectionDone(1, 1, 9, job.video))


def make_queue(tmp_path, runner):
    return JobQueue(JobStore(tmp_path / "jobs.sqlite"), runner, tmp_path)


def test_jobs_run_in_order_and_a_failure_does_not_stop_the_queue(tmp_path):
    runner = FakeRunner()
    q = make_queue(tmp_path, runner)
    ids = [q.submit(png(), {"prompt": p}).id for p in ("first", "fail here", "third")]
    assert q.run_pending() == 3
    assert runner.ran == ["first", "fail here", "third"]
    states = {j.id: j for j in q.store.list()}
    assert [states[i].state for i in ids] == ["done", "failed", "done"]
    assert states[ids[1]].error == "RuntimeError: boom"
    assert states[ids[0]].sections_done == 1 and states[ids[0]].frames == 9


def test_queue_and_finished_jobs_survive_a_restart(tmp_path):
    q = make_queue(tmp_path, FakeRunner())
    done = q.submit(png(), {"prompt": "done before the restart"})
    q.run_one()
    waiting = [q.submit(png(), {"prompt": f"waiting {i}"}).id for i in range(2)]
    interrupted = q.store.claim_next()  # running when the server "stops"
    assert interrupted.id == waiting[0]
    runner = FakeRunner()
    again = make_queue(tmp_path, runner)  # a new server on the same folder
    jobs = {j.id: j for j in again.store.list()}
    assert jobs[done.id].state == "done" and jobs[done.id].video.endswith(f"job-{done.id:05d}.mp4")
    assert jobs[interrupted.id].state == "failed" and "server stopped" in jobs[interrupted.id].error
    assert jobs[waiting[1]].state == "queued"
    again.run_pending()
    assert runner.ran == ["waiting 1"] and again.store.get(waiting[1]).state == "done"


def test_cancel_queued_and_running_jobs(tmp_path):
    runner = FakeRunner()
    q = make_queue(tmp_path, runner).start()
    try:
        running = q.submit(png(), {"prompt": "block until cancelled"})
        assert runner.started.wait(10)
        queued = q.submit(png(), {"prompt": "never runs"})
        assert q.cancel(queued.id) == "cancelled"
        assert q.cancel(running.id) == "cancelling"
        for _ in range(200):
            if q.store.get(running.id).state != "running":
                break
            threading.Event().wait(0.05)
        assert q.store.get(running.id).state == "cancelled"
        assert q.store.get(queued.id).state == "cancelled" and "never runs" not in runner.ran
        assert q.cancel(queued.id) == "cancelled"  # cancelling twice says what it is
        with pytest.raises(InputError, match="no job 999"):
            q.cancel(999)
    finally:
        q.stop()


def test_uploads_are_checked_before_queueing(tmp_path):
    q = make_queue(tmp_path, FakeRunner())
    with pytest.raises(InputError, match="not a readable image"):
        q.submit(b"GIF89a not really", {"prompt": "x"})
    with pytest.raises(InputError, match="type GIF"):
        check_upload(png(fmt="GIF"))
    with pytest.raises(InputError, match="each side"):
        q.submit(png(PICTURE[:32, :32]), {"prompt": "x"})
    with pytest.raises(InputError, match="limit"):
        check_upload(b"\0" * (21 << 20))
    with pytest.raises(InputError, match="prompt"):
        q.submit(png(), {"prompt": "  "})
    with pytest.raises(InputError, match="seconds"):
        q.submit(png(), {"prompt": "x", "options": {"seconds": -1}})
    assert q.store.list() == []  # nothing queued
    job = q.submit(png(fmt="JPEG"), {"prompt": "ok"})
    assert job.image.startswith(str(tmp_path / "inputs")) and job.image.endswith(".png")
    assert job.video == str(tmp_path / "videos" / f"job-{job.id:05d}.mp4")


def test_generation_runner_makes_videos_on_tiny(tmp_path):
    q = make_queue(tmp_path, GenerationRunner({"model": "tiny-random"}))
    a = q.submit(png(), {"prompt": "a cat", "options": {**FAST, "seconds": 1}})
    b = q.submit(png(), {"prompt": "a dog", "options": {**FAST, "seconds": 1}, "settings": {"enable_teacache": True}})
    assert q.run_pending() == 2
    for job in (q.store.get(a.id), q.store.get(b.id)):
        assert job.state == "done" and job.frames == 37 and job.sections_done == job.sections == 1
        assert (tmp_path / "videos" / f"job-{job.id:05d}.mp4").stat().st_size > 0
    assert "teacache" in q.live.cache_timeline[0]  # the second job's hit rate per section


def test_a_batch_queues_one_job_per_clip_with_consecutive_seeds_and_its_bucket(tmp_path):
    from framepack_turbo.pipeline.encode import nearest_bucket

    runner = FakeRunner()
    q = JobQueue(JobStore(tmp_path / "jobs.sqlite"), runner, tmp_path, base={"seed": 7, "resolution": 128})
    jobs = q.submit_batch(png(), {"prompt": "a cat", "options": {"seconds": 1}}, 3)
    assert [j.request["options"]["seed"] for j in jobs] == [7, 8, 9]  # the server's seed under the request's
    assert [j.request["batch"]["index"] for j in jobs] == [1, 2, 3] and len(
        {j.request["batch"]["key"] for j in jobs}
    ) == 1
    assert all(j.request["bucket"] == list(nearest_bucket(96, 128, resolution=128)) for j in jobs)
    assert jobs[0].request["options"]["resolution"] == 128 and jobs[0].request["options"]["seconds"] == 1
    drawn = q.submit_batch(png(), {"prompt": "a dog", "options": {"seed": "random", "resolution": 64}}, 2)
    seeds = [j.request["options"]["seed"] for j in drawn]
    assert isinstance(seeds[0], int) and seeds[1] == seeds[0] + 1  # the draw is recorded, not "random"
    assert drawn[0].request["bucket"] == list(nearest_bucket(96, 128, resolution=64))
    single = q.submit(png(), {"prompt": "one"})
    assert "batch" not in single.request and single.request["options"]["seed"] == 7
    assert q.run_pending() == 6 and [j.state for j in q.store.list()] == ["done"] * 6


@pytest.mark.parametrize(
    ("count", "options", "message"),
    [(0, {}, "count=0"), (101, {}, "count=101"), (2, {"seed": 2**63 - 1}, "2^63-2"), (2, {"seed": "soon"}, "'soon'")],
)
def test_a_bad_batch_queues_nothing(tmp_path, count, options, message):
    q = make_queue(tmp_path, FakeRunner())
    with pytest.raises(InputError, match=message.replace("^", r"\^")):
        q.submit_batch(png(), {"prompt": "x", "options": options}, count)
    assert q.store.list() == []


def test_a_video_upload_queues_an_extension_and_runs_it(tmp_path):
    """The page's "Extend a video": checked by content and stored under our name; the job starts from its
    last frame, and the runner hands the generator the video, not an image."""
    from framepack_turbo.pipeline import video

    clip = tmp_path / "clip.mp4"
    frames = np.stack([np.roll(PICTURE[:64, :64], 2 * t, axis=1) for t in range(40)])
    video.write_mp4(frames, clip)
    q = make_queue(tmp_path, GenerationRunner({"model": "tiny-random"}))
    with pytest.raises(InputError, match="not a readable video"):
        q.submit_batch(None, {"prompt": "x"}, 1, video=b"not a video" * 100)
    with pytest.raises(InputError, match="give no start image"):
        q.submit_batch(png(), {"prompt": "x"}, 1, video=clip.read_bytes())
    with pytest.raises(InputError, match="F1 continues from at least 33"):
        q.submit_batch(None, {"prompt": "x", "options": {"variant": "f1"}}, 1, video=_short(tmp_path))
    assert q.store.list() == [] and not list((tmp_path / "inputs").glob("*-video"))  # nothing kept of refusals
    request = {"prompt": "a cat", "options": {**FAST, "seconds": 1, "resolution": 64}}
    job = q.submit_batch(None, request, 1, video=clip.read_bytes())[0]
    stored = job.request["options"]["video"]
    assert stored.startswith(str(tmp_path / "inputs")) and job.request["bucket"] == [64, 64]
    assert np.array_equal(np.asarray(Image.open(job.image)), video.read_frames(clip)[-1])
    assert q.run_pending() == 1
    done = q.store.get(job.id)
    assert done.state == "done" and done.frames == 40 + 36 == video.probe(done.video).frames


def _short(tmp_path) -> bytes:
    from framepack_turbo.pipeline import video

    path = tmp_path / "short.mp4"
    video.write_mp4(np.zeros((20, 64, 64, 3), np.uint8), path)
    return path.read_bytes()


def test_a_failed_job_resumes_from_its_last_section_to_the_same_video(tmp_path):
    """The page's "Resume job": a job that failed in section 2 goes on from section 1's state, and its
    video is the one a job that never failed makes."""
    from framepack_turbo.pipeline import video
    from framepack_turbo.pipeline.events import StepProgress

    class CrashOnce(GenerationRunner):
        crashed = False

        def __call__(self, job, cancel, on_event):
            def crash_in_section_2(event):
                if isinstance(event, StepProgress) and event.section == 2 and not self.crashed:
                    CrashOnce.crashed = True
                    raise RuntimeError("the GPU fell off the bus")
                on_event(event)

            super().__call__(job, cancel, crash_in_section_2)

    q = make_queue(tmp_path, CrashOnce({"model": "tiny-random"}))
    request = {"prompt": "a cat", "options": {"seconds": 3.6, "steps": 2, "resolution": 64}}
    job = q.submit(png(), request)
    with pytest.raises(InputError, match="queued"):
        q.resume(job.id)  # only a failed or cancelled job resumes
    q.run_pending()
    failed = q.store.get(job.id)
    assert failed.state == "failed" and "fell off the bus" in failed.error
    assert q.resume(job.id) == "queued to resume" and q.store.get(job.id).state == "queued"
    reference = q.submit(png(), request)
    assert q.run_pending() == 2
    done = q.store.get(job.id)
    assert done.state == "done" and done.error == "" and done.sections_done == 3
    assert np.array_equal(video.read_frames(done.video), video.read_frames(q.store.get(reference.id).video))
    with pytest.raises(InputError, match="done"):
        q.resume(job.id)


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"steps": NAN}, "steps=nan"),
        ({"steps": INF}, "steps=inf"),
        ({"steps": 1e308}, "steps=1e+308"),
        ({"steps": 2.5}, "steps=2.5"),
        ({"seconds": NAN}, "seconds=nan"),
        ({"seed": NAN}, "seed=nan"),
        ({"seed": 1e300}, "seed=1e+300"),
        ({"window": INF}, "window=inf"),
        ({"crf": NAN}, "crf=nan"),
        ({"resolution": NAN}, "resolution=nan"),
        ({"distilled_guidance": NAN}, "distilled_guidance=nan"),
        ({"prompt_blend_sections": INF}, "prompt_blend_sections=inf"),
        ({"end_strength": NAN}, "end_strength=nan"),
        ({"steps": True}, "steps=True"),
        ({"steps": "many"}, "steps='many'"),
    ],
)
def test_non_finite_or_huge_numbers_through_the_api_are_refused_naming_the_field(tmp_path, options, field):
    """What the web API (/queue_job, or JobQueue.submit from Python) is sent is any JSON number: NaN, inf and
    1e308 were answered "cannot convert float NaN to integer" (or ran), now one line naming the field."""
    q = make_queue(tmp_path, FakeRunner())
    with pytest.raises(InputError) as refused:
        q.submit(png(), {"prompt": "x", "options": options})
    message = str(refused.value)
    assert message.startswith(field) and "\n" not in message and len(message) < 200, message
    assert q.store.list() == []


def test_whole_floats_are_taken_as_integers(tmp_path):
    q = make_queue(tmp_path, FakeRunner())
    job = q.submit(png(), {"prompt": "x", "options": {"steps": 3.0, "seed": 7.0, "resolution": 64.0}})
    options = job.request["options"]
    assert options["steps"] == 3 and isinstance(options["steps"], int) and options["seed"] == 7


def test_a_video_refused_after_it_was_stored_leaves_no_upload(tmp_path, monkeypatch):
    """The video upload is stored to be probed; any refusal after that (bad settings, no worker, a frame that
    does not decode) removes it: nothing of a refused request stays in inputs/."""
    from framepack_turbo.pipeline import extend, video

    clip = tmp_path / "clip.mp4"
    video.write_mp4(np.zeros((12, 64, 64, 3), np.uint8), clip)
    q = make_queue(tmp_path, FakeRunner())
    with pytest.raises(InputError, match="steps=nan"):
        q.submit_batch(None, {"prompt": "x", "options": {"steps": NAN}}, 1, video=clip.read_bytes())
    with pytest.raises(InputError, match="count=0"):
        q.submit_batch(None, {"prompt": "x"}, 0, video=clip.read_bytes())
    with pytest.raises(InputError, match="unknown setting"):
        q.submit_batch(None, {"prompt": "x", "settings": {"no_such": 1}}, 1, video=clip.read_bytes())

    def broken_tail(*args, **kwargs):
        raise InputError("the video upload: frame 12 is 24000x24000; the limit is 4096")

    monkeypatch.setattr(extend, "read_tail", broken_tail)
    with pytest.raises(InputError, match="24000x24000"):
        q.submit_batch(None, {"prompt": "x"}, 1, video=clip.read_bytes())
    assert q.store.list() == [] and list((tmp_path / "inputs").iterdir()) == []
