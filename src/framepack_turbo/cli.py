"""The `framepack` command. It reads events from the generator and shows them; it decides nothing else.

Errors a user can cause end with exit code 2 and one line on stderr, never a traceback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Annotated, Optional

import typer

from framepack_turbo.constants import ENV_PREFIX, FPS
from framepack_turbo.errors import FramePackError, InputError
from framepack_turbo.text import shown

# `framepack --help` lists the commands by what a user comes to do, one line each (click lists them in one
# alphabetical block, cut at the terminal's width).
COMMAND_GROUPS = {
    "Make": ("generate", "optimize", "export"),
    "Inspect": ("info", "doctor", "worker-info"),
    "Serve": ("serve",),
    "Measure": ("bench", "calibrate"),
}


class _GroupedCommands(typer.core.TyperGroup):
    def list_commands(self, ctx) -> list[str]:
        order = [name for names in COMMAND_GROUPS.values() for name in names]
        return sorted(super().list_commands(ctx), key=lambda n: order.index(n) if n in order else len(order))

    def format_commands(self, ctx, formatter) -> None:
        listed = set()
        for group, names in COMMAND_GROUPS.items():
            rows = [(n, self.commands[n].get_short_help_str(limit=200)) for n in names if n in self.commands]
            listed.update(n for n, _ in rows)
            with formatter.section(group):
                formatter.write_dl(rows)
        rest = [(n, self.commands[n].get_short_help_str(limit=200)) for n in self.commands if n not in listed]
        if rest:  # a command added without a group still shows
            with formatter.section("Other"):
                formatter.write_dl(rest)


app = typer.Typer(
    cls=_GroupedCommands,
    name="framepack",
    help="FramePack Turbo: image-to-video where every speed-up is real, checked and measured.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

log = logging.getLogger("framepack_turbo.cli")


def _fail(message: str, code: int = 2) -> typer.Exit:
    # a message may quote a file's contents (a clip's record, a LoRA's keys): no control character acts
    typer.echo(f"error: {shown(message, newlines=True)}", err=True)
    return typer.Exit(code)


def _console():
    from rich.console import Console

    return Console(stderr=True)


def _configure_logging(verbose: bool, console) -> None:
    from rich.logging import RichHandler

    # One console for log lines and the progress bar, so lines print above the bar instead of through it.
    if console.is_terminal:
        handler = RichHandler(console=console, show_time=False, show_path=False, markup=False, show_level=verbose)
    else:  # plain lines for pipes and log files: no wrapping at 80 columns
        handler = logging.StreamHandler(sys.stderr)
    logging.basicConfig(format="%(message)s", level=logging.WARNING, handlers=[handler], force=True)
    logging.getLogger("framepack_turbo").setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        from framepack_turbo.logs import quiet_libraries

        quiet_libraries()


def check_writable(out: Path) -> None:
    """Refuse an output path we could not write, before any model loads."""
    if out.suffix.lower() != ".mp4":
        raise InputError(f"--out {out}: the output must be an .mp4 file")
    if out.is_dir():
        raise InputError(f"--out {out}: is a directory; give a file name ending in .mp4")
    _check_writable_file(out, "--out ")


class _InterruptToCancel:
    """First Ctrl-C: cancel after the current step (the finished sections stay on disk). Second: abort."""

    def __init__(self, token) -> None:
        self.token = token
        self.previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signals only reach the main thread
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.token.cancelled:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.token.cancel()
        typer.echo("\nstopping after the current step (Ctrl-C again to abort)", err=True)

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


class _ProgressView:
    """A rich progress bar with step, section and ETA (rich prints plain lines when stderr is not a terminal)."""

    def __init__(self, console) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            TextColumn("eta {task.fields[eta]}"),
            console=console,
            transient=False,
        )
        self.task = None
        self.fraction = 0.0

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def __call__(self, event) -> None:
        from framepack_turbo.pipeline.events import JobDone, Notice, SectionDone, StageStarted, StepProgress

        if isinstance(event, StepProgress):
            eta = f"{event.eta_s:.0f}s"
            detail = f"step {event.step}/{event.steps}  section {event.section}/{event.sections}"
            total = event.steps * event.sections
            if self.task is None or event.fraction < self.fraction:  # the next clip of a batch: a new bar
                self.fraction = 0.0
                self.task = self.progress.add_task("sampling", total=total, detail=detail, eta=eta)
            self.progress.update(self.task, completed=event.fraction * total, detail=detail, eta=eta)
            self.fraction = event.fraction
        elif isinstance(event, SectionDone):
            self.progress.console.print(
                shown(f"section {event.section}/{event.sections} done: {event.frames} frames in {event.video_path}"),
                markup=False,
                highlight=False,
            )
        elif isinstance(event, StageStarted) and event.stage != "sampling":
            log.debug("stage: %s", event.stage)
        elif isinstance(event, Notice):
            self.progress.console.print(shown(f"note: {event.message}"), markup=False, highlight=False)
        elif isinstance(event, JobDone):
            pass


# Presets the bench can load without downloads, with their default bucket base.
BENCH_MODELS = {"tiny": 64, "tiny-random": 128, "small": 128, "full": 640}
SETTINGS_CONTEXT = {"allow_extra_args": True, "ignore_unknown_options": True}


def _settings_epilog() -> str:
    from framepack_turbo.settings import flags_help

    # \b keeps click from re-wrapping the table.
    return "\b\nSettings (every FRAMEPACK_* variable is also a flag; booleans take --no-NAME):\n" + flags_help()


def _settings_from(
    ctx: typer.Context,
    preset: str | None,
    below: dict | None = None,
    loras: list[str] | None = None,
    above: dict | None = None,
):
    """Flags left over after the command's own options are settings flags; parse and validate them.
    `below`: values under the flags (a recorded clip's settings, for --from); `loras`: the --lora flags;
    `above`: the command's own options that are settings (--gpus, --parallel)."""
    from framepack_turbo.settings import Settings, parse_flags

    overrides = {**(below or {}), **parse_flags(list(ctx.args))}
    if preset is not None:
        overrides["preset"] = preset
    if loras:
        overrides["loras"] = tuple(loras)
    overrides.update(above or {})
    return Settings.load(overrides, source="cli")


@app.command(context_settings=SETTINGS_CONTEXT, epilog=_settings_epilog())
def generate(
    ctx: typer.Context,
    image: Annotated[
        Optional[Path], typer.Option(help="Start image (png, jpg, webp ...); without it: text-to-video.")
    ] = None,
    prompt: Annotated[
        Optional[str], typer.Option(help='What happens; "[0s: ...] [1.8s: ...]" changes it over time.')
    ] = None,
    negative: Annotated[Optional[str], typer.Option(help="Negative prompt (used when --cfg > 1).")] = None,
    from_video: Annotated[
        Optional[Path],
        typer.Option("--from", help="Re-run a clip this tool made: its prompt, seed and settings from the file."),
    ] = None,
    out: Annotated[Optional[Path], typer.Option(help="Output .mp4 (a .json sidecar is written beside it).")] = None,
    count: Annotated[
        int, typer.Option(help="Clips to make, seeds --seed, --seed+1, ...; each to OUT with -seedN added.")
    ] = 1,
    prompt_at: Annotated[
        Optional[list[str]], typer.Option("--prompt-at", help="TIME:TEXT, repeatable: the prompt from TIME seconds.")
    ] = None,
    prompt_blend_sections: Annotated[
        int, typer.Option(help="Sections a prompt change blends over (0: a hard cut).")
    ] = 0,
    prompt_change_cfg: Annotated[
        float,
        typer.Option(
            help="Where the prompt changes, guidance away from the previous one (1: off; costs a model call)."
        ),
    ] = 1.0,
    end_image: Annotated[Optional[Path], typer.Option(help="Inverted variant: the clip ends on this image.")] = None,
    end_strength: Annotated[float, typer.Option(help="0..1: how strongly the end image holds.")] = 1.0,
    image_embed_blend: Annotated[
        bool, typer.Option("--image-embed-blend", help="Blend the start and end images' embeddings over time.")
    ] = False,
    keyframe: Annotated[
        Optional[list[str]], typer.Option("--keyframe", help="TIME:PATH, repeatable (inverted): an image to pass.")
    ] = None,
    start_color: Annotated[
        Optional[str], typer.Option(help="Text-to-video (no --image): the start frame's colour, or noise.")
    ] = None,
    video_in: Annotated[
        Optional[Path],
        typer.Option("--video", help="Continue this clip (mp4, webm, mov ...) by --seconds; instead of --image."),
    ] = None,
    lora: Annotated[
        Optional[list[str]],
        typer.Option("--lora", help="PATH[:WEIGHT], repeatable: a LoRA (.safetensors) and its weight (default 1)."),
    ] = None,
    preset: Annotated[Optional[str], typer.Option(help="Optimization preset (also FRAMEPACK_PRESET).")] = None,
    ignore_incompatible: Annotated[
        bool, typer.Option("--ignore-incompatible", help="Run despite critical compatibility findings (after 5 s).")
    ] = False,
    resume: Annotated[
        Optional[Path],
        typer.Option(
            "--resume",
            help="Go on with a job that stopped (Ctrl-C, a crash, out of memory): the .mp4 it was writing.",
        ),
    ] = None,
    gpus: Annotated[
        Optional[int],
        typer.Option(
            help="Split each step of the video over N GPUs (context parallelism; N CPU processes with --device cpu)."
        ),
    ] = None,
    parallel: Annotated[
        Optional[str], typer.Option(help="With --gpus: ulysses (default; heads divide by N) or ring (CUDA).")
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Library messages and debug lines too.")] = False,
) -> None:
    """Generate a video from one image and a prompt. Settings flags (--seconds, --steps, --quant-bits ...) below.

    --seed random draws a seed; the outputs record the one drawn. --resume FILE.mp4 continues a stopped job
    from its last finished section, with the settings it was started with (changes to them are refused)."""
    console = _console()
    _configure_logging(verbose, console)
    try:
        # Everything the user typed is checked before a model loads.
        from framepack_turbo.api import (
            FramePack,
            batch_outputs,
            batch_seeds,
            default_output_path,
            options_from_settings,
        )
        from framepack_turbo.pipeline.options import load_image

        if resume is not None:
            if from_video is not None or image is not None or video_in is not None or count != 1:
                raise InputError("--resume takes the job's own inputs: drop --from, --image, --video and --count")
            if out is not None and out.resolve() != resume.resolve():
                raise InputError(f"--resume {resume} goes on writing that file: drop --out")
            from framepack_turbo.pipeline import resume as resume_state

            saved = resume_state.peek(resume)
            recorded = _recorded_meta(saved["record"]["rerun"])
            out = resume
        else:
            recorded = _recorded(from_video) if from_video is not None else {}
        if prompt is None:
            if not recorded:
                raise InputError("--prompt is needed (or --from FILE.mp4 to take the prompt of a clip made here)")
            prompt = recorded["prompt"]
        negative = recorded.get("negative_prompt", "") if negative is None else negative
        from framepack_turbo import distributed

        launched = distributed.launched()  # torchrun, or the ranks `--gpus` starts: this process is one of them
        above = {"parallel_degree": gpus, "parallel_mode": parallel}
        if gpus is None and launched is not None and launched.world > 1:
            above["parallel_degree"] = launched.world  # `torchrun --nproc-per-node N` alone means N ranks
        above = {k: v for k, v in above.items() if v is not None}
        given = _given(ctx, lora)
        below = recorded.get("settings", {})
        if "rerun" in recorded:  # --from: the clip's recipe below the user's flags, its paths dropped and named
            mine = _settings_from(ctx, preset, None, loras=lora, above=above)  # the user's own flags, checked first
            below = _rerun_settings(recorded["rerun"], from_video, mine, given, image, video_in)
        settings = _settings_from(ctx, preset, below, loras=lora, above=above)
        follower = launched is not None and launched.rank != 0  # rank 0 alone reports
        if follower:
            logging.getLogger("framepack_turbo").setLevel(logging.WARNING)
        from framepack_turbo.models.presets import get_preset
        from framepack_turbo.pipeline.generate import timeline_of
        from framepack_turbo.pipeline.timeline import parse_keyframe, parse_prompt_at

        timed = {
            "prompt_at": tuple((p.seconds, p.text) for p in map(parse_prompt_at, prompt_at or [])),
            "keyframes": tuple(parse_keyframe(k) for k in keyframe or []),
            "prompt_blend_sections": prompt_blend_sections,
            "prompt_change_cfg": prompt_change_cfg,
            "end_image": str(end_image) if end_image else None,
            "end_strength": end_strength,
            "image_embed_blend": image_embed_blend,
            "start_color": start_color if image is None else None,
            "video": str(video_in) if video_in else None,
        }
        for name, value in recorded.get("timed", {}).items():  # --from: the clip's, where no flag was given
            if name not in given:
                timed[name] = value
        if image is not None and start_color is not None:
            raise InputError("--start-color is for text-to-video: give it without --image")
        if image is not None and video_in is not None:
            raise InputError("--video continues the clip from its own last frame: drop --image")
        if image is not None:
            timed["start_color"] = None
        options = options_from_settings(settings, prompt, negative, **timed)
        seeds = batch_seeds(options.seed, count)
        variant = options.variant or get_preset(settings.model).default_variant
        timeline_of(options, variant)  # times, keyframe sections, end frame with F1: refused now
        for path in [options.end_image, *(p for _, p in options.keyframes)]:
            if path:
                load_image(path)  # readable, sides in range: before any model loads
        if options.video:
            from framepack_turbo.pipeline import extend

            source = extend.probe_video(options.video)  # container, codec, sides, length: before any model loads
            _note(
                f"continuing {source.path} ({source.frames} frames at 30 fps) by {options.seconds:g} s"
                + (f"; {source.note()}" if source.note() else "")
            )
            picture = None
        elif image is None:
            picture = None
            if resume is None:  # a resume's start image (or its blank frame) is in its state
                typer.echo(
                    f"note: no --image: text-to-video from a {options.start_color or 'black'} start frame "
                    "(weaker than image-to-video)",
                    err=True,
                )
        else:
            picture = load_image(image)
        base_out = out or default_output_path()
        for path in batch_outputs(base_out, seeds):
            check_writable(path)
        if resume is not None:  # what would change the video so far is refused before any model loads
            record = {"values": settings.to_json_dict()}
            resume_state.refuse_changes(
                saved["fingerprint"], resume_state.fingerprint(record, options.to_dict()), resume
            )
            if not follower:  # a job writing the clip now (the run takes the lock; rank 0's alone)
                from framepack_turbo.pipeline.writer import ClipLock

                ClipLock(resume).acquire(resume=True).release()
            resume_state.check(resume, variant, saved)  # the parts whole, each tensor's shape: files untouched
            picture = None  # the state holds the start image
        _check_device(settings.device)
        from framepack_turbo.optim.lora import preflight

        for line in preflight(settings):  # every LoRA key mapped onto the model before its weights load
            if not follower:
                _note(line)
        if settings.parallel_degree > 1 and launched is None:  # start the ranks; each runs this command
            _check_parallel(settings, ignore_incompatible)
            from framepack_turbo import launch

            raise typer.Exit(launch.run_ranks(sys.argv[1:], settings.parallel_degree, cpu=_runs_on_cpu(settings)))

        from framepack_turbo.pipeline.events import CancelToken

        fp = FramePack.load(settings=settings, ignore_incompatible=ignore_incompatible)
        token = CancelToken()
        job = {k: v for k, v in options.to_dict().items() if k not in ("prompt", "negative_prompt", "seed")}
        with _InterruptToCancel(token), contextlib.nullcontext(None) if follower else _ProgressView(console) as view:
            if resume is not None:
                results = [fp.generate(None, prompt, resume, view, token, negative, resume=True, seed=seeds[0], **job)]
            else:
                results = fp.generate_batch(
                    picture, prompt, count, base_out, view, token, negative, seed=seeds[0], **job
                )
        for result in results if not follower else []:
            _report(result)
    except FramePackError as exc:
        raise _fail(str(exc), exc.exit_code) from None
    except KeyboardInterrupt:
        raise _fail("aborted", 130) from None


@app.command(context_settings=SETTINGS_CONTEXT, epilog=_settings_epilog())
def doctor(
    ctx: typer.Context,
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    preset: Annotated[Optional[str], typer.Option(help="Optimization preset (also FRAMEPACK_PRESET).")] = None,
) -> None:
    """Hardware, every setting with its source, the plan of passes, the compatibility report. Loads no model.

    Exit 1 when a critical rule fires.
    """
    console = _console()
    _configure_logging(False, console)
    try:
        from framepack_turbo.doctor import diagnose, render_text

        settings = _settings_from(ctx, preset)
        data = diagnose(settings)
    except FramePackError as exc:
        raise _fail(str(exc), exc.exit_code) from None
    if json_out:
        typer.echo(json.dumps(data, indent=2, default=str))
    else:
        typer.echo(render_text(data))
    raise typer.Exit(1 if any(f["severity"] == "critical" for f in data["compat"]) else 0)


@app.command(context_settings=SETTINGS_CONTEXT, epilog=_settings_epilog())
def optimize(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option(help="Folder for transformer.safetensors and its manifest.")],
    preset: Annotated[Optional[str], typer.Option(help="Optimization preset (also FRAMEPACK_PRESET).")] = None,
    ignore_incompatible: Annotated[bool, typer.Option("--ignore-incompatible")] = False,
) -> None:
    """Build the optimized transformer (low precision, pruning, INT-N, FP8 as set) and save it.

    Point FRAMEPACK_OPTIMIZED_TRANSFORMER at OUT/transformer.safetensors with ENABLE_OPT_CACHE=1 and
    later runs load it instead of re-quantizing.
    """
    console = _console()
    _configure_logging(False, console)
    try:
        from framepack_turbo.api import FramePack
        from framepack_turbo.models.loading import transformer_identity
        from framepack_turbo.optim import artifact

        settings = _settings_from(ctx, preset)
        target = out / "transformer.safetensors"
        _check_writable_file(target)
        # build from the weights, never from an existing artifact
        build = settings.model_copy(update={"enable_opt_cache": False})
        build._sources = settings._sources
        fp = FramePack.load(settings=build, ignore_incompatible=ignore_incompatible)
        model_dir = str(settings.model_dir) if settings.model_dir else None
        artifact.save(fp.bundle, settings, target, transformer_identity(settings.model, model_dir), fp.reports)
        size = target.stat().st_size / 2**20
        typer.echo(f"wrote {target} ({size:.1f} MiB) and {artifact.manifest_path(target).name}")
    except FramePackError as exc:
        raise _fail(str(exc), exc.exit_code) from None


def _report(result) -> None:
    timings = result.sidecar["timings"]
    frames = result.frames_before + len(result.frames)  # an extension: the input's frames come first
    extended = f", {result.frames_before} of them the input's" if result.frames_before else ""
    typer.echo(
        f"wrote {result.video_path} ({frames} frames, {frames / FPS:.2f} s{extended}, "
        f"seed {result.sidecar['seed']}) and {result.sidecar_path.name} in {timings['total']:.1f} s",
    )
    for name, record in result.sidecar.get("caches", {}).items():
        typer.echo(
            f"{name}: {record['hit']} reused of {record['hit'] + record['miss'] + record.get('forced', 0)} "
            f"({record['hit_rate'] * 100:.0f}%)"
        )


# The command's own options a user may give beside --from, by the recorded name they override
_OWN_OPTIONS = {
    "prompt_at": "prompt_at",
    "prompt_blend_sections": "prompt_blend_sections",
    "prompt_change_cfg": "prompt_change_cfg",
    "end_image": "end_image",
    "end_strength": "end_strength",
    "image_embed_blend": "image_embed_blend",
    "keyframe": "keyframes",
    "start_color": "start_color",
    "video_in": "video",
    "lora": "loras",
    "preset": "preset",
    "gpus": "parallel_degree",
    "parallel": "parallel_mode",
}


def _given(ctx: typer.Context, lora: list[str] | None) -> set[str]:
    """The settings and options the user gave on this command line (a value equal to the default counts):
    what a clip's record must not override."""
    from framepack_turbo.settings import parse_flags

    given = set(parse_flags(list(ctx.args)))
    for param, name in _OWN_OPTIONS.items():
        source = ctx.get_parameter_source(param)  # by name: typer vendors its own click
        if source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT"):
            given.add(name)
    if lora:
        given.add("loras")
    return given


def _note(text: str) -> None:
    typer.echo(shown(f"note: {text}"), err=True)


def _rerun_settings(rerun, clip: Path, mine, given: set[str], image: Path | None, video_in: Path | None) -> dict:
    """--from: the clip's recorded settings to put below the user's flags. What it does not take (paths,
    folders, files) is named in a note each, with the flag that passes it again; its LoRAs are taken where
    the user's LoRA folder holds a file with the recorded SHA-256. `mine`: the settings of the user's own
    flags and environment (where the LoRA folder is)."""
    from framepack_turbo.pipeline.recipe import match_loras, quoted

    label = f"--from {clip}"
    if rerun.video and image is not None and "video" not in given:
        raise InputError(
            f"{label}: the clip continued a video (recorded: {quoted(rerun.video)}), so it has no start image: "
            "drop --image, and pass --video FILE to continue a video again"
        )
    for dropped in rerun.dropped:
        if dropped.key not in given:
            _note(f"{label}: {dropped.note()}")
    below = dict(rerun.settings)
    if not rerun.loras:
        return below
    names = ", ".join(quoted(entry.name) for entry in rerun.loras)
    if "loras" in given or mine.explicitly_set("loras"):
        _note(f"{label}: its recorded LoRA(s) {names} are not used: the LoRAs given here are")
        return below
    folder = Path(mine.lora_dir)
    found = []
    for entry, path in match_loras(rerun.loras, folder):
        what = f"LoRA {quoted(entry.name)} (weight {entry.weight:g})"
        if path is None:
            _note(
                f"{label}: its recorded {what} is not used: no .safetensors in {folder} (--lora-dir) has its SHA-256 "
                f"{entry.sha256[:16]}...; pass --lora PATH:{entry.weight:g} again, or --lora-dir DIR"
            )
        else:
            found.append(f"{path}:{entry.weight!r}")
            _note(f"{label}: its recorded {what}: using {path}, whose SHA-256 is the recorded one")
    if found:
        below["loras"] = found
    return below


def _clip_metadata(path: Path, label: str) -> dict:
    """The metadata of a clip made here (its container's comment), or an InputError naming it."""
    from framepack_turbo.pipeline import video

    if not path.is_file():
        raise InputError(f"{label}: no such file")
    try:
        meta = video.read_metadata(path)
    except Exception as exc:  # not a video PyAV can open
        raise InputError(f"{label}: not a readable video ({type(exc).__name__})") from None
    if meta is None:
        raise InputError(f"{label}: no FramePack Turbo record in this video (it was made elsewhere)")
    return meta


def _recorded(path: Path) -> dict:
    """--from: what a clip made here records of itself, checked (pipeline/recipe.py), as a re-run's recipe:
    prompt, settings and timed options, never a path (`rerun` holds what was dropped)."""
    from framepack_turbo.pipeline import recipe

    record = recipe.read_record(_clip_metadata(path, f"--from {path}"), str(path))
    recipe.check_values(record, str(path))
    rerun = recipe.rerun_of(record)
    return {
        "prompt": rerun.prompt,
        "negative_prompt": rerun.negative_prompt,
        "settings": rerun.settings,
        "timed": rerun.timed,
        "rerun": rerun,
    }


def _recorded_meta(meta: dict) -> dict:
    """A resume state's copy of its clip's record as settings for the re-run: all of it, paths included (the
    state was written on this machine, by the job being resumed). A clip's record goes through `_recorded`."""
    from framepack_turbo.pipeline.options import OPTION_SETTING_NAMES
    from framepack_turbo.pipeline.recipe import TIMED_OPTIONS
    from framepack_turbo.settings import setting_names

    recorded = meta.get("options", {})
    options = {OPTION_SETTING_NAMES.get(k, k): v for k, v in recorded.items() if k not in ("prompt", "negative_prompt")}
    known = set(setting_names())
    settings = {**meta.get("settings", {}), **{k: v for k, v in options.items() if v is not None and k in known}}
    timed = {k: v for k, v in recorded.items() if k in TIMED_OPTIONS}
    return {**meta, "settings": settings, "timed": timed}


@app.command(short_help="What a clip was made with (prompt, seed, settings), read from the file alone.")
def info(
    video_path: Annotated[Path, typer.Argument(help="An .mp4 this tool made.")],
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """What a clip was made with, read from the file alone (its container metadata): prompt, seed, settings,
    and the files it names, which `--from` does not use unless they are passed again."""
    from framepack_turbo.pipeline import recipe, video

    try:
        meta = _clip_metadata(video_path, str(video_path))
        record = recipe.read_record(meta, str(video_path))
        probe = video.probe(video_path)
    except FramePackError as exc:
        raise _fail(str(exc), exc.exit_code) from None
    if json_out:  # JSON escapes every control character (ensure_ascii)
        typer.echo(json.dumps({**meta, "video": probe.__dict__}, indent=2, default=str))
        return
    opts = record.options
    rerun = recipe.rerun_of(record)
    dropped_keys = {d.key for d in rerun.dropped}
    from framepack_turbo.settings import path_settings

    recipe_settings = {k: v for k, v in record.settings.items() if k not in {*path_settings(), *dropped_keys}}
    lines = [
        f"prompt: {record.prompt}",
        f"negative prompt: {record.negative_prompt or '-'}",
        f"seed {record.seed}, variant {record.variant}, {opts.seconds:g} s, steps {opts.steps}, window {opts.window}, "
        f"distilled guidance {opts.distilled_guidance:g}, cfg {opts.cfg:g}, rescale {opts.guidance_rescale:g}, "
        f"resolution {opts.resolution}, crf {opts.crf}",
        f"model: {record.model.preset} ({record.model.source})",
        f"passes: {', '.join(record.passes) or 'none'}",
        "settings: " + (", ".join(f"{k}={v}" for k, v in sorted(recipe_settings.items())) or "defaults"),
    ]
    for entry in record.lora:
        lines.append(
            f"LoRA: {entry.name}, weight {entry.weight:g}, SHA-256 {entry.sha256} (--from takes the file with this "
            "hash from --lora-dir)"
        )
    again = []
    for dropped in rerun.dropped:
        why = f"not used by --from unless passed again: {dropped.flag}" if dropped.flag else dropped.reason
        lines.append(f"{dropped.what}: {dropped.value} ({why})")
        if dropped.flag and dropped.key in ("end_image", "keyframes", "video", "model_dir"):  # what the video shows
            again.append(dropped.flag)
    lines.append(
        f"video: {probe.frames} frames, {probe.width}x{probe.height}, {probe.fps:g} fps, {probe.codec} {probe.profile}"
    )
    start = [] if rerun.video else ["--image IMAGE"]
    lines.append(" ".join([f"re-run: framepack generate --from {video_path}", *start, *dict.fromkeys(again)]))
    typer.echo("\n".join(shown(line) for line in lines))


export_app = typer.Typer(help="Export components for other runtimes.", no_args_is_help=True)
app.add_typer(export_app, name="export")


@export_app.command("onnx", context_settings=SETTINGS_CONTEXT, epilog=_settings_epilog())
def export_onnx(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option(help="Folder; each component goes to OUT/<component>/ with a manifest.json.")],
    component: Annotated[
        list[str], typer.Option(help="transformer, text-encoder, image-encoder, vae-decoder or all (repeatable).")
    ] = ["transformer"],  # noqa: B006 - typer reads the default, never mutates it
    check: Annotated[
        bool, typer.Option(help="Run each graph in onnxruntime against PyTorch before keeping it.")
    ] = True,
    preset: Annotated[Optional[str], typer.Option(help="Optimization preset (also FRAMEPACK_PRESET).")] = None,
) -> None:
    """Export components to ONNX (dynamo exporter, weights as external data, dynamic text length, frames
    and resolution). Run them with FRAMEPACK_USE_ONNX_ENGINES=1 FRAMEPACK_ONNX_DIR=OUT; weight passes
    (low precision, pruning) must be the same in both runs, the manifest checks it.
    """
    console = _console()
    _configure_logging(False, console)
    try:
        from framepack_turbo.optim import onnx_export as ox

        ox.require_exporter()  # before any model loads
        names = list(ox.COMPONENTS) if "all" in component else list(dict.fromkeys(component))
        for name in names:
            if name not in ox.COMPONENTS:
                raise InputError(f"--component {name}: choose from {', '.join(ox.COMPONENTS)} or all")
            ox.check_output_folder(out / name)
        _check_writable_file(out / ".probe")
        settings = _settings_from(ctx, preset)
        from framepack_turbo.api import FramePack
        from framepack_turbo.optim.registry import switched_off_for_export

        # a graph records the weights as they are: hooks and compiled wrappers of other passes must not be in it
        build = settings.model_copy(update=switched_off_for_export(settings))
        build._sources = settings._sources
        fp = FramePack.load(settings=build)
        for name in names:
            manifest = ox.export_component(fp.bundle, name, out / name, check=check)
            for graph in manifest["graphs"]:
                size = sum(p.stat().st_size for p in (out / name).glob(graph["file"] + "*")) / 2**20
                error = f", max relative error {graph['check']['relative']:.1e}" if "check" in graph else ""
                typer.echo(f"wrote {out / name / graph['file']} ({size:.1f} MiB, {graph['dtype']}{error})")
    except FramePackError as exc:
        raise _fail(str(exc), exc.exit_code) from None


@app.command()
def bench(
    model: Annotated[
        str,
        typer.Option(help="tiny (trained, 64 px), tiny-random or small (CPU), full (real size, random weights, CUDA)."),
    ] = "tiny",
    configs: Annotated[
        str, typer.Option(help="Comma list of configurations; combine with + (int8+compile).")
    ] = "baseline",
    preset: Annotated[
        Optional[list[str]], typer.Option(help="Add an optimization preset as a configuration (repeatable).")
    ] = None,
    config_file: Annotated[Optional[Path], typer.Option(help="TOML with [configs.NAME] tables of settings.")] = None,
    variant: Annotated[Optional[str], typer.Option(help="inverted or f1.")] = None,
    seconds: Annotated[float, typer.Option(help="Clip length per generation.")] = 2.0,
    steps: Annotated[int, typer.Option(help="Sampling steps per section.")] = 4,
    resolution: Annotated[
        Optional[int], typer.Option(help="Bucket base; default 128 (64 for tiny, 640 for full).")
    ] = None,
    repeats: Annotated[int, typer.Option(help="Timed runs per configuration after the warm-up.")] = 2,
    seed: Annotated[int, typer.Option()] = 31337,
    device: Annotated[Optional[str], typer.Option(help="cuda or cpu; default: CUDA if present.")] = None,
    sequential: Annotated[
        bool, typer.Option("--sequential", help="One configuration process at a time (no interleaving).")
    ] = False,
    model_dir: Annotated[
        Optional[Path],
        typer.Option(
            help="Load every configuration's weights from this folder (the --model-dir layout; --model names the preset)."
        ),
    ] = None,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write every raw number here.")] = None,
    markdown_path: Annotated[Optional[Path], typer.Option("--markdown", help="Write the tables here.")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="Write a PNG plot here.")] = None,
    keep_outputs: Annotated[Optional[Path], typer.Option(help="Keep the compared tensors in this folder.")] = None,
    lora: Annotated[
        Optional[list[str]],
        typer.Option("--lora", help="PATH[:WEIGHT], repeatable: every configuration runs with it (no-lora drops it)."),
    ] = None,
    sweep: Annotated[
        Optional[str],
        typer.Option(
            help="Step-cache threshold series, comma list (teacache,magcache,fbcache,kvcache,kvcache+magcache,"
            "kvcache+teacache) or all: paired runs, the frontier table, --plot draws the frontier."
        ),
    ] = None,
) -> None:
    """Speed, peak memory and fidelity of configurations against the baseline, in one run."""
    console = _console()
    _configure_logging(False, console)
    try:
        from framepack_turbo.bench import configs as bench_configs
        from framepack_turbo.bench import report, runner

        leaked = sorted(k for k in os.environ if k.upper().startswith(ENV_PREFIX))
        if leaked:  # configurations say everything: each is read with an empty environment
            typer.echo(f"note: bench ignores {', '.join(leaked)}: put settings in configurations", err=True)
        if model not in BENCH_MODELS:
            raise InputError(f"--model {model}: choose {', '.join(BENCH_MODELS)}")
        if repeats < 1:
            raise InputError(f"--repeats {repeats}: must be >= 1")
        extra = bench_configs.load_config_file(config_file) if config_file else None
        resolved = bench_configs.resolve(configs.split(","), preset or [], extra)
        if sweep is not None:
            from framepack_turbo.bench import sweep as sweeps

            resolved += sweeps.configs([n.strip() for n in sweep.split(",") if n.strip()])
        spec = runner.BenchSpec(
            resolved,
            model=model,
            variant=variant,
            seconds=seconds,
            steps=steps,
            resolution=resolution or BENCH_MODELS[model],
            repeats=repeats,
            seed=seed,
            device=device,
            sequential=sequential,
            model_dir=str(model_dir.resolve()) if model_dir else None,
            loras=tuple(lora or ()),
            paired=sweep is not None,
        )
        from framepack_turbo.settings import Settings

        Settings.load(spec.common_settings(), source="cli", environ={})  # bad --seconds etc. fail here, once
        for path in (json_path, markdown_path, plot):
            if path is not None:
                _check_writable_file(path)
        command = "framepack " + " ".join(sys.argv[1:])
        results = runner.run(spec, keep_outputs, on_progress=lambda line: typer.echo(line, err=True))
    except FramePackError as exc:
        raise _fail(str(exc), exc.exit_code) from None
    except KeyboardInterrupt:
        raise _fail("aborted", 130) from None
    if json_path:
        report.write_json(results, json_path, command)
    if markdown_path:
        report.write_markdown(results, markdown_path, command)
    if plot and sweep is not None:
        from framepack_turbo.bench.sweep import write_frontier_plot

        write_frontier_plot(results, plot)
    elif plot:
        report.write_plot(results, plot)
    typer.echo(report.markdown(results, command))


calibrate_app = typer.Typer(help="Measure what a pass needs measured on this model.", no_args_is_help=True)
app.add_typer(calibrate_app, name="calibrate")

# one generation with nothing skipped: MagCache records, every other cache that changes the computation is off
CALIBRATION = dict(
    enable_magcache=True,
    magcache_calibrate=True,
    enable_teacache=False,
    enable_fbcache=False,
    enable_sim_cache=False,
    enable_kv_cache=False,
)


@calibrate_app.command("magcache", context_settings=SETTINGS_CONTEXT, epilog=_settings_epilog())
def calibrate_magcache(
    ctx: typer.Context,
    image: Annotated[
        Optional[Path], typer.Option(help="Start image; default: the bench's (a scene of tiny's world for tiny).")
    ] = None,
    prompt: Annotated[Optional[str], typer.Option(help="Prompt; default: the bench's.")] = None,
    negative: Annotated[str, typer.Option(help="Negative prompt (with --cfg > 1).")] = "",
    preset: Annotated[Optional[str], typer.Option(help="Optimization preset (also FRAMEPACK_PRESET).")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Library messages and debug lines too.")] = False,
) -> None:
    """MagCache's magnitude ratios for this model, variant, step count and resolution (and for the negative
    prediction when --cfg > 1): one generation with nothing skipped, the mean over its sections, written to
    --magcache-ratios or the runtime cache, where MagCache finds them."""
    import tempfile

    from framepack_turbo.settings import Settings, parse_flags

    console = _console()
    _configure_logging(verbose, console)
    try:
        from framepack_turbo.api import FramePack, options_from_settings
        from framepack_turbo.bench.runner import BenchSpec, bench_input
        from framepack_turbo.pipeline.events import CancelToken
        from framepack_turbo.pipeline.options import load_image

        overrides = {**parse_flags(list(ctx.args)), **CALIBRATION}
        if preset is not None:
            overrides["preset"] = preset
        settings = Settings.load(overrides, source="cli")
        _check_device(settings.device)
        with tempfile.TemporaryDirectory(prefix="framepack-calibrate-") as tmp:
            spec = BenchSpec([], model=settings.model, resolution=settings.resolution, model_dir=settings.model_dir)
            default_image, default_prompt, _ = bench_input(spec, Path(tmp))
            picture = load_image(image or default_image)
            options = options_from_settings(settings, prompt or default_prompt, negative)
            fp = FramePack.load(settings=settings)
            token = CancelToken()
            job = {k: v for k, v in options.to_dict().items() if k not in ("prompt", "negative_prompt")}
            with _InterruptToCancel(token), _ProgressView(console) as view:
                fp.generate(picture, options.prompt, Path(tmp) / "calibration.mp4", view, token, negative, **job)
        cache = fp.extension("magcache")
        if cache is None or not cache.saved:
            raise InputError("MagCache did not run, so nothing was calibrated (see the compatibility findings above)")
        for key, entry in cache.calibration.latest().items():
            typer.echo(
                f"{key.describe()}, mean of {entry.sections} section(s): {' '.join(f'{r:.5f}' for r in entry.ratios)}"
            )
            typer.echo(f"  saved to {cache.saved[key]}")
    except FramePackError as exc:
        raise _fail(str(exc), exc.exit_code) from None
    except KeyboardInterrupt:
        raise _fail("aborted", 130) from None


LOOPBACK = ("127.0.0.1", "localhost", "::1")


@app.command(context_settings=SETTINGS_CONTEXT, epilog=_settings_epilog())
def serve(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="Address to listen on; anything but loopback needs --auth.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 7860,
    auth: Annotated[Optional[str], typer.Option(help="user:pass required to open the page.")] = None,
    share: Annotated[str, typer.Option(help="yes: a public Gradio share link (needs --auth).")] = "no",
    data_dir: Annotated[Path, typer.Option(help="Jobs database, uploaded images and videos.")] = Path("outputs/app"),
    preset: Annotated[Optional[str], typer.Option(help="Optimization preset (also FRAMEPACK_PRESET).")] = None,
    ray: Annotated[
        Optional[str],
        typer.Option(
            "--ray",
            envvar="FRAMEPACK_RAY_ADDRESS",
            help="Run jobs on Ray workers: bare --ray (or 'local') starts a Ray cluster on this machine; 'auto' "
            "joins the one `ray start` runs here; host:port or ray://host:port another. Needs "
            "framepack-turbo[ray].",
        ),
    ] = None,
    ray_workers: Annotated[
        Optional[int], typer.Option(help="Ray workers: default one per GPU in the cluster (CPU-only: 1).")
    ] = None,
    ray_cpus_per_worker: Annotated[
        Optional[int], typer.Option(help="CPUs each Ray worker reserves (default: the cluster's, shared out).")
    ] = None,
    ray_shared_dir: Annotated[
        bool,
        typer.Option(
            help="DATA_DIR is one folder every Ray node sees at the same path: the workers write there and "
            "nothing is copied back."
        ),
    ] = False,
    ray_dashboard: Annotated[
        bool, typer.Option(help="Start Ray's dashboard with the local cluster (on 127.0.0.1:8265).")
    ] = False,
) -> None:
    """The web page and its job queue. Settings flags (--model, --resolution ...) are the page's defaults.

    Jobs, their states and videos persist in DATA_DIR/jobs.sqlite and DATA_DIR/videos/: a restarted
    server shows them again and goes on with the queued ones. With --ray the jobs run on Ray actors,
    one per GPU, several at once (docs/scale.md).
    """
    console = _console()
    _configure_logging(False, console)
    try:
        if share not in ("yes", "no"):
            raise InputError(f"--share {share}: yes or no")
        credentials = None
        if auth is not None:
            user, sep, password = auth.partition(":")
            if not (sep and user and password):
                raise InputError("--auth must be user:pass")
            credentials = (user, password)
        public = host not in LOOPBACK or share == "yes"
        if public and credentials is None:
            where = "a share link" if share == "yes" else f"{host}"
            raise InputError(
                f"refusing to serve on {where} without --auth user:pass: anyone who reaches it could run jobs on "
                "this machine and read its videos. Add --auth, or keep --host 127.0.0.1"
            )
        from framepack_turbo.settings import Settings, parse_flags

        base = parse_flags(list(ctx.args))  # the page's defaults; each job's settings start from them
        if preset is not None:
            base["preset"] = preset
        settings = Settings.load(base, source="cli")  # bad flags fail here, before the page starts
        if ray is None:
            _check_device(settings.device)  # Ray workers check their own device
            if settings.parallel_degree > 1:
                raise InputError(
                    f"--parallel-degree {settings.parallel_degree}: the page's jobs run in this one process; a job "
                    "on several GPUs needs --ray (each worker a group of that many actors)"
                )
        elif ray_workers is not None and ray_workers < 1 or ray_cpus_per_worker is not None and ray_cpus_per_worker < 1:
            raise InputError("--ray-workers and --ray-cpus-per-worker count from 1")
        _check_writable_file(data_dir / "jobs.sqlite")
        if ray is not None:
            from framepack_turbo.app.cluster import require_ray

            require_ray()
    except FramePackError as exc:
        raise _fail(str(exc), exc.exit_code) from None
    from framepack_turbo.app.jobs import DataDirLock, JobStore

    try:
        lock = DataDirLock(data_dir).acquire()  # before recovery: a second server must not touch the first's jobs
    except FramePackError as exc:
        raise _fail(str(exc), exc.exit_code) from None
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local tool
    from framepack_turbo.app.queue import GenerationRunner, JobQueue
    from framepack_turbo.app.ui import build, launch_options
    from framepack_turbo.hardware import Hardware

    hardware = Hardware.detect()
    workers = GenerationRunner(base)
    if ray is not None:
        from framepack_turbo.app.cluster import start_workers

        try:
            workers = start_workers(
                ray,
                base,
                data_dir,
                ray_workers,
                ray_cpus_per_worker,
                shared=ray_shared_dir,
                dashboard=ray_dashboard,
                ranks=settings.parallel_degree,
            )
        except FramePackError as exc:
            lock.release()
            raise _fail(str(exc), exc.exit_code) from None
        hardware = workers[0].hardware  # the page's compatibility report is the workers'
        group = f" of {settings.parallel_degree} ranks each" if settings.parallel_degree > 1 else ""
        console.print(
            f"[bold]Ray:[/bold] {len(workers)} worker(s){group} on {hardware.device_name}; `framepack worker-info`"
        )
    queue = JobQueue(JobStore(data_dir / "jobs.sqlite"), workers, data_dir, base=base).start()
    page = build(queue, base, hardware)
    try:
        page.launch(
            server_name=host,
            server_port=port,
            auth=credentials,
            share=share == "yes",
            quiet=False,
            **launch_options(queue),
        )
    finally:
        queue.stop()
        lock.release()


@app.command("worker-info")
def worker_info(
    data_dir: Annotated[Path, typer.Option(help="The server's data dir.")] = Path("outputs/app"),
    json_out: Annotated[bool, typer.Option("--json", help="Print the record as JSON.")] = False,
) -> None:
    """The Ray workers of the `serve --ray` running on DATA_DIR: device, loaded model, current job."""
    import json as json_module

    from framepack_turbo.app.cluster import read_board
    from framepack_turbo.app.jobs import DataDirInUse, DataDirLock

    try:
        board = read_board(data_dir)
        try:  # a lock we can take means no server holds the data dir: the record is its last word
            DataDirLock(data_dir).acquire().release()
            running = False
        except DataDirInUse:
            running = True
    except FramePackError as exc:
        raise _fail(str(exc), exc.exit_code) from None
    if json_out:
        typer.echo(json_module.dumps({**board, "server_running": running}, indent=2))
        return
    if not running:
        typer.echo(f"No server is running on {data_dir}; as its server (pid {board.get('pid')}) last recorded them:")
    for row in board["workers"]:
        loaded = row.get("model") or "no model loaded"
        job = f"job {row['job']}" if row.get("job") else "no job"
        where = f"{row.get('host', '?')} pid {row.get('pid', '?')}"
        if row.get("ranks", 1) > 1:  # a group: rank 0's host and pid, the others on the same node
            where += f", {row['ranks']} ranks"
        typer.echo(
            shown(  # the board is a file: nothing in it acts on the terminal
                f"{row['name']}: {row.get('state', '?')}, {row.get('device', '?')} ({where}), {loaded}, "
                f"{row.get('loads', 0)} load(s), {job}"
            )
        )


def _check_writable_file(path: Path, label: str = "") -> None:
    """Create the folder and a scratch file in it: refuse a path we could not write, before any work."""
    parent = path.parent if str(path.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".framepack-write-test-"):
            pass
    except OSError as exc:
        raise InputError(f"{label}{path}: cannot write there ({exc.strerror or exc})") from None


def _runs_on_cpu(settings) -> bool:
    from framepack_turbo.models.loading import default_device

    return (settings.device or default_device().type).startswith("cpu")


def _check_parallel(settings, ignore_incompatible: bool) -> None:
    """Before any rank starts: a context-parallel job the machine cannot run is bad input (one line, exit 2);
    other critical findings stop it as they would one process."""
    from framepack_turbo import compat
    from framepack_turbo.api import IncompatibleSettings
    from framepack_turbo.hardware import Hardware

    hardware = Hardware.detect()
    if _runs_on_cpu(settings) and hardware.cuda:  # --device cpu on a GPU machine: the ranks are CPU processes
        hardware = dataclasses.replace(hardware, device="cpu", gpu_count=None)
    report = compat.check(settings, hardware)
    for finding in report.critical:
        if finding.id.startswith("parallel-"):
            raise InputError(f"{finding.message} Fix: {finding.fix}")
    if report.has_critical and not ignore_incompatible:
        raise IncompatibleSettings(report)


def _check_device(device: str | None) -> None:
    if device is None or not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise InputError(f"--device {device}: CUDA is not available on this machine")


def _print_version(value: bool) -> None:
    if value:
        from framepack_turbo import __version__

        typer.echo(f"framepack-turbo {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """FramePack Turbo."""


def _bare_ray(argv: list[str]) -> list[str]:
    """`serve --ray` with no address means a local cluster (click options take a value, so one is put in)."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--ray" and (i + 1 == len(out) or out[i + 1].startswith("-")):
            out[i] = "--ray=local"
    return out


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app(args=_bare_ray(sys.argv[1:]))


if __name__ == "__main__":
    main()
