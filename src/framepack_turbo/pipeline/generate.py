"""The section loop: FramePack image-to-video, both variants, on diffusers' model classes.

One `Generator` runs one job over a `ModelBundle`. It encodes the prompt and the start image once,
then samples the clip section by section (inverted: last-to-first; F1: first-to-last), decodes each
new section, joins it to the pixels so far with a soft append, and rewrites the mp4 and its sidecar
after every section. Events go to `on_event`; a `CancelToken` stops it after the current step.

The optimization passes' runtime state arrives as `extensions` (optim/base.py): the generator resets
them per job and per section, runs each component call inside their contexts, lets them answer the
encoders from a cache, asks them to recover from out-of-memory, and records their numbers. It names no
pass.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch

from framepack_turbo import distributed
from framepack_turbo.constants import FPS, LATENT_CHANNELS, TIME_SCALE, VAE_SPATIAL_SCALE
from framepack_turbo.errors import Cancelled, FramePackError, InputError
from framepack_turbo.files import write_json
from framepack_turbo.hardware import Hardware, library_versions
from framepack_turbo.models.loading import ModelBundle
from framepack_turbo.pipeline import encode, extend, vae, video
from framepack_turbo.pipeline import resume as resume_state
from framepack_turbo.pipeline.events import (
    CancelToken,
    EventSink,
    JobDone,
    Notice,
    SectionDone,
    StageStarted,
    StepProgress,
)
from framepack_turbo.pipeline.options import GenerateOptions, blank_start, load_image
from framepack_turbo.pipeline.record import RunRecord
from framepack_turbo.pipeline.sampler import StepState, flow_sigmas, sample_unipc
from framepack_turbo.pipeline.sections import (
    CONTEXT_1X,
    CONTEXT_2X,
    CONTEXT_4X,
    CONTEXT_LATENTS,
    Section,
    history_kept,
    pixel_frames_per_window,
    plan_sections,
)
from framepack_turbo.pipeline.timeline import TimelinePlan, keyframe_for, plan_timeline, time_position
from framepack_turbo.pipeline.writer import ClipLock, ClipWriter

if TYPE_CHECKING:
    from framepack_turbo.optim.base import Extension

log = logging.getLogger(__name__)
T = TypeVar("T")


class OutOfMemory(FramePackError):
    """Out of GPU memory even after stepping the placement down; the finished sections are kept."""

    exit_code = 1


@dataclass
class Result:
    video_path: Path
    sidecar_path: Path
    sidecar: dict[str, Any]
    latents: torch.Tensor | None = None  # (1, 16, T, h, w) float32: the clip's latents, in time order
    record: RunRecord | None = None  # the sidecar, typed
    frames_before: int = 0  # a video extension: the mp4's frames before `frames`, copied from the input
    kept_frames: np.ndarray | None = field(default=None, repr=False)  # run(keep_frames=True): as encoded

    @property
    def status(self) -> str:
        return self.sidecar["status"]

    @property
    def frames(self) -> np.ndarray:
        """(T, H, W, 3) uint8, the clip's frames after `frames_before`: as they went to the encoder when the
        job kept them (keep_frames), else decoded from the file (once, on first use)."""
        if self.kept_frames is None:
            path = Path(self.video_path)
            self.kept_frames = (
                video.read_frames(path, skip=self.frames_before) if path.exists() else np.zeros((0, 0, 0, 3), np.uint8)
            )
        return self.kept_frames


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux and macOS; 0 where unknown)."""
    try:
        import resource
    except ImportError:  # Windows
        return 0.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)  # bytes on macOS, KiB on Linux


def _split_final(
    variant: str, is_last: bool, pixels: torch.Tensor, overlap: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the frames no later section blends into, the overlap window it will): F1 blends into the end,
    inverted into the front; after the last section everything is final. The window is a copy, so the
    section's decode can be freed."""
    if is_last:
        return pixels, None
    if variant == "inverted":
        return pixels[:, :, overlap:], pixels[:, :, :overlap].clone()
    return pixels[:, :, :-overlap], pixels[:, :, -overlap:].clone()


@dataclass
class _Conditioning:
    positive: encode.PromptEmbeddings
    negative: encode.PromptEmbeddings
    image_embeds: torch.Tensor
    start_latent: torch.Tensor  # (1, 16, 1, h, w) float32
    height: int
    width: int
    # Over time, per time-order section (None: the one above for every section)
    section_positive: list[encode.PromptEmbeddings] | None = None
    section_image_embeds: list[torch.Tensor] | None = None
    anchors: list[torch.Tensor] | None = None  # the clean "pre" latent (keyframes)
    end_latent: torch.Tensor | None = None  # inverted: the first section's "post" latent, times the strength
    # --prompt-change-cfg: per time-order section, the previous section's prompt where this one's differs
    section_previous: list[encode.PromptEmbeddings | None] | None = None

    def positive_at(self, k: int) -> encode.PromptEmbeddings:
        return self.positive if self.section_positive is None else self.section_positive[k]

    def previous_at(self, k: int) -> encode.PromptEmbeddings | None:
        return None if self.section_previous is None else self.section_previous[k]

    def image_embeds_at(self, k: int) -> torch.Tensor:
        return self.image_embeds if self.section_image_embeds is None else self.section_image_embeds[k]

    def anchor_at(self, k: int) -> torch.Tensor:
        return self.start_latent if self.anchors is None else self.anchors[k]


@dataclass
class _Timings:
    """Seconds per stage, summed; transformer time also per step."""

    stages: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    step_seconds: list[float] = field(default_factory=list)

    def add(self, stage: str, seconds: float) -> None:
        self.stages[stage] += seconds

    def to_dict(self) -> dict[str, Any]:
        steps = sorted(self.step_seconds)
        return {
            **{k: round(v, 6) for k, v in self.stages.items()},
            "steps": len(steps),
            "step_median": round(steps[len(steps) // 2], 6) if steps else None,
        }


class Generator:
    def __init__(
        self,
        bundle: ModelBundle,
        on_event: EventSink | None = None,
        cancel: CancelToken | None = None,
        extensions: Iterable[Extension] = (),
        settings: dict[str, Any] | None = None,
        decode: vae.ChunkedDecode | None = None,
        primary: bool = True,
    ) -> None:
        self.bundle = bundle
        # False on the other ranks of a context-parallel job: they sample with rank 0 (every transformer call
        # is split over the ranks) and hold the same latents, but rank 0 alone decodes, writes and reports.
        self.primary = primary
        self.on_event = on_event or (lambda event: None)
        self.cancel = cancel or CancelToken()
        self.extensions = list(extensions)
        self.settings = settings or {}  # recorded in the sidecar as given
        self._writer: ClipWriter | None = None
        self.decode_config = decode or vae.ChunkedDecode()

    # ---- public -------------------------------------------------------------------------------

    def run(
        self, image, options: GenerateOptions, out_path: str | Path, keep_frames: bool = False, resume: bool = False
    ) -> Result:
        """Generate the clip. Raises `Cancelled` (after writing what finished) if the token is set.

        `keep_frames`: hold the clip's uint8 frames for `Result.frames` (otherwise they are read back from the
        file when asked for: the job holds only the overlap window). `resume`: go on from the state a stopped
        job left beside `out_path` (pipeline/resume.py); its options and settings must be the same, its parts
        whole. One job writes a clip at a time (writer.ClipLock): another job writing `out_path`, a new one or
        a resume, is refused (`ClipInUse`)."""
        out_path = Path(out_path)
        lock = ClipLock(out_path).acquire(resume=resume) if self.primary else None  # the other ranks write nothing
        try:
            return self._run(image, options, out_path, keep_frames, resume)
        finally:
            if lock is not None:
                lock.release()

    def _run(self, image, options: GenerateOptions, out_path: Path, keep_frames: bool, resume: bool) -> Result:
        job_started = time.perf_counter()
        variant = options.variant or self.bundle.preset.default_variant
        sections = plan_sections(variant, options.seconds, options.window)
        plan = timeline_of(options, variant)  # every timed input checked before any model runs
        state = None
        if resume:
            saved = resume_state.peek(out_path)
            resume_state.refuse_changes(saved["fingerprint"], self._fingerprint(options), out_path)
            state = resume_state.check(out_path, variant, saved)  # every part the state counts, before any write
            if state.picture is not None:
                image = state.picture
        source = extend.probe_video(options.video) if options.video else None
        tail = None
        if source is not None:  # a continuation: the input's last frame is the start image
            if image is not None:
                raise InputError("--video continues the clip from its own last frame: drop --image")
            tail = extend.read_tail(source, *extend.bucket_of(source, options.resolution), variant, options.window)
            least = extend.f1_least_frames(options.window)
            if variant == "f1" and len(tail.frames) < least:
                raise InputError(
                    f"{source.path}: {tail.total} frames at 30 fps; F1 continues from at least {least} "
                    f"({least / FPS:.1f} s, one section's latents): use --variant inverted"
                )
            picture = tail.frames[-1]
        elif image is None:  # text-to-video: a blank start frame
            picture = blank_start(options.start_color or "black", options.resolution, options.seed)
        else:
            picture = load_image(image)
        bucket = encode.nearest_bucket(*picture.shape[:2], resolution=options.resolution)
        for extension in self.extensions:  # fixed-shape engines refuse another frame size now, not mid-job
            extension.check_frame(*bucket)
        timings = _Timings()
        record = self._record(options, variant, image, len(sections))
        record.timeline = plan.to_dict()
        notes = plan.notes() + (extend.notes(source, tail) if source is not None else [])  # resampled, cut short
        for note in notes:
            self.on_event(Notice(note))
        sidecar = video.sidecar_path(out_path)
        self._reset("job")

        cond = self._condition(picture, options, timings, plan, text_to_video=image is None and source is None)
        if distributed.active():
            distributed.check_same("inputs", _job_fingerprint(options, cond, len(sections)))
        record.job_caches = {e.name: e.stats() for e in self.extensions if e.kind == "job_cache"}
        record.image["bucket"] = [cond.height, cond.width]
        if source is not None:
            record.image.update(source=str(source.path), extends=extend.describe(source, tail))

        rng = torch.Generator("cpu").manual_seed(options.seed)
        history = self._initial_history(variant, cond)
        if cond.end_latent is not None:  # the slot the first section reads as its "post" context
            history[:, :, :1] = cond.end_latent
        pixels: torch.Tensor | None = None  # the overlap window: the frames a later section blends into
        generated = 1 if variant == "f1" else 0  # latent frames of the clip so far (F1 starts with the image)
        clip = [cond.start_latent.cpu()] if variant == "f1" else []  # the clip's latents, in time order
        before = 0  # output frames copied from an input video ahead of `frames`
        if tail is not None and variant == "f1":
            # F1 continues the input itself: its last latents are the history the context comes from, and
            # its last frames are the pixels the first section's decode cross-fades into (FramePack's append)
            tail_latents = self._encode_clip(tail.frames, options.seed)
            history = torch.cat([history[:, :, : extend.CONTEXT_LATENTS], tail_latents], dim=2)
            generated, before = tail_latents.shape[2], tail.before
            clip = [tail_latents]
            pixels = extend.to_pixels(tail.frames, self.bundle.vae.dtype)
        elif tail is not None:
            before = tail.total
        written = 0  # final frames handed to the writer (after `before`)
        kept: list[np.ndarray] = []  # keep_frames: the final frames, in time order
        done = 0
        keep = history_kept(options.window)  # history latents kept
        if state is not None:
            done, generated, history = state.sections_done, state.generated, state.history
            rng.set_state(state.rng)
            sampled = resume_state.load_latents(out_path, done)
            clip = [clip[0], *sampled] if variant == "f1" else list(reversed(sampled))
        if not self.primary:
            return self._follow(
                out_path,
                sections[done:],
                variant,
                history,
                cond,
                options,
                rng,
                timings,
                job_started,
                clip,
                record,
                keep,
            )
        if state is not None:
            pixels, written = state.window, state.frames - before
            record.restore(state.record, done)
            self.on_event(Notice(f"resuming {out_path} after section {done} of {len(sections)}"))
        writer = ClipWriter(out_path, options.crf, backward=variant == "inverted", sections=done)
        if source is not None and before:
            copied = extend.head(source, cond.height, cond.width, before)
            writer.head(copied, cond.height, cond.width, record.reproduction())
        self._writer = writer
        overlap = pixel_frames_per_window(options.window)
        status = "complete"
        self.on_event(StageStarted("sampling"))
        try:
            for section in sections[done:]:
                latents = self._sample_with_step_down(
                    section, variant, history, cond, options, rng, timings, job_started, len(sections), record
                )
                caches, engines = self._section_stats(section)
                record.add_section(caches, engines)
                latents, history = _extend_history(variant, section, latents, history, clip, cond)
                generated += latents.shape[2]
                out = self._decode_append(variant, section, history, generated, pixels, options.window, timings)
                # what later sections read: the context and the next decode's span, not the whole clip
                history = history[:, :, :keep] if variant == "inverted" else history[:, :, -keep:]
                final, pixels = _split_final(variant, section.is_last, out, overlap)
                frames = video.to_uint8_frames(final)
                if tail is not None and variant == "inverted" and section.is_last:
                    frames = extend.join_after(tail.frames[-1], frames, overlap)
                if keep_frames:
                    kept.insert(0, frames) if variant == "inverted" else kept.append(frames)
                written += len(frames)
                record.sections_done, record.timings = section.number + 1, timings.to_dict()
                record.frames = before + written
                record.host_memory = {"peak_rss_mb": peak_rss_mb()}
                record.writer = self._writer_record(writer)
                then = self._after_write(
                    section,
                    out_path,
                    record,
                    latents,
                    caches,
                    engines,
                    picture=None if image is None else picture,
                    state=None
                    if section.is_last
                    else resume_state.ResumeState(
                        section.number + 1,
                        generated,
                        before + written,
                        history.clone(),
                        None if pixels is None else pixels.clone(),
                        rng.get_state(),
                        None,
                        self._fingerprint(options),
                    ),
                )
                writer.add(frames, record.reproduction(), then, join=not section.is_last)
                self._announce(writer, len(sections))
        except Cancelled:
            status = "cancelled"
        except KeyboardInterrupt:  # a second Ctrl-C: no step finishes, but the record must not stay "running"
            record.status, record.error, record.timings = "cancelled", "aborted", timings.to_dict()
            write_json(record.to_dict(), sidecar)
            raise
        except Exception as exc:
            # Keep the record of what finished; the mp4 of finished sections is on disk, the overlap joins it.
            record.status, record.error, record.timings = "failed", f"{type(exc).__name__}: {exc}", timings.to_dict()
            with contextlib.suppress(Exception):
                self._stop(writer, pixels, record, len(sections))
            writer.close()
            record.frames = before + written + (0 if pixels is None else pixels.shape[2])
            write_json(record.to_dict(), sidecar)
            raise
        finally:
            self._reset("section")
            self._writer = None

        t0 = time.perf_counter()
        try:
            if status == "complete":
                record.frames = writer.finish(record.reproduction())  # the input's copied head included
                self._announce(writer, len(sections))
            else:
                if pixels is not None and record.sections_done:
                    written += pixels.shape[2]
                    if keep_frames:
                        edge = video.to_uint8_frames(pixels)
                        kept.insert(0, edge) if variant == "inverted" else kept.append(edge)
                self._stop(writer, pixels, record, len(sections))
                record.frames = before + written
        finally:
            writer.close()
        timings.add("write", time.perf_counter() - t0 + writer.waited)
        timings.add("total", time.perf_counter() - job_started)
        video_path = out_path if record.sections_done and out_path.exists() else None
        record.status, record.timings = status, timings.to_dict()
        record.writer, record.host_memory = self._writer_record(writer), {"peak_rss_mb": peak_rss_mb()}
        record.video["path"] = str(video_path) if video_path else None
        write_json(record.to_dict(), sidecar)
        self.on_event(JobDone(status, video_path, record.frames))
        frames_kept = np.concatenate(kept) if keep_frames and kept else None
        latents_clip = torch.cat(clip, dim=2) if clip else None
        result = Result(
            out_path, sidecar, record.to_dict(), latents_clip, record, frames_before=before, kept_frames=frames_kept
        )
        if keep_frames and frames_kept is None:
            result.kept_frames = np.zeros((0, cond.height, cond.width, 3), np.uint8)
        if status == "cancelled":
            stopped = Cancelled(
                f"stopped by the user after {record.sections_done} of {len(sections)} sections"
                + (f"; {record.frames - before} frames kept in {out_path}" if video_path else "; nothing written")
            )
            stopped.result = result  # what finished, for callers that want to show it
            raise stopped
        return result

    def _follow(
        self, out_path, sections, variant, history, cond, options, rng, timings, job_started, clip, record, keep
    ):
        """A follower rank's job: the same sampling as rank 0 (`sections`: those left to make), nothing decoded,
        written or reported."""
        try:
            for section in sections:
                latents = self._sample_with_step_down(
                    section, variant, history, cond, options, rng, timings, job_started, section.total, record
                )
                self._section_stats(section)
                _, history = _extend_history(variant, section, latents, history, clip, cond)
                history = history[:, :, :keep] if variant == "inverted" else history[:, :, -keep:]
        except Cancelled:
            pass  # rank 0 reports it; the cancel came to every rank after the same step
        finally:
            self._reset("section")
        return Result(out_path, video.sidecar_path(out_path), {}, torch.cat(clip, dim=2) if clip else None)

    # ---- writing -------------------------------------------------------------------------------

    def _fingerprint(self, options: GenerateOptions) -> dict[str, Any]:
        return resume_state.fingerprint(self.settings, options.to_dict())

    def _after_write(self, section, out_path, record, latents, caches, engines, picture, state):
        """What the writer's thread does once the section's frames are in the file: the resume state (the
        section's latents, then the state that points past them), then the sidecar, in that order, so no
        file ever says more than what is on disk."""
        sidecar_json = json.loads(json.dumps(record.to_dict(), default=str))  # as of now: the loop goes on
        rerun = json.loads(json.dumps(record.reproduction(), default=str))  # what `--resume` loads settings from
        latents = latents.clone()

        def then():
            if state is not None:
                resume_state.save_latents(out_path, section.number, latents)
                state.picture = picture
                state.record = {**record.resumable(sidecar_json), "rerun": rerun}
                state.save(out_path)
            write_json(sidecar_json, video.sidecar_path(out_path))
            return section.number, caches, engines

        return then

    def _announce(self, writer: ClipWriter, total: int, wait: bool = False) -> None:
        """SectionDone for each section the writer has put in the file (events stay on this thread)."""
        if wait:
            writer.wait()
        writer.check()
        for item in writer.done():
            number, caches, engines = item.payload
            self.on_event(SectionDone(number + 1, total, item.frames, writer.path, caches, engines))

    def _stop(self, writer: ClipWriter, pixels, record: RunRecord, total: int) -> None:
        """A stop (cancel, failure): the overlap window joins the file as its edge, and the sections
        written are announced."""
        edge = video.to_uint8_frames(pixels) if pixels is not None and record.sections_done else None
        writer.stop(edge, record.reproduction())
        self._announce(writer, total, wait=True)

    @staticmethod
    def _writer_record(writer: ClipWriter | None = None) -> dict[str, Any] | None:
        if writer is None:
            return None
        seconds = [s["encode_s"] + s["join_s"] for s in writer.seconds]
        return {
            "sections": [{k: round(v, 4) if isinstance(v, float) else v for k, v in s.items()} for s in writer.seconds],
            "median_s": round(sorted(seconds)[len(seconds) // 2], 4) if seconds else None,
            "waited_s": round(writer.waited, 4),
        }

    # ---- stages -------------------------------------------------------------------------------

    def _condition(
        self, picture: np.ndarray, options: GenerateOptions, timings: _Timings, plan: TimelinePlan, text_to_video: bool
    ) -> _Conditioning:
        b = self.bundle
        dtype = b.transformer.dtype

        self.on_event(StageStarted("text_encode"))
        t0 = time.perf_counter()
        prompts: dict[str, encode.PromptEmbeddings] = {}
        for change in plan.changes:  # each distinct prompt once
            if change.text not in prompts:
                with self._around("text_encoder"), self._around("text_encoder_2"):
                    prompts[change.text] = self._encode_prompt(change.text)
                for line in prompts[change.text].truncations:
                    log.warning("Prompt truncated: %s", line)
                    self.on_event(Notice(f"prompt truncated: {line}"))
        positive = prompts[plan.changes[0].text]
        if options.cfg == 1:
            negative = encode.PromptEmbeddings.zeros_like(positive)
        else:
            with self._around("text_encoder"), self._around("text_encoder_2"):
                negative = self._encode_prompt(options.negative_prompt)
        timings.add("text_encode", self._clock() - t0)

        self.on_event(StageStarted("image_encode"))
        t0 = time.perf_counter()
        height, width = encode.nearest_bucket(*picture.shape[:2], resolution=options.resolution)
        latent_of = self._latent_encoder(options.seed, height, width)
        picture = encode.resize_and_center_crop(picture, height, width)
        start_latent = latent_of(picture)
        with self._around("image_encoder"):
            # text-to-video: no image to embed (FramePack's blank conditioning is zeros)
            image_embeds = self._encode_image(picture)
            if text_to_video:
                image_embeds = torch.zeros_like(image_embeds)
        cond = _Conditioning(positive, negative, image_embeds, start_latent, height, width)
        if plan.end_image:  # --end-image, or a keyframe on the clip's end
            end = encode.resize_and_center_crop(load_image(plan.end_image), height, width)
            cond.end_latent = latent_of(end) * options.end_strength
            if options.image_embed_blend:
                with self._around("image_encoder"):
                    end_embeds = self._encode_image(end)
                n = plan.sections
                cond.section_image_embeds = [torch.lerp(image_embeds, end_embeds, k / max(n - 1, 1)) for k in range(n)]
        if plan.keyframes:
            latents = [
                latent_of(encode.resize_and_center_crop(load_image(k.path), height, width)) for k in plan.keyframes
            ]
            cond.anchors = [
                start_latent if (i := keyframe_for(list(plan.keyframes), k)) is None else latents[i]
                for k in range(plan.sections)
            ]
        timings.add("image_encode", self._clock() - t0)
        if plan.timed:
            cond.section_positive = [
                encode.blend_prompts([(prompts[plan.changes[i].text], w) for i, w in weights.items()])
                for weights in plan.weights
            ]
            if options.prompt_change_cfg != 1:
                cond.section_previous = [
                    cond.section_positive[k - 1] if k and plan.weights[k] != plan.weights[k - 1] else None
                    for k in range(plan.sections)
                ]

        def cast(p: encode.PromptEmbeddings) -> encode.PromptEmbeddings:
            return encode.PromptEmbeddings(p.llama.to(dtype), p.mask, p.clip_pooled.to(dtype), p.truncations)

        cond.positive, cond.negative = cast(cond.positive), cast(cond.negative)
        cond.image_embeds = cond.image_embeds.to(dtype)
        if cond.section_positive is not None:
            cond.section_positive = [cast(p) for p in cond.section_positive]
        if cond.section_previous is not None:
            cond.section_previous = [p if p is None else cast(p) for p in cond.section_previous]
        if cond.section_image_embeds is not None:
            cond.section_image_embeds = [e.to(dtype) for e in cond.section_image_embeds]
        return cond

    def _latent_encoder(self, seed: int, height: int, width: int) -> Callable[[np.ndarray], torch.Tensor]:
        """VAE latents of bucket-sized pictures, the posterior sampled from one generator seeded by the job's
        seed (the start image first, as FramePack: its latent is the same with or without the other images)."""
        b = self.bundle
        posterior_rng = torch.Generator(b.vae.device).manual_seed(seed)

        def latent_of(picture: np.ndarray) -> torch.Tensor:
            with self._around("vae"):
                return vae.encode(encode.image_to_tensor(picture), b.vae, posterior_rng).cpu()

        return latent_of

    def _encode_clip(self, frames: np.ndarray, seed: int) -> torch.Tensor:
        """Latents of a bucket-sized clip (an input video's tail), in the VAE's temporal tiles (diffusers'
        framewise encoding), so the memory it takes does not grow with the clip."""
        b = self.bundle
        posterior_rng = torch.Generator(b.vae.device).manual_seed(seed + 1)  # the start latent's stays as it was
        with self._around("vae"):
            return vae.encode(extend.to_pixels(frames, torch.float32), b.vae, posterior_rng).cpu()

    @staticmethod
    def _initial_history(variant: str, cond: _Conditioning) -> torch.Tensor:
        """Zeros for the 1+2+16 context frames (float32, as FramePack); F1 appends the start latent."""
        h, w = cond.height // VAE_SPATIAL_SCALE, cond.width // VAE_SPATIAL_SCALE
        shape = (1, LATENT_CHANNELS, CONTEXT_LATENTS, h, w)
        history = torch.zeros(shape, dtype=torch.float32)
        if variant == "f1":
            history = torch.cat([history, cond.start_latent.cpu()], dim=2)
        return history

    def _context(self, variant: str, history: torch.Tensor, cond: _Conditioning, k: int = 0):
        """(clean, clean_2x, clean_4x) latents for time-order section `k`, from the history so far."""
        n = CONTEXT_LATENTS
        if variant == "inverted":
            post, two_x, four_x = history[:, :, :n].split([CONTEXT_1X, CONTEXT_2X, CONTEXT_4X], dim=2)
        else:
            four_x, two_x, post = history[:, :, -n:].split([CONTEXT_4X, CONTEXT_2X, CONTEXT_1X], dim=2)
        clean = torch.cat([cond.anchor_at(k).to(history), post], dim=2)
        return clean, two_x, four_x

    def _sample_section(
        self,
        section: Section,
        variant: str,
        history: torch.Tensor,
        cond: _Conditioning,
        options: GenerateOptions,
        rng: torch.Generator,
        timings: _Timings,
        job_started: float,
        n_sections: int,
    ) -> torch.Tensor:
        b = self.bundle
        device, dtype = b.device, b.transformer.dtype
        h, w = cond.height // VAE_SPATIAL_SCALE, cond.width // VAE_SPATIAL_SCALE
        noise = torch.randn((1, LATENT_CHANNELS, options.window, h, w), generator=rng).to(device)
        sigmas = flow_sigmas(options.steps, options.window * h * w // 4).to(device)
        k = time_position(variant, section.number, section.total)
        context = self._context(variant, history, cond, k)
        clean, clean_2x, clean_4x = (t.to(device=device, dtype=dtype) for t in context)
        positive, previous = cond.positive_at(k), cond.previous_at(k)
        idx = section.indices
        guidance = torch.tensor([options.distilled_guidance * TIME_SCALE], device=device, dtype=dtype)
        shared = dict(
            image_embeds=cond.image_embeds_at(k).to(device),
            indices_latents=idx.latents.to(device),
            guidance=guidance,
            latents_clean=clean,
            indices_latents_clean=idx.clean.to(device),
            latents_history_2x=clean_2x,
            indices_latents_history_2x=idx.clean_2x.to(device),
            latents_history_4x=clean_4x,
            indices_latents_history_4x=idx.clean_4x.to(device),
            return_dict=False,
        )

        step_index = iter(range(options.steps))  # the sampler evaluates the model once per step

        def predict(hidden: torch.Tensor, timestep: torch.Tensor, p: encode.PromptEmbeddings, label: str, step: int):
            where = dict(label=label, step=step, steps=options.steps, variant=variant, resolution=options.resolution)
            with self._around("transformer", **where):
                return b.transformer(
                    hidden_states=hidden,
                    timestep=timestep,
                    encoder_hidden_states=p.llama.to(device),
                    encoder_attention_mask=p.mask.to(device),
                    pooled_projections=p.clip_pooled.to(device),
                    **shared,
                )[0].float()

        def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            t0 = time.perf_counter()
            # As FramePack: the sample is rounded to the model dtype, x0 is formed in float32 from it.
            x = x.to(dtype)
            timestep = (sigma.float() * TIME_SCALE).to(dtype)
            step = next(step_index)
            flow = predict(x, timestep, positive, "cond", step)
            followed = flow
            if options.cfg != 1:
                uncond = predict(x, timestep, cond.negative, "uncond", step)
                guided = uncond + options.cfg * (flow - uncond)
                flow = _rescale_guidance(guided, flow, options.guidance_rescale)
            if previous is not None:
                # --prompt-change-cfg: away from the prompt the section before had (a negative prompt local in
                # time). A model continues the motion its history shows; this pushes it to the new prompt.
                flow = flow + (options.prompt_change_cfg - 1) * (
                    followed - predict(x, timestep, previous, "previous", step)
                )
            x0 = x.float() - flow * sigma.float().view(-1, 1, 1, 1, 1)
            elapsed = self._clock() - t0
            timings.step_seconds.append(elapsed)
            timings.add("transformer", elapsed)
            return x0

        def on_step(state: StepState) -> None:
            done = section.number * options.steps + state.step + 1
            total = n_sections * options.steps
            per_step = timings.stages["transformer"] / done
            # decode time per section so far (none before the first decode: the ETA firms up after it)
            per_decode = timings.stages["vae_decode"] / section.number if section.number else 0.0
            eta = per_step * (total - done) + per_decode * (n_sections - section.number)
            self.on_event(
                StepProgress(
                    step=state.step + 1,
                    steps=options.steps,
                    section=section.number + 1,
                    sections=n_sections,
                    elapsed_s=time.perf_counter() - job_started,
                    eta_s=eta,
                    denoised=state.denoised,
                    preview_factors=self.bundle.preset.latent_preview,
                )
            )
            if self._writer is not None:  # the sections the writer finished meanwhile
                self._announce(self._writer, n_sections)
            if self.cancel.cancelled:
                raise Cancelled("cancelled")

        log.info(
            "Section %d/%d (padding %d, last=%s): %d steps at %dx%d",
            *(section.number + 1, n_sections, section.padding, section.is_last, options.steps, cond.width, cond.height),
        )
        with torch.no_grad():
            latents = sample_unipc(denoise, noise, sigmas, callback=on_step)
        return latents.float().cpu()

    def _sample_with_step_down(
        self, section, variant, history, cond, options, rng, timings, job_started, n_sections, record
    ):
        """Sample a section; on out-of-memory, let an extension step down (the placement) and retry it once."""
        rng_state = rng.get_state()  # a retry draws the same noise
        for attempt in (1, 2):
            self._reset("section")
            try:
                return self._sample_section(
                    section, variant, history, cond, options, rng, timings, job_started, n_sections
                )
            except Exception as exc:
                if not vae.is_out_of_memory(exc):
                    raise
                change = self._recover(exc) if attempt == 1 else None
                self._record_extensions(record)
                if change is None:
                    mode = (record.placement or {}).get("mode", "none")
                    raise OutOfMemory(
                        f"out of GPU memory in section {section.number + 1} (placement {mode}"
                        f"{', after one step-down and retry' if attempt == 2 else ''}); the finished sections are "
                        "in the video. Lower --resolution or raise FRAMEPACK_GPU_MEMORY_PRESERVATION, use "
                        "--use-memory-v2 (FRAMEPACK_MEMORY_MODE=v2), or shrink the weights (FRAMEPACK_ENABLE_QUANT=1, "
                        "FRAMEPACK_ENABLE_FP8=1)"
                    ) from exc
                self.on_event(Notice(f"out of GPU memory: {change}, retrying the section"))
                rng.set_state(rng_state)
        raise AssertionError("unreachable")

    def _decode_append(
        self,
        variant: str,
        section: Section,
        history: torch.Tensor,
        generated: int,
        pixels: torch.Tensor | None,
        window: int,
        timings: _Timings,
    ) -> torch.Tensor:
        """Decode the new section (with enough earlier frames to overlap) and cross-fade it in."""
        self.on_event(StageStarted("vae_decode"))
        t0 = time.perf_counter()
        real = history[:, :, :generated] if variant == "inverted" else history[:, :, -generated:]  # history may be
        # trimmed to its last sections: the slices below never reach past what is kept
        overlap = pixel_frames_per_window(window)
        with self._around("vae"):
            if pixels is None:
                out = self._decode(real)
            elif variant == "inverted":
                span = window * 2 + 1 if section.is_last else window * 2
                out = vae.soft_append(self._decode(real[:, :, :span]), pixels, overlap)
            else:
                out = vae.soft_append(pixels, self._decode(real[:, :, -window * 2 :]), overlap)
        timings.add("vae_decode", self._clock() - t0)
        return out

    # ---- bookkeeping --------------------------------------------------------------------------

    def _clock(self) -> float:
        """Host time after the device has finished its queued work, so a stage's time is its own."""
        if self.bundle.device.type == "cuda":
            torch.cuda.synchronize(self.bundle.device)
        return time.perf_counter()

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        return vae.decode_chunked(latents, self.bundle.vae, self.decode_config)

    # ---- the extensions ---------------------------------------------------------------------------

    def _around(self, component: str, **where: Any):
        """Every extension's context around a component's call (placement moves, cache contexts)."""
        stack = contextlib.ExitStack()
        for extension in self.extensions:
            stack.enter_context(extension.around(component, **where))
        return stack

    def _lookup(self, kind: str, key: Any, compute: Callable[[], T]) -> T:
        """`compute()`, unless an extension answers it (the encoder output cache); chained in order."""
        for extension in reversed(self.extensions):
            compute = (lambda e, c: lambda: e.lookup(kind, key, c))(extension, compute)
        return compute()

    def _recover(self, error: BaseException) -> str | None:
        for extension in self.extensions:
            change = extension.recover(error)
            if change is not None:
                return change
        return None

    def _reset(self, scope: str) -> None:
        for extension in self.extensions:
            extension.reset(scope)

    def _section_stats(self, section: Section) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
        """(step cache -> this section's decisions, engine -> its calls so far), logged."""
        caches, engines = {}, {}
        for extension in self.extensions:
            if extension.kind == "cache":
                caches[extension.name] = stats = extension.stats()
                log.log(
                    logging.INFO if extension.verbose else logging.DEBUG,
                    "%s, section %d: %s",
                    *(extension.name, section.number + 1, ", ".join(f"{k} {v}" for k, v in stats.items())),
                )
            elif extension.kind == "engine":
                engines.update(extension.stats())
        return caches, engines

    def _record_extensions(self, record: RunRecord) -> None:
        for extension in self.extensions:
            if extension.kind == "placement":
                record.placement = extension.record()
            elif extension.kind == "lora":
                record.lora = extension.record()
            elif extension.kind == "parallel":
                record.parallel = extension.record()

    def _encode_prompt(self, prompt: str) -> encode.PromptEmbeddings:
        b = self.bundle

        def compute() -> encode.PromptEmbeddings:
            return encode.encode_prompt(prompt, b.tokenizer, b.text_encoder, b.tokenizer_2, b.text_encoder_2)

        return self._lookup("prompt", prompt, compute)

    def _encode_image(self, picture: np.ndarray) -> torch.Tensor:
        b = self.bundle

        def compute() -> torch.Tensor:
            return encode.encode_image(picture, b.feature_extractor, b.image_encoder)

        return self._lookup("image", picture, compute)

    def _record(self, options: GenerateOptions, variant: str, image, n_sections: int) -> RunRecord:
        b = self.bundle
        record = RunRecord(
            prompt=options.prompt,
            negative_prompt=options.negative_prompt,
            seed=options.seed,
            variant=variant,
            options=options.to_dict(),
            settings=self.settings,
            image=(
                {"source": options.video}  # an extension: `extends` is added once the input is read
                if options.video
                else {"source": None, "text_to_video": options.start_color or "black"}
                if image is None
                else {"source": str(image) if isinstance(image, (str, Path)) else type(image).__name__}
            ),
            model={
                "preset": b.preset.name,
                "source": b.source,
                "device": str(b.device),
                "dtypes": {name: str(m.dtype).removeprefix("torch.") for name, m in b.modules().items()},
                "load_seconds": round(b.load_seconds, 3),
            },
            video={"fps": FPS, "codec": "h264", "pix_fmt": video.PIX_FMT, "crf": options.crf},
            sections_total=n_sections,
            hardware=Hardware.detect().to_dict(),
            versions=library_versions(),
        )
        self._record_extensions(record)
        return record


def _job_fingerprint(options: GenerateOptions, cond: _Conditioning, sections: int) -> torch.Tensor:
    """A few numbers every rank of a context-parallel job must share: seed, length, steps, what was encoded."""
    numbers = [options.seed % 2**52, sections, options.steps, options.window, cond.height, cond.width]
    tensors = [cond.start_latent, cond.positive.llama, cond.positive.clip_pooled, cond.image_embeds]
    return torch.tensor(numbers + [float(t.double().sum()) for t in tensors], dtype=torch.float64)


def _extend_history(variant: str, section: Section, latents, history, clip: list, cond: _Conditioning):
    """The section's latents (inverted's last one with the start latent before it) joined to the history and
    to the clip, in time order: (latents, history)."""
    if variant == "inverted":
        if section.is_last:
            latents = torch.cat([cond.start_latent, latents], dim=2)
        clip.insert(0, latents)
        return latents, torch.cat([latents, history], dim=2)
    clip.append(latents)
    return latents, torch.cat([history, latents], dim=2)


def timeline_of(options: GenerateOptions, variant: str) -> TimelinePlan:
    """The job's timeline (prompts, keyframes, end frame), checked: bad times or combinations raise InputError."""
    from framepack_turbo.pipeline.sections import section_count

    return plan_timeline(
        options.prompt,
        options.prompt_at,
        options.keyframes,
        options.end_image,
        variant,
        section_count(options.seconds, options.window),
        options.window,
        options.seconds,
        options.prompt_blend_sections,
    )


def _rescale_guidance(guided: torch.Tensor, positive: torch.Tensor, rescale: float) -> torch.Tensor:
    """CFG rescale (Lin et al. 2023): pull the guided prediction's std back towards the positive's."""
    if rescale == 0:
        return guided
    dims = list(range(1, guided.ndim))
    rescaled = guided * (positive.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return rescale * rescaled + (1 - rescale) * guided
