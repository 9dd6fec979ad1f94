"""framepack bench: metrics on known images, configuration parsing, reports, and a real run with failure rows."""

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from framepack_turbo.bench import configs, metrics, report
from framepack_turbo.bench.configs import resolve
from framepack_turbo.cli import app
from framepack_turbo.errors import InputError

# ---- metrics -----------------------------------------------------------------------------------------


def _video(seed=0, t=3, h=32, w=40):
    return np.random.default_rng(seed).integers(0, 255, (t, h, w, 3), dtype=np.uint8)  # values 0..254


def test_psnr_known_values():
    a = _video()
    assert metrics.psnr_per_frame(a, a) == [math.inf] * 3
    b = a + 1  # every pixel off by 1/255: PSNR = 20 log10(255) = 48.13 dB
    assert metrics.psnr_per_frame(b, a) == pytest.approx([48.1308] * 3, abs=1e-3)
    c = a.astype(np.int32)
    c[1] += 16  # one frame off by 16: 20 log10(255/16) = 24.05 dB; the others identical
    per_frame = metrics.psnr_per_frame(np.clip(c, 0, 255).astype(np.uint8), a)
    assert per_frame[0] == math.inf and per_frame[2] == math.inf
    # mean PSNR goes through the mean MSE: one bad frame of three costs 10 log10(3) = 4.77 dB more
    assert metrics.mean_psnr([math.inf, 24.0, math.inf]) == pytest.approx(24.0 + 10 * math.log10(3))
    assert metrics.mean_psnr([math.inf, math.inf]) == math.inf


def test_ssim_known_values():
    a = _video(t=2, h=48, w=48)
    assert metrics.ssim_per_frame(a, a) == pytest.approx([1.0, 1.0])
    noisy = np.clip(a.astype(int) + np.random.default_rng(1).integers(-40, 40, a.shape), 0, 255).astype(np.uint8)
    s = metrics.ssim_per_frame(noisy, a)
    assert all(0.5 < v < 0.99 for v in s)  # structure kept, detail perturbed
    flat = np.full_like(a, 128)
    assert all(v < 0.1 for v in metrics.ssim_per_frame(flat, a))  # structure gone
    with pytest.raises(ValueError, match="shape"):
        metrics.ssim_per_frame(a[:1], a)


def test_relative_error_and_cosine():
    ref = torch.tensor([3.0, 4.0])
    assert metrics.relative_l2(ref, ref) == 0.0
    assert metrics.relative_l2(torch.tensor([3.0, 4.5]), ref) == pytest.approx(0.1)
    assert metrics.relative_l2(torch.zeros(2), torch.zeros(2)) == 0.0
    assert metrics.relative_l2(torch.ones(2), torch.zeros(2)) == math.inf
    assert metrics.cosine(ref, 2 * ref) == pytest.approx(1.0)
    assert metrics.cosine(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])) == pytest.approx(0.0)
    with pytest.raises(ValueError):
        metrics.relative_l2(torch.ones(3), torch.ones(2))


# ---- configurations ------------------------------------------------------------------------------------


def test_resolve_names_combinations_presets():
    got = resolve(["bf16", "int8+compile"], presets=["low-vram"])
    assert [c.name for c in got] == ["baseline", "bf16", "int8+compile", "preset:low-vram"]
    assert got[2].settings == {"enable_quant": True, "quant_bits": 8, "enable_compile": True}
    assert got[3].settings["use_bnb"] is True
    assert got[1].lossy and not got[0].lossy
    assert [c.name for c in resolve(["bf16", "baseline"])] == ["baseline", "bf16"]  # baseline always first


@pytest.mark.parametrize(
    "names, message",
    [
        (["int9"], "unknown configuration 'int9'; did you mean int8?"),
        (["int8+int4"], "int4 sets quant_bits=4, another part sets 8"),
        (["preset:turbo"], "unknown preset 'turbo'"),
    ],
)
def test_resolve_errors(names, message):
    with pytest.raises(InputError, match=message):
        resolve(names)


def test_config_file(tmp_path):
    f = tmp_path / "mine.toml"
    f.write_text("[configs.tight]\nenable_quant = true\nquant_bits = 4\n[configs.bad]\nquant_bits = 3\n")
    extra = configs.load_config_file(f)
    assert resolve(["tight"], extra=extra)[1].settings == {"enable_quant": True, "quant_bits": 4}
    with pytest.raises(InputError, match="configuration bad: --quant-bits 3: allowed 4 or 8"):
        resolve(["bad"], extra=extra)
    f.write_text("configs = 3")
    with pytest.raises(InputError, match=r"\[configs.NAME\] tables"):
        configs.load_config_file(f)
    f.write_text("[configs.x\n")
    with pytest.raises(InputError, match="not valid TOML"):
        configs.load_config_file(f)
    with pytest.raises(InputError, match="unknown setting"):
        resolve(["x"], extra={"x": {"not_a_setting": 1}})


def test_every_builtin_configuration_is_valid_settings():
    assert len(resolve(list(configs.BUILTIN))) == len(configs.BUILTIN)


# ---- reports ---------------------------------------------------------------------------------------------


def _results():
    fid = {
        "first_step_rel_l2": 0.01,
        "first_step_cosine": 0.999,
        "latents_rel_l2": 0.02,
        "psnr_db": 40.0,
        "ssim": 0.98,
        "psnr_per_frame": [42.0, 38.0],
        "ssim_per_frame": [0.99, 0.97],
    }
    same = {
        **fid,
        "first_step_rel_l2": 0.0,
        "latents_rel_l2": 0.0,
        "psnr_db": math.inf,
        "ssim": 1.0,
        "psnr_per_frame": [math.inf, math.inf],
    }
    timing = {"median": 0.5, "min": 0.4, "max": 0.6}
    base = {
        "config": "baseline",
        "status": "ok",
        "reason": "",
        "lossy": False,
        "s_per_step": timing,
        "speedup": 1.0,
        "s_per_video_second": timing,
        "first_run_s": 3.0,
        "load_s": 1.0,
        "peak_host_gb": 1.0,
        "fidelity": same,
        "stages_s": {s: timing for s in ("text_encode", "image_encode", "transformer", "vae_decode", "write", "total")},
    }
    fast = {**base, "config": "bf16", "lossy": True, "speedup": 2.0, "fidelity": fid}
    skipped = {"config": "int8", "status": "skipped", "reason": "INT-N quantization not built", "lossy": True}
    failed = {"config": "gpu", "status": "failed", "reason": "RuntimeError: no CUDA", "lossy": False}
    return {
        "spec": {"model": "tiny-random", "seconds": 1, "resolution": 64, "steps": 1, "variant": None, "repeats": 1},
        "machine": {"gpu": None, "cpu": "test cpu", "cpu_count": 2, "versions": {"torch": "x"}, "date": "today"},
        "rows": [base, fast, skipped, failed],
        "noise_floor": same,
        "random_weights": True,
    }


def test_markdown_has_every_row_and_the_noise_floor():
    md = report.markdown(_results(), "framepack bench ...")
    assert "| bf16 (lossy) | 0.5000 (0.4000-0.6000) | 2.00x |" in md
    assert "| int8 (lossy) | - | - |" in md and "skipped: INT-N quantization not built" in md
    assert "failed: RuntimeError: no CUDA" in md
    assert "| noise floor (baseline vs baseline) |" in md and "identical" in md
    assert "Random weights" in md and "Command: `framepack bench ...`" in md


def test_markdown_says_whether_the_trained_model_still_moves_as_prompted():
    results = _results()
    results["input"] = {"prompt": "the red circle moves right", "expected_motion": "right"}
    results["rows"][0]["motion"] = ["right", "right"]
    results["rows"][1]["motion"] = ["right", "still"]
    md = report.markdown(results)
    assert "| baseline | right, right | 2/2 |" in md and "| bf16 | right, still | 1/2 |" in md
    assert "Motion" not in report.markdown(_results())  # random weights: no motion to check


def test_tiny_bench_input_is_a_world_scene_that_moves_as_its_prompt_says(tmp_path):
    from PIL import Image

    from framepack_turbo.bench.runner import BenchSpec, bench_input

    spec = BenchSpec(resolve(["baseline"]), model="tiny", resolution=64)
    image, prompt, (color, motion) = bench_input(spec, tmp_path)
    assert prompt == "the red circle moves right" and (color, motion) == ("red", "right")
    assert np.array_equal(np.asarray(Image.open(image)), np.asarray(Image.open("examples/red-circle.png")))
    random = BenchSpec(resolve(["baseline"]), model="tiny-random", resolution=64)
    assert bench_input(random, tmp_path)[2] is None


def test_json_is_strict_and_marks_identical(tmp_path):
    path = report.write_json(_results(), tmp_path / "r.json", "cmd")
    data = json.loads(path.read_text())  # strict JSON: no Infinity
    assert data["noise_floor"]["psnr_db"] is None and data["noise_floor"]["psnr_db_identical"] is True
    assert data["rows"][1]["fidelity"]["psnr_db"] == 40.0
    assert data["rows"][0]["fidelity"]["psnr_per_frame"] == [None, None]


def test_plot_is_a_png(tmp_path):
    path = report.write_plot(_results(), tmp_path / "p.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- a real run -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_bench_bar_with_failure_rows(tmp_path):
    extra = tmp_path / "c.toml"
    extra.write_text('[configs.broken]\nenable_quant = true\nenable_fp8 = true\n[configs.gpu]\ndevice = "cuda"\n')
    args = [
        "bench",
        "--model",
        "tiny-random",
        "--configs",
        "baseline,bf16,tensorrt,broken,gpu",
        "--config-file",
        str(extra),
        "--steps",
        "2",
        "--seconds",
        "1",
        "--resolution",
        "64",
        "--repeats",
        "1",
        "--json",
        str(tmp_path / "r.json"),
        "--markdown",
        str(tmp_path / "r.md"),
        "--plot",
        str(tmp_path / "r.png"),
    ]
    result = CliRunner().invoke(app, args, env={"FRAMEPACK_ENABLE_COMPILE": "1"})
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "r.json").read_text())
    rows = {r["config"]: r for r in data["rows"]}
    assert list(rows) == ["baseline", "bf16", "tensorrt", "broken", "gpu"]
    for name in ("baseline", "bf16"):
        row = rows[name]
        assert row["status"] == "ok"
        assert row["s_per_step"]["median"] > 0 and row["peak_host_gb"] > 0
        assert row["frames"] == 37
        assert "psnr_db" in row["fidelity"] and "ssim" in row["fidelity"]
        assert len(row["fidelity"]["psnr_per_frame"]) == 37
    # the baseline is identical to itself; the env variable did not turn compile on for it
    assert rows["baseline"]["fidelity"]["psnr_db_identical"] is True
    assert rows["baseline"]["plan"] and all(
        p["status"] == "off" for p in rows["baseline"]["plan"] if p["name"] not in ("placement", "loading.parallel")
    )
    assert 20 < rows["bf16"]["fidelity"]["psnr_db"] < 90 and rows["bf16"]["fidelity"]["ssim"] < 1
    assert rows["tensorrt"]["status"] == "skipped" and "tensorrt-needs-gpu" in rows["tensorrt"]["reason"]
    assert rows["broken"]["status"] == "failed" and "multiple-quantization" in rows["broken"]["reason"]
    assert rows["gpu"]["status"] in ("failed", "skipped") and rows["gpu"]["reason"]
    assert data["noise_floor"]["psnr_db_identical"] is True  # CPU runs are deterministic
    assert data["machine"]["versions"]["torch"] and data["machine"]["date"]
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    assert "| bf16 (lossy) |" in (tmp_path / "r.md").read_text()
    assert "bench ignores FRAMEPACK_ENABLE_COMPILE" in result.output


@pytest.mark.parametrize(
    "seconds", [1.2, pytest.param(6.0, marks=pytest.mark.slow)]
)  # one section; five (the inverted paddings and the 2x/4x history)
def test_the_flop_formula_matches_torchs_count_of_a_real_call(tiny, example_image, tmp_path, seconds):
    """The MFU's FLOP count (bench/flops.py) against torch's FlopCounterMode over a transformer call the
    generator made, with attention in its math form so the counter sees its matrix products."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from framepack_turbo.bench.flops import call_shape, transformer_flops

    transformer = tiny.bundle.transformer
    calls = []
    hook = transformer.register_forward_pre_hook(lambda m, a, kw: calls.append(dict(kw)), with_kwargs=True)
    try:
        tiny.generate(example_image, "a cat", out=tmp_path / "f.mp4", seconds=seconds, steps=1, resolution=128)
    finally:
        hook.remove()
    for kwargs in (calls[0], calls[-1]):
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            transformer(**kwargs)
        shape = call_shape(transformer.config, kwargs)
        assert shape.noisy > 0 and shape.llama > 0 and shape.siglip > 0
        assert transformer_flops(transformer.config, shape) == pytest.approx(counter.get_total_flops(), rel=1e-3)


# ---- sweeps and the frontier --------------------------------------------------------------------------------


def test_sweep_series_are_valid_configurations_named_series_at_knob():
    from framepack_turbo.bench import sweep
    from framepack_turbo.settings import Settings

    every = sweep.configs(["all"])
    assert {sweep.series_of(c.name) for c in every} == set(sweep.SERIES)
    for config in every:
        Settings.load(config.settings, source="cli", environ={})
        assert config.lossy
    assert [c.name for c in sweep.configs(["kvcache"])] == [f"kvcache@r{r}" for r in (2, 3, 4, 6, 12)]
    with pytest.raises(InputError, match="--sweep warpcache: the series are"):
        sweep.configs(["warpcache"])


def _sweep_results():
    results = _results()
    base = results["rows"][0]
    rows = [base]
    for name, speedup, psnr, hit_rate in [
        ("teacache@0.1", 1.5, 44.0, 0.4),
        ("teacache@0.25", 2.2, 36.0, 0.7),
        ("magcache@0.1/K2", 1.4, 51.0, 0.36),
        ("magcache@0.4/K6", 1.8, 45.0, 0.48),
    ]:
        cache = name.split("@")[0]
        total = {"median": 1.0 / speedup, "min": 0.0, "max": 1.0}
        rows.append(
            {
                **base,
                "config": name,
                "lossy": True,
                "speedup": speedup,
                "settings": {},
                "fidelity": {**base["fidelity"], "psnr_db": psnr, "ssim": 0.99},
                "caches": {cache: {"hit": 1, "miss": 1, "forced": 0, "hit_rate": hit_rate}},
                "stages_s": {**base["stages_s"], "total": total},
            }
        )
    return {**results, "rows": rows}


def test_frontier_table_ranks_the_points_and_picks_the_fastest_above_each_floor(tmp_path):
    from framepack_turbo.bench import sweep

    results = _sweep_results()
    md = report.markdown(results, "framepack bench --sweep teacache,magcache")
    assert "## Frontier" in md
    assert "| magcache | 0.4/K6 | 52% | 1.80x | 0.90x | 45.00 | 0.9900 | - |" in md  # total 0.5 s / (1 / 1.8 s)
    assert "| 45 dB | magcache@0.4/K6 | 1.80x | 45.00 |" in md
    assert "| 40 dB | magcache@0.4/K6 | 1.80x | 45.00 |" in md
    assert "| 35 dB | teacache@0.25 | 2.20x | 36.00 |" in md
    assert sweep.best_at(sweep.points(results), 60) is None
    sweep.write_frontier_plot(results, tmp_path / "f.png")
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
    assert "## Frontier" not in report.markdown(_results())  # no sweep configurations, no frontier


@pytest.mark.slow
def test_a_paired_sweep_runs_every_point_after_a_baseline_run(tmp_path):
    args = ["bench", "--model", "tiny-random", "--sweep", "kvcache+magcache", "--steps", "4", "--seconds", "1"]
    args += [
        "--resolution",
        "64",
        "--repeats",
        "1",
        "--json",
        str(tmp_path / "r.json"),
        "--plot",
        str(tmp_path / "f.png"),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "r.json").read_text())
    rows = {r["config"]: r for r in data["rows"]}
    assert list(rows) == [
        "baseline",
        "kvcache+magcache@0.1/K2/r2",
        "kvcache+magcache@0.1/K2/r4",
        "kvcache+magcache@0.1/K2/r8",
    ]
    assert all(r["status"] == "ok" for r in rows.values())
    assert data["spec"]["paired"] is True
    assert data["noise_floor"]["psnr_db_identical"] is True  # two baseline runs kept
    assert "## Frontier" in result.output and "kvcache+magcache | 0.1/K2/r4" in result.output
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
