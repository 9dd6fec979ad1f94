"""What each section of a clip is conditioned on, in time: timestamped prompts, keyframes, the end frame.

Pure functions over section numbers and seconds, no tensors. Sections are counted here in *time order*
(0 = the clip's first section); `time_position` maps a section in generation order to it (the inverted
variant generates the last section in time first). Section k covers pixel frames
`[k * window * 4, (k + 1) * window * 4)` at 30 fps, so its span starts at `k * window * 4 / 30` s.

- Timestamped prompts: `"[0s: a red circle moves right] [1.8s: it moves left]"`; text outside the
  tags is the default prompt (used before the first tag). A bracket whose part before its first colon reads
  as a time (a number, signed or not, `nan`, `inf`, a decimal comma, a unit after it) is a tag, and its time
  must be one `--prompt-at` takes (`seconds_of`: the one rule for both; the clip's range is checked where the
  sections are known): `[-1s: x]`, `[nan s: x]` and `[1,2s: x]` are refused, never left in the text. So is a
  tag not closed before the next bracket (`[0s: a [1.2s: b]`) and a time in brackets with no colon (`[1.2s]`).
  Other brackets (`a [red] ball`, `[2 cats: playing]`) are the prompt's text, kept as typed. A tag's time snaps to the nearest section
  boundary: a prompt cannot change inside a section, whose frames are sampled together. A change can
  blend over the next N sections: section j of the blend (0-based) takes (j + 1) / (N + 1) of the new
  prompt's embeddings.
- Keyframes (inverted): a keyframe's time snaps to the nearest section boundary after the start, as a
  prompt's does; from that boundary on, the sections take its latent as their clean "pre" anchor instead
  of the start image's (FramePack-eichi's rule: a section's anchor is the nearest keyframe among the
  sections generated at or after it, which in the inverted order is the latest at or before it in time).
  Snapping is what the tiny model was trained on (train/timeline.py: the keyframe is the boundary's
  frame), and it makes the time a keyframe shows exact. A keyframe that lands on the clip's end is its
  end frame.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass

from framepack_turbo.constants import FPS, LATENT_FRAMES_TO_PIXELS
from framepack_turbo.errors import InputError
from framepack_turbo.text import shown

# A time as --prompt-at and a tag take it: a decimal number (exponent allowed) or nan/inf (refused as not
# finite), an optional trailing s. Not float()'s whole syntax: no underscores, no non-ASCII digits.
_SECONDS = re.compile(r"\s*([+-]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|nan|inf(?:inity)?))\s*s?\s*", re.I)
# What a user means as a time, right or wrong (`1,2s`, `1.2 sec`, `- 1s`, `nan s`): inside brackets it makes a tag.
_TIME_LIKE = re.compile(
    r"\s*[+-]?\s*(?:[0-9.,_]*[0-9][0-9.,_]*(?:[eE][+-]?[0-9]+)?|\.[0-9]|nan|inf(?:inity)?)\s*"
    r"(?P<unit>s|secs?|seconds?)?\s*",
    re.I,
)
TAG_FORM = "[TIMEs: TEXT] with TIME in seconds, e.g. [1.8s: the red circle moves left]"


@dataclass(frozen=True)
class TimedPrompt:
    seconds: float  # as asked
    text: str


@dataclass(frozen=True)
class PromptChange:
    """A prompt taking over at a section boundary."""

    text: str
    asked_s: float  # the time given
    section: int  # the time-order section it starts at (after snapping)
    starts_s: float  # where that section starts


def section_seconds(window: int) -> float:
    """Seconds of video one section adds."""
    return window * LATENT_FRAMES_TO_PIXELS / FPS


def time_position(variant: str, number: int, total: int) -> int:
    """The time-order index of the section generated `number`-th."""
    return total - 1 - number if variant == "inverted" else number


def seconds_of(text: str) -> float:
    """A time in seconds as `--prompt-at`, `--keyframe` and prompt tags write it; NaN where it is not one (or
    not finite). Whether it lies inside the clip is checked once the sections are known (`prompt_changes`)."""
    m = _SECONDS.fullmatch(text)
    seconds = float(m.group(1)) if m else math.nan
    return seconds if math.isfinite(seconds) else math.nan


def _excerpt(text: str, limit: int = 40) -> str:
    return repr(shown(text if len(text) <= limit else text[: limit - 3] + "..."))


def _tags(text: str) -> Iterator[tuple[int, int, TimedPrompt]]:
    """Each tag as (start, end, prompt); a bracket that reads as a tag but is not one is refused in one line."""
    i = text.find("[")
    while i >= 0:
        cut = min((j for j in (text.find(c, i + 1) for c in ":[]") if j >= 0), default=len(text))
        head, stop = text[i + 1 : cut], text[cut : cut + 1]
        like = _TIME_LIKE.fullmatch(head)
        if like and stop == ":":
            close = text.find("]", cut)
            inner = text.find("[", cut)
            if close < 0 or 0 <= inner < close:  # `[0s: a [1.2s: b]` or `[0s: a`: one tag, unclosed
                where = "before the next '['" if inner >= 0 else "(no ']' after it)"
                shown_to = inner if inner >= 0 else len(text)
                raise InputError(
                    f"prompt tag {_excerpt(text[i:shown_to].rstrip())} is not closed {where}: write {TAG_FORM}, "
                    "with no brackets in its text"
                )
            seconds = seconds_of(head)
            if math.isnan(seconds):
                raise InputError(f"prompt tag {_excerpt(text[i : close + 1])}: write {TAG_FORM}")
            yield i, close + 1, TimedPrompt(seconds, text[cut + 1 : close].strip())
            i = text.find("[", close + 1)
            continue
        if like and stop == "]" and like.group("unit"):
            raise InputError(f"prompt tag {_excerpt(text[i : cut + 1])} has no ':' before its text: write {TAG_FORM}")
        i = text.find("[", i + 1)


def parse_prompt(text: str) -> tuple[str, list[TimedPrompt]]:
    """(default prompt, timed prompts in time order) from a prompt with `[Ns: ...]` tags."""
    tags = list(_tags(text))
    if not tags:
        return text, []  # as typed: the encoders see exactly what FramePack's would
    starts = [0, *(end for _, end, _ in tags)]
    ends = [*(start for start, _, _ in tags), len(text)]
    default = " ".join(" ".join(text[a:b] for a, b in zip(starts, ends)).split())
    timed = [prompt for _, _, prompt in tags]
    for prompt in timed:
        if not prompt.text:
            raise InputError(f"prompt tag [{prompt.seconds:g}s: ...] has no text")
    return default, sorted(timed, key=lambda p: p.seconds)


def _parse_timed(value: str, flag: str, form: str, example: str) -> tuple[float, str]:
    """`TIME:REST` (TIME in seconds, an optional trailing s) as (seconds, REST), or one line saying how to write it."""
    time_part, sep, rest = value.partition(":")
    seconds = seconds_of(time_part)
    if not sep or not rest.strip() or math.isnan(seconds):
        raise InputError(f"{flag} {value!r}: write {form}, e.g. {example}")
    return seconds, rest.strip()


def parse_prompt_at(value: str) -> TimedPrompt:
    """`--prompt-at TIME:TEXT`."""
    return TimedPrompt(*_parse_timed(value, "--prompt-at", "TIME:TEXT", "1.8:the red circle moves left"))


def prompt_changes(
    default: str, timed: list[TimedPrompt], sections: int, window: int, seconds: float
) -> list[PromptChange]:
    """Each prompt and the section it starts at, in time order; the first starts at section 0.

    Times must lie in [0, seconds); two prompts that snap to one boundary are an error (the second would
    never be seen)."""
    length = section_seconds(window)
    changes: list[PromptChange] = []
    if default or not timed:
        changes.append(PromptChange(default, 0.0, 0, 0.0))
    for prompt in timed:
        if not 0 <= prompt.seconds < seconds:
            raise InputError(f"prompt at {prompt.seconds:g}s: outside the clip (0 to {seconds:g} s)")
        boundary = min(max(math.floor(prompt.seconds / length + 0.5), 0), sections - 1)  # half up
        change = PromptChange(prompt.text, prompt.seconds, boundary, round(boundary * length, 3))
        if changes and changes[-1].section == boundary:
            if changes[-1].asked_s == 0.0 and changes[-1].text == default and default and boundary == 0:
                changes[-1] = change  # a [0s: ...] tag replaces the default at the start
                continue
            raise InputError(
                f"prompts at {changes[-1].asked_s:g}s and {prompt.seconds:g}s both land on the section "
                f"starting at {change.starts_s:g}s (sections are {length:.2f} s): move one by a section"
            )
        changes.append(change)
    return changes


def prompt_weights(changes: list[PromptChange], sections: int, blend_sections: int) -> list[dict[int, float]]:
    """For each time-order section, {index into changes: weight}; weights sum to 1."""
    weights: list[dict[int, float]] = []
    for k in range(sections):
        current = max(i for i, c in enumerate(changes) if c.section <= k)
        into = k - changes[current].section  # sections since the change
        if current > 0 and blend_sections > 0 and into < blend_sections:
            new = (into + 1) / (blend_sections + 1)
            weights.append({current - 1: 1.0 - new, current: new})
        else:
            weights.append({current: 1.0})
    return weights


@dataclass(frozen=True)
class Keyframe:
    seconds: float  # as asked
    path: str
    section: int  # the boundary it landed on: the first time-order section it anchors (sections: the end)
    starts_s: float  # that boundary's time


def parse_keyframe(value: str) -> tuple[float, str]:
    """`--keyframe TIME:PATH`."""
    return _parse_timed(value, "--keyframe", "TIME:PATH", "1.8:middle.png")


def place_keyframes(keyframes: list[tuple[float, str]], sections: int, window: int, seconds: float) -> list[Keyframe]:
    """Keyframes in time order, snapped (half up) to the boundaries 1..sections; times outside (0, seconds] or
    two on one boundary refused."""
    length = section_seconds(window)
    placed: list[Keyframe] = []
    for at, path in sorted(keyframes):
        if not 0 < at <= seconds:
            raise InputError(f"--keyframe {at:g}:{path}: the time must be in (0, {seconds:g}] seconds")
        boundary = min(max(math.floor(at / length + 0.5), 1), sections)
        if placed and placed[-1].section == boundary:
            raise InputError(
                f"--keyframe {placed[-1].seconds:g} and {at:g}: both land on {boundary * length:.2f} s "
                f"(keyframes snap to section boundaries, {length:.2f} s apart); one keyframe per section"
            )
        placed.append(Keyframe(at, path, boundary, round(boundary * length, 3)))
    return placed


def keyframe_for(keyframes: list[Keyframe], section: int) -> int | None:
    """Index of the keyframe anchoring this time-order section (the latest at or before it), or None."""
    found = [i for i, kf in enumerate(keyframes) if kf.section <= section]
    return found[-1] if found else None


@dataclass(frozen=True)
class TimelinePlan:
    """Everything a job's sections are conditioned on over time, checked before any model runs."""

    sections: int
    changes: tuple[PromptChange, ...]  # prompts in time order (one: no timestamps)
    weights: tuple[dict[int, float], ...]  # per time-order section: {change index: weight}
    keyframes: tuple[Keyframe, ...]
    end_image: str | None
    variant: str = "inverted"

    @property
    def timed(self) -> bool:
        return len(self.changes) > 1

    def notes(self) -> list[str]:
        """Where each timed prompt and keyframe landed, for the user."""
        notes = [
            f"prompt {c.text!r} asked at {c.asked_s:g}s starts at {c.starts_s:g}s (section {c.section + 1})"
            for c in self.changes
            if c.asked_s != c.starts_s
        ] + [
            f"keyframe {k.path} asked at {k.seconds:g}s is shown at {k.starts_s:g}s"
            + (" (the clip's end: it is the end frame)" if k.section == self.sections else "")
            for k in self.keyframes
            if k.seconds != k.starts_s or k.section == self.sections
        ]
        if self.timed and self.variant == "inverted":
            notes.append(
                "the inverted variant generates the end first: a section after a prompt change cannot see where "
                "the sections before it leave the subject; F1 follows prompt changes better (--variant f1)"
            )
        return notes

    def to_dict(self) -> dict:
        return {
            "prompts": [
                {"text": c.text, "asked_s": c.asked_s, "starts_s": c.starts_s, "section": c.section}
                for c in self.changes
            ],
            "keyframes": [
                {"seconds": k.seconds, "path": k.path, "starts_s": k.starts_s, "section": k.section}
                for k in self.keyframes
            ],
            "end_image": self.end_image,
        }


def plan_timeline(
    prompt: str,
    prompt_at: tuple[tuple[float, str], ...],
    keyframes: tuple[tuple[float, str], ...],
    end_image: str | None,
    variant: str,
    sections: int,
    window: int,
    seconds: float,
    blend_sections: int = 0,
) -> TimelinePlan:
    if variant == "f1" and end_image:
        raise InputError(
            "an end frame needs the inverted variant (it generates the end first); F1 generates forward and "
            "has no slot for it: add --variant inverted"
        )
    if variant == "f1" and keyframes:
        raise InputError("keyframes need the inverted variant (--variant inverted); F1 has no slot for them")
    default, timed = parse_prompt(prompt)
    timed = sorted([*timed, *(TimedPrompt(float(s), t) for s, t in prompt_at)], key=lambda p: p.seconds)
    changes = prompt_changes(default, timed, sections, window, seconds)
    weights = prompt_weights(changes, sections, blend_sections)
    placed = place_keyframes(list(keyframes), sections, window, seconds)
    if placed and placed[-1].section == sections:  # on the end: the end frame's slot
        if end_image:
            raise InputError(
                f"--keyframe {placed[-1].seconds:g}:{placed[-1].path} lands on the clip's end, where --end-image "
                "already is: drop one, or move the keyframe earlier"
            )
        end_image = placed[-1].path
    return TimelinePlan(sections, tuple(changes), tuple(weights), tuple(placed), end_image, variant)
