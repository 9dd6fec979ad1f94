"""The shipped, trained `tiny` model: its files and manifest, its quality gates on held-out scenes
(VAE reconstruction, direction of motion in both variants over >= 3 sections), and the README's demo."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest

from framepack_turbo.errors import InputError
from framepack_turbo.models.presets import PRESETS, TINY_WEIGHTS
from framepack_turbo.train import ship, world

ROOT = Path(__file__).resolve().parents[1]
VAE_PSNR_BOUND_DB = ship.VAE_PSNR_BOUND_DB
MIN_DIRECTION_ACCURACY = 0.8


def test_shipped_files_match_their_manifest_and_budget():
    manifest = json.loads((TINY_WEIGHTS / "manifest.json").read_text())
    on_disk = {
        str(p.relative_to(TINY_WEIGHTS)): p.stat().st_size
        for p in TINY_WEIGHTS.rglob("*")
        if p.is_file() and p.name != "manifest.json"
    }
    assert on_disk == manifest["files"]
    assert sum(on_disk.values()) == manifest["bytes"] <= ship.MAX_SHIPPED_BYTES
    assert all(name.endswith((".json", ".safetensors", ".txt", ".model")) for name in on_disk)  # no pickles
    for stage in ("vae", "transformer"):
        record = manifest[stage]
        assert record["steps"] > 0 and record["seconds"] > 0 and np.isfinite(record["final_loss"])
    assert manifest["vae_gate"]["psnr_db"] >= VAE_PSNR_BOUND_DB and manifest["vae_gate"]["motion_kept"] >= 0.9
    assert {v: g["sections"] for v, g in manifest["direction_gate"].items()} == {"inverted": 3, "f1": 3}


def test_tiny_loads_the_shipped_folder(trained):
    bundle = trained.bundle
    assert bundle.preset.name == "tiny" and Path(bundle.source) == TINY_WEIGHTS
    assert sum(p.numel() for p in bundle.transformer.parameters()) > 1_000_000  # not the random preset's


def test_missing_shipped_weights_say_how_to_get_them(monkeypatch, tmp_path):
    from dataclasses import replace

    from framepack_turbo.models.loading import load_bundle

    monkeypatch.setitem(PRESETS, "tiny", replace(PRESETS["tiny"], bundled_dir=tmp_path / "gone"))
    with pytest.raises(InputError, match="weights are missing.*train_tiny.py"):
        load_bundle("tiny", device="cpu")


@pytest.mark.gate
def test_vae_reconstructs_held_out_clips_above_the_bound(trained):
    from framepack_turbo.train.vae import VaeTraining, evaluate

    metrics = evaluate(trained.bundle.vae, VaeTraining())
    assert metrics["psnr_db"] >= VAE_PSNR_BOUND_DB, metrics
    assert metrics["motion_kept"] >= 0.9, metrics  # the object (its colour, where it goes) survives the VAE


@pytest.fixture(scope="module")
def direction_gates(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("gate")
    return {v: ship.direction_accuracy(trained, v, out_dir=out) for v in ("inverted", "f1")}


QUICK_CASES = 2  # the direction gate's quick form (fast tier): its first cases, made again


@pytest.mark.parametrize("variant", ["inverted", "f1"])
def test_the_first_held_out_cases_move_as_recorded(trained, variant):
    """The first cases of the direction gate (the README's picture shows the first four inverted ones),
    generated again as the gate makes them: each object does exactly what the record says it did."""
    recorded = json.loads((TINY_WEIGHTS / "manifest.json").read_text())["direction_gate"][variant]["cases"]
    again = ship.direction_accuracy(trained, variant, count=QUICK_CASES)
    assert again["cases"] == recorded[:QUICK_CASES]


@pytest.mark.gate
@pytest.mark.parametrize("variant", ["inverted", "f1"])
def test_direction_gate_reproduces_the_shipped_record(direction_gates, variant):
    """The gate's numbers in the manifest are what the shipped files give (two cases either way, for
    another CPU's rounding)."""
    recorded = json.loads((TINY_WEIGHTS / "manifest.json").read_text())["direction_gate"][variant]
    gate = direction_gates[variant]
    assert gate["sections"] >= 3 and len(gate["cases"]) == len(recorded["cases"]) == ship.GATE_CASES
    assert abs(gate["accuracy"] - recorded["accuracy"]) <= 2 / ship.GATE_CASES + 1e-9, gate["cases"]


@pytest.mark.gate
@pytest.mark.parametrize("variant", ["inverted", "f1"])
def test_generated_clips_move_the_named_object_the_named_way(direction_gates, variant):
    gate = direction_gates[variant]
    assert gate["accuracy"] >= MIN_DIRECTION_ACCURACY, gate["cases"]


def _readme_demo() -> list[str]:
    """The arguments of the README's first `framepack generate` command."""
    text = (ROOT / "README.md").read_text()
    line = next(ln for ln in text.splitlines() if "framepack generate" in ln)
    return shlex.split(re.sub(r"^.*?framepack generate", "generate", line))


def test_readme_demo_moves_the_object_as_prompted(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from framepack_turbo.cli import app

    args = _readme_demo()
    assert args[args.index("--model") + 1] == "tiny"
    monkeypatch.chdir(ROOT)  # the command's relative paths are the repo's
    out = tmp_path / "out.mp4"
    args[args.index("--out") + 1] = str(out)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    prompt = args[args.index("--prompt") + 1]
    color, motion = re.fullmatch(r"the (\w+) \w+ moves (\w+)", prompt).groups()
    from framepack_turbo.pipeline.video import read_frames

    assert world.observed_motion(read_frames(out), color) == motion


def test_other_frame_sizes_warn_that_tiny_only_knows_64_px():
    from framepack_turbo import compat
    from framepack_turbo.hardware import Hardware
    from framepack_turbo.settings import Settings

    def ids(**values):
        return {f.id for f in compat.check(Settings.load(values), Hardware()).findings}

    assert "model-native-resolution" in ids(model="tiny", resolution=640)
    assert "model-native-resolution" not in ids(model="tiny", resolution=64)
    assert "model-native-resolution" not in ids(model="tiny-random", resolution=640)


def test_the_latent_preview_shows_the_tiny_models_colours(trained):
    """The per-step preview of tiny latents (its fitted map) is close to the colours of the pixels they
    encode, held-out scenes; HunyuanVideo's map on the same latents is not."""
    import torch

    from framepack_turbo.pipeline import vae as vae_ops

    rng = np.random.default_rng([77, 1])
    fitted, hunyuan = [], []
    for index in range(6):
        frames = world.render(world.random_scene(rng, 33), 33, 64)
        pixels = torch.from_numpy(frames).float().permute(3, 0, 1, 2)[None] / 127.5 - 1
        with torch.no_grad():
            z = vae_ops.encode(pixels, trained.bundle.vae, torch.Generator().manual_seed(index))
        target = torch.from_numpy(frames[[0, *range(4, 33, 4)]]).float().permute(0, 3, 1, 2) / 255
        target = torch.nn.functional.avg_pool2d(target, 8).permute(1, 0, 2, 3)[None]  # (1, 3, T', 8, 8)
        for factors, scores in ((trained.bundle.preset.latent_preview, fitted), (None, hunyuan)):
            mse = ((vae_ops.preview(z, factors) - target) ** 2).mean()
            scores.append(float(10 * torch.log10(1 / mse)))
    assert trained.bundle.preset.latent_preview is not None
    assert np.median(fitted) >= 16.0 and np.median(hunyuan) <= 10.0, (fitted, hunyuan)
