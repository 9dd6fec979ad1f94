"""The `framepack` command. It reads events from the generator and shows them; it decides nothing else.

Errors a user can cause end with exit code 2 and one line on stderr, never a traceback.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer

from framepack_turbo.errors import Cancelled, FramePackError, InputError

app = typer.Typer(
    name="framepack",
    help="FramePack Turbo: image-to-video where every speed-up is real, checked and measured.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

log = logging.getLogger("framepack_turbo.cli")


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def _console():
    from rich.console import Console

    return Console(stderr=True)


def _configure_logging(verbose: bool, console) -> None:
    from rich.logging import RichHandler

    # One console for log lines and the progress bar, so lines print above the bar instead of through it.
    handler = RichHandler(console=console, show_time=False, show_path=False, markup=False, show_level=verbose)
    logging.basicConfig(format="%(message)s", level=logging.WARNING, handlers=[handler], force=True)
    logging.getLogger("framepack_turbo").setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        # Library chatter (dtype notes, torchvision fallbacks) is noise to a user; --verbose shows it.
        for name in ("diffusers", "transformers", "huggingface_hub", "httpx"):
            logging.getLogger(name).setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=UserWarning, module="huggingface_hub")
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        from diffusers.utils import logging as df_logging

        df_logging.set_verbosity_error()


def check_writable(out: Path) -> None:
    """Refuse an output path we could not write, before any model loads."""
    if out.suffix.lower() != ".mp4":
        raise InputError(f"--out {out}: the output must be an .mp4 file")
    if out.is_dir():
        raise InputError(f"--out {out}: is a directory; give a file name ending in .mp4")
    parent = out.parent if str(out.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".framepack-write-test-"):
            pass
    except OSError as exc:
        raise InputError(f"--out {out}: cannot write there ({exc.strerror or exc})") from None


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
            if self.task is None:
                self.task = self.progress.add_task("sampling", total=total, detail=detail, eta=eta)
            self.progress.update(self.task, completed=event.fraction * total, detail=detail, eta=eta)
        elif isinstance(event, SectionDone):
            self.progress.console.print(
                f"section {event.section}/{event.sections} done: {event.frames} frames in {event.video_path}"
            )
        elif isinstance(event, StageStarted) and event.stage != "sampling":
            log.debug("stage: %s", event.stage)
        elif isinstance(event, Notice):
            self.progress.console.print(f"note: {event.message}")
        elif isinstance(event, JobDone):
            pass


@app.command()
def generate(
    image: Annotated[Path, typer.Option(help="Start image (png, jpg, webp ...).")],
    prompt: Annotated[str, typer.Option(help="What happens in the video.")],
    seconds: Annotated[float, typer.Option(help="Clip length in seconds (0 < s <= 120).")] = 5.0,
    variant: Annotated[Optional[str], typer.Option(help="inverted (anti-drifting) or f1; default: the model's.")] = None,
    model: Annotated[str, typer.Option(help="Preset: framepack, framepack-f1, tiny, small.")] = "framepack",
    model_dir: Annotated[Optional[Path], typer.Option(help="Local folder laid out like the repos.")] = None,
    seed: Annotated[int, typer.Option()] = 31337,
    steps: Annotated[int, typer.Option(help="Sampling steps per section.")] = 25,
    window: Annotated[int, typer.Option(help="Latent frames per section (latent window size).")] = 9,
    gs: Annotated[float, typer.Option(help="Distilled guidance scale.")] = 10.0,
    cfg: Annotated[float, typer.Option(help="Real CFG scale; 1 = off. Above 1 uses --negative.")] = 1.0,
    negative: Annotated[str, typer.Option(help="Negative prompt (used when --cfg > 1).")] = "",
    rs: Annotated[float, typer.Option(help="CFG rescale (0-1).")] = 0.0,
    resolution: Annotated[int, typer.Option(help="Bucket base resolution.")] = 640,
    crf: Annotated[int, typer.Option(help="h264 quality, 0-51, lower is better.")] = 16,
    out: Annotated[Optional[Path], typer.Option(help="Output .mp4 (a .json sidecar is written beside it).")] = None,
    device: Annotated[Optional[str], typer.Option(help="cuda, cuda:1, cpu; default: CUDA if present.")] = None,
    offline: Annotated[bool, typer.Option(help="Never contact the Hugging Face hub.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Generate a video from one image and a prompt."""
    console = _console()
    _configure_logging(verbose, console)
    try:
        # Everything the user typed is checked before a model loads.
        from framepack_turbo.api import default_output_path
        from framepack_turbo.models.presets import get_preset
        from framepack_turbo.pipeline.options import GenerateOptions, load_image

        options = GenerateOptions(
            prompt=prompt, negative_prompt=negative, seconds=seconds, variant=variant, seed=seed, steps=steps,
            window=window, distilled_guidance=gs, cfg=cfg, guidance_rescale=rs, resolution=resolution, crf=crf,
        )  # fmt: skip
        picture = load_image(image)
        get_preset(model)
        if model_dir is not None and not model_dir.is_dir():
            raise InputError(f"--model-dir {model_dir}: no such directory")
        out_path = out or default_output_path()
        check_writable(out_path)
        device_obj = _parse_device(device)

        from framepack_turbo.api import FramePack
        from framepack_turbo.pipeline.events import CancelToken

        fp = FramePack.load(model, model_dir=model_dir, device=device_obj, local_files_only=offline)
        token = CancelToken()
        with _InterruptToCancel(token), _ProgressView(console) as view:
            run_settings = {"model": model, "model_dir": str(model_dir) if model_dir else None,
                            "device": str(fp.bundle.device), "offline": offline}  # fmt: skip
            result = fp.generate(
                picture, prompt, out=out_path, on_event=view, cancel=token, settings=run_settings,
                **{k: v for k, v in options.to_dict().items() if k != "prompt"},
            )  # fmt: skip
        timings = result.sidecar["timings"]
        typer.echo(
            f"wrote {result.video_path} ({len(result.frames)} frames, {len(result.frames) / 30:.2f} s) "
            f"and {result.sidecar_path.name} in {timings['total']:.1f} s",
        )
    except Cancelled as exc:
        raise _fail(str(exc), exc.exit_code) from None
    except FramePackError as exc:
        raise _fail(str(exc), exc.exit_code) from None
    except KeyboardInterrupt:
        raise _fail("aborted", 130) from None


def _parse_device(device: str | None):
    if device is None:
        return None
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InputError(f"--device {device}: not a device name (cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: CUDA is not available on this machine")
    return dev


@app.callback()
def _root() -> None:
    """FramePack Turbo."""


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":
    main()
