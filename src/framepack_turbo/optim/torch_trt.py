"""TensorRT through torch-tensorrt (ENABLE_TENSORRT with TRT_TRANSFORMER / TRT_TEXT_ENCODERS).

torch-tensorrt's dynamo path compiles a module for the inputs it is shown, so the module is wrapped
and compiled on its first call per input signature (shapes and dtypes), like the TorchScript pass:
a FramePack job calls the transformer with one shape, so a job compiles once. At most
TRT_MAX_CACHED_SHAPES compiled modules are held (least recently used dropped); the engines
themselves go to torch-tensorrt's engine cache in TENSORRT_CACHE_DIR, so a shape seen in an earlier
process is loaded instead of rebuilt. Workspace and auxiliary streams come from TRT_WORKSPACE_MB and
TRT_MAX_AUX_STREAMS.

Needs CUDA and the torch-tensorrt package; compat skips the pass with the reason when either is
missing (`tensorrt-needs-gpu`, `tensorrt-not-installed`) or when it is on for no module
(`tensorrt-nothing-selected`). Not run on this project's CPU machines.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from framepack_turbo.optim.base import PassContext, PassReport, StandIn
from framepack_turbo.optim.jit import Signature, signature

if TYPE_CHECKING:
    from framepack_turbo.models.loading import ModelBundle
    from framepack_turbo.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TensorRTConfig:
    modules: tuple[str, ...]
    workspace_mb: int = 4096
    max_aux_streams: int = 2
    cache_dir: Path = Path("Cache/trt_cache")
    max_cached_shapes: int = 8
    engine_cache_gb: float = 64.0


def compile_options(config: TensorRTConfig, dtype: torch.dtype) -> dict[str, Any]:
    """torch_tensorrt.compile's settings from ours."""
    return {
        "ir": "dynamo",
        "enabled_precisions": {dtype},
        "workspace_size": config.workspace_mb << 20,
        "max_aux_streams": config.max_aux_streams,
        "cache_built_engines": True,
        "reuse_cached_engines": True,
        "engine_cache_dir": str(config.cache_dir),
        "engine_cache_size": int(config.engine_cache_gb * 2**30),
        "min_block_size": 1,
    }


class TensorRTModule(StandIn):
    """Stands in for a module; compiles it with torch-tensorrt per input signature, on first use."""

    def __init__(self, original: torch.nn.Module, config: TensorRTConfig, compile_fn: Any = None) -> None:
        super().__init__(original)
        self.trt_config = config
        self.compiled: OrderedDict[Signature, Any] = OrderedDict()
        self.compile_fn = compile_fn
        self.compilations = 0

    def forward(self, *args: Any, **kwargs: Any):
        tensors = {k: v for k, v in kwargs.items() if torch.is_tensor(v)}
        sig = signature({**tensors, **{f"arg{i}": a for i, a in enumerate(args) if torch.is_tensor(a)}})
        module = self.compiled.get(sig)
        if module is None:
            module = self._compile(args, kwargs)
            self.compiled[sig] = module
            while len(self.compiled) > self.trt_config.max_cached_shapes:
                self.compiled.popitem(last=False)
        self.compiled.move_to_end(sig)
        return module(*args, **kwargs)

    def _compile(self, args: tuple, kwargs: dict[str, Any]):
        compile_fn = self.compile_fn
        if compile_fn is None:
            import torch_tensorrt

            compile_fn = torch_tensorrt.compile
        dtype = next(self.original.parameters()).dtype
        log.info(
            "Compiling %s with TensorRT for new input shapes (engines cached in %s)",
            type(self.original).__name__,
            self.trt_config.cache_dir,
        )
        self.compilations += 1
        return compile_fn(
            self.original, arg_inputs=list(args), kwarg_inputs=kwargs, **compile_options(self.trt_config, dtype)
        )


class TensorRTPass:
    name = "tensorrt"

    def config(self, settings: Settings) -> TensorRTConfig:
        modules = (("transformer",) if settings.trt_transformer else ()) + (
            ("text_encoder", "text_encoder_2") if settings.trt_text_encoders else ()
        )
        return TensorRTConfig(
            modules,
            settings.trt_workspace_mb,
            settings.trt_max_aux_streams,
            settings.tensorrt_cache_dir,
            settings.trt_max_cached_shapes,
        )

    def apply(self, bundle: ModelBundle, config: TensorRTConfig, context: PassContext) -> PassReport:
        for name in config.modules:
            setattr(bundle, name, TensorRTModule(getattr(bundle, name), config))
        # Before the ONNX pass in the plan: with both on (the `tensorrt` preset) these modules are TensorRT's.
        return PassReport(self.name, "applied", f"{', '.join(config.modules)} compiled per input shape on first call")
