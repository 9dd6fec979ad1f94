"""Every compatibility rule: it fires on the case it describes and stays quiet on the baseline; the plan obeys."""

import tempfile
from dataclasses import replace
from pathlib import Path

import pytest

from framepack_turbo import compat
from framepack_turbo.compat import RULES, Severity, check
from framepack_turbo.hardware import Hardware
from framepack_turbo.optim import registry
from framepack_turbo.optim.plan import make_plan
from framepack_turbo.settings import Settings

from .lora_files import stub

CPU = Hardware()  # no CUDA, no optional backends
ALL_BACKENDS = {
    name: True
    for name in (
        "torchao",
        "bitsandbytes",
        "xformers",
        "sageattention",
        "flash_attn",
        "flash_attn_interface",
        "faiss",
        "onnxruntime",
        "tensorrt",
        "torch_tensorrt",
    )
}
H100 = Hardware(
    "cuda",
    "NVIDIA H100",
    16,
    80.0,
    79.0,
    (9, 0),
    True,
    ALL_BACKENDS,
    ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
)
A100 = Hardware(
    "cuda", "NVIDIA A100", 16, 80.0, 79.0, (8, 0), True, ALL_BACKENDS, ("CUDAExecutionProvider", "CPUExecutionProvider")
)
BARE_GPU = Hardware("cuda", "NVIDIA RTX 4090", 16, 24.0, 23.0, (8, 9), True, {}, ())
# host RAM and disk (tests/test_host_memory.py has the rules' numbers)
SMALL_HOST = replace(BARE_GPU, ram_total_gb=16.0, ram_available_gb=16.0, swap_free_gb=0.0)
BIG_HOST = replace(SMALL_HOST, ram_total_gb=128.0, ram_available_gb=128.0)
FULL_DISK = replace(BARE_GPU, disk_path="/data", disk_free_gb=0.1)
ROOMY_DISK = replace(FULL_DISK, disk_free_gb=100.0)
H100x2, H100x8 = replace(H100, gpu_count=2), replace(H100, gpu_count=8)


def s(**values) -> Settings:
    return Settings.load(values)


LORA = (str(stub(Path(tempfile.mkdtemp(prefix="framepack-compat-")))),)

# (rule id, settings that show it, hardware it needs, settings+hardware where it must NOT fire)
CASES = [
    ("lora-merged", dict(loras=LORA), CPU, dict(loras=LORA, lora_mode="unmerged")),
    ("lora-unmerged", dict(loras=LORA, use_bnb=True), H100, dict(loras=LORA)),  # auto: bitsandbytes takes no merge
    (
        "lora-merge-bitsandbytes",
        dict(loras=LORA, lora_mode="merged", use_bnb=True),
        H100,
        dict(loras=LORA, use_bnb=True),
    ),
    (
        "lora-adapters-quantized",
        dict(loras=LORA, lora_mode="unmerged", enable_quant=True),
        CPU,
        dict(loras=LORA, enable_quant=True),  # merged first, then quantized
    ),
    (
        "lora-adapters-exported",
        dict(loras=LORA, lora_mode="unmerged", use_onnx_engines=True),
        CPU,
        dict(loras=LORA, lora_mode="unmerged", use_onnx_engines=True, onnx_components="vae-decoder"),
    ),
    (
        "compile-cudagraphs-offload",
        dict(enable_compile=True, compile_mode="reduce-overhead", use_memory_v2=True),
        H100,
        dict(enable_compile=True, compile_mode="max-autotune-no-cudagraphs", use_memory_v2=True),
    ),
    (
        "compile-offload-without-cudagraphs",
        dict(enable_compile=True, use_memory_v2=True),
        H100,
        dict(enable_compile=True, use_memory_v2=False),
    ),
    ("tensorrt-bitsandbytes", dict(enable_tensorrt=True, use_bnb=True), H100, dict(enable_tensorrt=True)),
    ("compile-torchscript", dict(enable_compile=True, jit_mode="trace"), CPU, dict(jit_mode="trace")),
    ("multiple-quantization", dict(enable_quant=True, enable_fp8=True), H100, dict(enable_fp8=True)),
    (
        "fp8-without-fp8-hardware",
        dict(enable_fp8=True, fp8_use_scaled_mm=True),
        A100,
        dict(enable_fp8=True, fp8_use_scaled_mm=True),
    ),  # quiet case runs on H100 below
    ("tensorrt-needs-gpu", dict(enable_tensorrt=True), CPU, dict(enable_tensorrt=True)),
    ("tensorrt-not-installed", dict(enable_tensorrt=True), BARE_GPU, dict(enable_tensorrt=True)),
    ("onnx-needs-onnxruntime", dict(use_onnx_engines=True), CPU, dict(use_onnx_engines=True)),
    ("onnx-trt-provider-missing", dict(onnx_trt_enable=True), A100, dict(onnx_trt_enable=True)),
    (
        "onnx-step-caches",
        dict(use_onnx_engines=True, enable_teacache=True),
        CPU,
        dict(use_onnx_engines=True, onnx_components="vae-decoder", enable_teacache=True),
    ),
    (
        "onnx-compiled-transformer",
        dict(use_onnx_engines=True, enable_compile=True),
        CPU,
        dict(use_onnx_engines=True, onnx_components="text-encoder", enable_compile=True),
    ),
    ("onnx-quantized-transformer", dict(use_onnx_engines=True, enable_quant=True), CPU, dict(enable_quant=True)),
    ("onnx-trt-int8-uncalibrated", dict(onnx_trt_enable=True, onnx_trt_int8=True), H100, dict(onnx_trt_enable=True)),
    ("onnx-with-offload", dict(use_onnx_engines=True), BARE_GPU, dict(use_onnx_engines=True, memory_mode="high-vram")),
    ("bnb-needs-cuda", dict(use_bnb=True), CPU, dict(use_bnb=True)),
    ("bnb-not-installed", dict(use_bnb=True), BARE_GPU, dict(use_bnb=True)),
    ("memory-v2-needs-cuda", dict(use_memory_v2=True), CPU, dict(use_memory_v2=True)),
    ("quant-needs-torchao", dict(enable_quant=True), CPU, dict(enable_quant=True)),
    ("int4-on-cpu", dict(enable_quant=True, quant_bits=4), CPU, dict(enable_quant=True, quant_bits=8)),
    ("aggressive-attention-missing", dict(xformers_mode="aggressive"), CPU, dict(xformers_mode="aggressive")),
    (
        "faiss-missing",
        dict(enable_sim_cache=True, sim_cache_use_faiss=True),
        CPU,
        dict(enable_sim_cache=True, sim_cache_use_faiss=True),
    ),
    ("step-caches-exclusive", dict(enable_fbcache=True, enable_teacache=True), CPU, dict(enable_fbcache=True)),
    ("step-caches-torchscript", dict(enable_kv_cache=True, jit_mode="trace"), CPU, dict(enable_kv_cache=True)),
    (
        "kvcache-step-cache",
        dict(enable_kv_cache=True, enable_fbcache=True),
        CPU,
        dict(enable_kv_cache=True, enable_teacache=True),
    ),
    ("kvcache-stacked", dict(enable_kv_cache=True, enable_magcache=True), CPU, dict(enable_magcache=True)),
    (
        "bettertransformer-with-offload",
        dict(enable_bettertransformer=True, use_memory_v2=True),
        H100,
        dict(enable_bettertransformer=True),
    ),
    ("fast-start-skips", dict(fast_start=True, enable_compile=True), CPU, dict(fast_start=True)),
    ("prune-is-lossy", dict(enable_prune=True), CPU, dict(enable_prune=False)),
    ("setting-without-switch", dict(quant_bits=4), CPU, dict(quant_bits=4, enable_quant=True)),
    (
        "opt-cache-bitsandbytes",
        dict(enable_opt_cache=True, use_bnb=True),
        H100,
        dict(enable_opt_cache=True, enable_quant=True),
    ),
    ("opt-cache-nothing-to-store", dict(enable_opt_cache=True), CPU, dict(enable_opt_cache=True, enable_fp8=True)),
    ("model-native-resolution", dict(model="tiny", resolution=640), CPU, dict(model="tiny", resolution=64)),
    ("bnb-needs-weights", dict(use_bnb=True, model="tiny-random"), H100, dict(use_bnb=True)),
    ("tensorrt-nothing-selected", dict(enable_tensorrt=True), H100, dict(enable_tensorrt=True, trt_transformer=True)),
    (
        "onnx-components-taken-by-tensorrt",
        dict(use_onnx_engines=True, enable_tensorrt=True, trt_transformer=True),
        H100,
        dict(use_onnx_engines=True, enable_tensorrt=True, trt_text_encoders=True),
    ),
    ("host-ram-short", dict(model="full"), SMALL_HOST, dict(model="tiny-random")),
    ("disk-space-short", dict(seconds=60), FULL_DISK, dict(seconds=60)),
    # context parallelism
    ("parallel-ranks-exceed-gpus", dict(parallel_degree=4), H100x2, dict(parallel_degree=2)),
    (
        "parallel-heads-not-divisible",
        dict(parallel_degree=3, model="small"),
        CPU,
        dict(parallel_degree=4, model="small"),
    ),
    (
        "parallel-ring-needs-cuda",
        dict(parallel_degree=2, parallel_mode="ring"),
        CPU,
        dict(parallel_degree=2, parallel_mode="ring"),
    ),
    ("parallel-attention-backend", dict(parallel_degree=2, xformers_mode="off"), CPU, dict(parallel_degree=2)),
    ("parallel-offload", dict(parallel_degree=2, use_memory_v2=True), H100x8, dict(parallel_degree=2)),
    ("parallel-exported-transformer", dict(parallel_degree=2, jit_mode="trace"), CPU, dict(parallel_degree=2)),
    ("parallel-kv-cache", dict(parallel_degree=2, enable_kv_cache=True), CPU, dict(enable_kv_cache=True)),
    ("parallel-similarity-cache", dict(parallel_degree=2, enable_sim_cache=True), CPU, dict(enable_sim_cache=True)),
    ("parallel-cpu-processes", dict(parallel_degree=2), CPU, dict(parallel_degree=2)),
]
# Where the quiet case needs other hardware than the firing case.
QUIET_HARDWARE = {
    "fp8-without-fp8-hardware": H100,
    "tensorrt-needs-gpu": H100,
    "tensorrt-not-installed": H100,
    "onnx-needs-onnxruntime": H100,
    "onnx-trt-provider-missing": H100,
    "bnb-needs-cuda": H100,
    "bnb-not-installed": H100,
    "memory-v2-needs-cuda": H100,
    "quant-needs-torchao": H100,
    "aggressive-attention-missing": H100,
    "faiss-missing": H100,
    "disk-space-short": ROOMY_DISK,
    "parallel-ring-needs-cuda": H100x8,
    "parallel-cpu-processes": H100x8,
}


def test_every_rule_has_a_case():
    assert sorted(c[0] for c in CASES) == sorted(r.id for r in RULES)


def test_rule_ids_unique_and_texts_present():
    assert len({r.id for r in RULES}) == len(RULES)
    report = check(Settings.load({}), CPU)
    assert report.findings == ()


@pytest.mark.parametrize("rule_id, fire, hardware, quiet", CASES, ids=[c[0] for c in CASES])
def test_rule_fires_and_stays_quiet(rule_id, fire, hardware, quiet):
    report = check(s(**fire), hardware)
    finding = next((f for f in report.findings if f.id == rule_id), None)
    assert finding is not None, report.ids()
    assert finding.message and finding.fix
    assert finding.severity is compat.RULES_BY_ID[rule_id].severity
    quiet_report = check(s(**quiet), QUIET_HARDWARE.get(rule_id, hardware))
    assert rule_id not in quiet_report.ids()


def test_spec_five_severities():
    sev = {r.id: r.severity for r in RULES}
    assert sev["compile-cudagraphs-offload"] is Severity.CRITICAL
    assert sev["tensorrt-bitsandbytes"] is Severity.CRITICAL
    assert sev["multiple-quantization"] is Severity.CRITICAL
    assert sev["compile-torchscript"] is Severity.WARNING  # the spec: compile is skipped under TorchScript
    assert sev["fp8-without-fp8-hardware"] is Severity.WARNING  # falls back to fp8 storage


def test_fp8_hardware_message_names_the_device():
    f = check(s(enable_fp8=True, fp8_use_scaled_mm=True), A100).findings[0]
    assert "NVIDIA A100 (8.0)" in f.message and "8.9" in f.message


def test_multiple_quantization_names_the_methods():
    f = next(f for f in check(s(enable_quant=True, use_bnb=True), H100).findings if f.id == "multiple-quantization")
    assert "FRAMEPACK_ENABLE_QUANT and FRAMEPACK_USE_BNB" in f.message


def test_setting_without_switch_only_for_user_set_values(monkeypatch):
    # a preset value without its switch is not the user's doing: no finding
    assert "setting-without-switch" not in check(s(preset="tensorrt", enable_tensorrt=False), H100).ids()
    monkeypatch.setenv("FRAMEPACK_FBCACHE_THRESHOLD", "0.05")
    f = next(f for f in check(Settings.load({}), CPU).findings if f.id == "setting-without-switch")
    assert "FRAMEPACK_FBCACHE_THRESHOLD" in f.message


def test_critical_first():
    report = check(s(enable_tensorrt=True, use_bnb=True), CPU)
    assert report.findings[0].severity is Severity.CRITICAL
    assert report.has_critical and [f.id for f in report.critical] == ["tensorrt-bitsandbytes"]


# ---- the plan obeys the report ----------------------------------------------------------------------


def _status(plan, name):
    return next(p for p in plan.passes if p.name == name)


def test_plan_default_runs_no_optimization():
    plan = make_plan(Settings.load({}), check(Settings.load({}), CPU), CPU)
    assert [p.name for p in plan.passes] == list(registry.names())
    # only housekeeping runs by default: placement, and parallel weight reads
    assert {p.name for p in plan.passes if p.status != "off"} == {"placement", "loading.parallel"}
    assert plan.summary_lines() == ["Active optimizations: none (baseline)"]


def test_plan_skips_what_a_rule_disables():
    settings = s(enable_compile=True, jit_mode="trace")
    plan = make_plan(settings, check(settings, CPU), CPU)
    compile_ = _status(plan, "compile")
    assert compile_.status == "skipped" and "compile-torchscript" in compile_.reason
    settings = s(fast_start=True, enable_compile=True)
    assert _status(make_plan(settings, check(settings, CPU), CPU), "compile").status == "skipped"


def test_every_pass_with_work_over_the_bundle_has_an_implementation():
    # parallel loading and the optimized-model cache work while loading (load_bundle, FramePack.load)
    assert [p.name for p in registry.passes() if p.impl is None] == ["loading.parallel", "opt_cache"]


def test_onnx_and_tensorrt_skip_paths_on_cpu():
    settings = s(use_onnx_engines=True, enable_tensorrt=True, trt_transformer=True)
    bare = make_plan(settings, check(settings, CPU), CPU)  # no onnxruntime, no CUDA
    assert _status(bare, "onnx").status == "skipped" and "onnx-needs-onnxruntime" in _status(bare, "onnx").reason
    assert _status(bare, "tensorrt").status == "skipped" and "tensorrt-needs-gpu" in _status(bare, "tensorrt").reason
    no_trt = make_plan(settings, check(settings, BARE_GPU), BARE_GPU)  # CUDA without torch-tensorrt
    assert "tensorrt-not-installed" in _status(no_trt, "tensorrt").reason
    full = make_plan(settings, check(settings, H100), H100)  # TensorRT takes the transformer: no ONNX engine is left
    assert _status(full, "tensorrt").status == "active" and _status(full, "onnx").status == "skipped"
    assert "onnx-components-taken-by-tensorrt" in _status(full, "onnx").reason
    settings = s(
        use_onnx_engines=True, onnx_components="transformer,vae-decoder", enable_tensorrt=True, trt_transformer=True
    )
    both = make_plan(settings, check(settings, H100), H100)
    assert _status(both, "onnx").status == "active" and _status(both, "tensorrt").status == "active"


def test_plan_order_is_the_design_order():
    names = list(registry.names())
    order = ["loading.bnb", "precision", "prune", "quant", "attention", "fbcache", "placement", "compile", "tensorrt"]
    assert [n for n in names if n in order] == order


def test_the_lora_mode_picks_one_pass():
    merged = make_plan(s(loras=LORA), check(s(loras=LORA), CPU), CPU)
    assert merged.is_active("lora.merge") and not merged.is_active("lora.adapters")
    settings = s(loras=LORA, lora_mode="unmerged")
    unmerged = make_plan(settings, check(settings, CPU), CPU)
    assert unmerged.is_active("lora.adapters") and not unmerged.is_active("lora.merge")
    none = make_plan(s(), check(s(), CPU), CPU)
    assert not none.is_active("lora.merge") and not none.is_active("lora.adapters")


def test_host_rules_quiet_where_the_machine_has_room_or_is_unknown():
    assert "host-ram-short" not in check(s(model="full"), BIG_HOST).ids()
    assert "host-ram-short" in check(s(model="full"), SMALL_HOST).ids()
    for hardware in (CPU, H100):  # no host figures: no finding
        assert not {"host-ram-short", "disk-space-short"} & set(check(s(model="full"), hardware).ids())


def test_parallel_rules_against_the_machine_and_the_model():
    """A fresh GPU box: 24 GB cards put the 13B transformer in offloading mode, which context parallelism
    refuses; 80 GB cards keep it resident. The released model's 24 heads split over 2, 3, 4, 6, 8 ranks, not 5."""
    small_cards = replace(BARE_GPU, gpu_count=4)
    assert "parallel-offload" in check(s(parallel_degree=4, model="framepack"), small_cards).ids()
    roomy = check(s(parallel_degree=8, model="framepack"), H100x8)
    assert [f.id for f in roomy.critical] == []
    assert "parallel-heads-not-divisible" in check(s(parallel_degree=5, model="framepack"), H100x8).ids()
    assert (
        "parallel-heads-not-divisible"
        not in check(s(parallel_degree=5, model="framepack", parallel_mode="ring"), H100x8).ids()
    )
    # what composes: quantization, compile, LoRA, the step caches (decisions summed over ranks)
    stacked = s(parallel_degree=2, enable_quant=True, enable_compile=True, enable_teacache=True, loras=LORA)
    assert not [f.id for f in check(stacked, H100x8).findings if f.id.startswith("parallel-")]


def test_random_presets_heads_match_their_models():
    from framepack_turbo.models.presets import RANDOM_HEADS
    from framepack_turbo.models.random import SIZES

    assert RANDOM_HEADS == {name: size.heads for name, size in SIZES.items()}
