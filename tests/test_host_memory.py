"""Host RAM and disk before loading: the machine's figures, the estimate by placement, the two rules and
doctor's lines, on simulated machines (Hardware built by hand) and on this one."""

import json
import math
from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

from framepack_turbo import compat, placement
from framepack_turbo.cli import app
from framepack_turbo.doctor import diagnose, render_text
from framepack_turbo.hardware import Hardware, disk_free, host_memory_gb
from framepack_turbo.models.presets import HUNYUAN_PARAMS, RANDOM_PARAMS, WEIGHT_COMPONENTS, component_params
from framepack_turbo.settings import Settings


def gpu_box(ram_gb: float, available_gb: float | None = None, swap_gb: float = 0.0, disk_gb: float = 500.0, **kw):
    """A 24 GB CUDA card (auto placement: v1) on a host with `ram_gb` of RAM."""
    return Hardware(
        "cuda",
        "NVIDIA RTX 4090",
        16,
        24.0,
        23.0,
        (8, 9),
        True,
        kw.pop("backends", {}),
        (),
        ram_total_gb=ram_gb,
        ram_available_gb=ram_gb if available_gb is None else available_gb,
        swap_free_gb=swap_gb,
        disk_path="/data/outputs",
        disk_free_gb=disk_gb,
    )


def cpu_box(ram_gb: float, disk_gb: float = 500.0) -> Hardware:
    return Hardware(ram_total_gb=ram_gb, ram_available_gb=ram_gb, disk_path="/data/outputs", disk_free_gb=disk_gb)


def s(**values) -> Settings:
    return Settings.load(values, environ={})


def ids(settings: Settings, hardware: Hardware) -> list[str]:
    return compat.check(settings, hardware).ids()


def finding(settings: Settings, hardware: Hardware, rule_id: str) -> compat.Finding:
    return next(f for f in compat.check(settings, hardware).findings if f.id == rule_id)


# ---- what the machine has ------------------------------------------------------------------------------


def test_host_memory_is_read_from_meminfo(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(
        "MemTotal:       16318480 kB\nMemFree:         1000000 kB\nMemAvailable:    8159240 kB\n"
        "SwapTotal:       2097148 kB\nSwapFree:        1048574 kB\n"
    )
    assert host_memory_gb(meminfo) == {"ram_total_gb": 15.56, "ram_available_gb": 7.78, "swap_free_gb": 1.0}


def test_host_memory_without_meminfo_falls_back_to_sysconf(tmp_path):
    got = host_memory_gb(tmp_path / "missing")
    assert got["swap_free_gb"] is None
    assert got["ram_total_gb"] > 0 and 0 <= got["ram_available_gb"] <= got["ram_total_gb"]


def test_disk_is_measured_at_the_nearest_existing_folder(tmp_path):
    got = disk_free(tmp_path / "not" / "made" / "yet.mp4")
    assert got["disk_path"] == str(tmp_path) and got["disk_free_gb"] > 0


def test_detect_fills_the_host_fields():
    hw = Hardware.detect()
    assert hw.ram_total_gb > 0 and hw.ram_available_gb > 0 and hw.disk_free_gb > 0 and hw.disk_path
    assert {"ram_total_gb", "ram_available_gb", "swap_free_gb", "disk_path", "disk_free_gb"} <= hw.to_dict().keys()


# ---- the size facts -------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", ["tiny", "small", "full"])
def test_random_preset_sizes_are_what_the_models_have(size):
    from framepack_turbo.models.random import build_models

    models = build_models(size, torch.device("meta"))  # no memory
    counted = {n: sum(t.numel() for t in (*models[n].parameters(), *models[n].buffers())) for n in WEIGHT_COMPONENTS}
    assert counted == RANDOM_PARAMS[size]


def test_hunyuan_sizes():
    # the `full` random preset builds FramePackI2V_HY's transformer config and HunyuanVideo's VAE
    assert HUNYUAN_PARAMS["transformer"] == RANDOM_PARAMS["full"]["transformer"]
    assert HUNYUAN_PARAMS["vae"] == RANDOM_PARAMS["full"]["vae"]
    assert 25 < HUNYUAN_PARAMS["transformer"] * 2 / 1e9 < 26.5  # ~25.7 GB of bf16 files
    assert 14.5 < HUNYUAN_PARAMS["text_encoder"] * 2 / 1e9 < 15.5  # llava-llama-3-8b's LlamaModel in fp16


def test_local_weights_are_counted_from_their_headers():
    from safetensors import safe_open

    from framepack_turbo.models.presets import TINY_WEIGHTS

    params = component_params("tiny")
    for name in WEIGHT_COMPONENTS:
        total = 0
        for path in (TINY_WEIGHTS / name).glob("*.safetensors"):
            with safe_open(str(path), framework="pt") as f:
                total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
        assert params[name] == total > 0, name
    assert sum(params.values()) < 10_000_000  # a few MB


def test_a_model_dir_component_without_safetensors_counts_as_hunyuans(tmp_path):
    (tmp_path / "vae").mkdir()
    assert component_params("framepack", tmp_path) == HUNYUAN_PARAMS


# ---- the estimate -----------------------------------------------------------------------------------------


def test_v1_keeps_every_weight_on_the_host_in_half_precision():
    mem = placement.host_memory(s(model="framepack"), gpu_box(64))
    assert mem.mode == "v1" and mem.pinned_gb == 0
    assert mem.weights["transformer"] == pytest.approx(HUNYUAN_PARAMS["transformer"] * 2 / 2**30)
    assert mem.weights_gb == pytest.approx(sum(HUNYUAN_PARAMS.values()) * 2 / 2**30)
    assert mem.need_gb == pytest.approx(mem.weights_gb + mem.working_gb + placement.RUNTIME_GB)
    assert 39 < mem.need_gb < 43


def test_v2_pins_a_second_copy_while_it_sets_up():
    v1 = placement.host_memory(s(model="framepack"), gpu_box(64))
    v2 = placement.host_memory(s(model="framepack", use_memory_v2=True), gpu_box(64))
    assert v2.mode == "v2" and v2.pinned_gb == pytest.approx(v1.weights["transformer"])
    assert v2.need_gb == pytest.approx(v1.need_gb + v2.pinned_gb)
    assert "pins" in v2.peak_phase


def test_high_vram_holds_nothing_once_placed_but_builds_on_the_host():
    mem = placement.host_memory(s(model="framepack", memory_mode="high-vram"), gpu_box(64))
    assert mem.weights_gb == 0 and mem.peak_phase == "while loading"
    assert mem.peak_gb == pytest.approx(placement.host_memory(s(model="framepack"), gpu_box(64)).weights_gb)


def test_cpu_holds_float32():
    cpu = placement.host_memory(s(model="framepack"), cpu_box(256))
    gpu = placement.host_memory(s(model="framepack"), gpu_box(256))
    assert cpu.mode == "cpu" and cpu.weights_gb == pytest.approx(2 * gpu.weights_gb)


def test_quantization_lowers_what_stays_not_the_load_peak():
    torchao = gpu_box(64, backends={"torchao": True})
    plain = placement.host_memory(s(model="framepack"), torchao)
    quant = placement.host_memory(s(model="framepack", enable_quant=True), torchao)
    assert quant.weights["transformer"] == pytest.approx(plain.weights["transformer"] / 2)
    assert quant.need_gb == pytest.approx(plain.need_gb)  # the transformer loads at bf16 first
    fp8 = placement.host_memory(s(model="framepack", enable_fp8=True), torchao)
    assert fp8.weights["transformer"] == pytest.approx(quant.weights["transformer"])
    # v2's pinned copy is of the quantized weights: that peak does come down
    v2 = placement.host_memory(s(model="framepack", use_memory_v2=True), torchao)
    v2q = placement.host_memory(s(model="framepack", use_memory_v2=True, enable_quant=True), torchao)
    assert v2q.need_gb < v2.need_gb - 10
    # without torchao the quant pass is skipped (quant-needs-torchao): nothing changes
    assert placement.host_memory(s(model="framepack", enable_quant=True), gpu_box(64)).weights == plain.weights


def test_a_stored_optimized_transformer_lowers_the_load_peak(tmp_path):
    torchao = gpu_box(64, backends={"torchao": True})
    artifact = tmp_path / "t.safetensors"
    settings = s(model="framepack", enable_quant=True, enable_opt_cache=True, optimized_transformer=str(artifact))
    first = placement.host_memory(settings, torchao)
    artifact.write_bytes(b"stored")
    later = placement.host_memory(settings, torchao)
    assert later.need_gb == pytest.approx(first.need_gb - first.weights["transformer"])


def test_bitsandbytes_quantizes_while_loading():
    bnb = gpu_box(64, backends={"bitsandbytes": True})
    plain = placement.host_memory(s(model="framepack"), bnb)
    eight = placement.host_memory(s(model="framepack", use_bnb=True), bnb)
    four = placement.host_memory(s(model="framepack", use_bnb=True, bnb_load_in_4bit=True), bnb)
    assert eight.load_gb == pytest.approx(
        plain.load_gb - (HUNYUAN_PARAMS["transformer"] + 7_628_000_000) / 2**30, rel=0.01
    )
    assert four.need_gb < eight.need_gb < plain.need_gb
    # random weights: bitsandbytes is skipped (bnb-needs-weights), so it lowers nothing
    full = placement.host_memory(s(model="full", use_bnb=True), bnb)
    assert full.need_gb == pytest.approx(placement.host_memory(s(model="full"), bnb).need_gb)


def test_working_set_grows_with_the_frame_area():
    assert placement.working_set_gb(1280, 9) == pytest.approx(4 * placement.working_set_gb(640, 9))
    assert 0.3 < placement.working_set_gb(640, 9) < 0.8  # a few hundred MB at FramePack's 640 px


# ---- the host RAM rule on simulated machines ------------------------------------------------------------------


def test_full_model_on_16_gb_warns_naming_what_to_change():
    f = finding(s(model="full"), gpu_box(16), "host-ram-short")
    assert f.severity is compat.Severity.WARNING
    assert "~27 GB of host RAM" in f.message and "placement v1" in f.message
    assert "16 GB total / 16 GB available" in f.message
    assert f.fix.startswith("FRAMEPACK_ENABLE_QUANT=1 FRAMEPACK_ENABLE_OPT_CACHE=1 (~15 GB, fits")
    assert "USE_BNB" not in f.fix  # random weights: bitsandbytes cannot take them
    assert "ENABLE_QUANT / ENABLE_FP8 alone do not lower the peak" in f.fix
    assert not f.disables  # it warns; nothing is skipped


def test_real_weights_on_32_gb_suggest_bitsandbytes():
    f = finding(s(model="framepack"), gpu_box(32), "host-ram-short")
    assert "FRAMEPACK_USE_BNB=1 (~22 GB, fits: bitsandbytes quantizes" in f.fix and "pip install bitsandbytes" in f.fix
    f = finding(s(model="framepack"), gpu_box(32, backends={"bitsandbytes": True}), "host-ram-short")
    assert "pip install bitsandbytes" not in f.fix


def test_memory_v2_is_named_as_no_host_saving():
    f = finding(s(model="framepack", use_memory_v2=True), gpu_box(48), "host-ram-short")
    assert "pinned" in f.message
    assert f.fix.startswith("FRAMEPACK_MEMORY_MODE=v1 without --use-memory-v2 (~41 GB, fits")
    assert "saves GPU memory, not host RAM" in f.fix


def test_128_gb_is_enough():
    for values in (dict(model="full"), dict(model="framepack"), dict(model="framepack", use_memory_v2=True)):
        assert "host-ram-short" not in ids(s(**values), gpu_box(128)), values


@pytest.mark.parametrize("model", ["tiny", "tiny-random"])
def test_tiny_presets_fit_2_gb(model):
    for hw in (gpu_box(2, disk_gb=5), cpu_box(2, disk_gb=5)):
        found = ids(s(model=model, resolution=64), hw)
        assert "host-ram-short" not in found and "disk-space-short" not in found, (model, hw.device)
        assert placement.host_memory(s(model=model, resolution=64), hw).weights_gb < 0.05


def test_available_ram_and_swap_count():
    assert "host-ram-short" in ids(s(model="full"), gpu_box(64, available_gb=12))  # the rest is taken
    assert "host-ram-short" not in ids(s(model="full"), gpu_box(16, swap_gb=32))  # pageable weights can swap
    # v2's pinned copy cannot go to swap
    assert "host-ram-short" in ids(s(model="full", use_memory_v2=True), gpu_box(16, swap_gb=64))


def test_unknown_ram_stays_quiet():
    assert "host-ram-short" not in ids(s(model="framepack"), Hardware())


# ---- the disk rule ------------------------------------------------------------------------------------------


def test_disk_need_grows_with_the_clip():
    short, long = compat.disk_need(s()), compat.disk_need(s(seconds=120))
    assert long.video_gb == pytest.approx(short.video_gb * (120 * 30 + 1) / (5 * 30 + 1))
    assert compat.disk_need(s(crf=10)).video_gb == pytest.approx(2 * short.video_gb)  # 6 crf steps: 2x
    assert short.resume_gb > compat.RESUME_FACTOR * short.video_gb
    assert compat.disk_need(s(enable_module_cache=True)).cache_gb == pytest.approx(2.0)
    assert 0.005 < compat.disk_need(s(seconds=120)).video_gb < 0.05  # ~18 MB: 0.1 bit per pixel per frame


def test_nearly_full_disk_warns_naming_what_to_free():
    f = finding(s(seconds=120), gpu_box(128, disk_gb=0.3), "disk-space-short")
    assert f.severity is compat.Severity.WARNING
    assert "/data/outputs has 307 MB free" in f.message and "resume parts and state" in f.message
    assert f.fix.startswith("Free at least") and "at /data/outputs" in f.fix and "--out" in f.fix
    assert "disk-space-short" not in ids(s(seconds=120), gpu_box(128, disk_gb=50))
    cache = finding(s(enable_module_cache=True), gpu_box(128, disk_gb=2), "disk-space-short")
    assert "encoder output cache up to 2.0 GB" in cache.message and "FRAMEPACK_MODULE_CACHE_MAX_MB" in cache.fix
    assert "disk-space-short" not in ids(s(), replace(gpu_box(128), disk_free_gb=None))  # unknown: quiet


# ---- doctor -------------------------------------------------------------------------------------------------


def host_line(text: str, start: str) -> str:
    return next(line.strip() for line in text.splitlines() if line.strip().startswith(start))


def test_doctor_host_ram_line_on_a_small_machine():
    data = diagnose(s(model="full"), gpu_box(16), environ={})
    assert data["host_memory"]["short"] is True and data["host_memory"]["mode"] == "v1"
    assert data["host_memory"]["ram_total_gb"] == 16
    line = host_line(render_text(data), "host RAM:")
    assert line.startswith("host RAM: needs ~27 GB (weights 26 GB on the host for placement v1 (transformer 24 GB")
    assert line.endswith("machine has 16 GB total / 16 GB available  [short: see host-ram-short]")
    assert "host-ram-short" in [f["id"] for f in data["compat"]]
    ok = render_text(diagnose(s(model="full"), gpu_box(128), environ={}))
    assert host_line(ok, "host RAM:").endswith("machine has 128 GB total / 128 GB available")


def test_doctor_disk_line():
    data = diagnose(s(seconds=60), gpu_box(128, disk_gb=0.25), environ={})
    line = host_line(render_text(data), "disk:")
    assert line.startswith("disk: needs ~") and "at /data/outputs (video ~9 MB" in line
    assert line.endswith("256 MB free  [short: see disk-space-short]")
    assert data["disk"]["short"] is True and data["disk"]["free_gb"] == 0.25


def test_doctor_json_on_this_machine_has_the_fields():
    result = CliRunner().invoke(app, ["doctor", "--json", "--model", "tiny", "--resolution", "64"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["host_memory"]["need_gb"] < 2 and data["host_memory"]["short"] is False
    assert data["host_memory"]["ram_total_gb"] > 0 and data["disk"]["free_gb"] > 0
    assert not {"host-ram-short", "disk-space-short"} & {f["id"] for f in data["compat"]}
