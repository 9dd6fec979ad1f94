"""What a clip made here carries of itself, and what `--from` takes of it: a recipe, never a place.

The mp4's container metadata (`RunRecord.reproduction`, written by pipeline/video.py) records the prompt,
seed, options, model, passes, non-default settings and LoRAs of the job that made it. A clip is a file
anyone may have made or edited, so what is read back is first checked against `ClipRecord`, the schema of
that metadata: a wrongly typed field (options a list, keyframes "abc", a prompt at [1.0, null]) is refused
in one line naming the clip and the field (`read_record`). Its values are then checked as the settings and
options would check them, again naming the clip and the recorded key (`check_values`).

`rerun_of` splits a record into what a re-run takes, the recipe (prompt, seed, options, the model's name,
the passes' settings and their numbers), and what it never takes: where to read or write on this machine.
Every setting whose type is a path (`settings.path_settings`: a new one is covered by its type) and every
option that names a file (`options.PATH_OPTIONS`: the end image, the keyframes, the input video) comes back
as a `Dropped`, with the flag that passes it again. LoRAs come back by content only: a file in the user's
LoRA folder whose SHA-256 is the recorded one (`match_loras`).
"""

from __future__ import annotations

import json
import math
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from framepack_turbo.constants import MAX_LORA_WEIGHT
from framepack_turbo.errors import InputError
from framepack_turbo.pipeline.options import OPTION_SETTING_NAMES, PATH_OPTIONS, GenerateOptions
from framepack_turbo.text import shown

# GenerateOptions over time (not settings), taken from a clip unless a flag says otherwise
TIMED_OPTIONS = (
    "prompt_at",
    "prompt_blend_sections",
    "prompt_change_cfg",
    "end_image",
    "end_strength",
    "image_embed_blend",
    "keyframes",
    "start_color",
    "video",
)
_SHOWN_LENGTH = 200  # a recorded value quoted in a message: at most this many characters


class _Strict(BaseModel):
    # strict: JSON types as written (no "5" for 5, no 1 for true); extra keys (a later version's) ignored
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class RecordedModel(_Strict):
    preset: str | None = None
    source: str | None = None  # a repo id or a folder: shown, never used


class RecordedLora(_Strict):
    """A LoRA as the clip names it: the file's name, its contents' hash and its weight (never its path)."""

    name: str
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    weight: Annotated[float, Field(ge=-MAX_LORA_WEIGHT, le=MAX_LORA_WEIGHT, allow_inf_nan=False)]


def _options_model() -> type[BaseModel]:
    """GenerateOptions as a schema: each recorded option typed as the dataclass declares it, so a new option
    is checked by its declaration alone."""
    hints = typing.get_type_hints(GenerateOptions)
    declared = {f.name: (hints[f.name], f.default) for f in fields(GenerateOptions)}
    return create_model("RecordedOptions", __base__=_Strict, **declared)


RecordedOptions = _options_model()


class ClipRecord(_Strict):
    """The metadata a clip made here carries (`RunRecord.reproduction`), as types."""

    prompt: str
    negative_prompt: str = ""
    seed: int | None = None
    variant: Literal["inverted", "f1"] | None = None
    options: RecordedOptions = Field(default_factory=RecordedOptions)  # type: ignore[valid-type]
    model: RecordedModel = Field(default_factory=RecordedModel)
    passes: list[str] = Field(default_factory=list)
    settings: dict[str, Any] = Field(default_factory=dict)  # values checked by Settings: check_values
    lora: list[RecordedLora] = Field(default_factory=list)
    created: str | None = None

    def recorded_options(self) -> dict[str, Any]:
        """The options the clip recorded (not the defaults filled in for ones it lacks)."""
        return {name: getattr(self.options, name) for name in self.options.model_fields_set}


def quoted(value: Any) -> str:
    """A recorded value for a message: control characters escaped, long text cut."""
    text = shown(value)
    return text if len(text) <= _SHOWN_LENGTH else text[:_SHOWN_LENGTH] + "..."


def read_record(meta: Any, clip: str) -> ClipRecord:
    """The clip's metadata as a `ClipRecord`, or an InputError naming the clip and the first wrong field."""
    try:
        return ClipRecord.model_validate_json(json.dumps(meta, default=str))
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"]) or "metadata"
        raise InputError(
            f"{shown(clip)}: its recorded {quoted(where)} is not valid ({error['msg']}): the file was edited or "
            "not made by this tool"
        ) from None


def recorded_settings(record: ClipRecord) -> dict[str, Any]:
    """Every setting the clip records, as it records them: its settings, then the options that are settings
    (the options win, as they are what the job ran with)."""
    from framepack_turbo.settings import setting_names

    known = set(setting_names())
    out = {k: v for k, v in record.settings.items() if v is not None}
    for name, value in record.recorded_options().items():
        key = OPTION_SETTING_NAMES.get(name, name)
        if key in known and value is not None:
            out[key] = list(value) if isinstance(value, tuple) else value
    return out


@dataclass(frozen=True)
class Dropped:
    """One thing a clip records that a re-run does not take: `key` the setting or option, `what` it is in
    words, `value` as recorded, `flag` how the user passes it again."""

    key: str
    what: str
    value: str
    flag: str | None
    reason: str = "a clip does not say where to read or write on this machine"

    def note(self) -> str:
        again = f"; pass {self.flag} again to use it" if self.flag else ""
        return f"its recorded {self.what} {quoted(self.value)} is not used ({self.reason}){again}"


@dataclass
class Rerun:
    """What a re-run takes of a clip: settings (below the user's flags), timed options, the LoRAs to find by
    hash, and what it dropped."""

    prompt: str
    negative_prompt: str
    settings: dict[str, Any]
    timed: dict[str, Any]
    loras: list[RecordedLora]
    dropped: list[Dropped] = field(default_factory=list)
    video: str | None = None  # the clip continued this video (dropped: only --video passes one)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def rerun_of(record: ClipRecord) -> Rerun:
    """The recipe of a clip (already checked by `check_values`) and, one `Dropped` each, its paths."""
    from framepack_turbo.settings import path_settings, setting_names

    local = set(path_settings())
    known = set(setting_names())
    dropped: list[Dropped] = []
    settings: dict[str, Any] = {}
    for key, value in recorded_settings(record).items():
        if key not in known:
            dropped.append(Dropped(key, f"setting {key}", str(value), None, "not a setting of this version"))
        elif key == "loras":
            if not record.lora:  # a clip from before LoRAs were recorded by hash: their paths alone
                for text in value if isinstance(value, list) else [value]:
                    dropped.append(
                        Dropped(key, "LoRA", str(text), "--lora PATH:WEIGHT", "the clip records no hash to find it by")
                    )
        elif key in local:
            kind = "folder" if key.endswith("_dir") else "path"
            dropped.append(Dropped(key, key, str(value), f"{_flag(key)} {kind.upper()}"))
        else:
            settings[key] = value
    options = record.recorded_options()
    timed = {k: v for k, v in options.items() if k in TIMED_OPTIONS and k not in PATH_OPTIONS}
    if options.get("end_image"):
        dropped.append(Dropped("end_image", "end image", options["end_image"], "--end-image PATH"))
    for seconds, path in options.get("keyframes") or ():
        dropped.append(
            Dropped(
                "keyframes",
                f"keyframe at {seconds:g} s",
                path,
                f"--keyframe {seconds:g}:PATH",
                "a keyframe without its image is dropped, and a clip names no file on this machine",
            )
        )
    video = options.get("video") or None
    if video:
        dropped.append(Dropped("video", "input video", video, "--video PATH"))
    return Rerun(record.prompt, record.negative_prompt, settings, timed, list(record.lora), dropped, video)


def check_values(record: ClipRecord, clip: str) -> None:
    """The recorded values checked as a run checks them (settings, options, the prompt timeline), each
    refusal naming the clip and the recorded key instead of a flag the user never typed."""
    from framepack_turbo.pipeline.timeline import plan_timeline
    from framepack_turbo.settings import Settings, allowed, path_settings, setting_names

    name = shown(clip)
    local, known = set(path_settings()), set(setting_names())
    values = {k: v for k, v in recorded_settings(record).items() if k in known and k not in local}
    try:
        Settings(**values)
    except ValidationError as exc:
        error = exc.errors()[0]
        key = str(error["loc"][0]) if error["loc"] else "settings"
        reason = (
            error["msg"].removeprefix("Value error, ")
            if error["type"] == "value_error"
            else f"allowed {allowed(key)}"
            if key in known
            else error["msg"]
        )
        raise InputError(f"{name}: its recorded {key} is not valid: {quoted(error.get('input'))} ({reason})") from None
    skip = {*PATH_OPTIONS, "prompt", "negative_prompt"}  # the prompts: the record's own, above
    options = {k: v for k, v in record.recorded_options().items() if k not in skip}
    try:
        checked = GenerateOptions(prompt=record.prompt, negative_prompt=record.negative_prompt, **options)
    except InputError as exc:
        raise InputError(f"{name}: its recorded options are not valid: {shown(exc)}") from None
    for seconds, _ in checked.prompt_at:
        if not (math.isfinite(seconds) and seconds >= 0):
            raise InputError(
                f"{name}: its recorded prompt at {seconds:g} s is not valid: a time is a number >= 0 seconds"
            )
    from framepack_turbo.pipeline.sections import section_count

    variant = checked.variant or record.variant or "inverted"
    try:
        plan_timeline(
            checked.prompt,
            checked.prompt_at,
            (),
            None,
            variant,
            section_count(checked.seconds, checked.window),
            checked.window,
            checked.seconds,
            checked.prompt_blend_sections,
        )
    except InputError as exc:
        raise InputError(f"{name}: its recorded prompt timeline is not valid: {shown(exc)}") from None


def match_loras(loras: list[RecordedLora], folder: Path | None) -> list[tuple[RecordedLora, Path | None]]:
    """Each recorded LoRA with the file in `folder` whose SHA-256 is the recorded one (None: no such file).
    Files named as recorded are hashed first; each file at most once, and none once every LoRA is found."""
    from framepack_turbo.files import sha256_file

    found: dict[str, Path] = {}
    wanted = {lora.sha256 for lora in loras}
    if loras and folder is not None and folder.is_dir():
        names = {lora.name for lora in loras}
        candidates = sorted(folder.glob("*.safetensors"), key=lambda p: (p.name not in names, p.name))
        for path in candidates:
            if wanted <= set(found):
                break
            try:
                if path.is_file():
                    found.setdefault(sha256_file(path), path)
            except OSError:  # unreadable: not the file
                continue
    return [(lora, found.get(lora.sha256)) for lora in loras]
