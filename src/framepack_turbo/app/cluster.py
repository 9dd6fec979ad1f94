"""The job queue on Ray actors (`framepack serve --ray`): one actor per GPU (or a configured number of CPU
actors), each keeping its models loaded across jobs, fed by the server's one `JobQueue`.

Ray does what a home-made layer would do worse: it places the actors on the cluster's GPUs, streams
each job's messages back (an actor method that is a generator: `num_returns="streaming"`), carries the
bytes through its object store, and reports an actor whose process or node died as `RayActorError`.
The server keeps the one record of truth (the SQLite store, the videos on its disk); an actor is a
`GenerationRunner` in another process. Per job the server sends the inputs (start image, end image,
keyframes, the video to extend) and, for a retry, the job's files so far; the actor runs the job under a
folder at the same path on every node (so a resume state made on one actor is valid on another) and
sends, after each section, the blocks of the job's files that changed: the mp4 (F1 appends: a section
costs its own bytes, not the whole file again), the sidecar, the resume state. The server writes them
atomically beside the job. With `--ray-shared-dir` the data dir is one folder every node sees at the
same path, and nothing is copied.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import queue as queue_module
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from framepack_turbo.app.jobs import Job
from framepack_turbo.app.queue import GenerationRunner, WorkerLost
from framepack_turbo.errors import Cancelled, InputError
from framepack_turbo.pipeline.events import CancelToken, JobDone, SectionDone, StepProgress

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'framepack-turbo[ray]'"
NAMESPACE = "framepack"
BLOCK = 1 << 20  # bytes: the unit of the file updates (a block that did not change is not sent again)
WORKERS_FILE = "workers.json"  # DATA_DIR/workers.json: what `framepack worker-info` shows
START_TIMEOUT_S = 600.0  # an actor that is not up by then could not be placed (or its import failed)
MAX_RESTARTS = 2  # Ray restarts a crashed actor (a node lost: on another node) this often; a kill is final
RESTART_WAIT_S = 120.0  # how long a lost actor may take to answer again (Ray restarting it) before a new one
RECOVER_TRIES = 3  # new actors that failed to start before a lost worker is given up
LOST_LOCK_WAIT_S = 60.0  # a retried job waits this long for the lost worker's clip lock to go with its process
LOOPBACK = "127.0.0.1"


class RemoteJobFailed(RuntimeError):
    """The job failed on its worker; the message is the worker's ("InputError: ...")."""

    def __init__(self, description: str) -> None:
        super().__init__(description)
        self.description = description


def require_ray():
    try:
        import ray
    except ImportError:
        raise InputError(f"--ray needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


def connect(address: str, num_cpus: int | None = None, dashboard: bool = False) -> str:
    """Join the cluster at `address` ("auto": the one `ray start` made on this machine; "host:port"; "ray://...")
    or, for "local", start one in this process, listening on this machine only (no dashboard unless asked).
    Returns what was joined, for the log."""
    ray = require_ray()
    if ray.is_initialized():
        return "the running Ray session"
    if address == "local":
        with _loopback_node():
            ray.init(
                namespace=NAMESPACE,
                num_cpus=num_cpus,
                include_dashboard=dashboard,
                dashboard_host=LOOPBACK,
                log_to_driver=True,
            )
        node = ray.util.get_node_ip_address()
        if node != LOOPBACK:
            log.warning("The local Ray cluster registered as %s, not %s: its ports face that network", node, LOOPBACK)
        return "a local Ray cluster (this machine)"
    try:
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=True)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise InputError(
            f"--ray {address}: could not join the Ray cluster ({exc}); is `ray start` running there?"
        ) from None
    return f"the Ray cluster at {address}"


class _loopback_node:
    """A local cluster's node on 127.0.0.1: every port it opens (the GCS, the raylet, the workers, the
    dashboard agent and the metrics endpoint, which has no token) then listens there and nowhere else; on
    its LAN address they face the network. `ray.init` turns a given `_node_ip_address` of 127.0.0.1 into the
    LAN address; Ray keeps the node on loopback where clusters are off (`ray_constants.ENABLE_RAY_CLUSTER`,
    macOS and Windows by default), so that is what it reads while this cluster starts."""

    def __enter__(self):
        from ray._private import ray_constants

        self._constants, self._before = ray_constants, getattr(ray_constants, "ENABLE_RAY_CLUSTER", True)
        ray_constants.ENABLE_RAY_CLUSTER = False
        return self

    def __exit__(self, *exc) -> None:
        self._constants.ENABLE_RAY_CLUSTER = self._before


# ---- the files of a job, both sides ------------------------------------------------------------------


def job_files(root: Path, video_rel: str) -> list[str]:
    """The files of the job whose video is `root/video_rel`, relative to root: the mp4, its sidecar, and its
    `.parts/` folder (segments, resume state)."""
    from framepack_turbo.pipeline.video import sidecar_path
    from framepack_turbo.pipeline.writer import parts_dir

    video = root / video_rel
    found = [p for p in (video, sidecar_path(video)) if p.is_file()]
    parts = parts_dir(video)
    try:
        found += sorted(p for p in parts.rglob("*") if p.is_file() and not p.name.startswith("."))
    except FileNotFoundError:  # none, or removed while listed (the writer drops it once the clip is whole)
        pass
    return [str(p.relative_to(root)) for p in found]


def _blocks(data: bytes) -> list[str]:
    return [hashlib.blake2b(data[i : i + BLOCK], digest_size=16).hexdigest() for i in range(0, len(data), BLOCK)]


class FileSync:
    """The actor's side: what the server has of a job's files (block digests), and what changed since."""

    def __init__(self, root: Path, video_rel: str) -> None:
        from framepack_turbo.pipeline.video import sidecar_path

        self.root, self.video_rel = root, video_rel
        self.sidecar_rel = str(sidecar_path(video_rel))
        self.sent: dict[str, tuple[int, list[str]]] = {}
        for rel in job_files(root, video_rel):  # a retry starts from the files the server sent
            data = (root / rel).read_bytes()
            self.sent[rel] = (len(data), _blocks(data))

    def changes(self, final: bool = False) -> dict[str, Any]:
        """{"present": every file now, "blocks": {file: (size, {block index: bytes})}} for what differs; the
        sidecar whole when it changed (the server puts its own paths in it). `final`: the job's last update."""
        present = job_files(self.root, self.video_rel)
        blocks: dict[str, tuple[int, dict[int, bytes]]] = {}
        for rel in present:
            try:
                data = (self.root / rel).read_bytes()
            except FileNotFoundError:  # replaced between the listing and the read: the next update has it
                continue
            digests = _blocks(data)
            size, before = self.sent.get(rel, (-1, []))
            changed = {
                i: data[i * BLOCK : (i + 1) * BLOCK]
                for i, d in enumerate(digests)
                if i >= len(before) or before[i] != d
            }
            if changed and rel == self.sidecar_rel:
                changed = {i: data[i * BLOCK : (i + 1) * BLOCK] for i in range(len(digests))}
            if changed or size != len(data):
                blocks[rel] = (len(data), changed)
                self.sent[rel] = (len(data), digests)
        for rel in set(self.sent) - set(present):
            del self.sent[rel]
        return {"present": present, "blocks": blocks, "root": str(self.root), "final": final}


def _remap(value: Any, old: str, new: str) -> Any:
    """`value` with every path under `old` moved under `new` (strings, in lists and dicts)."""
    if isinstance(value, str):
        return new + value[len(old) :] if value == old or value.startswith(old + os.sep) else value
    if isinstance(value, list):
        return [_remap(v, old, new) for v in value]
    if isinstance(value, dict):
        return {k: _remap(v, old, new) for k, v in value.items()}
    return value


def _server_paths(root: Path, video_rel: str, worker_root: str, final: bool) -> None:
    """The record names the server's files, not the worker's: the sidecar after every update, and the
    finished mp4's metadata once (a packet copy of the file; during the job its metadata names the worker's)."""
    from framepack_turbo.files import write_json
    from framepack_turbo.pipeline import video

    here = str(Path(root).resolve())
    sidecar = video.sidecar_path(root / video_rel)
    if sidecar.is_file():
        write_json(_remap(json.loads(sidecar.read_text()), worker_root, here), sidecar)
    mp4 = root / video_rel
    if final and mp4.is_file() and worker_root != here:
        meta = video.read_metadata(mp4)
        if meta is not None:
            meta.pop("format", None)
            video.join([mp4], mp4, metadata=_remap(meta, worker_root, here), index_first=True)


def apply_files(root: Path, video_rel: str, update: dict[str, Any]) -> int:
    """The server's side: each changed file rebuilt from its copy here and the new blocks, written
    atomically (the resume state and segments first, the mp4 and then the sidecar last, so a file here
    never names a section whose state is not here yet); the job's files the worker no longer has are
    removed; the record's paths made this server's. Returns the bytes received."""
    from framepack_turbo.files import atomic_path

    def order(rel: str) -> int:
        return (
            2
            if rel.endswith(".json") and ".parts" not in rel
            else 1
            if rel.endswith(".mp4") and ".parts" not in rel
            else 0
        )

    received = 0
    for rel in sorted(update["blocks"], key=order):
        size, changed = update["blocks"][rel]
        target = root / rel
        data = bytearray(target.read_bytes()) if target.is_file() else bytearray()
        for index, chunk in changed.items():
            start = index * BLOCK
            if len(data) < start:
                data.extend(b"\0" * (start - len(data)))
            data[start : start + len(chunk)] = chunk
            received += len(chunk)
        del data[size:]
        with atomic_path(target) as tmp:
            Path(tmp).write_bytes(data)
    present = set(update["present"])
    for rel in job_files(root, video_rel):
        if rel not in present:
            (root / rel).unlink(missing_ok=True)
    from framepack_turbo.pipeline.writer import parts_dir

    parts = parts_dir(root / video_rel)
    if parts.is_dir() and not any(parts.iterdir()):
        parts.rmdir()
    if update.get("root"):
        _server_paths(root, video_rel, update["root"], update.get("final", False))
    return received


def _map_paths(job: dict[str, Any], fn: Callable[[str], str]) -> dict[str, Any]:
    """The job (as a dict) with each file path it names passed through `fn`."""
    options = dict(job["request"].get("options", {}))
    for key in ("video", "end_image"):
        if options.get(key):
            options[key] = fn(options[key])
    if options.get("keyframes"):
        options["keyframes"] = [[at, fn(path)] for at, path in options["keyframes"]]
    request = {**job["request"], "options": options}
    return {**job, "request": request, "image": fn(job["image"]), "video": fn(job["video"])}


def _input_paths(job: dict[str, Any]) -> list[str]:
    options = job["request"].get("options", {})
    paths = [job["image"], options.get("video"), options.get("end_image")]
    paths += [path for _, path in options.get("keyframes") or ()]
    return [p for p in paths if p]


# ---- the actor -----------------------------------------------------------------------------------------


class FramePackActor:
    """One worker process on the cluster: a `GenerationRunner` (models loaded on the first job and kept
    while jobs can share them) and the job's messages streamed back. Ray runs its methods on threads
    (`max_concurrency`), so `cancel` and `info` answer while `run` works."""

    def __init__(self, base: dict[str, Any], name: str, root: str, cwd: str) -> None:
        from framepack_turbo.hardware import Hardware

        if Path(cwd).is_dir():  # relative settings (a model folder) mean what they mean on the server
            os.chdir(cwd)
        self.name, self.root = name, Path(root)
        self.runner = GenerationRunner(base)
        self.hardware = Hardware.detect()
        self.job: int | None = None
        self.key: str | None = None
        self._tokens: dict[int, CancelToken] = {}
        self._steps: dict[int, int] = {}  # steps the running job made so far
        self._steps_at_cancel: dict[int, int] = {}

    def info(self) -> dict[str, Any]:
        loaded = self.runner._loaded
        return {
            "name": self.name,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "device": self.hardware.device_name,
            "cuda": self.hardware.cuda,
            "vram_gb": self.hardware.total_vram_gb,
            "threads": _torch_threads(),
            "model": loaded.settings.model if loaded is not None else None,
            "key": self.key,
            "loads": self.runner.loads,
            "job": self.job,
        }

    def get_hardware(self):
        return self.hardware

    def rendezvous(self) -> tuple[str, int]:
        """Rank 0 of a worker group: where the others meet it (its node's address and a free port there)."""
        import ray

        from framepack_turbo.launch import free_port

        return ray.util.get_node_ip_address(), free_port()

    def join(self, rank: int, world: int, address: str, port: int):
        """Become rank `rank` of a worker group before any job: the variables torchrun would set (Ray gives the
        actor its one GPU, so it is local device 0); the process group starts with the first job's load. A
        follower keeps its files apart from rank 0's (same node, same job), though it writes none."""
        from framepack_turbo.hardware import Hardware

        os.environ.update(
            RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0", MASTER_ADDR=address, MASTER_PORT=str(port)
        )
        if rank:
            self.root = self.root / f"rank{rank}"
        self.hardware = Hardware.detect()
        return self.hardware

    def cancel(self, job_id: int) -> bool:
        token = self._tokens.get(job_id)
        if token is not None:
            self._steps_at_cancel.setdefault(job_id, self._steps.get(job_id, 0))
            token.cancel()
        return token is not None

    def run(self, payload: dict[str, Any]):
        """Run one job; yields ("event", event), ("files", update), and last ("end", state, message)."""
        from framepack_turbo.api import load_key

        shared = payload["shared"]
        root = Path(payload["root"]) if shared else self.root
        for rel, data in payload["files"].items():
            target = root / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        if shared:
            job = Job(**payload["job"])
        else:
            for rel in job_files(root, payload["job"]["video"]):  # an earlier try's files, not sent: not ours
                if rel not in payload["files"]:
                    (root / rel).unlink()
            job = Job(**_map_paths(payload["job"], lambda rel: str(root / rel)))
        if job.attempts > 1:
            _wait_for_the_lost_worker(Path(job.video))
        sync = None if shared else FileSync(root, payload["job"]["video"])
        token = CancelToken()
        self._tokens[job.id], self.job = token, job.id
        messages: queue_module.Queue = queue_module.Queue()

        def on_event(event: Any) -> None:
            if isinstance(event, StepProgress):
                self._steps[job.id] = self._steps.get(job.id, 0) + 1
            messages.put(("event", event))

        def work() -> None:
            try:
                self.runner(job, token, on_event)
                messages.put(("end", "done", ""))
            except Cancelled:  # the message: how many steps ran after the cancel reached this actor
                after = self._steps.get(job.id, 0) - self._steps_at_cancel.get(job.id, 0)
                messages.put(("end", "cancelled", f"{after} step(s) after the cancel arrived"))
            except BaseException as exc:  # every failure goes back to the server as the job's
                log.exception("Job %d failed on %s", job.id, self.name)
                messages.put(("end", "failed", f"{type(exc).__name__}: {exc}"))

        thread = threading.Thread(target=work, name=f"framepack-job-{job.id}", daemon=True)
        thread.start()
        try:
            while True:
                message = messages.get()
                if message[0] == "end":
                    thread.join()
                    if self.runner._loaded is not None:
                        self.key = load_key(self.runner._loaded.settings, self.hardware)
                    if sync is not None:
                        yield ("files", sync.changes(final=True))
                    yield message
                    return
                event = message[1]
                if isinstance(event, StepProgress):
                    yield ("event", event.detached())
                    continue
                if isinstance(event, SectionDone) and sync is not None:  # the section is in the file: send it
                    yield ("files", sync.changes())
                yield ("event", event)
        finally:
            self._tokens.pop(job.id, None)
            self._steps.pop(job.id, None)
            self._steps_at_cancel.pop(job.id, None)
            self.job = None


def _wait_for_the_lost_worker(video: Path) -> None:
    """A retried job may start on this node before the lost worker's process has gone: Ray reports an actor
    dead (`ray.kill`, a crash) while its process is still exiting, and that process holds the clip's lock
    (writer.ClipLock) until it has. The lock goes with the process; wait for that instead of refusing the
    retry. A lock still held after LOST_LOCK_WAIT_S is a live job: the run then refuses it, named."""
    from framepack_turbo.pipeline.writer import ClipInUse, ClipLock

    deadline = time.monotonic() + LOST_LOCK_WAIT_S
    while True:
        try:
            ClipLock(video).acquire(resume=True).release()
            return
        except ClipInUse:
            if time.monotonic() > deadline:
                return
            time.sleep(0.2)


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


# ---- the server's side of one actor -------------------------------------------------------------------


class WorkerBoard:
    """DATA_DIR/workers.json: each worker's device, loaded model and current job, rewritten on every change
    (atomically), for `framepack worker-info` and the page."""

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / WORKERS_FILE
        self.rows: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def update(self, name: str, row: dict[str, Any]) -> None:
        from framepack_turbo.files import write_json

        with self._lock:
            self.rows[name] = {**self.rows.get(name, {}), **row, "updated": time.time()}
            write_json({"pid": os.getpid(), "workers": list(self.rows.values())}, self.path)


class RayWorker:
    """A queue worker that runs its jobs on one Ray actor, or on a group of them (`followers`: ranks 1..N-1 of
    a context-parallel job; `actor` is rank 0, the one whose messages and files come back)."""

    def __init__(
        self,
        actor,
        name: str,
        hardware,
        base: dict[str, Any],
        data_dir: Path,
        shared: bool,
        board,
        followers=(),
        respawn: Callable[[], tuple[Any, list[Any], Any]] | None = None,
    ) -> None:
        """`respawn`: starts this worker's actors again (rank 0, the followers, rank 0's hardware), for `recover`."""
        self.actor, self.name, self.hardware = actor, name, hardware
        self.followers = list(followers)
        self.base, self.data_dir, self.shared, self.board = dict(base), Path(data_dir).resolve(), shared, board
        self.respawn = respawn
        self.alive = True
        self.recoverable = respawn is not None or not self.followers  # it can come back after a loss
        self.lost_reason = ""
        self.restarts = 0  # times it came back (re-attached or re-created)
        self._failed_starts = 0
        self.key: str | None = None
        self._keys: dict[int, str] = {}
        self.received_bytes = 0
        self.last_cancel = ""  # the actor's word on the last cancelled job ("1 step(s) after the cancel arrived")

    # ---- routing and admission
    def _settings(self, job_settings: dict[str, Any]):
        from framepack_turbo.settings import Settings

        return Settings.load({**self.base, **job_settings}, source="api")

    def holds(self, job: Job) -> bool:
        """Its loaded models serve this job without a reload."""
        if self.key is None:
            return False
        if job.id not in self._keys:
            from framepack_turbo.api import load_key

            self._keys[job.id] = load_key(self._settings(job.request.get("settings", {})), self.hardware)
        return self._keys[job.id] == self.key

    def refusal(self, settings) -> str | None:
        from framepack_turbo import compat

        device = settings.device or ""
        if device.startswith("cuda") and not self.hardware.cuda:
            return f"--device {device} needs CUDA, and this worker runs on {self.hardware.device_name}"
        critical = compat.check(settings, self.hardware).critical
        return f"{critical[0].id}: {critical[0].message}" if critical else None

    # ---- one job
    def _payload(self, job: Job) -> dict[str, Any]:
        job_dict = {f.name: getattr(job, f.name) for f in dataclasses.fields(Job)}
        if self.shared:
            return {"job": job_dict, "files": {}, "shared": True, "root": str(self.data_dir)}

        def rel(path: str) -> str:
            resolved = Path(path).resolve()
            try:
                return str(resolved.relative_to(self.data_dir))
            except ValueError:
                raise InputError(f"{path}: outside the data dir, so the workers cannot be sent it") from None

        mapped = _map_paths(job_dict, rel)
        files = {p: (self.data_dir / p).read_bytes() for p in _input_paths(mapped)}
        if job.request.get("resume"):  # the job's files so far go with it: the worker goes on from them
            files.update({p: (self.data_dir / p).read_bytes() for p in job_files(self.data_dir, mapped["video"])})
        return {"job": mapped, "files": files, "shared": False, "root": ""}

    def __call__(self, job: Job, cancel: CancelToken, on_event: Callable[[Any], None]) -> None:
        ray = require_ray()
        payload = self._payload(job)
        video_rel = payload["job"]["video"]
        self.board.update(self.name, {"job": job.id, "state": "running"})
        # every rank runs the job (they meet in each step's collectives); only rank 0 reports and writes
        followers = [f.run.options(num_returns="streaming").remote(payload) for f in self.followers]
        stream = self.actor.run.options(num_returns="streaming").remote(payload)
        done = threading.Event()

        def forward_cancel() -> None:  # the actor checks its token every step, as a local job does
            while not done.is_set():
                if cancel.wait(0.05):
                    self.actor.cancel.remote(job.id)
                    return

        threading.Thread(target=forward_cancel, name=f"framepack-cancel-{job.id}", daemon=True).start()
        end = None
        try:
            for ref in stream:
                kind, *rest = ray.get(ref)
                if kind == "files":
                    self.received_bytes += apply_files(self.data_dir, video_rel, rest[0])
                elif kind == "event":
                    on_event(_here(rest[0], job))
                else:
                    end = rest
            for rank, follower in enumerate(followers, start=1):  # their end, after rank 0's: a failed rank fails it
                for ref in follower:
                    kind, *rest = ray.get(ref)
                    if kind == "end" and rest[0] == "failed" and end and end[0] != "failed":
                        end = ["failed", f"rank {rank}: {rest[1]}"]
        except _lost_errors() as exc:
            # the queue's thread brings it back (`recover`): the actor Ray restarts, or a new one
            self.alive, self.key = False, None  # a restarted actor has no models loaded
            self.lost_reason = _first_line(exc)
            self.board.update(self.name, {"job": None, "state": "lost", "reason": self.lost_reason})
            raise WorkerLost(self.lost_reason) from None
        finally:
            done.set()
        self._refresh()
        state, message = end if end else ("failed", "the worker ended the job without a result")
        if state == "cancelled":
            self.last_cancel = message
            log.info("Job %d cancelled on %s: %s", job.id, self.name, message)
            raise Cancelled("cancelled")
        if state == "failed":
            raise RemoteJobFailed(message)

    def recover(self) -> bool:
        """After a loss, one try at serving again: the actor Ray restarted answers (re-attached), or, dead for
        good (killed, its restarts spent, no answer in RESTART_WAIT_S), new actors replace it (re-created). A
        group always starts again whole: its process group broke, and a restarted rank would not be one of its
        ranks. Models load on the next job. False while it is not back; after RECOVER_TRIES failed starts it is
        given up (`recoverable` False) and says why."""
        if self.alive:
            return True
        if not self.followers and self._answers():
            return self._back("Ray restarted its actor")
        if self.respawn is None:
            self.recoverable = False
            return False
        ray = require_ray()
        for actor in (self.actor, *self.followers):  # a rank still running holds a GPU the new group needs
            try:
                ray.kill(actor, no_restart=True)
            except Exception as exc:  # already gone: nothing to free
                log.debug("%s: %s", self.name, exc)
        self.board.update(self.name, {"state": "starting again"})
        try:
            self.actor, followers, self.hardware = self.respawn()
        except Exception as exc:  # it could not be placed or started: try again later, then give up
            self._failed_starts += 1
            self.lost_reason = f"{self.lost_reason}; starting it again failed: {_first_line(exc)}"
            self.recoverable = self._failed_starts < RECOVER_TRIES
            self.board.update(self.name, {"state": "lost", "reason": self.lost_reason})
            log.warning("Worker %s could not be started again: %s", self.name, exc)
            return False
        self.followers = list(followers)
        return self._back("started again")

    def _answers(self) -> bool:
        """Whether the actor answers: Ray is restarting it while the calls raise ActorUnavailableError."""
        ray = require_ray()
        import ray.exceptions as rex

        deadline = time.monotonic() + RESTART_WAIT_S
        while time.monotonic() < deadline:
            try:
                ray.get(self.actor.info.remote(), timeout=max(1.0, deadline - time.monotonic()))
                return True
            except getattr(rex, "ActorUnavailableError", ()):  # restarting: ask again
                time.sleep(1.0)
            except Exception:  # dead for good, or no answer in time
                return False
        return False

    def _back(self, how: str) -> bool:
        self.alive, self.key, self.lost_reason, self._failed_starts = True, None, "", 0
        self.restarts += 1
        self.board.update(self.name, {"reason": None, "restarts": self.restarts})
        self._refresh()
        log.warning("Worker %s is back (%s); its models load on its next job", self.name, how)
        return True

    def _refresh(self) -> None:
        ray = require_ray()
        info = ray.get(self.actor.info.remote(), timeout=60)
        self.key = info.pop("key")
        self.board.update(self.name, {**info, "ranks": 1 + len(self.followers), "state": "idle"})

    def describe(self) -> dict[str, Any]:
        return dict(self.board.rows.get(self.name, {"name": self.name}))


def _lost_errors() -> tuple[type[BaseException], ...]:
    import ray.exceptions as rex

    return tuple(
        getattr(rex, name)
        for name in ("RayActorError", "ObjectLostError", "OwnerDiedError", "WorkerCrashedError", "NodeDiedError")
        if hasattr(rex, name)
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    reason = next((line for line in text if "actor is dead because" in line.lower()), text[0] if text else "")
    return f"{type(exc).__name__}: {reason.strip()}"


def _here(event: Any, job: Job) -> Any:
    """An event from the actor with the server's paths in it."""
    if isinstance(event, SectionDone | JobDone) and event.video_path is not None:
        return dataclasses.replace(event, video_path=Path(job.video))
    return event


# ---- starting the actors -------------------------------------------------------------------------------


def actor_root(data_dir: Path) -> str:
    """Where the actors keep a job's files: the same path on every node (a resume state records its paths),
    one per server (host and data dir)."""
    key = hashlib.sha256(f"{socket.gethostname()}:{Path(data_dir).resolve()}".encode()).hexdigest()[:12]
    return str(Path(tempfile.gettempdir()) / "framepack-ray" / key)


def start_workers(
    address: str,
    base: dict[str, Any],
    data_dir: Path,
    workers: int | None = None,
    cpus_per_worker: int | None = None,
    shared: bool = False,
    dashboard: bool = False,
    num_cpus: int | None = None,
    ranks: int = 1,
) -> list[RayWorker]:
    """Join or start the cluster and start the workers: one actor per GPU (`num_gpus=1`), or on a CPU-only
    cluster `workers` CPU actors (default 1) with the cluster's CPUs shared out; each reports its hardware.

    `ranks` > 1 (PARALLEL_DEGREE): each worker is a group of that many actors, packed on one node by a placement
    group (the ranks talk every block: NVLink, not the network), forming one context-parallel process group;
    `workers` then counts groups, `cpus_per_worker` is per actor."""
    ray = require_ray()
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    where = connect(address, num_cpus=num_cpus, dashboard=dashboard)
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
    group = "" if ranks == 1 else f" of {ranks} ranks"
    if gpus:
        count = workers or max(1, gpus // ranks)
        if count * ranks > gpus:
            raise InputError(f"--ray-workers {count}{group}: the cluster has {gpus} GPU(s); one actor per GPU")
        per = cpus_per_worker or max(1, cpus // (count * ranks))
        bundle = {"GPU": 1, "CPU": per}
    else:
        count = workers or 1
        per = cpus_per_worker or max(1, cpus // (count * ranks))
        if count * ranks * per > cpus:
            raise InputError(
                f"--ray-workers {count}{group} with {per} CPU(s) each: the cluster has {cpus} CPU(s) and no GPU; "
                "ask for fewer workers or CPUs per worker"
            )
        bundle = {"CPU": per}
    options = {"num_gpus": bundle.get("GPU", 0), "num_cpus": per}
    log.info("Ray: %s, %d GPU(s), %d CPU(s): starting %d worker(s)%s with %s", where, gpus, cpus, count, group, options)
    server = hashlib.sha256(f"{socket.gethostname()}:{os.getpid()}".encode()).hexdigest()[:8]
    root, cwd = actor_root(data_dir), os.getcwd()
    remote = ray.remote(FramePackActor)
    restarts = MAX_RESTARTS if ranks == 1 else 0  # a restarted rank would not rejoin its group
    generations = [0] * count  # a worker started again gets new actor names (the dead one's may linger)

    def spawn(i: int, placement: dict[str, Any]) -> list[Any]:
        again = f"-again{generations[i]}" if generations[i] else ""
        return [
            remote.options(
                name=f"framepack-{server}-{i}" + (f"-rank{r}" if ranks > 1 else "") + again,
                max_restarts=restarts,
                max_concurrency=4,
                **options,
                **placement,
            ).remote(base, f"worker-{i}", root, cwd)
            for r in range(ranks)
        ]

    def ready(groups: list[list[Any]]) -> list[Any]:
        """Each group's rank-0 hardware, once every actor is up (and, for a group, has joined its ranks)."""
        try:
            if ranks > 1:
                meeting = ray.get([g[0].rendezvous.remote() for g in groups], timeout=START_TIMEOUT_S)
                return [
                    ray.get([a.join.remote(r, ranks, *meet) for r, a in enumerate(g)], timeout=START_TIMEOUT_S)[0]
                    for g, meet in zip(groups, meeting)
                ]
            return ray.get([g[0].get_hardware.remote() for g in groups], timeout=START_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise InputError(
                f"Ray could not start {len(groups)} worker(s){group} with {options} in {START_TIMEOUT_S:.0f} s: the "
                f"cluster has {gpus} GPU(s) and {cpus} CPU(s) free at most (`ray status` shows what is used)"
            ) from None

    placements = []
    for _ in range(count):
        placement = {}
        if ranks > 1:
            pg = placement_group([bundle] * ranks, strategy="STRICT_PACK")
            placement = {"scheduling_strategy": PlacementGroupSchedulingStrategy(placement_group=pg)}
        placements.append(placement)
    groups = [spawn(i, placements[i]) for i in range(count)]
    hardware = ready(groups)

    def respawner(i: int) -> Callable[[], tuple[Any, list[Any], Any]]:
        def again() -> tuple[Any, list[Any], Any]:  # the same placement group: the old ranks' bundles are free
            generations[i] += 1
            actors = spawn(i, placements[i])
            return actors[0], actors[1:], ready([actors])[0]

        return again

    board = WorkerBoard(data_dir)
    made = [
        RayWorker(g[0], f"worker-{i}", hw, base, data_dir, shared, board, followers=g[1:], respawn=respawner(i))
        for i, (g, hw) in enumerate(zip(groups, hardware))
    ]
    for worker in made:
        worker._refresh()
    return made


def read_board(data_dir: Path) -> dict[str, Any]:
    """DATA_DIR/workers.json as the server last wrote it; InputError when there is none."""
    path = Path(data_dir) / WORKERS_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(
            f"{path}: no Ray workers recorded there (start `framepack serve --ray --data-dir {data_dir}`)"
        ) from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not readable ({exc})") from None
