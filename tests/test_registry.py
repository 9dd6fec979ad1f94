"""The pass contract: one declaration per pass that everything derives from, runtime passes that come off a
loaded bundle, the plan doctor prints is the plan that runs, and the import layers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from framepack_turbo import compat
from framepack_turbo.api import FramePack
from framepack_turbo.bench import configs as bench_configs
from framepack_turbo.bench.runner import ConfigRun, _lossy
from framepack_turbo.doctor import diagnose
from framepack_turbo.hardware import Hardware
from framepack_turbo.optim import artifact, registry
from framepack_turbo.optim.apply import implementation
from framepack_turbo.optim.plan import make_plan
from framepack_turbo.presets import PRESETS
from framepack_turbo.settings import Settings, setting_names

from . import toy_pass
from .lora_files import stub
from .test_compat import H100

ROOT = Path(__file__).resolve().parents[1]
CPU = Hardware()
JOB = dict(seconds=2, steps=4, resolution=64, seed=3)

# Settings no pass reads: what a job is (the generation group), fast start (a compat rule turns passes off
# with it), how the VAE decodes (the generator, per job) and the preset (its values are the settings).
GENERAL = {
    "model",
    "model_dir",
    "variant",
    "seconds",
    "steps",
    "window",
    "seed",
    "gs",
    "cfg",
    "rs",
    "resolution",
    "crf",
    "device",
    "offline",
    "fast_start",
    "vae_chunk_size",
    "vae_chunk_reserve_gb",
    "vae_chunk_safety",
    "vae_upscale_factor",
    "preset",
    "lora_dir",  # the web app's LoRA folder (its dropdown), not a pass's
}


# ---- one declaration, everything derived ------------------------------------------------------------


def test_declarations_name_real_settings_and_unique_passes():
    known = set(setting_names())
    assert len(set(registry.names())) == len(registry.names())
    for spec in registry.passes():
        assert set(spec.reads()) <= known, spec.name
    owned = {s for spec in registry.passes() for s in spec.reads()}
    assert set(setting_names()) - owned == GENERAL  # a new setting names the pass that reads it


def test_rules_presets_and_bench_configurations_name_real_passes_and_settings():
    known = set(setting_names())
    for name, values in PRESETS.items():
        assert set(values) <= known, name
    for name, values in bench_configs.BUILTIN.items():
        assert set(values) <= known, name
    # rules with a computed `disables`: evaluated on every preset and on every pass switched on alone
    cases = [Settings.load({"preset": p}, environ={}) for p in PRESETS]
    for spec in registry.passes():
        for key, off in spec.switch.items():
            on = {True: True, False: True}.get(off, None) if isinstance(off, bool) else None
            if on is not None:
                cases.append(Settings.load({key: on, "jit_mode": "trace", "use_onnx_engines": True}, environ={}))
    for settings in cases:
        for hardware in (CPU, H100):
            for finding in compat.check(settings, hardware).findings:
                assert set(finding.disables) <= set(registry.names()), finding.id


def test_a_rule_naming_no_pass_fails_when_it_is_written():
    with pytest.raises(ValueError, match="fbcahce: no such pass"):
        compat.Rule("typo", compat.Severity.WARNING, lambda s, h: True, "m", "f", disables=("fbcahce",))


class _Recorder:
    """A Settings stand-in that records which settings are read."""

    def __init__(self, settings: Settings) -> None:
        self._settings, self.read = settings, set()

    def __getattr__(self, name):
        self.read.add(name)
        return getattr(self._settings, name)


@pytest.mark.parametrize("name", [p.name for p in registry.passes() if p.impl])
def test_each_pass_reads_only_what_it_declares(name):
    recorder = _Recorder(Settings.load({}, environ={}))
    implementation(name).config(recorder)
    assert recorder.read <= set(registry.get(name).reads())


def test_artifact_key_export_list_and_lossy_labels_come_from_the_registry(tmp_path):
    assert set(registry.shaping_settings()) == {
        "enforce_low_precision",
        "enable_prune",
        "prune_dual_ratio",
        "prune_single_ratio",
        "enable_quant",
        "quant_bits",
        "quant_int8_mode",
        "quant_group_size",
        "enable_fp8",
        "fp8_target_keys",
        "fp8_exclude_keys",
        "fp8_use_scaled_mm",
    }
    assert artifact.stored_passes() == {"lora.merge", "prune", "quant", "fp8"}  # low precision also casts the encoders
    everything = Settings.load({"preset": "max-performance", "jit_mode": "trace", "enable_tensorrt": True}, environ={})
    off = registry.switched_off_for_export(everything)
    assert off["enable_compile"] is False and off["enable_teacache"] is False and off["jit_mode"] == "off"
    assert "enable_quant" not in off  # the weights are what an export holds
    lora = str(stub(tmp_path))
    with_lora = registry.switched_off_for_export(Settings.load({"loras": (lora,), "lora_mode": "unmerged"}, environ={}))
    assert "loras" not in with_lora and with_lora["lora_mode"] == "merged"  # merged LoRAs are in the weights
    assert bench_configs.BenchConfig("int8", {"enable_quant": True}).lossy
    assert not bench_configs.BenchConfig("compile", {"enable_compile": True}).lossy


def test_settings_and_the_decisions_import_without_torch():
    code = (
        "import sys, framepack_turbo.settings, framepack_turbo.compat, framepack_turbo.optim.plan\n"
        "heavy = [m for m in ('torch', 'numpy', 'diffusers', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_no_module_imports_a_layer_above_it():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import check_layers
    finally:
        sys.path.pop(0)
    assert check_layers.violations() == []


# ---- a new pass: one declaration and one module -----------------------------------------------------


@pytest.fixture
def toy():
    with registry.registered(toy_pass.SPEC):
        yield toy_pass


def test_a_toy_pass_shows_in_the_plan_doctor_compat_and_bench(toy):
    settings = toy.ToySettings.load({"enable_toy": True}, environ={})
    plan = make_plan(settings, compat.check(settings, CPU), CPU)
    assert plan.is_active("toy") and plan.lossy
    assert "toy pass" in plan.summary_lines()[0]
    assert any(p["name"] == "toy" and p["status"] == "active" for p in diagnose(settings, CPU, environ={})["plan"])
    idle = toy.ToySettings.load({"toy_strength": 0.7}, environ={})
    finding = next(f for f in compat.check(idle, CPU).findings if f.id == "setting-without-switch")
    assert "FRAMEPACK_TOY_STRENGTH" in finding.message
    row = ConfigRun(bench_configs.BenchConfig("toy", {}), plan=plan.to_list())
    assert _lossy(row)  # the bench labels the row from its plan


def test_a_toy_pass_runs_through_the_generator(toy, example_image, tmp_path):
    fp = FramePack.load(settings=toy.ToySettings.load({"model": "tiny-random", "enable_toy": True}, environ={}))
    result = fp.generate(example_image, "a cat", out=tmp_path / "t.mp4", **JOB)
    sections = result.sidecar["caches"]["toy"]["sections"]
    assert [s["forced"] for s in sections] == [JOB["steps"]] * 2  # one transformer call per step, per section


# ---- the plan doctor prints is the plan that runs ---------------------------------------------------


PLANNED = dict(
    enable_teacache=True, enable_sim_cache=True, enable_tensorrt=True, enable_module_cache=True, xformers_mode="off"
)


@pytest.mark.parametrize("hardware", [None, H100], ids=["this-cpu", "simulated-h100"])
def test_doctor_plan_is_the_plan_the_run_records(hardware, monkeypatch, example_image, tmp_path):
    if hardware is not None:  # a CUDA machine as the rules see it; the models still run on this CPU
        monkeypatch.setattr(Hardware, "detect", staticmethod(lambda import_backends=False: hardware))
    values = {"model": "tiny-random", "device": "cpu", "runtime_cache_dir": str(tmp_path / "rc"), **PLANNED}
    settings = Settings.load(values, environ={})
    doctor = diagnose(settings, Hardware.detect(), environ={})
    result = FramePack.load(settings=settings).generate(example_image, "a cat", out=tmp_path / "d.mp4", **JOB)
    assert result.sidecar["settings"]["plan"] == doctor["plan"]
    assert result.sidecar["placement"]["mode"] == doctor["placement"]["mode"] == "cpu"
    status = {p["name"]: p["status"] for p in doctor["plan"]}
    assert (
        status["teacache"] == status["attention"] == "active" and status["simcache"] == status["tensorrt"] == "skipped"
    )


# ---- runtime passes come off a loaded bundle ---------------------------------------------------------


RUNS = {
    "teacache": {"enable_teacache": True, "teacache_threshold": 0.5},
    "baseline": {},
    "fbcache": {"enable_fbcache": True, "fbcache_threshold": 0.3},
}


def _settings(values):
    return Settings.load({"model": "tiny-random", "device": "cpu", **values}, source="api", environ={})


def test_jobs_that_differ_in_runtime_passes_reuse_the_loaded_models(monkeypatch, example_image, tmp_path):
    fresh = {
        name: FramePack.load(settings=_settings(v)).generate(
            example_image, "a cat", out=tmp_path / f"f{name}.mp4", **JOB
        )
        for name, v in RUNS.items()
    }
    import framepack_turbo.api as api

    loads = []
    load_bundle = api.load_bundle
    monkeypatch.setattr(api, "load_bundle", lambda *a, **k: loads.append(1) or load_bundle(*a, **k))
    fp = None
    for name, values in RUNS.items():
        if fp is None:
            fp = FramePack.load(settings=_settings(values))
        else:
            assert fp.reconfigure(_settings(values))
        result = fp.generate(example_image, "a cat", out=tmp_path / f"r{name}.mp4", **JOB)
        assert torch.equal(result.latents, fresh[name].latents), name  # nothing of the last pass is left
        assert result.sidecar.get("caches") == fresh[name].sidecar.get("caches"), name
    assert len(loads) == 1
    assert [r.name for r in fp.reports] == ["fbcache", "placement"]
    hooked = [m for m in fp.bundle.transformer.modules() if getattr(m, "_diffusers_hook", None) is not None]
    assert not any(
        n.startswith("framepack_teacache") for m in hooked for n in m._diffusers_hook.hooks
    )  # the TeaCache hooks came off


def test_a_different_weight_pass_needs_a_reload():
    fp = FramePack.load(settings=_settings({}))
    assert not fp.reconfigure(_settings({"enable_quant": True}))
    assert not fp.reconfigure(_settings({"model": "small"}))
    assert [r.name for r in fp.reports] == ["placement"]  # nothing changed


@pytest.mark.slow
def test_the_web_queue_reuses_the_models_across_runtime_changes(tmp_path):
    from framepack_turbo.app.jobs import JobStore
    from framepack_turbo.app.queue import GenerationRunner, JobQueue

    from .test_queue import png

    runner = GenerationRunner({"model": "tiny-random", "device": "cpu"})
    queue = JobQueue(JobStore(tmp_path / "jobs.sqlite"), runner, tmp_path)
    for values in RUNS.values():
        queue.submit(png(), {"prompt": "a cat", "options": {**JOB, "resolution": 128}, "settings": values})
    assert queue.run_pending() == 3
    assert all(job.state == "done" for job in queue.store.list()) and runner.loads == 1
    assert set(queue.live.cache_timeline[0]) == {"fbcache"}  # from the events: the last job's cache per section


def test_the_attention_backend_comes_off_too():
    from framepack_turbo.optim.attention import attention_backends

    fp = FramePack.load(settings=_settings({"xformers_mode": "off"}))
    default = attention_backends(FramePack.load(settings=_settings({})).bundle.transformer)
    assert attention_backends(fp.bundle.transformer) != default
    assert fp.reconfigure(_settings({}))
    assert attention_backends(fp.bundle.transformer) == default
