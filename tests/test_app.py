"""`framepack serve` refusals and the page's live compatibility report (the browser test is test_browser.py)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from framepack_turbo.cli import app

pytest.importorskip("gradio")


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["--host", "0.0.0.0"], "refusing to serve on 0.0.0.0 without --auth"),
        (["--share", "yes"], "refusing to serve on a share link without --auth"),
        (["--auth", "nopassword"], "--auth must be user:pass"),
        (["--share", "maybe"], "--share maybe: yes or no"),
        (["--steps", "0"], "steps"),
    ],
)
def test_serve_refuses_before_starting(args, reason, tmp_path):
    result = CliRunner().invoke(app, ["serve", "--data-dir", str(tmp_path), *args])
    assert result.exit_code == 2 and reason in result.output


def test_compat_report_follows_the_panel():
    from framepack_turbo.app.ui import compat_markdown
    from framepack_turbo.hardware import Hardware

    base = {"model": "tiny-random"}
    assert "No compatibility findings" in compat_markdown(base, {}, Hardware())
    both = compat_markdown(base, {"enable_teacache": True, "enable_fbcache": True}, Hardware())
    assert "step-caches-exclusive" in both and "first-block cache" in both
    assert "Settings error" in compat_markdown(base, {"gpu_memory_preservation": -1}, Hardware())


def test_critical_settings_are_not_queued():
    from framepack_turbo.app.ui import critical_findings
    from framepack_turbo.hardware import Hardware

    assert critical_findings({"model": "tiny-random"}, Hardware()) == []
    found = critical_findings({"model": "tiny-random", "enable_quant": True, "enable_fp8": True}, Hardware())
    assert len(found) == 1 and found[0].startswith("multiple-quantization")


def test_preview_grid_keeps_every_frame_in_place_and_enlarges_it():
    import numpy as np

    from framepack_turbo.app.ui import preview_grid

    frames = np.arange(9 * 8 * 8 * 3, dtype=np.uint8).reshape(9, 8, 8, 3)
    grid = preview_grid(frames, tile=96)
    assert grid.shape == (3 * 8 * 12, 3 * 8 * 12, 3)  # 3x3 tiles, 12x nearest enlargement
    small = grid[::12, ::12]
    for i, frame in enumerate(frames):
        r, c = divmod(i, 3)
        assert np.array_equal(small[r * 8 : (r + 1) * 8, c * 8 : (c + 1) * 8], frame)
    five = preview_grid(frames[:5], tile=8)
    assert five.shape == (16, 24, 3) and not five[8:, 16:].any()  # 2 rows of 3, the sixth tile empty
    assert preview_grid(None) is None


def test_the_bucket_shown_is_the_one_the_generator_uses(tmp_path):
    from PIL import Image

    from framepack_turbo.app.ui import bucket_markdown
    from framepack_turbo.pipeline.encode import nearest_bucket

    path = tmp_path / "wide.png"
    Image.new("RGB", (1280, 720)).save(path)
    h, w = nearest_bucket(720, 1280, resolution=640)
    assert (h, w) == (480, 832)  # FramePack's 640 bucket for 16:9
    assert f"**{w}x{h}**" in bucket_markdown(str(path), 640) and "1280x720" in bucket_markdown(str(path), 640)
    h, w = nearest_bucket(720, 1280, resolution=320)
    assert f"**{w}x{h}**" in bucket_markdown(str(path), 320.0)
    assert "upload an image" in bucket_markdown(None, 640)
    (tmp_path / "bad.png").write_text("no")
    assert "not a readable image" in bucket_markdown(str(tmp_path / "bad.png"), 640)


def test_the_lora_rows_list_bundled_and_folder_loras_and_make_the_setting(tmp_path):
    from framepack_turbo.app.ui import NO_LORA, lora_choices, lora_settings
    from framepack_turbo.models.presets import PRESETS

    (tmp_path / "mine.safetensors").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not a LoRA")
    choices = lora_choices(tmp_path, "tiny")
    bundled = {f"{p.stem} (bundled with tiny)": str(p) for p in PRESETS["tiny"].bundled_loras()}
    assert choices == {**bundled, "mine": str(tmp_path / "mine.safetensors")}
    assert lora_choices(tmp_path / "missing", "small") == {}
    rows = ("mine", 0.5, NO_LORA, 1.0, None, 1.0)
    assert lora_settings(rows, choices) == {"loras": (f"{tmp_path / 'mine.safetensors'}:0.5",)}
    assert lora_settings((NO_LORA, 1.0) * 3, choices) == {}
