"""The README's commands run as written: every fenced `framepack ...` command on `--model tiny`, in the
order a reader meets them (the video extension reads the set-up command's out.mp4), and its Python
snippet. Files they write go to a temporary folder; the paths they read are the repository's."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from .conftest import ROOT

README = ROOT / "README.md"
MAX_LINES = 160  # issue 41: the README is a front door, not the reference


def _fenced(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def readme_tiny_commands() -> list[list[str]]:
    """The argument lists of the fenced `framepack` commands on `--model tiny` (after any `&&` set-up)."""
    commands = []
    for block in _fenced("bash"):
        for line in block.splitlines():
            line = line.split("&&")[-1].strip()
            words = shlex.split(line, comments=True)
            if words[:1] == ["framepack"] and "--model" in words and words[words.index("--model") + 1] == "tiny":
                commands.append(words[1:])
    return commands


def test_the_readme_is_short_and_its_commands_are_found():
    assert len(README.read_text().splitlines()) <= MAX_LINES
    commands = readme_tiny_commands()
    assert [c[0] for c in commands[:2]] == ["generate", "generate"]  # the set-up demo first
    assert len(commands) >= 4
    assert len(_fenced("python")) == 1


@pytest.mark.slow
def test_every_tiny_command_and_the_python_snippet_run_as_written(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from framepack_turbo.cli import app
    from framepack_turbo.pipeline import video

    monkeypatch.chdir(ROOT)  # the paths the commands read are the repository's
    written = {}
    for args in readme_tiny_commands():
        args = list(args)
        for flag in ("--out", "--video"):  # what they write (and read back) lives in tmp_path
            if flag in args:
                i = args.index(flag) + 1
                args[i] = written.setdefault(args[i], str(tmp_path / args[i]))
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, (args, result.output)
        if "--out" in args:
            out = args[args.index("--out") + 1]
            assert json.loads(Path(out).with_suffix(".json").read_text())["status"] == "complete", args
    assert len(video.read_frames(written["longer.mp4"])) > len(video.read_frames(written["out.mp4"]))

    (snippet,) = _fenced("python")
    snippet = snippet.replace('out="circle.mp4"', f"out={str(tmp_path / 'circle.mp4')!r}")
    namespace = {}
    exec(compile(snippet, str(README), "exec"), namespace)  # noqa: S102 - the README's own code
    assert namespace["result"].frames.shape == (109, 64, 64, 3)
