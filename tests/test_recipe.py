"""What a clip carries of itself and what `--from` and `info` do with it (pipeline/recipe.py, the CLI): a recipe,
never where to read or write on this machine; a record checked against its schema; its text escaped.

The hostile clips are a real clip made once with the tiny-random model, its container metadata rewritten.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from framepack_turbo.cli import app
from framepack_turbo.pipeline import recipe, video
from framepack_turbo.pipeline.options import PATH_OPTIONS, GenerateOptions
from framepack_turbo.settings import Settings, path_settings
from framepack_turbo.text import shown

from .conftest import EXAMPLE_IMAGE

FAST = ["--model", "tiny-random", "--seconds", "1", "--steps", "2", "--resolution", "64"]
ESCAPES = "\x1b]0;owned\x07\x1b[2J\rX\u202e"


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """A real clip of this tool (1 s, 64 px, 2 steps, seed 3)."""
    folder = tmp_path_factory.mktemp("clip")
    out = folder / "made.mp4"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)  # its caches land there
        made = CliRunner().invoke(
            app,
            ["generate", "--image", str(EXAMPLE_IMAGE), "--prompt", "a cat", *FAST, "--seed", "3", "--out", str(out)],
        )
    assert made.exit_code == 0, made.output
    return out


def forge(clip: Path, path: Path, change) -> Path:
    """`clip` with its metadata rewritten by `change(meta)` (which edits the dict in place or returns a new one),
    its frames copied as they are."""
    meta = video.read_metadata(clip)
    meta = change(meta) or meta
    video.join([clip], path, metadata=meta)
    return path


def errors(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.strip()]


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    """Each command runs in its own folder: the default caches (Cache/, optimized_models/) land there."""
    monkeypatch.chdir(tmp_path)


# ---- the rule, from the declarations -----------------------------------------------------------------------


def _looks_like_a_path(name: str, field) -> bool:
    default = field.get_default(call_default_factory=True)
    return isinstance(default, Path) or name.endswith(("_dir", "_path", "_file", "_save", "_load", "_artifact"))


def test_every_path_setting_is_dropped_from_a_clip():
    """Every setting typed as a path (or named like one) is in path_settings, and a record naming each of them
    gives a re-run none of them: each is dropped, named, with the flag that passes it again."""
    paths = set(path_settings())
    for name, field in Settings.model_fields.items():
        if "Path" in str(field.annotation) or _looks_like_a_path(name, field):
            assert name in paths, f"{name} names a place on this machine: it must be in path_settings()"
    assert {"jit_save", "jit_load", "runtime_cache_dir", "model_dir", "loras", "lora_dir", "onnx_dir"} <= paths
    record = recipe.read_record(
        {"prompt": "x", "settings": {**{name: "/elsewhere/thing" for name in paths}, "steps": 3}}, "c.mp4"
    )
    rerun = recipe.rerun_of(record)
    assert set(rerun.settings) == {"steps"}
    assert {d.key for d in rerun.dropped} == paths
    for dropped in rerun.dropped:
        assert "/elsewhere/thing" in dropped.note() and dropped.flag and dropped.flag.startswith("--")


def test_the_options_that_name_files_are_declared_and_dropped():
    assert PATH_OPTIONS == {"end_image", "keyframes", "video"}
    options = {"end_image": "/e.png", "keyframes": [[0.5, "/k.png"]], "video": "/v.mp4", "end_strength": 0.5}
    rerun = recipe.rerun_of(recipe.read_record({"prompt": "x", "options": options}, "c.mp4"))
    assert rerun.timed == {"end_strength": 0.5} and rerun.video == "/v.mp4"
    notes = [d.note() for d in rerun.dropped]
    assert any("/e.png" in n and "--end-image" in n for n in notes)
    assert any("keyframe at 0.5 s" in n and "/k.png" in n and "--keyframe 0.5:PATH" in n for n in notes)
    assert any("/v.mp4" in n and "--video" in n for n in notes)


def test_the_schema_types_each_option_as_declared():
    """A new GenerateOptions field is typed in the schema by its declaration alone."""
    assert set(recipe.RecordedOptions.model_fields) == set(GenerateOptions.__dataclass_fields__)


def test_shown_escapes_control_characters_and_bidi_overrides():
    assert shown("a\x1b[2Jb\rc\x07\x9b\u202e") == "a\\x1b[2Jb\\x0dc\\x07\\x9b\\u202e"
    assert shown("one\ntwo") == "one\\x0atwo" and shown("one\ntwo", newlines=True) == "one\ntwo"
    assert shown("ünïcode ✓ [0s: ok]") == "ünïcode ✓ [0s: ok]"
    assert shown(12) == "12"


# ---- --from: the clip acts on nothing here -----------------------------------------------------------------


def test_from_writes_nowhere_a_clip_names(clip, tmp_path):
    """A clip recording jit_save=<an existing file> and a runtime cache folder: the file is not touched, the folder
    not made, and each is named in a note with its flag."""
    victim = tmp_path / "precious.bin"
    victim.write_bytes(b"mine")
    folder = tmp_path / "theirs" / "cache"

    def change(meta):
        meta["settings"].update(jit_mode="trace", jit_save=str(victim), runtime_cache_dir=str(folder))

    forged = forge(clip, tmp_path / "forged.mp4", change)
    again = tmp_path / "again.mp4"
    result = CliRunner().invoke(
        app, ["generate", "--from", str(forged), "--image", str(EXAMPLE_IMAGE), "--out", str(again)]
    )
    assert result.exit_code == 0, result.output
    assert victim.read_bytes() == b"mine"
    assert not folder.exists() and not folder.parent.exists()
    notes = [line for line in result.output.splitlines() if line.startswith("note: --from")]
    assert any(f"jit_save {victim}" in n and "--jit-save PATH" in n for n in notes), result.output
    assert any(f"runtime_cache_dir {folder}" in n and "--runtime-cache-dir FOLDER" in n for n in notes)
    sidecar = json.loads(again.with_suffix(".json").read_text())
    assert sidecar["settings"]["values"]["jit_mode"]["value"] == "trace"  # the recipe is kept
    assert sidecar["settings"]["values"]["jit_save"]["value"] is None


def test_from_reads_no_input_a_clip_names(clip, tmp_path):
    """Recorded end image and keyframes are not read (they name files that do not exist here): dropped with a
    note naming time and path; a flag given beside --from equal to its default still beats the clip's value."""

    def change(meta):
        meta["options"].update(
            end_image=str(tmp_path / "their-end.png"),
            keyframes=[[0.5, str(tmp_path / "their-key.png")]],
            prompt_change_cfg=2.0,
            end_strength=0.5,
        )

    forged = forge(clip, tmp_path / "forged.mp4", change)
    again = tmp_path / "again.mp4"
    result = CliRunner().invoke(
        app,
        [
            "generate",
            "--from",
            str(forged),
            "--image",
            str(EXAMPLE_IMAGE),
            "--prompt-change-cfg",
            "1",
            "--out",
            str(again),
        ],
    )
    assert result.exit_code == 0, result.output
    assert f"end image {tmp_path / 'their-end.png'}" in result.output
    assert f"keyframe at 0.5 s {tmp_path / 'their-key.png'}" in result.output and "--keyframe 0.5:PATH" in result.output
    options = json.loads(again.with_suffix(".json").read_text())["options"]
    assert options["end_image"] is None and options["keyframes"] == []
    assert options["prompt_change_cfg"] == 1.0  # the flag, though it is the default
    assert options["end_strength"] == 0.5  # the recipe
    assert options["seed"] == 3 and options["steps"] == 2


def test_image_with_a_recorded_video_is_refused(clip, tmp_path):
    forged = forge(clip, tmp_path / "forged.mp4", lambda meta: meta["options"].update(video=str(clip)))
    result = CliRunner().invoke(
        app, ["generate", "--from", str(forged), "--image", str(EXAMPLE_IMAGE), "--out", str(tmp_path / "o.mp4")]
    )
    assert result.exit_code == 2
    assert errors(result) == [errors(result)[-1]] and errors(result)[0].startswith("error: --from")
    assert "continued a video" in result.output and "drop --image" in result.output
    assert not (tmp_path / "o.mp4").exists()


def _lora(path: Path) -> Path:
    """A LoRA for the trained tiny model's transformer."""
    from framepack_turbo.models.loading import empty_transformer

    from . import lora_files

    lora_files.write(path, "diffusers", empty_transformer("tiny", None), seed=1)
    return path


def test_from_finds_a_recorded_lora_by_its_hash_in_the_lora_dir(clip, tmp_path):
    """The record names each LoRA by name, SHA-256 and weight: the file in --lora-dir with that hash (under any
    name) is used with the recorded weight; with none there, the LoRA is dropped with a note."""
    from framepack_turbo.files import sha256_file

    mine = tmp_path / "loras"
    mine.mkdir()
    lora = _lora(mine / "renamed.safetensors")
    digest = sha256_file(lora)

    def change(meta):
        meta["settings"].update(model="tiny", loras=["/their/home/style.safetensors:0.5"])
        meta["lora"] = [{"name": "style.safetensors", "sha256": digest, "weight": 0.5}]

    forged = forge(clip, tmp_path / "forged.mp4", change)
    found = tmp_path / "found.mp4"
    result = CliRunner().invoke(
        app,
        [
            "generate",
            "--from",
            str(forged),
            "--image",
            str(EXAMPLE_IMAGE),
            "--lora-dir",
            str(mine),
            "--out",
            str(found),
        ],
    )
    assert result.exit_code == 0, result.output
    assert f"using {lora}" in result.output and "/their/home" not in result.output
    record = json.loads(found.with_suffix(".json").read_text())["lora"]["loras"]
    assert [(e["sha256"], e["weight"]) for e in record] == [(digest, 0.5)]
    assert video.read_metadata(found)["lora"] == [{"name": "renamed.safetensors", "sha256": digest, "weight": 0.5}]
    empty = tmp_path / "empty"
    empty.mkdir()
    missed = tmp_path / "missed.mp4"
    result = CliRunner().invoke(
        app,
        [
            "generate",
            "--from",
            str(forged),
            "--image",
            str(EXAMPLE_IMAGE),
            "--lora-dir",
            str(empty),
            "--out",
            str(missed),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "LoRA style.safetensors (weight 0.5) is not used" in result.output and "--lora PATH:0.5" in result.output
    assert "lora" not in json.loads(missed.with_suffix(".json").read_text())


# ---- info: everything shown, nothing acts -----------------------------------------------------------------


def test_info_escapes_the_record_and_shows_the_files_it_names(clip, tmp_path):
    def change(meta):
        meta["prompt"] = f"a cat{ESCAPES}"
        meta["model"]["source"] = f"repo{ESCAPES}"
        meta["options"].update(
            end_image=f"/e{ESCAPES}.png", keyframes=[[0.5, "/k.png"]], video="/v.mp4", prompt_at=[[0.5, "z\x1b[1m"]]
        )
        meta["settings"]["jit_save"] = "/their/file.pt"
        meta["lora"] = [{"name": f"s{ESCAPES}.safetensors", "sha256": "a" * 64, "weight": 0.5}]

    forged = forge(clip, tmp_path / "forged.mp4", change)
    result = CliRunner().invoke(app, ["info", str(forged)])
    assert result.exit_code == 0, result.output
    out = result.output
    assert not any(ch in out for ch in "\x1b\x07\r\u202e"), repr(out)
    assert "a cat\\x1b]0;owned\\x07\\x1b[2J\\x0dX\\u202e" in out and "repo\\x1b" in out
    lines = out.splitlines()
    for what in ("end image: /e\\x1b", "keyframe at 0.5 s: /k.png", "input video: /v.mp4", "jit_save: /their/file.pt"):
        line = next(line for line in lines if line.startswith(what))
        assert "not used by --from unless passed again" in line
    assert any(line.startswith("LoRA: s\\x1b") and "a" * 64 in line for line in lines)
    assert "--end-image PATH" in lines[-1] and "--image" not in lines[-1]  # a continuation: --video, no image
    as_json = CliRunner().invoke(app, ["info", "--json", str(forged)])
    assert as_json.exit_code == 0 and "\x1b" not in as_json.output and "\\u001b" in as_json.output
    assert json.loads(as_json.output)["prompt"] == f"a cat{ESCAPES}"


# ---- records of the wrong types or values: one line naming the clip ---------------------------------------

WRONG = {
    "options a list": lambda m: {**m, "options": [1, 2]},
    "settings a string": lambda m: {**m, "settings": "steps=3"},
    "keyframes text": lambda m: m["options"].update(keyframes="abc"),
    "a keyframe without a path": lambda m: m["options"].update(keyframes=[[1.2]]),
    "model a string": lambda m: {**m, "model": "tiny-random"},
    "passes a number": lambda m: {**m, "passes": 3},
    "a timed prompt of null": lambda m: m["options"].update(prompt_at=[[1.0, None]]),
    "seed text": lambda m: {**m, "seed": "3"},
    "a lora without its hash": lambda m: {**m, "lora": [{"name": "x.safetensors", "weight": 1}]},
}


@pytest.mark.parametrize("case", list(WRONG))
def test_a_wrongly_typed_record_is_refused_in_one_line(clip, tmp_path, case):
    forged = forge(clip, tmp_path / "forged.mp4", WRONG[case])
    for command in (["info", str(forged)], ["generate", "--from", str(forged), "--out", str(tmp_path / "o.mp4")]):
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 2, (case, command, result.output, result.exception)
        lines = errors(result)
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
        assert f"{forged}: its recorded" in lines[0] and "is not valid" in lines[0]
        assert not (tmp_path / "o.mp4").exists()


BAD_VALUES = {
    "vae chunk 1": (
        lambda m: m["settings"].update(vae_chunk_size=1),
        "its recorded vae_chunk_size is not valid: 1 (must be 0 (one pass) or at least 2",
    ),
    "option steps 0": (lambda m: m["options"].update(steps=0), "its recorded steps is not valid: 0"),
    "quant bits 5": (lambda m: m["settings"].update(quant_bits=5), "its recorded quant_bits is not valid: 5"),
    "blend -1": (lambda m: m["options"].update(prompt_blend_sections=-1), "its recorded options are not valid"),
    "a prompt after the end": (
        lambda m: m["options"].update(prompt_at=[[9.0, "late"]]),
        "its recorded prompt timeline is not valid",
    ),
    "a prompt at NaN": (lambda m: m["options"].update(prompt_at=[[math.nan, "when"]]), "its recorded prompt at nan s"),
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_a_recorded_value_error_names_the_clip_not_a_flag(clip, tmp_path, case):
    change, expected = BAD_VALUES[case]
    forged = forge(clip, tmp_path / "forged.mp4", change)
    result = CliRunner().invoke(
        app, ["generate", "--from", str(forged), "--image", str(EXAMPLE_IMAGE), "--out", str(tmp_path / "o.mp4")]
    )
    assert result.exit_code == 2, result.output
    lines = errors(result)
    assert len(lines) == 1 and lines[0].startswith(f"error: {forged}: {expected}"), lines
    assert not any(flag in lines[0] for flag in ("--steps", "--quant-bits", "--vae-chunk-size"))
