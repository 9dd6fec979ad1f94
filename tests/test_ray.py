"""The queue on Ray workers: routing and retry (fake workers), the file updates, and a real local Ray
cluster on this CPU machine (2 CPU actors, the trained `tiny` model): six jobs finish with one load per
actor and two running at once, cancel stops a running job, a job no worker can run is refused before it
queues, and a job whose actor is killed mid-job is retried on the other, from its last finished section.

Needs Ray (`pip install 'framepack-turbo[ray]'`; the test extra has it): skipped without it on a developer
machine, failing in CI (CI=true).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest

from framepack_turbo.app import cluster
from framepack_turbo.app.jobs import JobStore
from framepack_turbo.app.queue import JobQueue, WorkerLost
from framepack_turbo.errors import InputError
from framepack_turbo.pipeline.events import SectionDone, StepProgress

from .test_queue import png

# ---- routing and retry, with fake workers ---------------------------------------------------------------


class FakeWorker:
    """Holds the models of one model name; records the jobs it ran; 'lose' in a prompt loses the worker."""

    def __init__(self, name, model=None, refuse=None):
        self.name, self.model, self.refuse = name, model, refuse
        self.ran, self.alive = [], True
        self.lose_next = False

    def holds(self, job):
        return self.model is not None and job.request.get("settings", {}).get("model") == self.model

    def refusal(self, settings):
        return self.refuse

    def __call__(self, job, cancel, on_event):
        self.ran.append(job.id)
        if "lose" in job.prompt and self.lose_next:
            raise WorkerLost("ActorDiedError: killed")
        on_event(SectionDone(1, 1, 9, job.video))


def _queue(tmp_path, workers):
    return JobQueue(JobStore(tmp_path / "jobs.sqlite"), workers, tmp_path)


def test_a_job_goes_to_the_free_worker_that_holds_its_models(tmp_path):
    a, b = FakeWorker("a", model="tiny"), FakeWorker("b", model="small")
    q = _queue(tmp_path, [a, b])
    small = q.submit(png(), {"prompt": "x", "settings": {"model": "small"}})
    tiny = q.submit(png(), {"prompt": "y", "settings": {"model": "tiny"}})
    assert q.run_one(0)  # a skips the older job: b is free and holds its models
    assert a.ran == [tiny.id]
    assert q.run_one(1) and b.ran == [small.id]
    other = q.submit(png(), {"prompt": "z", "settings": {"model": "tiny-random"}})
    assert q.run_one(1) and b.ran[-1] == other.id  # nobody holds it: the first free worker takes it


def test_a_lost_worker_gets_its_job_retried_once_on_another(tmp_path):
    a, b = FakeWorker("a"), FakeWorker("b")
    a.lose_next = b.lose_next = True
    q = _queue(tmp_path, [a, b])
    job = q.submit(png(), {"prompt": "lose it"})
    assert q.run_one(0)
    after = q.store.get(job.id)
    assert after.state == "queued" and after.retries[0]["worker"] == "a"
    assert "ActorDiedError" in after.retries[0]["reason"] and not after.request.get("resume")  # no state yet
    assert not q.run_one(0)  # a retry goes to another worker
    assert q.run_one(1)  # b loses it too: the second loss fails it, with the reason
    failed = q.store.get(job.id)
    assert failed.state == "failed" and failed.attempts == 2 and "worker b lost: ActorDiedError" in failed.error


def test_a_job_no_worker_can_run_is_refused_before_it_queues(tmp_path):
    q = _queue(tmp_path, [FakeWorker("a", refuse="needs CUDA"), FakeWorker("b", refuse="needs CUDA")])
    with pytest.raises(InputError, match="no worker can run this job: a: needs CUDA"):
        q.submit(png(), {"prompt": "x"})
    assert q.store.list() == []


class ComesBack(FakeWorker):
    """A worker Ray restarts: lost on a 'lose' job, back after `after` tries at bringing it back (never when
    `after` is None: given up after two)."""

    def __init__(self, name, after=2):
        super().__init__(name)
        self.after, self.tries, self.recoverable, self.lost_reason = after, 0, True, ""
        self.lose_next = True

    def __call__(self, job, cancel, on_event):
        if "lose" in job.prompt and self.lose_next:
            self.lose_next, self.alive, self.lost_reason = False, False, "ActorDiedError: SIGKILL"
            self.ran.append(job.id)
            raise WorkerLost(self.lost_reason)
        super().__call__(job, cancel, on_event)

    def recover(self):
        self.tries += 1
        if self.after is None:
            self.recoverable = self.tries < 2
            return False
        if self.tries < self.after:
            return False
        self.alive, self.lost_reason = True, ""
        return True


def _until(condition, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.01)
    raise AssertionError("timed out")


def test_the_only_worker_lost_comes_back_and_runs_what_waited(tmp_path, monkeypatch):
    """kill -9 of the only worker's process: its job is queued again, not failed; while no worker can run, new
    jobs and resumes are refused with the reason and the queued jobs say why they wait; once it is back they run."""
    from framepack_turbo.app import queue as queue_module

    monkeypatch.setattr(queue_module, "RECOVER_WAIT_S", 0.3, raising=False)
    worker = ComesBack("worker-0", after=3)
    q = _queue(tmp_path, [worker])
    lost = q.submit(png(), {"prompt": "lose it"})
    waiting = q.submit(png(), {"prompt": "after it"})
    failed = q.submit(png(), {"prompt": "x"})
    q.store.claim(failed.id)
    q.store.finish(failed.id, "failed", "boom")
    (Path(failed.video).with_suffix(".parts")).mkdir(parents=True)
    (Path(failed.video).with_suffix(".parts") / "state.safetensors").write_bytes(b"s")
    q.start()
    try:
        _until(lambda: not worker.alive)
        _until(lambda: q.store.get(waiting.id).error.startswith("waiting: no worker can run jobs now"))
        assert q.store.get(lost.id).state == "queued"  # retried once it is back, not failed
        with pytest.raises(InputError, match=r"worker-0 lost \(ActorDiedError: SIGKILL\); it is being brought back"):
            q.submit(png(), {"prompt": "new"})
        with pytest.raises(InputError, match="no worker can run jobs now"):
            q.resume(failed.id)
        _until(lambda: q.store.get(waiting.id).state == "done")
        assert q.store.get(lost.id).state == "done" and q.store.get(lost.id).attempts == 2
        assert q.store.get(waiting.id).error == "" and worker.tries == 3
        assert q.resume(failed.id) == "queued to resume"
        assert q.submit(png(), {"prompt": "new"}).state == "queued"
    finally:
        q.stop()


def test_a_worker_given_up_fails_what_waits_with_the_reason(tmp_path, monkeypatch):
    from framepack_turbo.app import queue as queue_module

    monkeypatch.setattr(queue_module, "RECOVER_WAIT_S", 0.05, raising=False)
    worker = ComesBack("worker-0", after=None)
    q = _queue(tmp_path, [worker])
    lost = q.submit(png(), {"prompt": "lose it"})
    waiting = q.submit(png(), {"prompt": "after it"})
    q.start()
    try:
        _until(lambda: q.store.get(waiting.id).state == "failed")
        for job in (q.store.get(lost.id), q.store.get(waiting.id)):
            assert job.state == "failed" and "worker-0 lost (ActorDiedError: SIGKILL); restart the server" in job.error
        with pytest.raises(InputError, match="restart the server"):
            q.submit(png(), {"prompt": "new"})
    finally:
        q.stop()


def test_an_old_store_gains_the_worker_columns(tmp_path):
    path = tmp_path / "jobs.sqlite"
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE jobs (id INTEGER PRIMARY KEY AUTOINCREMENT, state TEXT NOT NULL, created REAL NOT NULL, "
        "started REAL, finished REAL, request TEXT NOT NULL, image TEXT NOT NULL, video TEXT NOT NULL, "
        "error TEXT NOT NULL DEFAULT '', sections_done INTEGER NOT NULL DEFAULT 0, "
        "sections INTEGER NOT NULL DEFAULT 0, frames INTEGER NOT NULL DEFAULT 0)"
    )
    db.execute("INSERT INTO jobs (state, created, request, image, video) VALUES ('queued', 1, '{}', 'i', 'v')")
    db.commit()
    db.close()
    store = JobStore(path)
    job = store.claim_next("worker-3")
    assert job.worker == "worker-3" and job.attempts == 1 and job.retries == []


def test_a_retry_waits_for_the_lost_workers_lock_to_go_with_its_process(tmp_path, monkeypatch):
    """Ray reports a killed actor dead while its process still exits, holding the clip's lock: the retry on
    the same node waits for the lock (not refused: CI saw 'another job (pid N) is writing this clip'), and
    gives up waiting on a lock that stays (a live job, refused by the run)."""
    import subprocess
    import sys

    from framepack_turbo.pipeline.writer import ClipInUse, ClipLock

    out = tmp_path / "job-00001.mp4"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from framepack_turbo.pipeline.writer import ClipLock;"
            " ClipLock(sys.argv[1]).acquire(resume=True); print('held', flush=True); time.sleep(float(sys.argv[2]))",
            str(out),
            "1.5",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(ClipInUse):  # what the retry met without the wait
        ClipLock(out).acquire(resume=True)
    cluster._wait_for_the_lost_worker(out)
    assert holder.poll() is not None  # it waited for the holder's end, not a fixed time
    ClipLock(out).acquire(resume=True).release()
    with ClipLock(out):  # held for good: the wait ends at its limit and leaves the refusal to the run
        monkeypatch.setattr(cluster, "LOST_LOCK_WAIT_S", 0.3)
        cluster._wait_for_the_lost_worker(out)
        with pytest.raises(ClipInUse):
            ClipLock(out).acquire(resume=True)


# ---- the file updates ---------------------------------------------------------------------------------


def test_file_updates_send_changed_blocks_and_rebuild_the_files(tmp_path, monkeypatch):
    monkeypatch.setattr(cluster, "BLOCK", 16)
    worker, server = tmp_path / "worker", tmp_path / "server"
    video = worker / "videos" / "job-00001.mp4"
    parts = worker / "videos" / "job-00001.parts"
    parts.mkdir(parents=True)
    sync = cluster.FileSync(worker, "videos/job-00001.mp4")
    video.write_bytes(b"A" * 40)
    (parts / "state.safetensors").write_bytes(b"s1")
    first = sync.changes()
    assert cluster.FileSync(worker, "videos/job-00001.mp4").changes()["blocks"] == {}  # a retry's: had already
    assert cluster.apply_files(server, "videos/job-00001.mp4", first) == 42
    video.write_bytes(b"A" * 16 + b"B" * 16 + b"A" * 8 + b"C" * 20)  # one block changed, the tail grew
    (worker / "videos" / "job-00001.json").write_text("{}")
    second = sync.changes()
    assert sorted(second["blocks"]["videos/job-00001.mp4"][1]) == [1, 2, 3]  # block 0 is not sent again
    cluster.apply_files(server, "videos/job-00001.mp4", second)
    assert (server / "videos/job-00001.mp4").read_bytes() == video.read_bytes()
    assert json.loads((server / "videos/job-00001.json").read_text()) == {}
    video.write_bytes(b"D" * 10)  # shorter; the parts go (the finished clip)
    (parts / "state.safetensors").unlink()
    parts.rmdir()
    cluster.apply_files(server, "videos/job-00001.mp4", sync.changes())
    assert (server / "videos/job-00001.mp4").read_bytes() == b"D" * 10
    assert not (server / "videos/job-00001.parts").exists()


def test_bare_ray_flag_means_a_local_cluster():
    from framepack_turbo.cli import _bare_ray

    assert _bare_ray(["serve", "--ray"]) == ["serve", "--ray=local"]
    assert _bare_ray(["serve", "--ray", "--port", "1"]) == ["serve", "--ray=local", "--port", "1"]
    assert _bare_ray(["serve", "--ray", "auto"]) == ["serve", "--ray", "auto"]


def test_ray_missing_names_the_install(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(InputError, match=r"pip install 'framepack-turbo\[ray\]'"):
        cluster.require_ray()


def test_worker_info_reads_the_board(tmp_path):
    from typer.testing import CliRunner

    from framepack_turbo.cli import app

    board = cluster.WorkerBoard(tmp_path)
    board.update("worker-0", {"name": "worker-0", "state": "running", "device": "cpu", "model": "tiny", "job": 4})
    result = CliRunner().invoke(app, ["worker-info", "--data-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "No server is running" in result.output and "worker-0: running, cpu" in result.output
    assert "tiny" in result.output and "job 4" in result.output
    missing = CliRunner().invoke(app, ["worker-info", "--data-dir", str(tmp_path / "none")])
    assert missing.exit_code == 2 and "no Ray workers recorded" in missing.output


# ---- a real local Ray cluster ---------------------------------------------------------------------------

try:
    import ray
except ImportError:
    ray = None


RAY_JOB = {"seconds": 2, "steps": 3, "resolution": 64}  # 2 sections of the trained tiny model


@pytest.fixture(scope="module")
def ray_queue(tmp_path_factory):
    if ray is None:
        assert not os.environ.get("CI"), "CI installs Ray with the test extra"
        pytest.skip("Ray is not installed (pip install 'framepack-turbo[ray]')")
    data = tmp_path_factory.mktemp("ray-app")
    base = {"model": "tiny", "resolution": 64}
    workers = cluster.start_workers("local", base, data, workers=2, num_cpus=2)
    queue = JobQueue(JobStore(data / "jobs.sqlite"), workers, data, base=base)
    events: list[tuple[int, float, object]] = []
    on_event = queue._on_event

    def record(job, event):
        events.append((job.id, time.monotonic(), event))
        on_event(job, event)

    queue._on_event = record
    queue.events = events
    queue.start()
    yield queue
    queue.stop()
    ray.shutdown()


def _wait(queue, ids, timeout=600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = [queue.store.get(i) for i in ids]
        if all(j.state in ("done", "failed", "cancelled") for j in jobs):
            return jobs
        time.sleep(0.2)
    raise AssertionError(f"jobs {ids} did not finish: {[queue.store.get(i).state for i in ids]}")


@pytest.mark.cluster
def test_six_jobs_on_two_actors_each_loading_once(ray_queue, tmp_path):
    from framepack_turbo.app.queue import GenerationRunner
    from framepack_turbo.pipeline.video import read_frames, read_metadata

    jobs = ray_queue.submit_batch(png(), {"prompt": "a ball moves right", "options": {**RAY_JOB, "seed": 11}}, 6)
    done = _wait(ray_queue, [j.id for j in jobs])
    assert [j.state for j in done] == ["done"] * 6, [j.error for j in done]
    assert {j.worker for j in done} == {"worker-0", "worker-1"}
    infos = {w.name: w.describe() for w in ray_queue.workers}
    assert [infos[n]["loads"] for n in ("worker-0", "worker-1")] == [1, 1]  # models kept across jobs
    by_worker = {n: [j for j in done if j.worker == n] for n in infos}
    a, b = by_worker["worker-0"][0], by_worker["worker-1"][0]
    assert a.started < b.finished and b.started < a.finished  # they ran at the same time
    for job in done:
        assert job.frames == 73 and job.sections_done == 2
        sidecar = json.loads(Path(job.video).with_suffix(".json").read_text())
        assert sidecar["status"] == "complete" and not Path(job.video).with_suffix(".parts").exists()
        worker_root = cluster.actor_root(ray_queue.data_dir)
        assert worker_root not in json.dumps(sidecar)  # the record names this server's files
        assert sidecar["image"]["source"] == str(Path(job.image).resolve())
        assert sidecar["video"]["path"] == str(Path(job.video).resolve())
        assert worker_root not in json.dumps(read_metadata(job.video))
    # the video that came back is the one this process makes of the same job (same code; 1 torch thread each)
    local = done[0]
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref_queue = JobQueue(JobStore(tmp_path / "jobs.sqlite"), GenerationRunner({"model": "tiny"}), tmp_path)
        ref = ref_queue.submit(png(), {"prompt": "a ball moves right", "options": {**RAY_JOB, "seed": 11}})
        ref_queue.run_pending()
    finally:
        torch.set_num_threads(threads)
    remote_frames = read_frames(local.video).astype(np.int16)
    local_frames = read_frames(ref_queue.store.get(ref.id).video).astype(np.int16)
    assert remote_frames.shape == local_frames.shape
    assert np.array_equal(remote_frames, local_frames)  # bit for bit
    previews = [e for i, _, e in ray_queue.events if i == local.id and isinstance(e, StepProgress)]
    assert len(previews) == 6 and previews[-1].preview_frames().dtype == np.uint8  # progress streamed back


@pytest.mark.cluster
def test_cancel_reaches_the_running_actor_within_a_step(ray_queue):
    job = ray_queue.submit(png(), {"prompt": "a ball moves right", "options": {**RAY_JOB, "seconds": 6, "steps": 6}})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        live = ray_queue.lives.get(job.id)
        if live is not None and live.step >= 2:
            break
        time.sleep(0.02)
    steps = [e for i, _, e in ray_queue.events if i == job.id and isinstance(e, StepProgress)]
    at_cancel = len(steps)
    assert ray_queue.cancel(job.id) == "cancelling"
    (after,) = _wait(ray_queue, [job.id])
    assert after.state == "cancelled"
    later = [e for i, _, e in ray_queue.events if i == job.id and isinstance(e, StepProgress)][at_cancel:]
    # counted on the actor (steps still in the stream when cancel was called are not the actor's delay)
    (worker,) = [w for w in ray_queue.workers if w.name == after.worker]
    assert int(worker.last_cancel.split(" ")[0]) <= 1, worker.last_cancel  # at most the step under way
    assert len(steps) + len(later) < 6 * 4  # far from the whole clip


@pytest.mark.cluster
def test_a_job_needing_cuda_is_refused_on_a_cpu_cluster(ray_queue):
    before = len(ray_queue.store.list())
    with pytest.raises(InputError, match="no worker can run this job: worker-0: --device cuda needs CUDA"):
        ray_queue.submit(png(), {"prompt": "x", "settings": {"device": "cuda"}})
    assert len(ray_queue.store.list()) == before


@pytest.mark.cluster
def test_a_killed_actor_gets_its_job_retried_on_the_other(ray_queue):
    job = ray_queue.submit(png(), {"prompt": "a ball moves right", "options": {**RAY_JOB, "seconds": 4, "seed": 3}})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and ray_queue.store.get(job.id).sections_done < 1:
        time.sleep(0.05)
    running = ray_queue.store.get(job.id)
    assert running.state == "running" and running.sections_done >= 1
    victim = next(w for w in ray_queue.workers if w.name == running.worker)
    ray.kill(victim.actor)
    (after,) = _wait(ray_queue, [job.id])
    assert after.state == "done", after.error
    assert after.attempts == 2 and after.worker != running.worker
    (lost,) = after.retries
    assert lost["worker"] == running.worker and "ActorDiedError" in lost["reason"] and lost["sections_done"] >= 1
    sidecar = json.loads(Path(after.video).with_suffix(".json").read_text())
    assert sidecar["status"] == "complete" and sidecar["resumed"]  # it went on from its finished sections
    assert after.sections_done == 3 and after.frames == 109  # the whole clip
    # killed for good (no restart): a new actor takes its place, its models load on its next job
    _until(lambda: victim.alive, timeout=300)
    assert victim.describe()["state"] == "idle" and victim.describe()["loads"] == 0


@pytest.mark.cluster
def test_a_worker_whose_process_is_killed_comes_back_into_service(ray_queue):
    """kill -9 of a worker's process mid-job: Ray restarts the actor and the server takes it back (it was
    marked lost for good, its queue left waiting); the job finishes, and the worker runs jobs again."""
    import signal

    job = ray_queue.submit(png(), {"prompt": "a ball moves left", "options": {**RAY_JOB, "seconds": 4, "seed": 5}})
    _until(lambda: ray_queue.store.get(job.id).sections_done >= 1, timeout=300)
    running = ray_queue.store.get(job.id)
    victim = next(w for w in ray_queue.workers if w.name == running.worker)
    pid, restarts = victim.describe()["pid"], victim.restarts
    os.kill(pid, signal.SIGKILL)
    (after,) = _wait(ray_queue, [job.id])
    assert after.state == "done" and after.attempts == 2, after.error
    _until(lambda: victim.alive, timeout=300)
    assert victim.restarts == restarts + 1 and victim.describe()["pid"] != pid
    again = ray_queue.submit_batch(png(), {"prompt": "a ball moves left", "options": {**RAY_JOB, "seed": 8}}, 2)
    done = _wait(ray_queue, [j.id for j in again])
    assert [j.state for j in done] == ["done"] * 2 and {j.worker for j in done} == {"worker-0", "worker-1"}


@pytest.mark.cluster
def test_the_local_cluster_listens_on_loopback_only(ray_queue):
    """Every port the local cluster opened (the GCS, the raylet, the workers, and with Ray's dashboard extra the
    agent and the metrics endpoint, which has no token) is on 127.0.0.1: none on 0.0.0.0 or ::."""
    import psutil

    session = Path(ray._private.worker._global_node.get_session_dir_path()).name
    me = os.getpid()
    ours = {p.pid for p in psutil.Process(me).children(recursive=True)}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if session in " ".join(proc.info["cmdline"] or []):
            ours.add(proc.info["pid"])
    ours.discard(me)  # this test process: its own servers are other tests' (its Ray port is a worker's twin)
    listening = [
        (c.laddr.ip, c.laddr.port, c.pid)
        for c in psutil.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN and c.pid in ours
    ]
    assert len({pid for _, _, pid in listening}) >= 3, listening  # the GCS, the raylet, the actors
    assert all(ip in ("127.0.0.1", "::1", "::ffff:127.0.0.1") for ip, _, _ in listening), listening
    assert ray.util.get_node_ip_address() == "127.0.0.1"
