"""ONNX engines (USE_ONNX_ENGINES, ONNX_TRT_*): exported components run through onnxruntime.

Each component in ONNX_COMPONENTS is replaced by a stand-in module with the same call convention
(the generator and diffusers' VAE tiling do not know), which feeds its tensors to an onnxruntime
session. Exports come from ONNX_DIR (`framepack export onnx --out DIR`) or, when it is unset, from
the runtime cache, where each component is exported on first use under a key of its weights.

Providers, as installed: TensorRT (ONNX_TRT_ENABLE) -> CUDA -> CPU. The ONNX_TRT_* settings become
the TensorRT provider's options. A TensorRT engine is built for one input shape: each shape gets its
own engine folder under ONNX_TRT_CACHE_DIR (keyed by graph, shapes and options) so a shape seen before
loads in seconds instead of building for minutes, and at most TRT_MAX_CACHED_SHAPES folders are kept
per graph (least recently used go first). Only the newest TensorRT session is held in memory: each one
holds a copy of the weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from framepack_turbo.constants import LLAMA_HIDDEN_LAYER, VAE_SPATIAL_SCALE
from framepack_turbo.errors import FramePackError, InputError
from framepack_turbo.optim import onnx_export as ox
from framepack_turbo.optim.base import Extension, PassContext, PassReport, Scope, StandIn
from framepack_turbo.optim.torch_trt import TensorRTModule

if TYPE_CHECKING:
    from framepack_turbo.models.loading import ModelBundle
    from framepack_turbo.settings import Settings

log = logging.getLogger(__name__)

TRT, CUDA, CPU = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"


class OnnxShapeError(FramePackError):
    """A call whose shapes no exported graph covers, with exports that are not ours to extend."""

    exit_code = 2


@dataclass(frozen=True)
class OnnxConfig:
    components: tuple[str, ...] = ("transformer",)
    export_dir: Path | None = None  # ONNX_DIR; None: the runtime cache, exported on first use
    cache_root: Path = Path("Cache/runtime_caches/onnx")
    trt: bool = False
    trt_fp16: bool = True
    trt_int8: bool = False
    device_id: int = 0
    trt_workspace_mb: int = 4096
    trt_cache_dir: Path = Path("Cache/onnx_trt_cache")
    max_cached_shapes: int = 8

    def directory(self, component: str, identity: dict[str, Any]) -> Path:
        if self.export_dir is not None:
            return self.export_dir / component
        return self.cache_root / ox.identity_key(identity) / component

    @property
    def extendable(self) -> bool:
        """Exports in the runtime cache are ours: a new shape may add a file. A user's folder is not."""
        return self.export_dir is None


def provider_chain(config: OnnxConfig, available: Sequence[str], cuda: bool) -> list[tuple[str, dict[str, Any]]]:
    """TensorRT -> CUDA -> CPU, keeping those installed (and wanted); each with its options."""
    chain: list[tuple[str, dict[str, Any]]] = []
    if config.trt and cuda and TRT in available:
        chain.append(
            (
                TRT,
                {
                    "device_id": config.device_id,
                    "trt_fp16_enable": config.trt_fp16,
                    "trt_int8_enable": config.trt_int8,
                    "trt_max_workspace_size": config.trt_workspace_mb << 20,
                    "trt_engine_cache_enable": True,
                    "trt_timing_cache_enable": True,
                },
            )
        )
    if cuda and CUDA in available:
        chain.append((CUDA, {"device_id": config.device_id}))
    chain.append((CPU, {}))
    return chain


class EngineCache:
    """Engine folders keyed by (graph, input shapes, provider options), at most `max_entries` kept."""

    def __init__(self, root: Path, max_entries: int) -> None:
        self.root, self.max_entries = Path(root), max_entries

    @staticmethod
    def key(graph_id: str, shapes: dict[str, tuple[int, ...]], options: dict[str, Any]) -> str:
        text = json.dumps(
            {
                "graph": graph_id,
                "shapes": sorted((k, list(v)) for k, v in shapes.items()),
                "options": sorted((k, str(v)) for k, v in options.items()),
            }
        )
        return hashlib.sha256(text.encode()).hexdigest()[:20]

    def folder(self, key: str, about: dict[str, Any]) -> Path:
        """The folder for `key` (created, marked most recently used); evicts the oldest past the bound."""
        path = self.root / key
        path.mkdir(parents=True, exist_ok=True)
        marker = path / "key.json"
        if not marker.exists():
            marker.write_text(json.dumps(about, indent=2))
        # Strictly newest even where the file system's clock is coarser than two uses in a row.
        newest = max((p.joinpath("key.json").stat().st_mtime_ns for p in self.entries() if p != path), default=0)
        now = max(time.time_ns(), newest + 1)
        os.utime(marker, ns=(now, now))
        self.evict(keep=key)
        return path

    def entries(self) -> list[Path]:
        """Engine folders, least recently used first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if (p / "key.json").is_file()]
        return sorted(found, key=lambda p: (p / "key.json").stat().st_mtime_ns)

    def evict(self, keep: str = "") -> None:
        entries = [p for p in self.entries() if p.name != keep]
        excess = len(entries) + (1 if keep else 0) - self.max_entries
        for path in entries[: max(excess, 0)]:
            log.info("TensorRT engine cache: removing %s (more than %d shapes)", path.name, self.max_entries)
            shutil.rmtree(path, ignore_errors=True)


def _trt_profile(shapes: dict[str, tuple[int, ...]]) -> str:
    return ",".join(f"{name}:{'x'.join(map(str, shape))}" for name, shape in shapes.items())


class GraphRunner:
    """Runs one module's exported graphs: picks the file covering each call, holds its sessions."""

    def __init__(
        self,
        module_name: str,
        component: str,
        directory: Path,
        original: torch.nn.Module,
        bundle: Any,
        config: OnnxConfig,
        providers: list[tuple[str, dict[str, Any]]],
    ) -> None:
        self.module_name, self.component, self.directory = module_name, component, directory
        self.original, self.bundle, self.config, self.providers = original, bundle, config, providers
        self.sessions: dict[str, Any] = {}  # graph file (or TensorRT engine key) -> session
        self.calls, self.exports = 0, 0
        self.provider = ""
        self.manifest: dict[str, Any] | None = None
        self.engine_cache = EngineCache(
            config.trt_cache_dir / f"{directory.parent.name}-{module_name}", config.max_cached_shapes
        )

    def run(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        shapes = {k: tuple(v.shape) for k, v in tensors.items()}
        entry = self._graph_for(shapes)
        session = self._session(entry, shapes)
        device = next(iter(tensors.values())).device
        feed = {}
        for spec in entry["inputs"]:
            t = tensors[spec["name"]].detach()
            t = t.to(getattr(torch, entry["dtype"])) if spec["kind"] == "float" else t.long()
            feed[spec["name"]] = t.cpu().numpy()
        # Host arrays in and out: one copy each way on CUDA, the price of not binding device memory
        # (io_binding), which no test here can exercise without a GPU.
        out = session.run(None, feed)[0]
        self.calls += 1
        return torch.from_numpy(np.ascontiguousarray(out)).to(device)

    def check_frame(self, height: int, width: int) -> None:
        """Refuse, before a job runs, a frame size that no graph of a fixed export takes: the spatial axes
        of each graph's first video-shaped (5-d) input, at the latent size (height/8, width/8)."""
        if self.config.extendable:
            return  # a missing shape is exported when first called
        self.manifest = self.manifest or ox.read_manifest(self.directory) or {"graphs": []}
        latent = (height // VAE_SPATIAL_SCALE, width // VAE_SPATIAL_SCALE)
        taken = []
        for entry in self.manifest["graphs"]:
            video = [spec["shape"] for spec in entry["inputs"] if len(spec["shape"]) == 5]
            if entry["module"] != self.module_name or not video:
                continue
            axes = video[0][-2:]
            if all(ox.axis_fits(axis, entry["dims"], size) for axis, size in zip(axes, latent)):
                return
            taken.append("x".join(ox.axis_text(axis, entry["dims"], VAE_SPATIAL_SCALE) for axis in axes))
        if taken:
            raise InputError(
                f"the ONNX export of {self.module_name} in {self.directory} takes frames of {' or '.join(taken)} "
                f"(height x width); this job's are {height}x{width}: export it for this size "
                f"(`framepack export onnx --component {self.component}`), pick a --resolution it covers, or unset "
                "FRAMEPACK_ONNX_DIR to export shapes on demand"
            )

    def _graph_for(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
        if self.manifest is None:  # read once; re-read after an export adds a graph
            self.manifest = ox.read_manifest(self.directory) or {"graphs": []}
        manifest = self.manifest
        for entry in manifest["graphs"]:
            if entry["module"] == self.module_name and ox.bind_dims(entry["inputs"], entry["dims"], shapes) is not None:
                return entry
        covered = "; ".join(
            ", ".join(f"{i['name']} {i['shape']}" for i in g["inputs"][:3])
            for g in manifest["graphs"]
            if g["module"] == self.module_name
        )
        asked = ", ".join(f"{k} {list(v)}" for k, v in list(shapes.items())[:3])
        if not self.config.extendable:
            raise OnnxShapeError(
                f"the ONNX export of {self.module_name} in {self.directory} covers {covered or 'nothing'}; this call has "
                f"{asked}. Export again with `framepack export onnx --component {self.component}` or unset "
                "FRAMEPACK_ONNX_DIR to export shapes on demand into the runtime cache"
            )
        log.info("No exported graph of %s covers %s: exporting this shape", self.module_name, asked)
        spec = next(s for s in ox.graph_specs(self.bundle, self.component) if s.module == self.module_name)
        identity = manifest.get("identity") or ox.component_identity(self.bundle, self.component)
        with _export_lock(self.directory), _original_in_place(self.bundle, self.module_name, self.original):
            entry = ox.export_graph(self.bundle, self.component, spec, self.directory, identity, shapes=shapes)
        self.exports += 1
        self.manifest = None
        return entry

    def _session(self, entry: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> Any:
        import onnxruntime

        providers = self.providers
        key = entry["file"]
        if providers[0][0] == TRT:  # an engine per shape, in its own cache folder
            name, options = providers[0]
            graph_id = f"{self.directory}/{entry['file']}:{(self.directory / entry['file']).stat().st_mtime_ns}"
            key = EngineCache.key(graph_id, shapes, options)
            if key not in self.sessions:
                folder = self.engine_cache.folder(
                    key, {"graph": graph_id, "shapes": {k: list(v) for k, v in shapes.items()}}
                )
                profile = _trt_profile({i["name"]: shapes[i["name"]] for i in entry["inputs"]})
                options = {
                    **options,
                    "trt_engine_cache_path": str(folder),
                    "trt_timing_cache_path": str(folder),
                    "trt_profile_min_shapes": profile,
                    "trt_profile_opt_shapes": profile,
                    "trt_profile_max_shapes": profile,
                }
                providers = [(name, options), *providers[1:]]
                self.sessions.clear()  # one TensorRT session in memory: each holds the weights
        session = self.sessions.get(key)
        if session is None:
            started = time.perf_counter()
            opts = onnxruntime.SessionOptions()
            opts.log_severity_level = 3
            session = onnxruntime.InferenceSession(str(self.directory / entry["file"]), opts, providers=providers)
            self.sessions[key] = session
            self.provider = session.get_providers()[0]
            log.info(
                "onnxruntime session for %s on %s in %.1f s",
                entry["file"],
                self.provider,
                time.perf_counter() - started,
            )
        return session

    def reset(self) -> None:  # per job: the sidecar counts this job's calls
        self.calls = self.exports = 0

    def stats(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "calls": self.calls,
            "exported_shapes": self.exports,
            "folder": str(self.directory),
        }


@contextlib.contextmanager
def _original_in_place(bundle: Any, module_name: str, original: torch.nn.Module):
    """Put the PyTorch module back where its stand-in is, for the duration of an export."""
    parent_name, _, attr = module_name.rpartition(".")
    parent = ox.resolve_module(bundle, parent_name) if parent_name else bundle
    stand_in = getattr(parent, attr)
    setattr(parent, attr, original)
    try:
        yield
    finally:
        setattr(parent, attr, stand_in)


@contextlib.contextmanager
def _export_lock(directory: Path):
    """An exclusive lock file beside the export folder (POSIX advisory lock; held until the block ends)."""
    import fcntl

    directory.parent.mkdir(parents=True, exist_ok=True)
    with open(directory.parent / f".{directory.name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class OnnxStandIn(StandIn):
    """Takes a module's place with the same call convention; computes through its graph runner."""

    def __init__(self, original: torch.nn.Module, runner: GraphRunner) -> None:
        super().__init__(original)
        self.runner = runner

    def _run(self, **tensors: torch.Tensor | None) -> torch.Tensor:
        return self.runner.run({k: v for k, v in tensors.items() if v is not None})


class OnnxTransformer(OnnxStandIn):
    def forward(self, return_dict: bool = False, attention_kwargs: Any = None, **tensors: torch.Tensor):
        return (self._run(**tensors).to(self.original.dtype),)


class OnnxLlama(OnnxStandIn):
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: Any):
        from transformers.modeling_outputs import BaseModelOutputWithPast

        out = self._run(input_ids=input_ids, attention_mask=attention_mask)
        # Only the layer the pipeline reads was exported; the others are None so any other use fails loudly.
        layers = self.original.config.num_hidden_layers + 1
        hidden = tuple(out if i == layers + LLAMA_HIDDEN_LAYER else None for i in range(layers))
        return BaseModelOutputWithPast(hidden_states=hidden)


class OnnxClip(OnnxStandIn):
    def forward(self, input_ids: torch.Tensor, **_: Any):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return BaseModelOutputWithPooling(pooler_output=self._run(input_ids=input_ids))


class OnnxSiglip(OnnxStandIn):
    def forward(self, pixel_values: torch.Tensor, **_: Any):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return BaseModelOutputWithPooling(last_hidden_state=self._run(pixel_values=pixel_values).to(pixel_values.dtype))


class OnnxVaeDecoder(OnnxStandIn):
    def forward(self, hidden_states: torch.Tensor, **_: Any) -> torch.Tensor:
        return self._run(hidden_states=hidden_states).to(hidden_states.dtype)


STAND_INS = {
    "transformer": OnnxTransformer,
    "text_encoder": OnnxLlama,
    "text_encoder_2": OnnxClip,
    "image_encoder": OnnxSiglip,
    "vae.decoder": OnnxVaeDecoder,
}


def install(
    bundle: Any, component: str, config: OnnxConfig, providers: list[tuple[str, dict[str, Any]]]
) -> list[GraphRunner]:
    """Make sure the component is exported (first use) and put its stand-ins in the bundle."""
    taken = [n for n in ox.COMPONENT_MODULES[component] if isinstance(ox.resolve_module(bundle, n), TensorRTModule)]
    if taken:  # ENABLE_TENSORRT took them (the plan runs TensorRT first); TRT_TEXT_ENCODERS takes both encoders
        log.info("%s run through torch-tensorrt; no ONNX engine for %s", ", ".join(taken), component)
        return []
    identity = ox.component_identity(bundle, component)
    directory = config.directory(component, identity)
    with _export_lock(directory):  # two processes (bench workers, two jobs) must not export into one folder
        manifest = ox.read_manifest(directory)
        if manifest is None:
            log.info("No ONNX export of %s in %s: exporting it (once; later runs reuse it)", component, directory)
            manifest = ox.export_component(bundle, component, directory)
    if manifest.get("identity") != identity:
        raise ox.OnnxExportError(
            f"the ONNX export in {directory} was made from other weights than this run's {component} "
            "(model, pruning or precision differ); export again with "
            f"`framepack export onnx --component {component} --out {directory.parent}` and the same settings"
        )
    runners = []
    for name in ox.COMPONENT_MODULES[component]:
        original = ox.resolve_module(bundle, name)
        runner = GraphRunner(name, component, directory, original, bundle, config, providers)
        parent_name, _, attr = name.rpartition(".")
        parent = ox.resolve_module(bundle, parent_name) if parent_name else bundle
        setattr(parent, attr, STAND_INS[name](original, runner))
        runners.append(runner)
    return runners


class OnnxEngines(Extension):
    """The runners standing in for the exported modules: which provider ran them and how often, per job."""

    name = "onnx"
    kind = "engine"

    def __init__(self, runners: list[GraphRunner]) -> None:
        self.runners = runners

    def reset(self, scope: Scope) -> None:
        if scope == "job":  # counts are per job, not per section
            for runner in self.runners:
                runner.reset()

    def stats(self) -> dict[str, Any]:
        return {r.module_name: r.stats() for r in self.runners}

    def check_frame(self, height: int, width: int) -> None:
        for runner in self.runners:
            runner.check_frame(height, width)


class OnnxPass:
    name = "onnx"

    def config(self, settings: Settings) -> OnnxConfig:
        return OnnxConfig(
            components=tuple(settings.onnx_components),
            export_dir=settings.onnx_dir,
            cache_root=settings.runtime_cache_dir / "onnx",
            trt=settings.onnx_trt_enable,
            trt_fp16=settings.onnx_trt_fp16,
            trt_int8=False,  # no calibration table is built: rule onnx-trt-int8-uncalibrated
            device_id=settings.onnx_trt_device_id,
            trt_workspace_mb=settings.onnx_trt_workspace_mb,
            trt_cache_dir=settings.onnx_trt_cache_dir,
            max_cached_shapes=settings.trt_max_cached_shapes,
        )

    def apply(self, bundle: ModelBundle, config: OnnxConfig, context: PassContext) -> PassReport:
        import onnxruntime

        cuda = bundle.device.type == "cuda"
        providers = provider_chain(config, onnxruntime.get_available_providers(), cuda)
        runners = []
        for component in config.components:
            runners += install(bundle, component, config, providers)
        chain = " -> ".join(name.removesuffix("ExecutionProvider") for name, _ in providers)
        detail = f"{', '.join(config.components)} through onnxruntime ({chain})"
        return PassReport(self.name, "applied", detail, extension=OnnxEngines(runners))
