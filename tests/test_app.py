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
