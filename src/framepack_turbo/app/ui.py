"""The Gradio page: FramePack's controls, an optimization panel with the live compatibility report and
plan, the job queue, and the running job's progress (bar, ETA, latent preview, growing video, cache
hit rates per section). The page only reads the queue and the store; it decides nothing itself.
"""

from __future__ import annotations

import functools
import html
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from framepack_turbo.app.queue import JobQueue, check_number
from framepack_turbo.errors import FramePackError
from framepack_turbo.text import shown

log = logging.getLogger(__name__)

VARIANT_CHOICES = ["model default", "inverted", "f1"]
ATTENTION_CHOICES = ["standard", "aggressive", "off"]
# The settings the optimization panel changes, in the order of its controls.
PANEL_SETTINGS = (
    "preset",
    "enable_teacache",
    "enable_fbcache",
    "enable_magcache",
    "enable_quant",
    "enable_compile",
    "enable_module_cache",
    "use_onnx_engines",
    "xformers_mode",
    "gpu_memory_preservation",
)
JOB_COLUMNS = ["id", "state", "prompt", "seed", "size", "sections", "frames", "error"]
MAX_CLIPS_PER_JOB = 16  # the page's count control (the API and CLI take up to constants.MAX_COUNT)
LORA_ROWS = 3  # LoRAs one job can stack on the page (the CLI and API take any number)
NO_LORA = "none"
RESULTS_SHOWN = 6  # finished videos in the results gallery, newest first
PREVIEW_TILE = 96  # pixels: the latent preview's frames are enlarged to at least this height


_MARKDOWN_PUNCTUATION = re.compile(r"([!-/:-@\[-`{-~])")


def md_text(value: object) -> str:
    """Text made from a file or a request (a job's prompt, an error quoting a file, a LoRA or model name) as
    Markdown that shows it as written: control characters escaped (`text.shown`), then every ASCII punctuation
    mark backslash-escaped, so nothing in it becomes a link, an image, emphasis, HTML or an autolink."""
    return _MARKDOWN_PUNCTUATION.sub(r"\\\1", shown(value))


def html_text(value: object) -> str:
    """The same for the page's HTML (the progress bars)."""
    return html.escape(shown(value))


def panel_settings(values: tuple) -> dict[str, Any]:
    return dict(zip(PANEL_SETTINGS, values))


def lora_choices(lora_dir: Path, model: str) -> dict[str, str]:
    """The page's LoRA dropdown, label -> file: those bundled with the model, then the LoRA folder's."""
    from framepack_turbo.models.presets import PRESETS

    choices = {f"{shown(p.stem)} (bundled with {model})": str(p) for p in PRESETS[model].bundled_loras()}
    if Path(lora_dir).is_dir():
        choices.update({shown(p.stem): str(p) for p in sorted(Path(lora_dir).glob("*.safetensors"))})
    return choices


def lora_settings(values: tuple, choices: dict[str, str]) -> dict[str, Any]:
    """The `loras` setting of the page's LoRA rows (name, weight, name, weight ...); {} without any."""
    picked = [
        f"{choices[name]}:{float(weight):g}"
        for name, weight in zip(values[::2], values[1::2])
        if name and name != NO_LORA and name in choices
    ]
    return {"loras": tuple(picked)} if picked else {}


def compat_markdown(base: dict[str, Any], panel: dict[str, Any], hardware) -> str:
    """The compatibility findings and the plan for these settings, as the run would get them."""
    from framepack_turbo import compat
    from framepack_turbo.optim.plan import make_plan
    from framepack_turbo.settings import Settings

    try:
        settings = Settings.load({**base, **panel}, source="api")
    except FramePackError as exc:
        return f"**Settings error:** {md_text(exc)}"
    report = compat.check(settings, hardware)
    plan = make_plan(settings, report, hardware)
    lines = ["**Plan:** " + plan.summary_lines()[0].removeprefix("Active optimizations: ")]
    for p in plan.passes:
        if p.status == "skipped":
            lines.append(f"- {p.title}: skipped ({md_text(p.reason)})")
    if report.findings:
        lines.append("")
        lines += [
            f"- **{f.severity.value}** `{f.id}`: {md_text(f.message)} *Fix:* {md_text(f.fix)}" for f in report.findings
        ]
    else:
        lines.append("\nNo compatibility findings.")
    return "\n".join(lines)


def critical_findings(values: dict[str, Any], hardware) -> list[str]:
    """Findings that would stop the job's load: the page refuses to queue it instead."""
    from framepack_turbo import compat
    from framepack_turbo.settings import Settings

    report = compat.check(Settings.load(values, source="api"), hardware)
    return [f"{f.id}: {f.message} Fix: {f.fix}" for f in report.findings if f.severity is compat.Severity.CRITICAL]


def bucket_markdown(image_path: str | None, resolution: float) -> str:
    """The bucket the generator will crop this image to at this resolution, as the job will get it."""
    from framepack_turbo.pipeline.encode import nearest_bucket
    from framepack_turbo.pipeline.options import open_checked

    if not image_path:
        return "Bucket: upload an image to see the size the video will have."
    try:
        with open_checked(image_path, "the upload") as im:
            width, height = im.size
    except (FramePackError, OSError) as exc:
        return f"Bucket: {md_text(exc)}"
    bh, bw = nearest_bucket(height, width, resolution=int(resolution))
    return f"Bucket: **{bw}x{bh}** (width x height) for this {width}x{height} image at resolution {int(resolution)}."


KEYFRAME_ROWS = 2  # keyframe (time, image) rows on the page


def timeline_markdown(prompt: str, seconds: float, window: float, variant: str, base: dict[str, Any]) -> str:
    """Where each timestamped prompt lands (times snap to section boundaries), as the job would get it."""
    from framepack_turbo.models.presets import get_preset
    from framepack_turbo.pipeline.sections import section_count
    from framepack_turbo.pipeline.timeline import parse_prompt, prompt_changes, section_seconds
    from framepack_turbo.settings import Settings

    try:
        window = int(window)
        sections = section_count(float(seconds), window)
        default, timed = parse_prompt(prompt or "")
        if not timed:
            return "Timeline: one prompt for the whole clip (tag parts with [1.8s: ...] to change it over time)."
        changes = prompt_changes(default, timed, sections, window, float(seconds))
    except FramePackError as exc:
        return f"**Timeline:** {md_text(exc)}"
    if variant == VARIANT_CHOICES[0]:
        variant = get_preset(Settings.load(base, source="api").model).default_variant
    parts = [
        f"{c.starts_s:g} s" + (f" (asked {c.asked_s:g} s)" if c.asked_s != c.starts_s else "") + f": {md_text(c.text)}"
        for c in changes
    ]
    order = "generated last to first" if variant == "inverted" else "generated first to last"
    return f"Timeline ({sections} sections of {section_seconds(window):.2f} s, {order}): " + " · ".join(parts)


def size_text(bucket) -> str:
    """[height, width] as the "WxH" people read."""
    return f"{bucket[1]}x{bucket[0]}" if bucket else "-"


def job_row(job) -> list:
    options = job.request.get("options", {})
    return [
        job.id,
        job.state,
        shown(job.prompt[:60]),
        options.get("seed", "-"),
        size_text(job.request.get("bucket")),
        f"{job.sections_done}/{job.sections or '?'}",
        job.frames,
        shown(job.error[:80]),
    ]


def result_caption(job) -> str:
    """What made a finished video, from its sidecar (what the run actually used), else from the request."""
    from framepack_turbo.pipeline.video import sidecar_path

    try:
        record = json.loads(sidecar_path(job.video).read_text())
        seed, bucket = record["seed"], record["image"]["bucket"]
    except (OSError, ValueError, KeyError, TypeError):
        seed, bucket = job.request.get("options", {}).get("seed", "?"), job.request.get("bucket")
    return f"job {job.id} · seed {seed} · {size_text(bucket)} · {shown(job.prompt[:40])}"


# The ranges of the page's sliders, one owner: the controls are built with them and "Use these settings" fills a
# control only with a value it can hold (a clip made by the CLI may have 0.5 s or 200 steps).
SLIDER_RANGES: dict[str, tuple[float, float]] = {
    "seconds": (1, 120),
    "steps": (1, 100),
    "gs": (0, 32),
    "window": (1, 33),
    "crf": (1, 51),
    "end_strength": (0, 1),
    "prompt_blend_sections": (0, 8),
    "prompt_change_cfg": (1, 12),
    "gpu_memory_preservation": (0, 128),
    "lora_weight": (-2, 2),
}
# The Generate tab's upload fields: "Use these settings" empties them (a clip names no file on this machine,
# so its recipe has none; one left from another job would change what the re-run shows). The start image stays.
CLEARED_UPLOADS = (
    "end_image",
    *(f"keyframe-{i}{part}" for i in range(KEYFRAME_ROWS) for part in ("-time", "")),
    "video_in",
)
_PROMPT_SHOWN = 48  # characters of the clip's prompt the status line quotes
_SHOWN_NOTES = 6  # settings without a control named in the status line; the rest counted


@dataclass
class ClipSettings:
    """What "Use these settings" puts in the page's controls (`values`, by the keys `build` maps to its
    controls: "prompt", "seed", "gs", a PANEL_SETTINGS name, "lora-0", "lora-0-weight", ...) and the one
    escaped status line saying what was filled and what was not."""

    values: dict[str, Any]
    status: str


def _lora_hashes(choices: dict[str, str]) -> dict[str, str]:
    """SHA-256 -> the dropdown's label, for each file the page's LoRA dropdown offers (an unreadable one: none)."""
    out: dict[str, str] = {}
    for label, path in choices.items():
        try:
            out.setdefault(_cached_sha256(path, *_stamp(path)), label)
        except OSError:
            continue
    return out


def _stamp(path: str) -> tuple[int, int]:
    info = os.stat(path)
    return info.st_size, info.st_mtime_ns


@functools.lru_cache(maxsize=256)
def _cached_sha256(path: str, size: int, mtime_ns: int) -> str:  # the file's stamp in the key: an edit re-hashes
    from framepack_turbo.files import sha256_file

    return sha256_file(path)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b or str(a) == str(b)


def clip_settings(meta: Any, clip: str, choices: dict[str, str], start) -> ClipSettings:
    """The Generate tab's controls from a clip's recorded metadata (`video.read_metadata`), by the recipe rule
    (pipeline/recipe.py): checked as `--from` checks it (`read_record`, `check_values`), split by `rerun_of` into
    the recipe and what it never takes (the end image, keyframes, input video, any folder or file: never filled;
    the page's own upload fields are emptied instead). LoRAs only by content: a file the page's dropdown offers
    (`choices`, label -> path) whose SHA-256 is the recorded one. `start`: this server's Settings (its model,
    its values of the settings the page has no control for). An InputError names a clip the page cannot read."""
    from framepack_turbo.models.presets import get_preset
    from framepack_turbo.pipeline import recipe
    from framepack_turbo.presets import PRESETS
    from framepack_turbo.settings import Settings

    record = recipe.read_record(meta, clip)
    recipe.check_values(record, clip)
    rerun = recipe.rerun_of(record)
    recorded = rerun.settings  # the recipe: no path, no folder
    values: dict[str, Any] = dict.fromkeys(CLEARED_UPLOADS)
    filled: list[str] = []
    missed: list[str] = []

    def fit(key: str, control: str, label: str, value: Any) -> None:
        low, high = SLIDER_RANGES[key]
        if isinstance(value, (int, float)) and low <= value <= high:
            values[control] = value
            filled.append(label)
        else:
            missed.append(f"{label} {recipe.quoted(value)} (this page's control takes {low:g} to {high:g})")

    prompt = rerun.prompt
    changes = rerun.timed.get("prompt_at") or []
    if changes and any("[" in text or "]" in text for _, text in changes):
        missed.append("its timed prompts (brackets in their text: the prompt box cannot tag them)")
    elif changes:  # --prompt-at, as the prompt box writes it
        prompt = " ".join([prompt, *(f"[{seconds:g}s: {text}]" for seconds, text in changes)]).strip()
    values["prompt"], values["negative"] = prompt, rerun.negative_prompt
    excerpt = prompt if len(prompt) <= _PROMPT_SHOWN else prompt[:_PROMPT_SHOWN] + "..."
    filled += [f'prompt "{excerpt}"', "negative prompt"]  # the prompt says which clip it was
    if record.seed is not None:
        values.update(seed=record.seed, random_seed=False, count=1)
        filled.append(f"seed {record.seed}")
    for key, label in (("seconds", "seconds"), ("steps", "steps"), ("gs", "distilled guidance"), ("window", "window")):
        if key in recorded:
            fit(key, key, label, recorded[key])
    if "crf" in recorded:
        fit("crf", "crf", "CRF", recorded["crf"])
    if "resolution" in recorded:  # check_values held it to a multiple of 16 in the page's range
        values["resolution"] = recorded["resolution"]
        filled.append("resolution")
    ran = record.variant or recorded.get("variant")
    if recorded.get("variant") in VARIANT_CHOICES:
        values["variant"] = recorded["variant"]
    elif ran is None or ran == get_preset(start.model).default_variant:
        values["variant"] = VARIANT_CHOICES[0]
    else:  # the clip's model ran it by default; this server's model would not
        values["variant"] = ran
    filled.append("variant")
    for key, control, label in (
        ("end_strength", "end_strength", "end strength"),
        ("prompt_blend_sections", "blend", "prompt blend"),
        ("prompt_change_cfg", "change_cfg", "prompt change guidance"),
    ):
        if key in rerun.timed:
            fit(key, control, label, rerun.timed[key])
    if rerun.timed.get("image_embed_blend"):
        missed.append("image embed blend (no control here)")
    if rerun.timed.get("start_color"):
        missed.append(f"start colour {recipe.quoted(rerun.timed['start_color'])} (no control here)")

    # The optimization panel: what the clip ran with (its recorded values over the built-in defaults, not over
    # this server's environment or flags: a setting the clip does not record was at its default)
    try:
        ran_with = Settings.load({k: recorded[k] for k in PANEL_SETTINGS if k in recorded}, source="api", environ={})
    except FramePackError as exc:
        missed.append(f"the optimizations ({exc})")
    else:
        allowed = {"preset": list(PRESETS), "xformers_mode": ATTENTION_CHOICES}
        for name in PANEL_SETTINGS:
            value = getattr(ran_with, name)
            if name in allowed and value not in allowed[name]:
                missed.append(f"{name} {recipe.quoted(value)} (not offered here)")
            elif name in SLIDER_RANGES and not SLIDER_RANGES[name][0] <= value <= SLIDER_RANGES[name][1]:
                missed.append(f"{name} {value:g} (this page's control takes {SLIDER_RANGES[name][1]:g} at most)")
            else:
                values[name] = value
        filled.append("optimizations")

    hashes = _lora_hashes(choices) if rerun.loras else {}
    low_weight, high_weight = SLIDER_RANGES["lora_weight"]  # the weight slider's range, one owner
    rows = []
    for entry in rerun.loras:
        label = hashes.get(entry.sha256)
        what = f"LoRA {recipe.quoted(entry.name)}"
        if label is None:
            missed.append(f"{what} (no LoRA offered here has its SHA-256 {entry.sha256[:12]}...)")
        elif len(rows) == LORA_ROWS:
            missed.append(f"{what} (the page has {LORA_ROWS} LoRA rows)")
        elif not low_weight <= entry.weight <= high_weight:
            missed.append(
                f"{what} at weight {entry.weight:g} (the weight control takes {low_weight:g} to {high_weight:g})"
            )
        else:
            rows.append((label, entry.weight))
    for row in range(LORA_ROWS):
        values[f"lora-{row}"], values[f"lora-{row}-weight"] = rows[row] if row < len(rows) else (NO_LORA, 1.0)
    filled.append(f"LoRA rows ({len(rows)} found by SHA-256)" if rows else "LoRA rows (none)")

    for dropped in rerun.dropped:  # never a place: the uploads are the user's to make again
        if dropped.key in ("end_image", "keyframes", "video"):
            missed.append(f"{dropped.what} (a clip names no file on this machine: upload it again)")
        elif dropped.key == "loras":
            missed.append(f"LoRA {recipe.quoted(dropped.value)} (recorded by path only, with no SHA-256)")
        else:
            missed.append(f"{dropped.what} (a place on the machine that made it)")
    if record.model.preset and record.model.preset != start.model:
        missed.append(f"model {recipe.quoted(record.model.preset)} (this server runs {start.model})")
    controlled = {"seconds", "steps", "gs", "window", "crf", "resolution", "variant", "seed", "model", "loras"}
    others = [
        f"{key} {recipe.quoted(value)}"
        for key, value in recorded.items()
        if key not in controlled and key not in PANEL_SETTINGS and not _same(value, getattr(start, key, None))
    ]
    if others:
        more = f" and {len(others) - _SHOWN_NOTES} more" if len(others) > _SHOWN_NOTES else ""
        missed.append("no control here, kept as this server has them: " + ", ".join(others[:_SHOWN_NOTES]) + more)
    line = f"Filled from {clip}: " + ", ".join(filled) + "."
    if missed:
        line += " Not filled: " + "; ".join(missed) + "."
    return ClipSettings(values, "**Use these settings:** " + md_text(line))


def defaults_markdown(start) -> str:
    """The Settings tab's defaults: the server's own settings (its flags and environment) that the controls
    start from, each escaped."""
    from framepack_turbo.settings import setting_names

    given = [f"{name} {shown(getattr(start, name))}" for name in setting_names() if start.explicitly_set(name)]
    return (
        "**Defaults.** The controls start from this server's settings (`framepack serve` flags and the environment): "
        + (md_text(", ".join(given)) if given else "the built-in defaults")
        + ". A flag given to `serve` is the page's default."
    )


def settings_summary(panel: tuple, lora_values: tuple) -> str:
    """The Generate tab's line naming what the Settings tab is set to (its controls are out of sight there)."""
    values = panel_settings(panel)
    names = {
        "enable_teacache": "TeaCache",
        "enable_fbcache": "first-block cache",
        "enable_magcache": "MagCache",
        "enable_quant": "INT-N quantization",
        "enable_compile": "torch.compile",
        "enable_module_cache": "encoder cache",
        "use_onnx_engines": "ONNX engines",
    }
    on = [label for key, label in names.items() if values.get(key)]
    picked = [
        f"{name} ({float(weight):g})"
        for name, weight in zip(lora_values[::2], lora_values[1::2])
        if name and name != NO_LORA
    ]
    return md_text(
        f"Settings tab: preset {values.get('preset')}, attention {values.get('xformers_mode')}, "
        + (", ".join(on) if on else "no optimization switched on")
        + "; LoRA: "
        + (", ".join(picked) if picked else "none")
    )


def preview_grid(frames: np.ndarray | None, tile: int = PREVIEW_TILE) -> np.ndarray | None:
    """The latent preview's frames (T, h, w, 3) as a near-square grid, each frame enlarged (nearest) to at
    least `tile` pixels high: a 9-frame window at 64 px is 8x72 latent pixels, unreadable as one strip."""
    if frames is None:
        return None
    count, h, w, _ = frames.shape
    columns = math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    scale = max(1, math.ceil(tile / h))
    grid = np.zeros((rows * h, columns * w, 3), dtype=frames.dtype)
    for i, frame in enumerate(frames):
        r, c = divmod(i, columns)
        grid[r * h : (r + 1) * h, c * w : (c + 1) * w] = frame
    return grid.repeat(scale, axis=0).repeat(scale, axis=1)


def _upload_path(payload, gradio_preprocess):
    """The uploaded file's path, not decoded. Gradio's own preprocessing opens the upload (and converts
    any non-RGB image in full) before the app sees it: a non-image or a decompression bomb then failed
    inside Gradio with no reason for the client, and a 13000x13000 1-bit PNG cost gigabytes. The queue's
    `check_upload` reads the header first and refuses with the reason."""
    if payload is None:
        return None
    if payload.path is None:  # an inline data: URL, small by construction
        return gradio_preprocess(payload)
    return payload.path


def progress_line(job, live) -> str:
    """One running job's bar and numbers (several run at once on Ray workers)."""
    where = f" on {html_text(job.worker)}" if job.worker and job.worker != "local" else ""
    if live is None or not live.steps:
        return f"Job {job.id}{where}: loading models..."
    return (
        f"<progress value='{live.fraction:.3f}' max='1' style='width:100%'></progress><br>"
        f"Job {job.id}{where} (seed {job.request.get('options', {}).get('seed', '?')}, "
        f"{size_text(job.request.get('bucket'))}): section {live.section}/{live.sections}, "
        f"step {live.step}/{live.steps}, {live.fraction * 100:.0f}%, ETA {_eta(live.eta_s)}"
    )


def workers_markdown(queue: JobQueue) -> str:
    """The Ray workers (device, loaded model, current job); nothing for the one in-process worker."""
    rows = [w.describe() for w in queue.workers if hasattr(w, "describe")]
    if not rows:
        return ""
    lines = [
        f"- **{md_text(r.get('name'))}** ({md_text(r.get('state', '?'))}): {md_text(r.get('device', '?'))} on "
        f"{md_text(r.get('host', '?'))}, {md_text(r.get('model') or 'no model loaded')}, {r.get('loads', 0)} load(s)"
        + (f", job {md_text(r['job'])}" if r.get("job") else "")
        for r in rows
    ]
    return "**Workers (Ray)**\n" + "\n".join(lines)


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return time.strftime("%M:%S", time.gmtime(max(seconds, 0)))


SERVED_SUFFIXES = (".mp4", ".json")  # what the videos folder serves: the videos (finished or growing), sidecars


def servable(path: str | Path, data_dir: Path) -> bool:
    """Whether Gradio's file route may answer for `path`: nothing of the data dir (the job database, the
    inputs, a job's `.parts/` folder with its segments and its resume state, which holds the uploaded image)
    but the mp4s and sidecars directly in its videos folder. Anything outside the data dir is left to Gradio's
    own rules (its upload and cache folders)."""
    # compared case-blind, as Gradio's blocklist is (a case-insensitive file system serves JOBS.SQLITE too)
    parts = [part.lower() for part in Path(os.path.abspath(path)).resolve().parts]
    root = [part.lower() for part in Path(data_dir).resolve().parts]
    if parts[: len(root)] != root:
        return True
    name = parts[-1]
    return (
        parts[len(root) : -1] == ["videos"]
        and name.endswith(SERVED_SUFFIXES)
        and not name.startswith(".")  # an atomic write's temporary file
    )


class ServedFiles:
    """ASGI middleware before Gradio's routes: a file request (`.../file=PATH`) for a path of the data dir
    that `servable` refuses is answered 403. Gradio's `allowed_paths` is a folder allowlist (no patterns), and
    the videos folder must be on it (the page returns its videos to the player); a job's `.parts/` folder lies
    inside it, so the rule that serves only mp4s and sidecars is kept here."""

    def __init__(self, app, data_dir: str) -> None:
        self.app, self.data_dir = app, Path(data_dir)

    async def __call__(self, scope, receive, send) -> None:
        path = scope.get("path", "") if scope.get("type") == "http" else ""
        marker = path.find("/file=")
        if marker >= 0 and not servable(path[marker + len("/file=") :], self.data_dir):
            from starlette.responses import PlainTextResponse

            await PlainTextResponse("File not allowed.", status_code=403)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def launch_options(queue: JobQueue) -> dict[str, Any]:
    """How the page is served: only the videos and their sidecars can be fetched through Gradio's file route
    (not the job database, not the inputs, not a job's segments or resume state), uploads stop at the queue's
    size limit, and a refused request's reason reaches the client instead of a bare "error"."""
    from starlette.middleware import Middleware

    from framepack_turbo.app.queue import MAX_UPLOAD_BYTES, MAX_VIDEO_UPLOAD_BYTES

    data = queue.data_dir.resolve()
    # Gradio's limit is the larger one (a video); check_upload holds images to theirs
    return {
        "allowed_paths": [str(queue.videos.resolve())],
        "blocked_paths": [str(queue.inputs.resolve()), *(str(data / f"jobs.sqlite{s}") for s in ("", "-wal", "-shm"))],
        "max_file_size": max(MAX_UPLOAD_BYTES, MAX_VIDEO_UPLOAD_BYTES),
        "show_error": True,
        "app_kwargs": {"middleware": [Middleware(ServedFiles, data_dir=str(data))]},
    }


def build(queue: JobQueue, base: dict[str, Any], hardware):
    """The page. `base`: the server's settings (its flags), which the controls start from."""
    import gradio as gr

    from framepack_turbo.constants import MAX_RESOLUTION, MIN_RESOLUTION
    from framepack_turbo.presets import PRESETS
    from framepack_turbo.settings import Settings

    start = Settings.load(base, source="api")
    loras = lora_choices(start.lora_dir, start.model)

    def queue_job(
        image_path,
        prompt,
        negative,
        seconds,
        resolution,
        seed,
        random_seed,
        count,
        steps,
        gs,
        window,
        crf,
        variant,
        end_path,
        end_strength,
        blend,
        change_cfg,
        *rest,
    ):
        keyframe_values, video_path = rest[: 2 * KEYFRAME_ROWS], rest[2 * KEYFRAME_ROWS]
        lora_values = rest[2 * KEYFRAME_ROWS + 1 : 2 * KEYFRAME_ROWS + 1 + 2 * LORA_ROWS]
        panel = rest[2 * KEYFRAME_ROWS + 1 + 2 * LORA_ROWS :]
        if not image_path and not video_path:
            return "**Upload a start image (or a video to extend) first.**"
        if image_path and video_path:
            return "**Not queued:** a video to extend starts from its own last frame: remove the start image."
        try:
            # the page's API takes any JSON value for these: NaN, inf or 1e308 is refused naming its field
            resolution = check_number(resolution, "resolution", whole=True)
            options = dict(
                seconds=check_number(seconds, "seconds"),
                resolution=resolution,
                seed="random" if random_seed else check_number(seed, "seed", whole=True),
                steps=check_number(steps, "steps", whole=True),
                distilled_guidance=check_number(gs, "gs"),
                window=check_number(window, "window", whole=True),
                crf=check_number(crf, "crf", whole=True),
            )
            if variant != VARIANT_CHOICES[0]:
                options["variant"] = variant
            if end_path:
                options["end_strength"] = check_number(end_strength, "end strength")
            options["prompt_blend_sections"] = check_number(blend, "prompt blend", whole=True)
            options["prompt_change_cfg"] = check_number(change_cfg, "prompt change guidance")
            count = check_number(count, "clips", whole=True)
            rows = lora_values[::2], lora_values[1::2]
            for row, (name, weight) in enumerate(zip(*rows)):
                if name and name != NO_LORA:
                    check_number(weight, f"LoRA {row + 1} weight")
            job_settings = {**panel_settings(panel), **lora_settings(lora_values, loras)}
            request = {"prompt": prompt, "negative_prompt": negative, "options": options, "settings": job_settings}
            critical = critical_findings({**base, **request["settings"], "resolution": resolution}, hardware)
            if critical:
                return "**Not queued:** " + md_text(" ".join(critical))
            keyframes = [
                (check_number(at, f"keyframe {i + 1} time"), Path(path).read_bytes())
                for i, (at, path) in enumerate(zip(keyframe_values[::2], keyframe_values[1::2]))
                if path and at is not None
            ]
            end = Path(end_path).read_bytes() if end_path else None
            picture = Path(image_path).read_bytes() if image_path else None
            clip = Path(video_path).read_bytes() if video_path else None
            jobs = queue.submit_batch(picture, request, count, end, keyframes, clip)
        except (FramePackError, OSError) as exc:
            return f"**Not queued:** {md_text(exc)}"
        ids = ", ".join(str(j.id) for j in jobs)
        seeds = ", ".join(str(j.request["options"]["seed"]) for j in jobs)
        what = f"job {ids} (seed {seeds}" if len(jobs) == 1 else f"jobs {ids} (seeds {seeds}"
        return f"Queued {what}; {size_text(jobs[0].request['bucket'])})."

    def cancel_job(job_id):
        if job_id is None:
            return "**Enter a job id to cancel.**"
        try:
            job_id = check_number(job_id, "job id", whole=True)
            return f"Job {job_id}: {queue.cancel(job_id)}."
        except FramePackError as exc:
            return f"**{md_text(exc)}**"

    def resume_job(job_id):
        if job_id is None:
            return "**Enter the id of a failed or cancelled job to resume.**"
        try:
            job_id = check_number(job_id, "job id", whole=True)
            return f"Job {job_id}: {queue.resume(job_id)}."
        except FramePackError as exc:
            return f"**{md_text(exc)}**"

    def on_preset(name):
        values = Settings.load({**base, "preset": name}, source="api")
        return [getattr(values, n) for n in PANEL_SETTINGS[1:]]

    def refresh(shown):
        shown_video, shown_results = shown or (None, None)
        jobs = queue.store.list()
        table = [job_row(j) for j in jobs]
        lives = dict(queue.lives)
        runs = sorted((j for j in jobs if j.state == "running"), key=lambda j: j.id)
        running = runs[0] if runs else None
        live = lives.get(running.id) if running is not None else None
        progress = "<br>".join(progress_line(j, lives.get(j.id)) for j in runs) or "Idle."
        if queue.unavailable:  # every worker lost: why the queued jobs wait (or failed)
            progress = f"<b>{html_text(queue.unavailable)}</b><br>{progress}"
        preview = preview_grid(live.preview) if live is not None else None
        timeline = live.cache_timeline if live is not None else []
        caches = (
            "\n".join(
                f"- section {i + 1}: "
                + (", ".join(f"{k} {v * 100:.0f}% reused" for k, v in rates.items()) or "no step cache")
                for i, rates in enumerate(timeline)
            )
            or "No cache data yet."
        )
        # The video of the running job once a section is written, else the newest finished one.
        current = (
            running
            if running is not None and running.frames  # inverted: the first section's frames all wait
            else next((j for j in jobs if j.state == "done"), None)
        )
        key = (current.id, current.sections_done) if current is not None else None
        video = gr.skip() if key == shown_video or current is None else current.video
        finished = [j for j in jobs if j.state == "done" and Path(j.video).is_file()][:RESULTS_SHOWN]
        results_key = [j.id for j in finished]  # the gallery's clips in order: a pick in it is one of these jobs
        results = gr.skip() if results_key == shown_results else [(j.video, result_caption(j)) for j in finished]
        summary = " · ".join(f"job {j.id}: {j.state}" for j in reversed(jobs[:12])) or "No jobs yet."
        preview = preview if preview is not None else gr.skip()
        return (
            *(table, summary, progress, preview, caches, video, results, (key, results_key)),
            *(workers_markdown(queue), progress, preview),
        )

    def pick_clip(shown, evt):
        """A clip picked in the gallery: its job id in the "Use these settings" box."""
        ids = (shown or (None, None))[1] or []
        index = evt.index if isinstance(evt.index, int) else None
        return ids[index] if index is not None and 0 <= index < len(ids) else gr.skip()

    # the annotation as an object: this module's are strings (`from __future__`), and Gradio finds the event's
    # argument by its type
    pick_clip.__annotations__["evt"] = gr.SelectData

    with gr.Blocks(title="FramePack Turbo") as page:
        gr.Markdown(
            "# FramePack Turbo\nOne image and a prompt; "
            + (
                f"jobs run on {len(queue.workers)} Ray worker{'s' if len(queue.workers) != 1 else ''}, one job each at a time."
                if len(queue.workers) > 1 or hasattr(queue.runner, "describe")
                else "jobs run one at a time on this machine's GPU (or CPU)."
            )
        )
        with gr.Tabs(elem_id="tabs") as tabs:
            with gr.Tab("Generate", id="generate", elem_id="tab-generate"):
                with gr.Row():
                    with gr.Column(scale=3):
                        image = gr.Image(
                            type="filepath", label="Start image", elem_id="start-image", sources=["upload"]
                        )
                        image.preprocess = functools.partial(_upload_path, gradio_preprocess=image.preprocess)
                        bucket = gr.Markdown(bucket_markdown(None, start.resolution), elem_id="bucket")
                        prompt = gr.Textbox(label="Prompt", elem_id="prompt", lines=2)
                        negative = gr.Textbox(label="Negative prompt (used when real CFG > 1)", elem_id="negative")
                        timeline = gr.Markdown(
                            timeline_markdown("", start.seconds, start.window, "model default", base),
                            elem_id="timeline",
                        )
                        with gr.Row():
                            seconds = gr.Slider(
                                *SLIDER_RANGES["seconds"],
                                value=start.seconds,
                                step=0.1,
                                label="Seconds",
                                elem_id="seconds",
                            )
                            resolution = gr.Slider(
                                MIN_RESOLUTION,
                                MAX_RESOLUTION,
                                value=start.resolution,
                                step=16,
                                label="Resolution (bucket base)",
                                elem_id="resolution",
                            )
                        with gr.Row():
                            # no precision: Gradio's own rounding of a sent inf or NaN failed before the page could
                            # name the field
                            seed = gr.Number(value=start.seed, precision=None, step=1, label="Seed", elem_id="seed")
                            random_seed = gr.Checkbox(False, label="Random seed (recorded)", elem_id="random-seed")
                            count = gr.Slider(
                                1,
                                MAX_CLIPS_PER_JOB,
                                value=1,
                                step=1,
                                label="Clips (seed, seed+1, ...)",
                                elem_id="count",
                            )
                        with gr.Row():
                            steps = gr.Slider(
                                *SLIDER_RANGES["steps"], value=start.steps, step=1, label="Steps", elem_id="steps"
                            )
                            gs = gr.Slider(
                                *SLIDER_RANGES["gs"], value=start.gs, step=0.1, label="Distilled guidance", elem_id="gs"
                            )
                        with gr.Row():
                            window = gr.Slider(
                                *SLIDER_RANGES["window"],
                                value=start.window,
                                step=1,
                                label="Window (latent frames)",
                                elem_id="window",
                            )
                            crf = gr.Slider(
                                *SLIDER_RANGES["crf"],
                                value=start.crf,
                                step=1,
                                label="MP4 CRF (lower: better)",
                                elem_id="crf",
                            )
                        variant = gr.Radio(
                            VARIANT_CHOICES,
                            value=start.variant or VARIANT_CHOICES[0],
                            label="Variant",
                            elem_id="variant",
                        )
                        with gr.Accordion("End frame and keyframes (inverted variant)", open=False):
                            with gr.Row():
                                end_image = gr.Image(
                                    type="filepath", label="End image", elem_id="end-image", sources=["upload"]
                                )
                                end_image.preprocess = functools.partial(
                                    _upload_path, gradio_preprocess=end_image.preprocess
                                )
                                with gr.Column():
                                    end_strength = gr.Slider(
                                        *SLIDER_RANGES["end_strength"],
                                        value=1,
                                        step=0.05,
                                        label="End strength",
                                        elem_id="end-strength",
                                    )
                                    blend = gr.Slider(
                                        *SLIDER_RANGES["prompt_blend_sections"],
                                        value=0,
                                        step=1,
                                        label="Prompt blend (sections)",
                                        elem_id="prompt-blend",
                                    )
                                    change_cfg = gr.Slider(
                                        *SLIDER_RANGES["prompt_change_cfg"],
                                        value=1,
                                        step=0.5,
                                        label="Prompt change guidance (1: off; each change costs model calls)",
                                        elem_id="prompt-change-cfg",
                                    )
                            keyframe_inputs = []
                            for row in range(KEYFRAME_ROWS):
                                with gr.Row():
                                    at = gr.Number(
                                        None, label=f"Keyframe {row + 1} time (s)", elem_id=f"keyframe-{row}-time"
                                    )
                                    picture = gr.Image(
                                        type="filepath",
                                        label=f"Keyframe {row + 1}",
                                        elem_id=f"keyframe-{row}",
                                        sources=["upload"],
                                    )
                                    picture.preprocess = functools.partial(
                                        _upload_path, gradio_preprocess=picture.preprocess
                                    )
                                    keyframe_inputs += [at, picture]
                        with gr.Accordion("Extend a video", open=False):
                            video_in = gr.File(
                                label="Video to continue (instead of a start image; Seconds is the new part)",
                                file_types=[".mp4", ".webm", ".mov", ".mkv"],
                                type="filepath",
                                elem_id="video-in",
                            )
                        active = gr.Markdown(
                            settings_summary(
                                tuple(getattr(start, n) for n in PANEL_SETTINGS), (NO_LORA, 1.0) * LORA_ROWS
                            ),
                            elem_id="active-settings",
                        )
                        queue_btn = gr.Button("Queue job", variant="primary", elem_id="queue-btn")
                        status = gr.Markdown(elem_id="status")
                    # The running job beside the controls, as FramePack-Studio shows it: one queues a job and
                    # watches its first steps (is the preview what the prompt asked for?) without leaving the
                    # controls, to cancel and change a setting at once. The Queue tab has the full view.
                    with gr.Column(scale=2):
                        current_progress = gr.HTML("Idle.", elem_id="current-progress")
                        current_preview = gr.Image(
                            label="Latent preview (the running job)",
                            elem_id="current-preview",
                            interactive=False,
                            height=240,
                        )
            with gr.Tab("Queue", id="queue", elem_id="tab-queue"):
                with gr.Row():
                    with gr.Column():
                        progress = gr.HTML("Idle.", elem_id="progress")
                        preview = gr.Image(
                            label="Latent preview (current step, one tile per latent frame)",
                            elem_id="preview",
                            interactive=False,
                            height=240,
                        )
                        caches = gr.Markdown(elem_id="caches")
                    with gr.Column():
                        video = gr.Video(
                            label="Video (grows after each section)", elem_id="video", interactive=False, height=360
                        )
                # The queue spans the tab: the seed and size columns need the width.
                summary = gr.Markdown(elem_id="queue-summary")
                jobs = gr.Dataframe(
                    headers=JOB_COLUMNS,
                    label="Jobs",
                    elem_id="jobs",
                    interactive=False,
                    column_widths=["5%", "9%", "36%", "13%", "8%", "8%", "7%", "14%"],
                )
                with gr.Row():
                    cancel_id = gr.Number(label="Job id", precision=None, step=1, elem_id="cancel-id")
                    cancel_btn = gr.Button("Cancel job", elem_id="cancel-btn")
                    resume_btn = gr.Button("Resume job", elem_id="resume-btn")
                # the answer beside the buttons (the Generate tab's status line is out of sight here)
                queue_status = gr.Markdown(elem_id="queue-status")
                workers = gr.Markdown(workers_markdown(queue), elem_id="workers")
            with gr.Tab("Outputs", id="outputs", elem_id="tab-outputs"):
                results = gr.Gallery(
                    label=f"Finished videos (newest {RESULTS_SHOWN}; pick one to use its settings)",
                    elem_id="results",
                    columns=3,
                    fit_columns=False,
                    height=420,
                )
                with gr.Row():
                    use_id = gr.Number(label="Job id (or pick a clip above)", precision=None, step=1, elem_id="use-id")
                    use_btn = gr.Button("Use these settings", elem_id="use-settings-btn")
                use_status = gr.Markdown(
                    "Fills the Generate tab from the clip's own record: its recipe, never a file on this machine "
                    "(the end image, keyframes and video to extend are uploaded again).",
                    elem_id="use-status",
                )
            with gr.Tab("Settings", id="settings", elem_id="tab-settings"):
                with gr.Row():
                    with gr.Column():
                        gr.Markdown("### Optimizations")
                        with gr.Row():
                            preset = gr.Dropdown(list(PRESETS), value=start.preset, label="Preset", elem_id="preset")
                            attention = gr.Dropdown(ATTENTION_CHOICES, value=start.xformers_mode, label="Attention")
                        # Three to a row: six in one row cut their labels ("torch.com", "INT-N quantizati").
                        with gr.Row():
                            teacache = gr.Checkbox(start.enable_teacache, label="TeaCache", elem_id="teacache")
                            fbcache = gr.Checkbox(start.enable_fbcache, label="First-block cache", elem_id="fbcache")
                            magcache = gr.Checkbox(start.enable_magcache, label="MagCache", elem_id="magcache")
                        with gr.Row():
                            quant = gr.Checkbox(start.enable_quant, label="INT-N quantization", elem_id="quant")
                            compile_ = gr.Checkbox(start.enable_compile, label="torch.compile", elem_id="compile")
                            module_cache = gr.Checkbox(start.enable_module_cache, label="Encoder cache")
                        with gr.Row():
                            onnx = gr.Checkbox(start.use_onnx_engines, label="ONNX engines")
                        preservation = gr.Slider(
                            *SLIDER_RANGES["gpu_memory_preservation"],
                            value=start.gpu_memory_preservation,
                            step=0.5,
                            label="GPU memory preservation (GB)",
                            elem_id="preservation",
                        )
                        panel = [
                            *(preset, teacache, fbcache, magcache, quant, compile_),
                            *(module_cache, onnx, attention, preservation),
                        ]
                        report = gr.Markdown(
                            compat_markdown(
                                base,
                                {**panel_settings(tuple(c.value for c in panel)), "resolution": int(resolution.value)},
                                hardware,
                            ),
                            elem_id="compat",
                        )
                    with gr.Column():
                        gr.Markdown("### LoRA")
                        gr.Markdown(
                            f"From {md_text(start.lora_dir)}/ (`--lora-dir`) and those bundled with the model; "
                            f"{'merged into the weights' if start.lora_mode != 'unmerged' else 'PEFT adapters'} "
                            "(`--lora-mode`: unmerged switches LoRAs between jobs without reloading)."
                        )
                        lora_inputs = []
                        for row in range(LORA_ROWS):
                            with gr.Row():
                                name = gr.Dropdown(
                                    [NO_LORA, *loras], value=NO_LORA, label=f"LoRA {row + 1}", elem_id=f"lora-{row}"
                                )
                                weight = gr.Slider(
                                    *SLIDER_RANGES["lora_weight"],
                                    value=1.0,
                                    step=0.05,
                                    label="Weight",
                                    elem_id=f"lora-{row}-weight",
                                )
                                lora_inputs += [name, weight]
                        gr.Markdown(defaults_markdown(start), elem_id="defaults")
        shown = gr.State(None)

        preset.change(on_preset, preset, panel[1:])

        def report_for(res, *values):  # the rules that read the resolution (model-native-resolution) see the page's
            return compat_markdown(base, {**panel_settings(values), "resolution": int(res)}, hardware)

        for control in (resolution, *panel):
            control.change(report_for, [resolution, *panel], report)
        for control in (*panel, *lora_inputs):
            control.change(
                lambda *v: settings_summary(v[: len(panel)], v[len(panel) :]), [*panel, *lora_inputs], active
            )
        for control in (image, resolution):
            control.change(bucket_markdown, [image, resolution], bucket)
        for control in (prompt, seconds, window, variant):
            control.change(lambda *v: timeline_markdown(*v, base), [prompt, seconds, window, variant], timeline)
        queue_btn.click(
            queue_job,
            [image, prompt, negative, seconds, resolution, seed, random_seed, count, steps, gs, window, crf, variant]
            + [end_image, end_strength, blend, change_cfg, *keyframe_inputs, video_in, *lora_inputs]
            + panel,
            status,
            api_name="queue_job",
        )
        cancel_btn.click(cancel_job, cancel_id, queue_status, api_name="cancel_job")
        resume_btn.click(resume_job, cancel_id, queue_status, api_name="resume_job")

        # "Use these settings": the keys of `clip_settings` to the controls they fill
        controls = {
            **dict(prompt=prompt, negative=negative, seed=seed, random_seed=random_seed, count=count),
            **dict(seconds=seconds, resolution=resolution, steps=steps, gs=gs, window=window, crf=crf),
            **dict(variant=variant, end_strength=end_strength, blend=blend, change_cfg=change_cfg),
            **dict(zip(PANEL_SETTINGS, panel)),
            **{f"lora-{i // 2}" + ("-weight" if i % 2 else ""): c for i, c in enumerate(lora_inputs)},
            **{f"keyframe-{i // 2}" + ("" if i % 2 else "-time"): c for i, c in enumerate(keyframe_inputs)},
            **dict(end_image=end_image, video_in=video_in),
        }

        def use_settings(job_id):
            try:
                values = settings_of_job(queue, job_id, loras, start)
            except (FramePackError, OSError) as exc:
                return {use_status: f"**Not used:** {md_text(exc)}"}
            return {
                **{controls[key]: value for key, value in values.values.items()},
                **{use_status: values.status, status: values.status, tabs: gr.Tabs(selected="generate")},
            }

        results.select(pick_clip, shown, use_id)
        use_btn.click(use_settings, use_id, [*controls.values(), use_status, status, tabs], api_name="use_settings")
        outputs = [jobs, summary, progress, preview, caches, video, results, shown, workers]
        outputs += [current_progress, current_preview]
        gr.Timer(1.0).tick(refresh, shown, outputs)
        page.load(refresh, shown, outputs)
    return page


def settings_of_job(queue: JobQueue, job_id: Any, choices: dict[str, str], start) -> ClipSettings:
    """ "Use these settings" for a job of this queue: its finished (or cancelled, failed) clip's record, read from
    the file the server named (`video.read_metadata`), as `clip_settings` takes it."""
    from framepack_turbo.errors import InputError
    from framepack_turbo.pipeline import video

    if job_id is None:
        raise InputError("enter a job id, or pick a clip in the gallery")
    job_id = check_number(job_id, "job id", whole=True)
    job = queue.store.get(job_id)
    if job is None:
        raise InputError(f"no job {job_id}")
    if job.state in ("queued", "running"):
        raise InputError(f"job {job_id} is {job.state}: its clip carries its record once it stops")
    if not Path(job.video).is_file():
        raise InputError(f"job {job_id} ({job.state}) left no clip")
    try:
        meta = video.read_metadata(job.video)
    except Exception as exc:  # noqa: BLE001 - a file PyAV cannot open
        raise InputError(f"job {job_id}'s clip is not a readable video ({type(exc).__name__})") from None
    if meta is None:
        raise InputError(f"job {job_id}'s clip carries no record")
    return clip_settings(meta, f"job {job_id}'s clip", choices, start)
