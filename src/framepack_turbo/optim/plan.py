"""The plan: every optimization pass in its fixed order, and whether this run applies it.

Order (DESIGN): loading options -> precision -> pruning -> quantization -> attention -> caches ->
memory placement -> compilation. A pass is wanted when its settings turn it on; a compatibility
finding can skip it (the finding names the pass in `disables`); a pass whose implementation is not
in this version says so instead of pretending. Nothing here touches a model: `apply_plan` does,
through each built pass's `apply`.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from framepack_turbo.compat import CompatReport
    from framepack_turbo.hardware import Hardware
    from framepack_turbo.settings import Settings

log = logging.getLogger(__name__)

Status = Literal["off", "active", "skipped", "not built"]


@dataclass(frozen=True)
class PassSpec:
    name: str
    title: str
    wanted: Callable[[Settings], bool]
    switches: tuple[str, ...]  # the settings that turn it on, for messages
    implementation: str | None = None  # "module:Class" of the pass; None: not in this version
    housekeeping: bool = False  # loading and placement: not a change to the computation, left out of the summary


PASS_ORDER: tuple[PassSpec, ...] = (
    PassSpec(
        "loading.bnb", "bitsandbytes quantized loading", lambda s: s.use_bnb, ("use_bnb",),
        "framepack_turbo.optim.bnb:BnbPass",
    ),  # fmt: skip
    PassSpec(
        "loading.parallel", "parallel component loading",
        lambda s: s.parallel_loaders > 1 or s.preload_repos, ("parallel_loaders", "preload_repos"),
        "framepack_turbo.models.loading", housekeeping=True,  # not a pass over the bundle: load_bundle does it
    ),  # fmt: skip
    PassSpec(
        "precision", "low precision (bf16/fp16)", lambda s: s.enforce_low_precision, ("enforce_low_precision",),
        "framepack_turbo.optim.precision:LowPrecisionPass",
    ),  # fmt: skip
    PassSpec("prune", "block pruning", lambda s: s.enable_prune, ("enable_prune",), "framepack_turbo.optim.prune:PrunePass"),
    PassSpec(
        "quant", "INT-N quantization", lambda s: s.enable_quant, ("enable_quant", "quant_bits"),
        "framepack_turbo.optim.quant:QuantPass",
    ),  # fmt: skip
    PassSpec("fp8", "FP8 weights", lambda s: s.enable_fp8, ("enable_fp8",), "framepack_turbo.optim.fp8:Fp8Pass"),
    PassSpec(
        "attention", "transformer attention backend", lambda s: s.xformers_mode != "standard", ("xformers_mode",),
        "framepack_turbo.optim.attention:AttentionPass",
    ),  # fmt: skip
    PassSpec(
        "encoder_attention", "encoder attention (BetterTransformer)",
        lambda s: s.enable_bettertransformer or s.encoder_attn_implementation != "default",
        ("enable_bettertransformer", "encoder_attn_implementation"),
        "framepack_turbo.optim.encoder_attention:EncoderAttentionPass",
    ),  # fmt: skip
    PassSpec(
        "modulecache", "encoder output cache", lambda s: s.enable_module_cache, ("enable_module_cache",),
        "framepack_turbo.optim.modulecache:ModuleCachePass",
    ),  # fmt: skip
    PassSpec(
        "fbcache", "first-block cache", lambda s: s.enable_fbcache, ("enable_fbcache",),
        "framepack_turbo.optim.fbcache:FirstBlockCachePass",
    ),  # fmt: skip
    PassSpec(
        "teacache", "TeaCache", lambda s: s.enable_teacache, ("enable_teacache",),
        "framepack_turbo.optim.teacache:TeaCachePass",
    ),  # fmt: skip
    PassSpec(
        "simcache", "similarity cache", lambda s: s.enable_sim_cache, ("enable_sim_cache",),
        "framepack_turbo.optim.simcache:SimilarityCachePass",
    ),  # fmt: skip
    PassSpec(
        "kvcache", "context KV cache", lambda s: s.enable_kv_cache, ("enable_kv_cache",),
        "framepack_turbo.optim.kvcache:ContextKVCachePass",
    ),  # fmt: skip
    PassSpec(
        "placement", "memory placement (high-VRAM / v1 / v2)", lambda s: True, ("memory_mode", "use_memory_v2"),
        "framepack_turbo.optim.offload:PlacementPass", housekeeping=True,
    ),  # fmt: skip
    PassSpec(
        "opt_cache", "optimized-model cache", lambda s: s.enable_opt_cache, ("enable_opt_cache",),
        "framepack_turbo.optim.artifact",  # not a pass over the bundle: FramePack.load loads or saves it
    ),  # fmt: skip
    PassSpec(
        "compile", "torch.compile", lambda s: s.enable_compile, ("enable_compile",), "framepack_turbo.optim.compile:CompilePass"
    ),
    PassSpec("jit", "TorchScript", lambda s: s.jit_mode != "off", ("jit_mode",), "framepack_turbo.optim.jit:JitPass"),
    PassSpec(
        "tensorrt", "TensorRT (torch-tensorrt)", lambda s: s.enable_tensorrt, ("enable_tensorrt",),
        "framepack_turbo.optim.torch_trt:TensorRTPass",
    ),
    PassSpec(
        "onnx", "ONNX engines (onnxruntime)", lambda s: s.use_onnx_engines or s.onnx_trt_enable,
        ("use_onnx_engines", "onnx_trt_enable"), "framepack_turbo.optim.onnx_engines:OnnxPass",
    ),  # fmt: skip
)
PASSES_BY_NAME = {p.name: p for p in PASS_ORDER}


@dataclass(frozen=True)
class PlannedPass:
    name: str
    title: str
    status: Status
    reason: str = ""

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "title": self.title, "status": self.status, "reason": self.reason}


@dataclass(frozen=True)
class Plan:
    passes: tuple[PlannedPass, ...] = field(default_factory=tuple)

    def active(self) -> list[PlannedPass]:
        return [p for p in self.passes if p.status == "active"]

    def to_list(self) -> list[dict[str, str]]:
        return [p.to_dict() for p in self.passes]

    def summary_lines(self) -> list[str]:
        """One screen: what runs, what was asked for and does not, and why."""
        lines = []
        active = [p for p in self.active() if not PASSES_BY_NAME[p.name].housekeeping]
        lines.append("Active optimizations: " + (", ".join(p.title for p in active) if active else "none (baseline)"))
        for p in self.passes:
            if p.status in ("skipped", "not built"):
                lines.append(f"  {p.title}: {p.status}: {p.reason}")
        return lines


def _env_names(spec: PassSpec) -> str:
    from framepack_turbo.settings import env_name

    return ", ".join(env_name(s) for s in spec.switches)


def make_plan(settings: Settings, report: CompatReport) -> Plan:
    """Decide each pass's status from the settings and the compatibility findings."""
    disabled = report.disabled_passes()
    planned = []
    for spec in PASS_ORDER:
        if not spec.wanted(settings):
            planned.append(PlannedPass(spec.name, spec.title, "off"))
        elif spec.name in disabled:
            planned.append(PlannedPass(spec.name, spec.title, "skipped", disabled[spec.name]))
        elif spec.implementation is None:
            planned.append(
                PlannedPass(
                    spec.name, spec.title, "not built",
                    f"{_env_names(spec)} is accepted, but this pass is not in this version yet: the run goes without it",
                )  # fmt: skip
            )
        else:
            planned.append(PlannedPass(spec.name, spec.title, "active"))
    return Plan(tuple(planned))


def loading_kwargs(plan: Plan, settings: Settings) -> dict[str, dict[str, Any]]:
    """Extra `from_pretrained` arguments per component from the active passes that work while loading."""
    out: dict[str, dict[str, Any]] = {}
    if any(p.name == "loading.bnb" for p in plan.active()):
        from framepack_turbo.models.presets import COMPONENTS
        from framepack_turbo.optim import bnb

        config = bnb.BnbPass().config(settings)
        for component in COMPONENTS:
            kwargs = bnb.loading_kwargs(config, component)
            if kwargs:
                out[component] = kwargs
    return out


# Passes whose whole effect the optimized-model cache stores. (Low precision also casts the encoders,
# so it still runs on a cached transformer and leaves that alone.)
WEIGHT_PASSES = frozenset({"prune", "quant", "fp8"})


def apply_plan(
    plan: Plan, bundle: Any, settings: Settings, hardware: Hardware, skip: frozenset[str] = frozenset()
) -> list[Any]:
    """Run every active pass on the bundle, in order (but those in `skip`); returns their reports."""
    reports = []
    for planned in plan.active():
        spec = PASSES_BY_NAME[planned.name]
        if planned.name in skip or ":" not in spec.implementation:
            continue
        module_name, _, cls_name = spec.implementation.partition(":")
        pass_ = getattr(importlib.import_module(module_name), cls_name)()
        config = pass_.config(settings)
        if config is None:
            continue
        report = pass_.apply(bundle, config, hardware)
        log.info("%s: %s%s", planned.title, report.outcome, f" ({report.detail})" if report.detail else "")
        reports.append(report)
    return reports
