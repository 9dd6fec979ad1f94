"""MagCache: the published rule, its calibrated ratios as data, and its stacking with the context KV cache."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from typer.testing import CliRunner

from framepack_turbo.api import FramePack
from framepack_turbo.optim import ratios
from framepack_turbo.optim.magcache import Accumulator, MagCacheConfig, decide, retained_steps
from framepack_turbo.settings import Settings

OPTS = dict(seconds=2, steps=8, resolution=64, seed=3)  # 2 sections of 8 steps
ONE_SECTION = dict(OPTS, seconds=1)


def load(tmp_path, **settings) -> FramePack:
    settings = {"enable_magcache": True, "magcache_ratios": str(tmp_path / "ratios.json"), **settings}
    return FramePack.load("tiny-random", device="cpu", runtime_cache_dir=str(tmp_path / "rc"), **settings)


def generate(fp, image, tmp_path, name="out", **options):
    return fp.generate(image, "a cat", out=tmp_path / f"{name}.mp4", **{**OPTS, **options})


def published_rule(ratios_: list[float], steps: int, threshold: float, k: int, retention: float) -> str:
    """The MagCache authors' FramePack loop, restated from their published code: C computed, - skipped."""
    acc_ratio, acc_err, acc_steps, out = 1.0, 0.0, 0, []
    for cnt in range(steps):
        skip = False
        if cnt >= int(retention * steps) and cnt >= 1:
            acc_ratio *= ratios_[cnt]
            acc_err += abs(1 - acc_ratio)
            acc_steps += 1
            if acc_err <= threshold and acc_steps <= k and abs(1 - ratios_[cnt]) <= 0.06:
                skip = True
            else:
                acc_ratio, acc_err, acc_steps = 1.0, 0.0, 0
        out.append("-" if skip else "C")
    return "".join(out)


# FramePack's published ratios, the list the real model uses at 25 steps
FRAMEPACK = next(e for e in ratios.read(ratios.SHIPPED) if e.key.model == "framepack").ratios


@pytest.mark.parametrize(
    ("threshold", "k", "retention"), [(0.1, 2, 0.2), (0.15, 4, 0.2), (0.25, 3, 0.1), (0.05, 1, 0.5)]
)
def test_decisions_follow_the_published_rule_on_the_published_ratios(threshold, k, retention):
    config = MagCacheConfig(threshold=threshold, max_skips=k, retention=retention)
    acc = Accumulator()
    ours = "".join("-" if decide(acc, t, 25, FRAMEPACK[t], config) == "hit" else "C" for t in range(25))
    assert ours == published_rule(list(FRAMEPACK), 25, threshold, k, retention)


def test_decisions_pinned_at_the_published_defaults():
    """E010K2R02 on FramePack's ratios: the retained start, skips where the ratio is near 1, the last
    step computed (its ratio, 0.789, is past the per-step guard): 12 of 25 steps skipped."""
    config = MagCacheConfig()
    acc = Accumulator()
    pinned = "".join("-" if decide(acc, t, 25, FRAMEPACK[t], config) == "hit" else "C" for t in range(25))
    assert pinned == "CCCCC--C-C--C--C--C--C-CC", pinned
    assert pinned[-1] == "C" and pinned[: retained_steps(25, 0.2)] == "CCCCC"


def test_k_and_retention_are_honoured_whatever_the_threshold():
    flat = [1.0] * 20  # ratios of 1: nothing but K and the retention stops a skip
    for k in (1, 2, 5):
        acc = Accumulator()
        config = MagCacheConfig(threshold=10, max_skips=k, retention=0.25)
        kinds = [decide(acc, t, 20, flat[t], config) for t in range(20)]
        assert kinds[:5] == ["forced"] * 5
        runs = "".join("-" if x == "hit" else "C" for x in kinds[5:]).split("C")
        assert max(len(r) for r in runs) == k


def test_reusing_nothing_changes_nothing(tiny, example_image, tmp_path):
    reference = generate(tiny, example_image, tmp_path, "ref")
    result = generate(load(tmp_path, magcache_threshold=1e-9), example_image, tmp_path)
    assert torch.equal(result.latents, reference.latents)
    assert result.sidecar["caches"]["magcache"]["hit"] == 0


def test_calibrates_on_first_use_then_skips_and_keeps_state_per_section(example_image, tmp_path, decisions, caplog):
    with caplog.at_level(logging.WARNING):
        result = generate(load(tmp_path, magcache_threshold=0.5, magcache_k=3), example_image, tmp_path)
    assert "no ratios for tiny-random" in caplog.text
    first, second = result.sidecar["caches"]["magcache"]["sections"]
    assert first["hit"] == 0 and first["forced"] == 8  # calibrating: computed in full
    assert second["hit"] > 0
    saved = ratios.read(tmp_path / "ratios.json")
    assert [e.key for e in saved] == [ratios.Key("tiny-random", "inverted", 8, 64, "cond")]
    assert saved[0].ratios[0] == 1.0 and len(saved[0].ratios) == 8
    section_2 = [d for d in decisions if d[0] == "magcache"][8:]
    assert section_2[0][3] == "forced"  # a new section: nothing to reuse from the last one
    assert max(len(r) for r in "".join("-" if d[3] == "hit" else "C" for d in section_2).split("C")) <= 3


def test_ratios_computed_twice_are_equal(example_image, tmp_path):
    for run in ("a", "b"):
        generate(load(tmp_path / run, magcache_calibrate=True), example_image, tmp_path, run)
    (a,), (b,) = (ratios.read(tmp_path / run / "ratios.json") for run in ("a", "b"))
    assert a.ratios == b.ratios and a.sections == b.sections == 2


def test_positive_and_negative_predictions_have_their_own_ratios_and_state(example_image, tmp_path, decisions):
    fp = load(tmp_path, magcache_threshold=0.5, magcache_k=3)
    fp.generate(example_image, "a cat", out=tmp_path / "o.mp4", negative_prompt="blurry", cfg=2.0, **ONE_SECTION)
    saved = {e.key.prediction: e.ratios for e in ratios.read(tmp_path / "ratios.json")}
    assert set(saved) == {"cond", "uncond"} and saved["cond"] != saved["uncond"]
    again = fp.generate(
        example_image, "a cat", out=tmp_path / "p.mp4", negative_prompt="blurry", cfg=2.0, **ONE_SECTION
    )
    second_job = [d for d in decisions if d[0] == "magcache"][16:]
    assert {d[1] for d in second_job} == {"cond", "uncond"}
    for prediction in ("cond", "uncond"):
        assert sum(d[3] == "hit" for d in second_job if d[1] == prediction) > 0
    assert again.sidecar["caches"]["magcache"]["hit"] > 0


def test_state_resets_between_jobs(example_image, tmp_path):
    fp = load(tmp_path, magcache_threshold=0.5, magcache_k=3)
    generate(fp, example_image, tmp_path, "calibrate")
    used = generate(fp, example_image, tmp_path, "used", resolution=96)
    again = generate(fp, example_image, tmp_path, "again")
    fresh = generate(load(tmp_path, magcache_threshold=0.5, magcache_k=3), example_image, tmp_path, "fresh")
    assert used.sidecar["caches"]["magcache"]["hit"] > 0  # another resolution class borrows the nearest one's
    assert torch.equal(again.latents, fresh.latents)
    assert again.sidecar["caches"] == fresh.sidecar["caches"]


@pytest.mark.parametrize(
    "content",
    ["{not json", json.dumps({"some": "other file"}), json.dumps({"format": ratios.FORMAT, "entries": [{"x": 1}]})],
    ids=["corrupt", "foreign", "bad-entry"],
)
def test_a_bad_ratios_file_warns_and_never_crashes(content, example_image, tmp_path, caplog):
    path = tmp_path / "ratios.json"
    path.write_text(content)
    with caplog.at_level(logging.WARNING):
        result = generate(load(tmp_path), example_image, tmp_path)
    assert result.sidecar["caches"]["magcache"]["sections"][0]["hit"] == 0  # calibrated instead
    assert "ratios" in caplog.text and ("ignored" in caplog.text or "skipped" in caplog.text)
    if "entries" not in content:  # the user's file, but not ratios: left as is, the entry goes to the runtime cache
        assert path.read_text() == content
        assert [e.key.model for e in ratios.read(tmp_path / "rc" / ratios.RUNTIME_FILE)] == ["tiny-random"]
    else:  # a ratios file with a bad entry: the entry is skipped and the calibrated one added
        assert [e.key.model for e in ratios.read(path)] == ["tiny-random"]


def test_shipped_ratios_are_well_formed_and_name_their_source(caplog):
    with caplog.at_level(logging.WARNING):
        entries = ratios.read(ratios.SHIPPED)
    assert not caplog.text
    keys = {(e.key.model, e.key.variant, e.key.steps) for e in entries}
    assert {
        ("framepack", "inverted", 25),
        ("framepack-f1", "f1", 25),
        ("tiny", "inverted", 25),
        ("tiny", "f1", 25),
    } <= keys
    assert all(e.source for e in entries)
    assert all("Zehong-Ma/MagCache" in e.source for e in entries if e.key.model.startswith("framepack"))


def test_another_step_count_interpolates_with_a_warning():
    found = ratios.find(ratios.Key("framepack", "inverted", 10, 640))
    assert found is not None and "25 steps interpolated to 10" in found.note
    assert len(found.ratios) == 10 and found.ratios[0] == 1.0 and found.ratios[-1] == FRAMEPACK[-1]
    exact = ratios.find(ratios.Key("framepack", "inverted", 25, 640))
    assert exact.ratios == FRAMEPACK and exact.note == ""
    uncond = ratios.find(ratios.Key("framepack", "inverted", 25, 640, "uncond"))
    assert uncond.ratios == FRAMEPACK and "cond prediction" in uncond.note
    assert ratios.find(ratios.Key("framepack", "f1-unknown", 25, 640)) is None


# ---- stacked with the context KV cache -------------------------------------------------------------


@pytest.mark.parametrize("step_cache", ["magcache", "teacache"])
def test_kv_cache_under_a_whole_step_cache_decides_only_on_computed_steps(
    step_cache, example_image, tmp_path, decisions
):
    extra = (
        dict(magcache_threshold=0.5, magcache_k=2)
        if step_cache == "magcache"
        else dict(enable_magcache=False, enable_teacache=True, teacache_threshold=0.1)
    )
    fp = load(tmp_path, enable_kv_cache=True, kv_cache_refresh=4, **extra)
    assert [e.name for e in fp.extensions if e.kind == "cache"] == ["kvcache", step_cache]
    if step_cache == "magcache":
        generate(fp, example_image, tmp_path, "calibrate", steps=10)  # its first job computes everything
    result = generate(fp, example_image, tmp_path, steps=10)
    assert torch.isfinite(result.latents).all()
    caches = result.sidecar["caches"]
    for section in (0, 1):
        computed = caches[step_cache]["sections"][section]
        kv = caches["kvcache"]["sections"][section]
        decided = kv["hit"] + kv["miss"] + kv["forced"]
        assert decided == computed["miss"] + computed["forced"] < 10  # a skipped step never reaches the KV cache
    assert caches["kvcache"]["hit"] > 0  # computed steps close enough together reuse the context K/V


def test_kv_cache_under_a_whole_step_cache_that_skips_nothing_equals_the_kv_cache_alone(example_image, tmp_path):
    kv_alone = generate(load(tmp_path, enable_magcache=False, enable_kv_cache=True), example_image, tmp_path, "kv")
    both = generate(load(tmp_path, enable_kv_cache=True, magcache_threshold=1e-9), example_image, tmp_path, "both")
    assert torch.equal(both.latents, kv_alone.latents)


def test_switching_a_cache_on_a_loaded_model_keeps_the_hook_order(example_image, tmp_path):
    """MagCache kept, the KV cache added on the next job: the hooks stack as on a fresh load."""
    fp = load(tmp_path, magcache_threshold=0.5)
    generate(fp, example_image, tmp_path, "calibrate")

    both = Settings.load(
        dict(
            model="tiny-random",
            device="cpu",
            enable_magcache=True,
            magcache_threshold=0.5,
            enable_kv_cache=True,
            magcache_ratios=str(tmp_path / "ratios.json"),
            runtime_cache_dir=str(tmp_path / "rc"),
        ),
        source="cli",
        environ={},
    )
    assert fp.reconfigure(both)
    assert [e.name for e in fp.extensions if e.kind == "cache"] == ["kvcache", "magcache"]
    switched = generate(fp, example_image, tmp_path, "switched")
    fresh = generate(FramePack.load(settings=both), example_image, tmp_path, "fresh")
    assert torch.equal(switched.latents, fresh.latents)


# ---- the command ------------------------------------------------------------------------------------


def test_calibrate_command_writes_the_ratios_file(tmp_path):
    from framepack_turbo.cli import app

    path = tmp_path / "r.json"
    args = ["calibrate", "magcache", "--model", "tiny-random", "--device", "cpu", "--steps", "4", "--seconds", "1"]
    result = CliRunner().invoke(app, [*args, "--resolution", "64", "--magcache-ratios", str(path)])
    assert result.exit_code == 0, result.output
    assert "tiny-random (inverted, 4 steps, resolution 64, cond)" in result.output
    (entry,) = ratios.read(path)
    assert len(entry.ratios) == 4 and entry.sections == 1


def test_calibrate_command_refuses_bad_input(tmp_path):
    from framepack_turbo.cli import app

    result = CliRunner().invoke(app, ["calibrate", "magcache", "--model", "tiny-random", "--steps", "0"])
    assert result.exit_code == 2 and "Traceback" not in result.output


# ---- the trained model --------------------------------------------------------------------------------


def test_on_the_trained_model_the_shipped_ratios_skip_steps_and_keep_the_motion(trained, tmp_path, caplog):
    """MagCache's published default (0.1, K 2, retention 0.2) on tiny at 25 steps, with the ratios shipped for
    it: steps are skipped, the object still moves as prompted, and the clip stays near the uncached one."""
    from PIL import Image

    from framepack_turbo.bench import metrics
    from framepack_turbo.train import world

    scene = world.DEMO_SCENE
    image = tmp_path / "start.png"
    Image.fromarray(world.render(scene, 1, 64)[0]).save(image)
    opts = dict(seconds=3.6, steps=25, resolution=64, seed=31337)
    reference = trained.generate(image, scene.prompt, out=tmp_path / "ref.mp4", **opts)
    settings = Settings.load(
        dict(model="tiny", device="cpu", enable_magcache=True, runtime_cache=False), source="cli", environ={}
    )
    cached = FramePack(trained.bundle, settings=trained.settings)  # the session's models, MagCache on and off again
    assert cached.reconfigure(settings)
    try:
        with caplog.at_level(logging.WARNING):
            result = cached.generate(image, scene.prompt, out=tmp_path / "mag.mp4", **opts)
    finally:
        assert cached.reconfigure(trained.settings)
    assert "no ratios" not in caplog.text  # the shipped ones, exactly
    shipped = ratios.find(ratios.Key("tiny", "inverted", 25, 64)).ratios
    acc, config = Accumulator(), MagCacheConfig()
    per_section = sum(decide(acc, t, 25, shipped[t], config) == "hit" for t in range(25))
    assert result.sidecar["caches"]["magcache"]["hit"] == 3 * per_section > 0
    assert world.observed_motion(result.frames, scene.color) == scene.motion
    psnr = metrics.mean_psnr(metrics.psnr_per_frame(result.frames, reference.frames))
    assert psnr > 30, psnr
