"""The section loop: FramePack image-to-video, both variants, on diffusers' model classes.

One `Generator` runs one job over a `ModelBundle`. It encodes the prompt and the start image once,
then samples the clip section by section (inverted: last-to-first; F1: first-to-last), decodes each
new section, joins it to the pixels so far with a soft append, and rewrites the mp4 and its sidecar
after every section. Events go to `on_event`; a `CancelToken` stops it after the current step.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from framepack_turbo.errors import Cancelled, FramePackError
from framepack_turbo.hardware import Hardware, library_versions
from framepack_turbo.models.loading import ModelBundle
from framepack_turbo.pipeline import encode, vae, video
from framepack_turbo.pipeline.events import (
    CancelToken,
    EventSink,
    JobDone,
    Notice,
    SectionDone,
    StageStarted,
    StepProgress,
)
from framepack_turbo.pipeline.options import GenerateOptions, load_image
from framepack_turbo.pipeline.sampler import StepState, flow_sigmas, sample_unipc
from framepack_turbo.pipeline.sections import (
    CONTEXT_1X,
    CONTEXT_2X,
    CONTEXT_4X,
    Section,
    pixel_frames_per_window,
    plan_sections,
)

log = logging.getLogger(__name__)

LATENT_CHANNELS = 16
TIME_SCALE = 1000.0  # the transformer takes timestep and guidance scaled by 1000


class OutOfMemory(FramePackError):
    """Out of GPU memory even after stepping the placement down; the finished sections are kept."""

    exit_code = 1


class Stateful(Protocol):
    """Anything holding per-section state (step caches): reset before every section and every job."""

    def reset(self) -> None: ...


@dataclass
class Result:
    frames: np.ndarray  # (T, H, W, 3) uint8, what the mp4 holds
    video_path: Path
    sidecar_path: Path
    sidecar: dict[str, Any]
    latents: torch.Tensor | None = None  # (1, 16, T, h, w) float32: the clip's latents, in time order

    @property
    def status(self) -> str:
        return self.sidecar["status"]


@dataclass
class _Conditioning:
    positive: encode.PromptEmbeddings
    negative: encode.PromptEmbeddings
    image_embeds: torch.Tensor
    start_latent: torch.Tensor  # (1, 16, 1, h, w) float32
    height: int
    width: int


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
        stateful: Iterable[Stateful] = (),
        settings: dict[str, Any] | None = None,
    ) -> None:
        self.bundle = bundle
        self.on_event = on_event or (lambda event: None)
        self.cancel = cancel or CancelToken()
        self.stateful = list(stateful) + list(bundle.step_caches)
        self.caches = list(bundle.step_caches)  # step caches: their calls get a cache context, their counts a record
        self.settings = settings or {}  # recorded in the sidecar as given

    # ---- public -------------------------------------------------------------------------------

    def run(self, image, options: GenerateOptions, out_path: str | Path) -> Result:
        """Generate the clip. Raises `Cancelled` (after writing what finished) if the token is set."""
        job_started = time.perf_counter()
        out_path = Path(out_path)
        picture = load_image(image)
        variant = options.variant or self.bundle.preset.default_variant
        sections = plan_sections(variant, options.seconds, options.window)
        timings = _Timings()
        sidecar = self._sidecar(options, variant, image, len(sections))
        self._reset_state()
        for runner in self.bundle.engines:  # counts are per job, not per section
            runner.reset()

        cond = self._condition(picture, options, timings)
        if self.bundle.encoder_cache is not None:
            sidecar.setdefault("caches", {})["modulecache"] = self.bundle.encoder_cache.take_stats()
        sidecar["image"]["bucket"] = [cond.height, cond.width]

        rng = torch.Generator("cpu").manual_seed(options.seed)
        history = self._initial_history(variant, cond)
        pixels: torch.Tensor | None = None
        generated = 1 if variant == "f1" else 0  # latent frames of the clip so far (F1 starts with the image)
        frames = np.zeros((0, cond.height, cond.width, 3), np.uint8)
        status = "complete"
        self.on_event(StageStarted("sampling"))
        try:
            for section in sections:
                latents = self._sample_with_step_down(section, variant, history, cond, options, rng, timings, job_started, len(sections), sidecar)
                self._record_cache_stats(sidecar, section)
                if self.bundle.engines:  # ONNX / TensorRT stand-ins: which provider ran, how often
                    sidecar["engines"] = {r.module_name: r.stats() for r in self.bundle.engines}
                if variant == "inverted":
                    if section.is_last:
                        latents = torch.cat([cond.start_latent, latents], dim=2)
                    history = torch.cat([latents, history], dim=2)
                else:
                    history = torch.cat([history, latents], dim=2)
                generated += latents.shape[2]
                pixels = self._decode_append(variant, section, history, generated, pixels, options.window, timings)
                frames = video.to_uint8_frames(pixels)
                t0 = time.perf_counter()
                video.write_mp4(frames, out_path, crf=options.crf)
                timings.add("write", time.perf_counter() - t0)
                sidecar.update(sections_done=section.number + 1, frames=len(frames), timings=timings.to_dict())
                video.write_json(sidecar, video.sidecar_path(out_path))
                self.on_event(SectionDone(section.number + 1, len(sections), len(frames), out_path))
        except Cancelled:
            status = "cancelled"
        except Exception as exc:
            # Keep the record of what finished; the mp4 of finished sections is already on disk.
            sidecar.update(status="failed", error=f"{type(exc).__name__}: {exc}", timings=timings.to_dict())
            video.write_json(sidecar, video.sidecar_path(out_path))
            raise
        finally:
            self._reset_state()

        timings.add("total", time.perf_counter() - job_started)
        video_path = out_path if sidecar["sections_done"] else None
        sidecar.update(status=status, frames=len(frames), timings=timings.to_dict())
        sidecar["video"]["path"] = str(video_path) if video_path else None
        video.write_json(sidecar, video.sidecar_path(out_path))
        self.on_event(JobDone(status, video_path, len(frames)))
        clip = history[:, :, :generated] if variant == "inverted" else history[:, :, -generated:]
        result = Result(frames, out_path, video.sidecar_path(out_path), sidecar, clip)
        if status == "cancelled":
            stopped = Cancelled(
                f"stopped by the user after {sidecar['sections_done']} of {len(sections)} sections"
                + (f"; {len(frames)} frames kept in {out_path}" if sidecar["sections_done"] else "; nothing written")
            )
            stopped.result = result  # what finished, for callers that want to show it
            raise stopped
        return result

    # ---- stages -------------------------------------------------------------------------------

    def _condition(self, picture: np.ndarray, options: GenerateOptions, timings: _Timings) -> _Conditioning:
        b = self.bundle
        dtype = b.transformer.dtype

        self.on_event(StageStarted("text_encode"))
        t0 = time.perf_counter()
        with self._on_gpu("text_encoder"), self._on_gpu("text_encoder_2"):
            positive = self._encode_prompt(options.prompt)
        for line in positive.truncations:
            log.warning("Prompt truncated: %s", line)
            self.on_event(Notice(f"prompt truncated: {line}"))
        if options.cfg == 1:
            negative = encode.PromptEmbeddings.zeros_like(positive)
        else:
            with self._on_gpu("text_encoder"), self._on_gpu("text_encoder_2"):
                negative = self._encode_prompt(options.negative_prompt)
        timings.add("text_encode", self._clock() - t0)

        self.on_event(StageStarted("image_encode"))
        t0 = time.perf_counter()
        height, width = encode.nearest_bucket(*picture.shape[:2], resolution=options.resolution)
        picture = encode.resize_and_center_crop(picture, height, width)
        with self._on_gpu("vae"):
            posterior_rng = torch.Generator(b.vae.device).manual_seed(options.seed)
            start_latent = vae.encode(encode.image_to_tensor(picture), b.vae, posterior_rng).cpu()
        with self._on_gpu("image_encoder"):
            image_embeds = self._encode_image(picture)
        timings.add("image_encode", self._clock() - t0)

        def cast(p: encode.PromptEmbeddings) -> encode.PromptEmbeddings:
            return encode.PromptEmbeddings(p.llama.to(dtype), p.mask, p.clip_pooled.to(dtype), p.truncations)

        return _Conditioning(cast(positive), cast(negative), image_embeds.to(dtype), start_latent, height, width)

    @staticmethod
    def _initial_history(variant: str, cond: _Conditioning) -> torch.Tensor:
        """Zeros for the 1+2+16 context frames (float32, as FramePack); F1 appends the start latent."""
        shape = (1, LATENT_CHANNELS, CONTEXT_1X + CONTEXT_2X + CONTEXT_4X, cond.height // 8, cond.width // 8)
        history = torch.zeros(shape, dtype=torch.float32)
        if variant == "f1":
            history = torch.cat([history, cond.start_latent.cpu()], dim=2)
        return history

    def _context(self, variant: str, history: torch.Tensor, cond: _Conditioning):
        """(clean, clean_2x, clean_4x) latents for the section, from the history so far."""
        n = CONTEXT_1X + CONTEXT_2X + CONTEXT_4X
        if variant == "inverted":
            post, two_x, four_x = history[:, :, :n].split([CONTEXT_1X, CONTEXT_2X, CONTEXT_4X], dim=2)
        else:
            four_x, two_x, post = history[:, :, -n:].split([CONTEXT_4X, CONTEXT_2X, CONTEXT_1X], dim=2)
        clean = torch.cat([cond.start_latent.to(history), post], dim=2)
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
        h, w = cond.height // 8, cond.width // 8
        noise = torch.randn((1, LATENT_CHANNELS, options.window, h, w), generator=rng).to(device)
        sigmas = flow_sigmas(options.steps, options.window * h * w // 4).to(device)
        clean, clean_2x, clean_4x = (t.to(device=device, dtype=dtype) for t in self._context(variant, history, cond))
        idx = section.indices
        guidance = torch.tensor([options.distilled_guidance * TIME_SCALE], device=device, dtype=dtype)
        shared = dict(
            image_embeds=cond.image_embeds.to(device),
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
            with self._cache_context(label, step, options.steps):
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
            flow = predict(x, timestep, cond.positive, "cond", step)
            if options.cfg != 1:
                uncond = predict(x, timestep, cond.negative, "uncond", step)
                guided = uncond + options.cfg * (flow - uncond)
                flow = _rescale_guidance(guided, flow, options.guidance_rescale)
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
                )
            )
            if self.cancel.cancelled:
                raise Cancelled("cancelled")

        log.info(
            "Section %d/%d (padding %d, last=%s): %d steps at %dx%d",
            section.number + 1, n_sections, section.padding, section.is_last, options.steps, cond.width, cond.height,
        )  # fmt: skip
        with torch.no_grad():
            latents = sample_unipc(denoise, noise, sigmas, callback=on_step)
        return latents.float().cpu()

    def _sample_with_step_down(self, section, variant, history, cond, options, rng, timings, job_started, n_sections, sidecar):
        """Sample a section; on out-of-memory, step the placement down one mode and retry it once."""
        from framepack_turbo.optim import offload

        rng_state = rng.get_state()  # a retry draws the same noise
        for attempt in (1, 2):
            self._reset_state()
            try:
                return self._sample_section(section, variant, history, cond, options, rng, timings, job_started, n_sections)
            except Exception as exc:
                placer = self.bundle.placer
                if not offload.is_out_of_memory(exc):
                    raise
                lower = placer.step_down(exc) if placer is not None and attempt == 1 else None
                if lower is None:
                    mode = placer.placement.mode if placer is not None else "none"
                    raise OutOfMemory(
                        f"out of GPU memory in section {section.number + 1} (placement {mode}"
                        f"{', after one step-down and retry' if attempt == 2 else ''}); the finished sections are "
                        "in the video. Lower --resolution or raise FRAMEPACK_GPU_MEMORY_PRESERVATION, use "
                        "--use-memory-v2 (FRAMEPACK_MEMORY_MODE=v2), or shrink the weights (FRAMEPACK_ENABLE_QUANT=1, "
                        "FRAMEPACK_ENABLE_FP8=1)"
                    ) from exc
                sidecar["placement"] = {"mode": placer.placement.mode, "history": placer.history}
                self.on_event(Notice(f"out of GPU memory: stepped down to placement {lower}, retrying the section"))
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
        real = history[:, :, :generated] if variant == "inverted" else history[:, :, -generated:]
        overlap = pixel_frames_per_window(window)
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
        placer = self.bundle.placer
        return placer.decode(latents) if placer is not None else vae.decode(latents, self.bundle.vae)

    def _on_gpu(self, name: str):
        """The memory placement's context for a component's work (encoders and VAE move in only then)."""
        placer = self.bundle.placer
        return placer.use(name) if placer is not None else contextlib.nullcontext()

    def _encode_prompt(self, prompt: str) -> encode.PromptEmbeddings:
        b = self.bundle

        def compute() -> encode.PromptEmbeddings:
            return encode.encode_prompt(prompt, b.tokenizer, b.text_encoder, b.tokenizer_2, b.text_encoder_2)

        return b.encoder_cache.prompt(prompt, compute) if b.encoder_cache else compute()

    def _encode_image(self, picture: np.ndarray) -> torch.Tensor:
        b = self.bundle

        def compute() -> torch.Tensor:
            return encode.encode_image(picture, b.feature_extractor, b.image_encoder)

        return b.encoder_cache.image(picture, compute) if b.encoder_cache else compute()

    def _cache_context(self, label: str, step: int, steps: int):
        """diffusers' cache context for the step caches' hooks: which prediction, which step."""
        if not self.caches:
            return contextlib.nullcontext()
        return self.bundle.transformer.cache_context(label, step_index=step, num_inference_steps=steps)

    def _record_cache_stats(self, sidecar: dict[str, Any], section: Section) -> None:
        """Each step cache's counts for the section just sampled: logged, and kept in the sidecar."""
        for cache in self.caches:
            stats = cache.section_stats()
            record = sidecar.setdefault("caches", {}).setdefault(cache.name, {"sections": []})
            record["sections"].append(stats)
            totals = {k: sum(s.get(k, 0) for s in record["sections"]) for k in ("hit", "miss", "forced")}
            decisions = sum(totals.values())
            record.update(totals, hit_rate=round(totals["hit"] / decisions, 4) if decisions else 0.0)
            log.log(
                logging.INFO if cache.verbose else logging.DEBUG,
                "%s, section %d: %s", cache.name, section.number + 1, ", ".join(f"{k} {v}" for k, v in stats.items()),
            )  # fmt: skip

    def _reset_state(self) -> None:
        for item in self.stateful:
            item.reset()

    def _sidecar(self, options: GenerateOptions, variant: str, image, n_sections: int) -> dict[str, Any]:
        b = self.bundle
        return {
            "status": "running",
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "prompt": options.prompt,
            "negative_prompt": options.negative_prompt,
            "seed": options.seed,
            "variant": variant,
            "options": options.to_dict(),
            "settings": self.settings,
            "image": {"source": str(image) if isinstance(image, (str, Path)) else type(image).__name__},
            "model": {
                "preset": b.preset.name,
                "source": b.source,
                "device": str(b.device),
                "dtypes": {name: str(m.dtype).removeprefix("torch.") for name, m in b.modules().items()},
                "load_seconds": round(b.load_seconds, 3),
            },
            "video": {"fps": video.FPS, "codec": "h264", "pix_fmt": video.PIX_FMT, "crf": options.crf},
            "sections_total": n_sections,
            "sections_done": 0,
            "frames": 0,
            "placement": (
                {"mode": b.placer.placement.mode, "reason": b.placer.placement.reason, "history": b.placer.history}
                if b.placer is not None else None
            ),
            "hardware": Hardware.detect().to_dict(),
            "versions": library_versions(),
        }


def _rescale_guidance(guided: torch.Tensor, positive: torch.Tensor, rescale: float) -> torch.Tensor:
    """CFG rescale (Lin et al. 2023): pull the guided prediction's std back towards the positive's."""
    if rescale == 0:
        return guided
    dims = list(range(1, guided.ndim))
    rescaled = guided * (positive.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return rescale * rescaled + (1 - rescale) * guided
