"""scripts/gpu_check.py: its dry run on the CPU (so the GPU check never rots), its runner's budgets and refusals."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time

import pytest

from .conftest import ROOT

SCRIPT = ROOT / "scripts" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_a_check_over_its_budget_is_stopped_and_the_next_one_runs(tmp_path):
    gc = _module()
    ctx = gc.Context(out=tmp_path, dry_run=True, device="cpu", model="small", resolution=128, steps=1, seconds=1.2)

    def forever(ctx):
        while True:
            time.sleep(0.01)

    def skipping(ctx):
        raise gc.Skip("not here")

    def broken(ctx):
        raise ValueError("bad value")

    with open(tmp_path / "errors.log", "w") as errors:
        rows = [
            gc.run_check(gc.Check("slow", 0.3, forever, "sleeps"), ctx, errors),
            gc.run_check(gc.Check("skips", 5, skipping, "skips"), ctx, errors),
            gc.run_check(gc.Check("breaks", 5, broken, "raises"), ctx, errors),
            gc.run_check(gc.Check("works", 5, lambda ctx: {"answer": 42}, "returns"), ctx, errors),
        ]
    assert [r["status"] for r in rows] == ["failed", "skipped", "failed", "ok"]
    assert rows[0]["reason"] == "stopped: over its budget of 0.3 s" and rows[0]["seconds"] < 2
    assert rows[1]["reason"] == "not here" and rows[2]["reason"] == "ValueError: bad value"
    assert rows[3]["answer"] == 42
    assert "ValueError: bad value" in (tmp_path / "errors.log").read_text()
    assert "| slow | failed |" in gc.table(rows)


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--only", "nonsense"], "unknown check(s) nonsense"), ([], "no CUDA device; use --dry-run")],
)
def test_refusals_are_one_line_exit_2(tmp_path, args, message):
    import torch

    if not args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    done = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), *args], capture_output=True, text=True)
    assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_the_dry_run_runs_or_skips_every_check_with_its_reason(tmp_path):
    gc = _module()
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), "--dry-run", "--steps", "2"],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "checks.jsonl").read_text().splitlines()]
    assert [r["name"] for r in rows] == [c.name for c in gc.CHECKS]
    by_name = {r["name"]: r for r in rows}
    assert all(r["status"] in ("ok", "skipped") for r in rows)
    assert all(r["reason"] for r in rows if r["status"] == "skipped")
    for cuda_only in ("placement-v1", "placement-v2", "oom-step-down", "fp8-scaled-mm"):
        assert by_name[cuda_only]["status"] == "skipped" and "CUDA" in by_name[cuda_only]["reason"]
    ran = [n for n, r in by_name.items() if r["status"] == "ok"]
    for name in ("environment", "baseline", "fp8-storage", "int8+compile", "compile", "attention", "vae-decode"):
        assert name in ran
    baseline = by_name["baseline"]
    assert baseline["s_per_step"] > 0 and baseline["tflop_per_step"] > 0 and 0 < baseline["mfu"] < 1
    assert baseline["frames"] == 37 and baseline["psnr"] == float("inf")  # it is its own reference
    assert 30 < by_name["fp8-storage"]["psnr"] < float("inf")  # lossy, and compared with the baseline
    assert "teacache" in by_name["teacache"]["caches"]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["model"] == "small" and len(results["checks"]) == len(rows)
    assert "| baseline | ok |" in (tmp_path / "table.md").read_text()
