"""The job queue: jobs from the page or the API run on workers, one job at a time each, one thread per
worker: one in-process worker by default (one GPU), or Ray actors (`app/cluster.py`, `serve --ray`).

`JobQueue.submit` checks the start image and the request before anything is queued, stores its own
PNG copy of the image and names the output after the job id. A free worker claims the oldest queued
job it should take (one whose models it holds, unless another free worker holds them), runs it through
its `Runner`, and records the outcome; an exception fails that job only, and the queue goes on. A worker
lost mid-job (`WorkerLost`: its process or node died) gets the job retried once on another worker, from
its last finished section. What each running job is doing (step, section, ETA, latent preview, cache
hit rates) is kept in memory for the page; the states are in the SQLite store.
"""

from __future__ import annotations

import io
import json
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from framepack_turbo.app.jobs import Job, JobStore
from framepack_turbo.errors import Cancelled, InputError
from framepack_turbo.pipeline.events import CancelToken, Notice, SectionDone, StepProgress

log = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = 20 << 20
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP")
MAX_VIDEO_UPLOAD_BYTES = 500 << 20
MAX_VIDEO_UPLOAD_SECONDS = 10 * 60.0


MAX_ATTEMPTS = 2  # a job whose worker is lost is retried once; lost again, it fails
RECOVER_WAIT_S = 5.0  # between two tries at bringing a lost worker back


class Runner(Protocol):
    """Runs one job. A worker may also have `name`, `holds(job)` (its loaded models serve the job without a
    reload: routing prefers it), `refusal(settings)` (why it cannot run these settings, or None), `alive`,
    and, to come back after a loss, `recover()` (True once it serves again), `recoverable` (False once it is
    given up) and `lost_reason`; plain callables run anything."""

    def __call__(self, job: Job, cancel: CancelToken, on_event: Callable[[Any], None]) -> None: ...


class WorkerLost(RuntimeError):
    """The worker's process (or its machine) went away mid-job: not the job's fault, so it is retried."""


def worker_name(worker: Any) -> str:
    return getattr(worker, "name", "local")


@dataclass
class Live:
    """What the page shows of the running job."""

    job_id: int
    step: int = 0
    steps: int = 0
    section: int = 0
    sections: int = 0
    eta_s: float | None = None
    fraction: float = 0.0
    preview: np.ndarray | None = None  # (T, h, w, 3) uint8 latent-size frames of the current x0 estimate
    notices: list[str] = field(default_factory=list)
    cache_timeline: list[dict[str, Any]] = field(default_factory=list)  # per finished section: {cache: hit rate}


# Settings whose refusal the CLI already words (its range and type), under the names the job's options use.
_SETTING_OPTIONS = ("seconds", "steps", "window", "distilled_guidance", "cfg", "guidance_rescale", "resolution", "crf")
LARGEST_NUMBER = 2**63  # no number a job takes is this large (the seed's range ends just below it)


def check_number(value: Any, name: str, whole: bool = False) -> int | float:
    """A number from a form or the web API (any JSON value: NaN, inf, 1e308, "many", true), checked: finite,
    in the range anything takes, whole where an integer is wanted (then an int). One line naming `name`."""
    from framepack_turbo.text import shown

    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InputError(f"{name}={shown(repr(value))[:40]}: must be a number")
    if isinstance(value, float) and not math.isfinite(value):
        raise InputError(f"{name}={value}: must be a finite number")
    if abs(value) >= LARGEST_NUMBER:
        raise InputError(f"{name}={value:g}: out of range (at most 2^63-1)")
    if whole:
        if isinstance(value, float) and not value.is_integer():
            raise InputError(f"{name}={value:g}: must be a whole number")
        return int(value)
    return value


def check_options(asked: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """A request's options with every number checked (`check_number`: NaN, inf, huge and wrongly typed values
    refused naming the option) and whole ones made ints; those the settings also hold are checked against the
    settings' ranges, so the API refuses what the CLI refuses, in its words."""
    import dataclasses

    from framepack_turbo.pipeline.options import OPTION_SETTING_NAMES, GenerateOptions
    from framepack_turbo.settings import Settings, SettingsError

    kinds = {f.name: f.type for f in dataclasses.fields(GenerateOptions)}
    checked = dict(asked)
    for name, value in asked.items():
        kind = kinds.get(name)
        if name == "seed" and value == "random":
            continue
        if kind in ("int", "float"):
            checked[name] = check_number(value, name, whole=kind == "int")
    as_settings = {OPTION_SETTING_NAMES.get(n, n): checked[n] for n in _SETTING_OPTIONS if n in checked}
    if as_settings:
        try:
            Settings.load({**base, **as_settings}, source="api")
        except SettingsError as exc:
            text = str(exc)
            for option, setting in OPTION_SETTING_NAMES.items():  # the option's name, as it was sent
                if option in checked and text.startswith(setting + "="):
                    text = option + text[len(setting) :]
            raise InputError(text) from None
    return checked


def check_upload(data: bytes) -> np.ndarray:
    """An uploaded image, checked: size, a real image of an allowed type, sides in range (from the header,
    before decoding); RGB array."""
    from framepack_turbo.pipeline.options import decode_rgb, load_image, open_checked

    if len(data) > MAX_UPLOAD_BYTES:
        raise InputError(f"image is {len(data) / 2**20:.1f} MB; the limit is {MAX_UPLOAD_BYTES >> 20} MB")
    im = open_checked(io.BytesIO(data), "the upload")
    if im.format not in IMAGE_FORMATS:
        im.close()
        raise InputError(f"image type {im.format or 'unknown'} is not accepted; use {', '.join(IMAGE_FORMATS)}")
    return load_image(decode_rgb(im, "the upload"))


def check_video_upload(data: bytes, path: Path):
    """An uploaded video to extend, checked by its content (container, codec, sides, length) and stored at
    `path`; the `InputVideo`. Nothing is kept when it is refused."""
    from framepack_turbo.pipeline import extend

    if len(data) > MAX_VIDEO_UPLOAD_BYTES:
        raise InputError(f"video is {len(data) / 2**20:.0f} MB; the limit is {MAX_VIDEO_UPLOAD_BYTES >> 20} MB")
    path.write_bytes(data)
    try:
        return extend.probe_video(path, max_seconds=MAX_VIDEO_UPLOAD_SECONDS)
    except InputError as exc:
        path.unlink(missing_ok=True)
        raise InputError(str(exc).replace(str(path), "the video upload")) from None


class JobQueue:
    def __init__(
        self,
        store: JobStore,
        runner: Runner | list[Runner],
        data_dir: str | Path,
        poll_s: float = 0.25,
        base: dict[str, Any] | None = None,
    ) -> None:
        """`runner`: one worker, or several (each runs one job at a time, on its own thread). `base`: the
        server's settings (its flags), under each request's."""
        self.workers: list[Runner] = list(runner) if isinstance(runner, list | tuple) else [runner]
        self.store, self.runner, self.poll_s = store, self.workers[0], poll_s
        self.base = dict(base or {})
        self.data_dir = Path(data_dir)
        self.inputs, self.videos = self.data_dir / "inputs", self.data_dir / "videos"
        self.inputs.mkdir(parents=True, exist_ok=True)
        self.videos.mkdir(parents=True, exist_ok=True)
        self.lives: dict[int, Live] = {}  # running job id -> what it is doing
        self._last: Live | None = None  # the last finished job's (its cache timeline stays readable)
        self._tokens: dict[int, CancelToken] = {}
        self._busy: set[int] = set()  # indices of the workers running a job
        self._route = threading.Lock()  # one claim at a time: routing looks at which workers are free
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        recovered = store.recover()
        if recovered:
            log.warning("Jobs %s were running when the server stopped: marked failed", recovered)
        for job_id in recovered:
            _mark_sidecar_failed(store.get(job_id))

    # ---- from the page / API -------------------------------------------------------------------

    def submit(self, image: bytes | np.ndarray, request: dict[str, Any]) -> Job:
        """Check and queue one clip. `request`: prompt, negative_prompt, options (GenerateOptions fields), settings."""
        return self.submit_batch(image, request, 1)[0]

    def submit_batch(
        self,
        image: bytes | np.ndarray | None,
        request: dict[str, Any],
        count: int,
        end_image: bytes | None = None,
        keyframes: list[tuple[float, bytes]] = (),
        video: bytes | None = None,
    ) -> list[Job]:
        """Check and queue `count` clips of one request, seeds seed, seed+1, ... (options seed "random" draws
        the first, and the jobs record the numbers). One job per clip, so each clip can be cancelled, shows
        its own progress and video, and survives a restart on its own; `request["batch"]` groups them.
        `end_image` and `keyframes` (time, image) are uploads too: checked and stored like the start image.
        `video`: a clip to extend instead of a start image (its last frame is the job's picture)."""
        from PIL import Image

        from framepack_turbo.api import batch_seeds, options_from_settings
        from framepack_turbo.pipeline.encode import nearest_bucket
        from framepack_turbo.pipeline.options import load_image
        from framepack_turbo.settings import Settings

        stamp = f"{time.time_ns():x}"
        if video is not None and image is not None:
            raise InputError("a video to extend starts from its own last frame: give no start image")
        if video is None and image is None:
            raise InputError("a start image (or a video to extend) is needed")
        prompt = request.get("prompt", "")
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError("a prompt is needed")
        # The job's options in full (the server's defaults under the request's), so the seeds and the
        # bucket are known now and a queued job runs what it showed whatever the server restarts with.
        settings = Settings.load({**self.base, **request.get("settings", {})}, source="api")
        self._check_servable(settings)
        asked = check_options(dict(request.get("options", {})), {**self.base, **request.get("settings", {})})
        seeds = batch_seeds(asked.pop("seed", settings.seed), count)
        times = [check_number(t, f"keyframe {i + 1} time") for i, (t, _) in enumerate(keyframes)]
        source = None
        if video is not None:  # stored to be probed: removed below when anything refuses the request
            source = check_video_upload(video, self.inputs / f"input-{stamp}-video")
        try:
            if source is None:
                picture = check_upload(image) if isinstance(image, bytes) else load_image(image)
            negative = request.get("negative_prompt", "")
            full = options_from_settings(settings, prompt, negative, **asked, seed=seeds[-1]).to_dict()
            options = {k: v for k, v in full.items() if k not in ("prompt", "negative_prompt")}
            if source is not None:
                from framepack_turbo.pipeline import extend

                options["video"] = str(source.path)
                height, width = extend.bucket_of(source, options["resolution"])
                picture = extend.read_tail(source, height, width, "inverted").frames[-1]  # what the job shows
            bucket = list(nearest_bucket(*picture.shape[:2], resolution=options["resolution"]))
            json.dumps(request)  # only plain data is stored
            image_path = self.inputs / f"input-{stamp}.png"  # our name, our encoding: nothing of the client's kept
            extra = {}
            if end_image is not None:
                extra[self.inputs / f"input-{stamp}-end.png"] = check_upload(end_image)
                options["end_image"] = str(next(iter(extra)))
            if keyframes:
                paths = [self.inputs / f"input-{stamp}-key{i}.png" for i in range(len(keyframes))]
                extra.update({p: check_upload(data) for p, (_, data) in zip(paths, keyframes)})
                options["keyframes"] = [[t, str(p)] for p, t in zip(paths, times)]
            self._check_timeline(options, prompt, negative, settings)
        except BaseException:
            if source is not None:
                source.path.unlink(missing_ok=True)
            raise
        Image.fromarray(picture).save(image_path)
        for path, array in extra.items():
            Image.fromarray(array).save(path)
        jobs = []
        for index, seed in enumerate(seeds):
            clip = {**request, "bucket": bucket, "options": {**options, "seed": seed}}
            if count > 1:
                clip["batch"] = {"key": stamp, "index": index + 1, "count": count}
            jobs.append(self.store.add(clip, str(image_path), self.videos))
            log.info("Queued job %d: %s", jobs[-1].id, prompt[:60])
        self._wake.set()
        return jobs

    @staticmethod
    def _check_timeline(options: dict[str, Any], prompt: str, negative: str, settings) -> None:
        """Timed prompts, keyframes and the end frame, checked as the generator will (before anything is stored)."""
        from framepack_turbo.models.presets import get_preset
        from framepack_turbo.pipeline.generate import timeline_of
        from framepack_turbo.pipeline.options import GenerateOptions

        checked = GenerateOptions(prompt=prompt, negative_prompt=negative, **options)
        variant = checked.variant or get_preset(settings.model).default_variant
        timeline_of(checked, variant)
        if checked.video and variant == "f1":
            from framepack_turbo.pipeline import extend

            frames, least = extend.probe_video(checked.video).frames, extend.f1_least_frames(checked.window)
            if frames < least:
                raise InputError(f"the video has {frames} frames; F1 continues from at least {least}: pick inverted")

    @property
    def unavailable(self) -> str | None:
        """Why no worker can run a job now (every one lost: being brought back, or given up), else None."""
        if any(getattr(w, "alive", True) for w in self.workers):
            return None
        lost = "; ".join(f"{worker_name(w)} lost ({getattr(w, 'lost_reason', '') or 'gone'})" for w in self.workers)
        if any(getattr(w, "recoverable", False) for w in self.workers):
            return f"no worker can run jobs now: {lost}; it is being brought back: try again in a minute"
        return f"no worker can run jobs: {lost}; restart the server"

    def _check_available(self) -> None:
        reason = self.unavailable
        if reason is not None:
            raise InputError(reason)

    def _check_servable(self, settings) -> None:
        """Refuse, before it queues, a job no worker could run (it needs CUDA and no worker has it, ...)."""
        self._check_available()
        alive = [w for w in self.workers if getattr(w, "alive", True)]
        reasons = [(worker_name(w), getattr(w, "refusal", lambda s: None)(settings)) for w in alive]
        if all(reason for _, reason in reasons):
            name, reason = reasons[0]
            others = f" (and the {len(reasons) - 1} other worker(s) alike)" if len(reasons) > 1 else ""
            raise InputError(f"no worker can run this job: {name}: {reason}{others}")

    @property
    def live(self) -> Live | None:
        """The oldest running job's progress (the page shows each), else the last finished job's."""
        lives = dict(self.lives)
        return lives[min(lives)] if lives else self._last

    def cancel(self, job_id: int) -> str:
        """Cancel a queued job at once, or ask a running one to stop after its current step."""
        if self.store.cancel_queued(job_id):
            return "cancelled"
        job = self.store.get(job_id)
        if job is None:
            raise InputError(f"no job {job_id}")
        token = self._tokens.get(job_id)
        if job.state == "running" and token is not None:
            token.cancel()
            return "cancelling"
        return job.state

    def resume(self, job_id: int) -> str:
        """Queue a failed or cancelled job again, to go on from its last finished section."""
        from framepack_turbo.pipeline.resume import state_path

        job = self.store.get(job_id)
        if job is None:
            raise InputError(f"no job {job_id}")
        if job.state not in ("failed", "cancelled"):
            raise InputError(f"job {job_id} is {job.state}: only a failed or cancelled job resumes")
        if not state_path(job.video).is_file():
            raise InputError(f"job {job_id} left no resume state (it stopped before its first section was written)")
        self._check_available()
        self.store.requeue_to_resume(job_id)
        self._wake.set()
        return "queued to resume"

    # ---- the worker ----------------------------------------------------------------------------

    def start(self) -> JobQueue:
        for index in range(len(self.workers)):
            name = f"framepack-jobs-{worker_name(self.workers[index])}"
            thread = threading.Thread(target=self._loop, args=(index,), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self, timeout: float = 30) -> None:
        self._stop.set()
        self._wake.set()
        for token in list(self._tokens.values()):
            token.cancel()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def run_pending(self) -> int:
        """Run queued jobs in this thread until none is left (tests, scripts); returns how many ran."""
        count = 0
        while self.run_one():
            count += 1
        return count

    def _loop(self, index: int) -> None:
        worker = self.workers[index]
        while not self._stop.is_set():
            if not getattr(worker, "alive", True):
                if not self._bring_back(worker):
                    break
                continue
            if not self.run_one(index):
                self._wake.wait(self.poll_s)
                self._wake.clear()
        if not getattr(worker, "alive", True):
            log.warning("Worker %s is gone: its thread stops", worker_name(worker))
            self._fail_waiting()

    def _bring_back(self, worker: Runner) -> bool:
        """One try at bringing a lost worker back (Ray restarted its actor, or a new one is started); False once
        it is given up. While no worker can run, the queued jobs say why they wait, and run once one is back:
        a worker Ray restarts is back in seconds, and failing the whole queue for that would lose it."""
        if not getattr(worker, "recoverable", False):
            return False
        reason = self.unavailable
        if reason is not None:
            self.store.note_queued(f"waiting: {reason}")
        if worker.recover():
            log.warning("Worker %s is back: queued jobs run again", worker_name(worker))
            self.store.note_queued("")
            self._wake.set()
            return True
        self._stop.wait(RECOVER_WAIT_S)
        return getattr(worker, "recoverable", False)

    def _fail_waiting(self) -> None:
        """No worker will run again (every one given up): the queued jobs fail with the reason, not wait forever."""
        reason = self.unavailable
        if reason is None or any(getattr(w, "recoverable", False) for w in self.workers):
            return
        failed = self.store.fail_queued(reason)
        if failed:
            log.error("Jobs %s failed: %s", failed, reason)

    def _claim_for(self, index: int) -> Job | None:
        """The oldest queued job this worker should take: one whose models it holds, or one no other free
        worker holds the models for (that one takes it instead, without a reload)."""
        worker = self.workers[index]
        holds = getattr(worker, "holds", None)
        with self._route:
            free = [
                w
                for i, w in enumerate(self.workers)
                if i != index and i not in self._busy and getattr(w, "alive", True) and hasattr(w, "holds")
            ]
            for job in self.store.queued():
                if job.retries and job.retries[-1]["worker"] == worker_name(worker) and self._others_alive(index):
                    continue  # a retry goes to another worker
                if holds is None or holds(job) or not any(w.holds(job) for w in free):
                    claimed = self.store.claim(job.id, worker_name(worker))
                    if claimed is not None:
                        self._busy.add(index)
                        return claimed
        return None

    def _others_alive(self, index: int) -> bool:
        return any(getattr(w, "alive", True) for i, w in enumerate(self.workers) if i != index)

    def run_one(self, index: int = 0) -> bool:
        job = self._claim_for(index)
        if job is None:
            return False
        worker = self.workers[index]
        token = CancelToken()
        self._tokens[job.id] = token
        self.lives[job.id] = Live(job.id)
        log.info("Running job %d on %s", job.id, worker_name(worker))
        try:
            worker(job, token, lambda event: self._on_event(job, event))
        except Cancelled:
            self.store.finish(job.id, "cancelled")
        except WorkerLost as exc:
            self._lost(job, worker, exc)
        except Exception as exc:  # one job's failure is its own: record it, keep the queue going
            log.exception("Job %d failed", job.id)
            self.store.finish(job.id, "failed", getattr(exc, "description", None) or f"{type(exc).__name__}: {exc}")
        else:  # it finished: a cancel that came after the last step changed nothing (the sidecar says complete)
            self.store.finish(job.id, "done")
        finally:
            self._tokens.pop(job.id, None)
            self._last = self.lives.pop(job.id, None)
            self._busy.discard(index)
            self._wake.set()  # a routed-away job may now be this worker's, or a free one's
        return True

    def _lost(self, job: Job, worker: Runner, exc: WorkerLost) -> None:
        """Retry once on another worker, from the last finished section when its state is on this disk."""
        from framepack_turbo.pipeline.resume import state_path

        current = self.store.get(job.id)
        reason = f"worker {worker_name(worker)} lost: {exc}"
        # the lost one again too, once it is back (Ray restarts it, or it is started again)
        alive = [w for w in self.workers if getattr(w, "alive", True) or getattr(w, "recoverable", False)]
        cancelled = self._tokens[job.id].cancelled
        if current is not None and current.attempts < MAX_ATTEMPTS and alive and not cancelled:
            resume = state_path(job.video).is_file()
            self.store.retry(job.id, reason, resume=resume)
            log.warning("Job %d: %s; retried%s", job.id, reason, " from its last section" if resume else "")
            return
        kept = (
            f"; its {current.sections_done} finished section(s) are in its video" if current and current.frames else ""
        )
        self.store.finish(job.id, "failed", reason + kept)
        log.error("Job %d failed: %s", job.id, reason)

    def _on_event(self, job: Job, event: Any) -> None:
        live = self.lives.get(job.id)
        if live is None:
            return
        if isinstance(event, StepProgress):
            live.step, live.steps, live.section, live.sections = event.step, event.steps, event.section, event.sections
            live.eta_s, live.fraction = event.eta_s, event.fraction
            live.preview = event.preview_frames()
        elif isinstance(event, SectionDone):
            self.store.progress(job.id, event.section, event.sections, event.frames)
            live.cache_timeline.append(event.cache_hit_rates())
        elif isinstance(event, Notice):
            live.notices.append(event.message)


def _mark_sidecar_failed(job: Job | None) -> None:
    """The store and the sidecar agree: a job recovery failed is `failed` in its sidecar too."""
    from framepack_turbo.files import write_json
    from framepack_turbo.pipeline.video import sidecar_path

    if job is None:
        return
    path = sidecar_path(job.video)
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return  # no sidecar yet (it stopped before the first write): nothing disagrees
    if record.get("status") == "running":
        record.update(status="failed", error=job.error)
        write_json(record, path)


class GenerationRunner:
    """Runs a job with FramePack; the models load on the first job (never at import) and are kept for the
    next job when its settings differ only in runtime passes (a step cache on or off, another threshold,
    the encoder cache) or per-job values: those passes come off and go on over the loaded models."""

    def __init__(self, base: dict[str, Any]) -> None:
        self.base = dict(base)  # the server's settings (flags it was started with)
        self._loaded: Any = None
        self.loads = 0  # how many times models were loaded (the page and the tests read it)

    def settings_for(self, job_settings: dict[str, Any]):
        from framepack_turbo.settings import Settings

        return Settings.load({**self.base, **job_settings}, source="api")

    def _framepack(self, job_settings: dict[str, Any]):
        from framepack_turbo.api import FramePack

        settings = self.settings_for(job_settings)
        if self._loaded is not None and self._loaded.reconfigure(settings):
            return self._loaded
        self._loaded = None  # drop the old models before loading new ones
        self._loaded = FramePack.load(settings=settings)
        self.loads += 1
        return self._loaded

    def __call__(self, job: Job, cancel: CancelToken, on_event: Callable[[Any], None]) -> None:
        # Called only from the queue's one worker: one job at a time needs no lock here.
        fp = self._framepack(job.request.get("settings", {}))
        options = job.request.get("options", {})
        resume = bool(job.request.get("resume"))
        fp.generate(
            # an extension starts from its video's last frame; a resume from the image its state holds
            None if options.get("video") or resume else job.image,
            job.prompt,
            out=job.video,
            on_event=on_event,
            cancel=cancel,
            negative_prompt=job.request.get("negative_prompt", ""),
            resume=resume,
            **options,
        )
