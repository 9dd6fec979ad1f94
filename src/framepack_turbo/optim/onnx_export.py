"""ONNX export of the pipeline's components (`framepack export onnx`, and USE_ONNX_ENGINES on first use).

torch's dynamo exporter (`torch.onnx.export(..., dynamo=True)`) with the weights as external data, so
a graph past protobuf's 2 GB limit (the 13B transformer) still saves. The legacy TorchScript exporter
is not used: its graph of this transformer does not load in onnxruntime (measured here: a Slice index type clash).

What changes between calls is a dynamic axis: the text length, the number of latent frames (window)
and the latent height/width (every bucket of every base resolution; even sides, the transformer's
2x2 patches). SigLIP's input is fixed by its processor, so its graph has fixed shapes. Where an axis
cannot be dynamic, `export_graph(..., shapes=...)` writes one file per concrete shape instead; the
manifest lists every file with the shapes it covers, and the runtime picks the file that covers a call.

Layout of an export (the manifest is written last: a file it does not list is ignored):

    DIR/<component>/manifest.json
    DIR/<component>/<module>.onnx, <module>.onnx.data       (dynamic axes)
    DIR/<component>/<module>-<shape key>.onnx, ...data      (one fixed shape)

The manifest records the weights' identity; a run whose models differ refuses the export instead of
computing with someone else's weights.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from framepack_turbo.constants import LLAMA_HIDDEN_LAYER, ONNX_COMPONENTS
from framepack_turbo.errors import FramePackError, InputError

log = logging.getLogger(__name__)

FORMAT, VERSION = "framepack-turbo-onnx", 1
COMPONENTS = ONNX_COMPONENTS
# The bundle modules each component exports; "vae.decoder" is the VAE's decoder network, so diffusers'
# own tiling (temporal and spatial) keeps running around it.
COMPONENT_MODULES = {
    "transformer": ("transformer",),
    "text-encoder": ("text_encoder", "text_encoder_2"),
    "image-encoder": ("image_encoder",),
    "vae-decoder": ("vae.decoder",),
}
# Largest relative error (max |onnx - eager| / max |eager|) accepted by the export check.
CHECK_TOLERANCE = {"float32": 1e-3, "float16": 2e-2}

Shape = tuple[int | str, ...]  # an int, a dim name ("text") or a multiple of one ("2*h")


class OnnxExportError(FramePackError):
    """An export failed or does not match the models; the message says what to do."""

    exit_code = 1


@dataclass(frozen=True)
class GraphInput:
    name: str
    kind: str  # float (model dtype), ids (token ids), mask (ones), index (0..n-1)
    shape: Shape


@dataclass(frozen=True)
class GraphSpec:
    """One exported graph: which module, its tensor inputs and the ranges of its dynamic dims."""

    module: str
    inputs: tuple[GraphInput, ...]
    dims: dict[str, tuple[int, int]]  # dim name -> (min, max)
    example: dict[str, int]  # dim values of the example the exporter traces

    def to_dict(self) -> dict[str, Any]:
        return {
            "module": self.module,
            "inputs": [{"name": i.name, "kind": i.kind, "shape": list(i.shape)} for i in self.inputs],
            "dims": {k: list(v) for k, v in self.dims.items()},
        }


# How each module is called and which tensor its graph returns (the pipeline reads exactly that one).
GRAPH_OUTPUT: dict[str, Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]] = {
    "transformer": lambda m, kw: m(**kw, return_dict=False)[0],
    "text_encoder": lambda m, kw: m(**kw, output_hidden_states=True).hidden_states[LLAMA_HIDDEN_LAYER],
    "text_encoder_2": lambda m, kw: m(**kw, output_hidden_states=False).pooler_output,
    "image_encoder": lambda m, kw: m(**kw).last_hidden_state,
    "vae.decoder": lambda m, kw: m(**kw),
}


class _Graph(torch.nn.Module):
    """The module with positional tensor inputs (in the spec's order) and one tensor out: what the exporter
    records. Positional, because the exporter cannot bind dynamic shapes to a `**kwargs` signature."""

    def __init__(self, module: torch.nn.Module, name: str, input_names: list[str]) -> None:
        super().__init__()
        self.module, self.output, self.input_names = module, GRAPH_OUTPUT[name], input_names

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.output(self.module, dict(zip(self.input_names, tensors)))


def resolve_module(bundle: Any, name: str) -> torch.nn.Module:
    obj = bundle
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def graph_specs(bundle: Any, component: str) -> list[GraphSpec]:
    """The graphs of a component, with shapes from the loaded models' configs."""
    from framepack_turbo.pipeline.sections import CONTEXT_1X, CONTEXT_2X, CONTEXT_4X

    if component not in COMPONENT_MODULES:
        raise InputError(f"--component {component}: choose one of {', '.join(COMPONENTS)}")
    specs = []
    for name in COMPONENT_MODULES[component]:
        if name == "transformer":
            c = bundle.transformer.config
            ch, lat = c.in_channels, ("frames", "2*h", "2*w")
            clean = CONTEXT_1X + 1  # the start latent and the newest history frame
            inputs = (
                GraphInput("hidden_states", "float", (1, ch, *lat)),
                GraphInput("timestep", "float", (1,)),
                GraphInput("encoder_hidden_states", "float", (1, "text", c.text_embed_dim)),
                GraphInput("encoder_attention_mask", "mask", (1, "text")),
                GraphInput("pooled_projections", "float", (1, c.pooled_projection_dim)),
                GraphInput("image_embeds", "float", (1, "image", c.image_proj_dim)),
                GraphInput("indices_latents", "index", ("frames",)),
                GraphInput("guidance", "float", (1,)),
                GraphInput("latents_clean", "float", (1, ch, clean, "2*h", "2*w")),
                GraphInput("indices_latents_clean", "index", (clean,)),
                GraphInput("latents_history_2x", "float", (1, ch, CONTEXT_2X, "2*h", "2*w")),
                GraphInput("indices_latents_history_2x", "index", (CONTEXT_2X,)),
                GraphInput("latents_history_4x", "float", (1, ch, CONTEXT_4X, "2*h", "2*w")),
                GraphInput("indices_latents_history_4x", "index", (CONTEXT_4X,)),
            )
            dims = {"frames": (1, 64), "h": (1, 128), "w": (1, 128), "text": (1, 512), "image": (1, 1024)}
            example = {"frames": 3, "h": 3, "w": 4, "text": 7, "image": 5}
        elif name == "text_encoder":
            limit = int(getattr(bundle.text_encoder.config, "max_position_embeddings", 4096))
            inputs = (GraphInput("input_ids", "ids", (1, "seq")), GraphInput("attention_mask", "mask", (1, "seq")))
            dims, example = {"seq": (2, limit)}, {"seq": 9}
        elif name == "text_encoder_2":
            limit = int(getattr(bundle.text_encoder_2.config, "max_position_embeddings", 77))
            inputs = (GraphInput("input_ids", "ids", (1, "seq")),)
            dims, example = {"seq": (2, limit)}, {"seq": 9}
        elif name == "image_encoder":
            size = int(bundle.image_encoder.config.image_size)
            inputs = (GraphInput("pixel_values", "float", (1, 3, size, size)),)
            dims, example = {}, {}
        else:  # vae.decoder
            ch = bundle.vae.config.latent_channels
            inputs = (GraphInput("hidden_states", "float", (1, ch, "frames", "h", "w")),)
            dims, example = {"frames": (1, 64), "h": (2, 512), "w": (2, 512)}, {"frames": 3, "h": 5, "w": 6}
        specs.append(GraphSpec(name, inputs, dims, example))
    return specs


# ---- shapes ---------------------------------------------------------------------------------------


def _axis(entry: int | str) -> tuple[int, str | None]:
    """ "2*h" -> (2, "h"); "h" -> (1, "h"); 7 -> (7, None)."""
    if isinstance(entry, int):
        return entry, None
    factor, _, name = entry.rpartition("*")
    return (int(factor) if factor else 1), name


def axis_fits(entry: int | str, dims: dict[str, list[int]], size: int) -> bool:
    """Whether one axis of a graph's input takes `size`."""
    factor, name = _axis(entry)
    if name is None:
        return size == factor
    low, high = dims[name]
    return size % factor == 0 and low <= size // factor <= high


def axis_text(entry: int | str, dims: dict[str, list[int]], scale: int = 1) -> str:
    """The sizes one axis takes, times `scale`: "640" or "320-640"."""
    factor, name = _axis(entry)
    if name is None:
        return str(factor * scale)
    low, high = dims[name]
    return str(factor * low * scale) if low == high else f"{factor * low * scale}-{factor * high * scale}"


def bind_dims(
    inputs: list[dict[str, Any]], dims: dict[str, list[int]], shapes: dict[str, tuple[int, ...]]
) -> dict[str, int] | None:
    """The dim values that make `shapes` fit a graph's inputs, or None when they do not fit."""
    bound: dict[str, int] = {}
    for spec in inputs:
        shape = shapes.get(spec["name"])
        if shape is None or len(shape) != len(spec["shape"]):
            return None
        for entry, size in zip(spec["shape"], shape):
            factor, name = _axis(entry)
            if name is None:
                if size != factor:
                    return None
                continue
            if size % factor:
                return None
            value = size // factor
            low, high = dims[name]
            if not low <= value <= high or bound.setdefault(name, value) != value:
                return None
    return bound


def concrete_shape(shape: Shape, values: dict[str, int]) -> tuple[int, ...]:
    out = []
    for entry in shape:
        factor, name = _axis(entry)
        out.append(factor if name is None else factor * values[name])
    return tuple(out)


def shape_key(shapes: dict[str, tuple[int, ...]]) -> str:
    text = json.dumps(sorted((k, list(v)) for k, v in shapes.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def example_inputs(
    spec: GraphSpec,
    dtype: torch.dtype,
    device: torch.device,
    shapes: dict[str, tuple[int, ...]] | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Inputs of the spec's example shapes (or the given concrete `shapes`), random but valid."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i in spec.inputs:
        shape = shapes[i.name] if shapes else concrete_shape(i.shape, spec.example)
        if i.kind == "float":
            t = torch.randn(shape, generator=gen).to(dtype)
        elif i.kind == "ids":
            t = torch.randint(0, 16, shape, generator=gen)
        elif i.kind == "mask":
            t = torch.ones(shape, dtype=torch.long)
        else:
            t = torch.arange(shape[0])
        out[i.name] = t.to(device)
    return out


def _dynamic_shapes(spec: GraphSpec) -> dict[str, dict[int, Any]]:
    from torch.export import Dim

    base = {name: Dim(name.replace(".", "_"), min=low, max=high) for name, (low, high) in spec.dims.items()}
    out: dict[str, dict[int, Any]] = {}
    for i in spec.inputs:
        axes = {}
        for axis, entry in enumerate(i.shape):
            factor, name = _axis(entry)
            if name is not None:
                axes[axis] = base[name] if factor == 1 else factor * base[name]
        out[i.name] = axes
    return out


# ---- identity and manifest ------------------------------------------------------------------------


_CONFIG_METADATA = ("transformers_version", "architectures", "dtype", "torch_dtype")


def module_fingerprint(module: torch.nn.Module) -> dict[str, Any]:
    """What makes two modules compute the same graph: class, config, parameter count, sampled weights."""
    config = getattr(module, "config", None)
    values = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
    # Private keys are bookkeeping (diffusers' `_use_default_values` is a set in hash order, different per
    # process; `_name_or_path` is where it was loaded from); versions are not the architecture, and
    # `architectures` and `dtype` are written by `save_pretrained`, so a saved model would not match its
    # unsaved self (the weights' real dtype shows in the sampled weights below).
    values = {k: v for k, v in values.items() if not k.startswith("_") and k not in _CONFIG_METADATA}
    config_text = json.dumps(values, sort_keys=True, default=str)
    from framepack_turbo.models.loading import weights_fingerprint
    from framepack_turbo.optim.lora import MERGED_ATTR

    fingerprint = {
        "class": type(module).__name__,
        "config": hashlib.sha256(config_text.encode()).hexdigest()[:16],
        "parameters": sum(p.numel() for p in module.parameters()),
        "weights": weights_fingerprint(module),
    }
    if getattr(module, MERGED_ATTR, None):  # the sampled weights may miss a LoRA's modules: its hash does not
        fingerprint["loras"] = [{"sha256": e["sha256"], "weight": e["weight"]} for e in getattr(module, MERGED_ATTR)]
    return fingerprint


def component_identity(bundle: Any, component: str) -> dict[str, Any]:
    return {name: module_fingerprint(resolve_module(bundle, name)) for name in COMPONENT_MODULES[component]}


def identity_key(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def manifest_path(directory: Path) -> Path:
    return Path(directory) / "manifest.json"


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The component's manifest, or None when there is none (a broken one is an error, not a miss)."""
    path = manifest_path(directory)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise OnnxExportError(f"{path}: unreadable ONNX manifest ({exc}); delete the folder and export again") from None
    if data.get("format") != FORMAT or data.get("version") != VERSION:
        raise OnnxExportError(f"{path}: not a framepack-turbo ONNX export of version {VERSION}; export again")
    return data


def _write_json(path: Path, data: dict[str, Any]) -> None:
    from framepack_turbo.files import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(data, f, indent=2)


def export_dtype(device: torch.device) -> torch.dtype:
    """float32 on the host (numpy and onnxruntime's CPU kernels have no bf16), float16 on CUDA."""
    return torch.float16 if device.type == "cuda" else torch.float32


# ---- export ---------------------------------------------------------------------------------------


def export_graph(
    bundle: Any,
    component: str,
    spec: GraphSpec,
    directory: Path,
    identity: dict[str, Any],
    shapes: dict[str, tuple[int, ...]] | None = None,
    check: bool = True,
) -> dict[str, Any]:
    """Export one graph into `directory` and add it to the manifest; returns its manifest entry.

    `shapes`: export these concrete input shapes (one fixed-shape file) instead of the dynamic axes.
    """
    module = resolve_module(bundle, spec.module)
    device = next(module.parameters()).device
    dtype = export_dtype(device)
    if next(module.parameters()).dtype != dtype:
        log.info("Exporting a %s copy of %s (ONNX graphs are float32 on the host, float16 on CUDA)", dtype, spec.module)
        module = copy.deepcopy(module).to(dtype)
    names = [i.name for i in spec.inputs]
    graph = _Graph(module, spec.module, names).eval()
    inputs = example_inputs(spec, dtype, device, shapes)
    directory.mkdir(parents=True, exist_ok=True)
    stem = spec.module.replace(".", "_") + (f"-{shape_key(shapes)}" if shapes else "")
    started = time.perf_counter()
    log.info("Exporting %s to ONNX (%s)...", spec.module, "fixed shape" if shapes else "dynamic axes")
    with (
        tempfile.TemporaryDirectory(dir=directory, prefix=".export-") as tmp,
        torch.no_grad(),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer chatter, per op
        try:
            program = torch.onnx.export(
                graph,
                tuple(inputs[n] for n in names),
                input_names=names,
                output_names=["output"],
                dynamo=True,
                external_data=True,
                verbose=False,
                dynamic_shapes=None if shapes else {"tensors": tuple(_dynamic_shapes(spec)[n] for n in names)},
            )
            program.save(str(Path(tmp) / f"{stem}.onnx"), external_data=True)
        except Exception as exc:
            raise OnnxExportError(
                f"ONNX export of {spec.module} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            ) from exc
        # data first, graph second, manifest last: a reader never sees a graph without its weights
        for suffix in (".onnx.data", ".onnx"):
            src = Path(tmp) / f"{stem}{suffix}"
            if src.exists():
                os.replace(src, directory / src.name)
    seconds = time.perf_counter() - started
    entry = {
        **spec.to_dict(),
        "file": f"{stem}.onnx",
        "dtype": str(dtype).removeprefix("torch."),
        "export_seconds": round(seconds, 2),
    }
    if shapes:
        entry["inputs"] = [{**i, "shape": list(shapes[i["name"]])} for i in entry["inputs"]]
        entry["dims"] = {}
    if check:
        entry["check"] = check_graph(directory / entry["file"], graph, inputs, entry["dtype"])
    del graph, module
    manifest = read_manifest(directory) or {}
    if manifest and manifest.get("identity") != identity:
        raise OnnxExportError(f"{directory}: holds an export of other weights; use an empty folder")
    graphs = [g for g in manifest.get("graphs", []) if g["file"] != entry["file"]] + [entry]
    _write_json(
        manifest_path(directory),
        {
            "format": FORMAT,
            "version": VERSION,
            "component": component,
            "identity": identity,
            "graphs": graphs,
            "torch": torch.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        },
    )
    log.info("Exported %s to %s in %.1f s", spec.module, directory / entry["file"], seconds)
    return entry


def check_graph(path: Path, graph: torch.nn.Module, inputs: dict[str, torch.Tensor], dtype: str) -> dict[str, float]:
    """Run the exported graph on the CPU provider against eager PyTorch; refuse it past the tolerance."""
    import onnxruntime

    with torch.no_grad():
        reference = graph(*inputs.values()).float().cpu()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {i.name: inputs[i.name].cpu().numpy() for i in session.get_inputs()}
    out = torch.from_numpy(session.run(None, feed)[0]).float()
    max_abs = float((out - reference).abs().max())
    rel = max_abs / max(float(reference.abs().max()), 1e-12)
    if rel > CHECK_TOLERANCE[dtype]:
        raise OnnxExportError(
            f"{path.name}: onnxruntime differs from PyTorch by {rel:.2e} (relative; limit {CHECK_TOLERANCE[dtype]:.0e})"
        )
    return {"max_abs": max_abs, "relative": rel}


def require_exporter() -> None:
    """The dynamo exporter needs onnx and onnxscript, the check onnxruntime: say how to get them."""
    import importlib.util

    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise OnnxExportError(
            f"ONNX export needs {', '.join(missing)}, which is not installed: pip install 'framepack-turbo[onnx]' "
            "(or pip install onnx onnxscript onnxruntime)"
        )


def check_output_folder(directory: Path) -> None:
    """Refuse to replace a folder that holds something other than an earlier export."""
    if directory.is_dir() and any(directory.iterdir()) and not manifest_path(directory).is_file():
        raise InputError(f"{directory}: exists and is not an ONNX export; choose another --out")


def export_component(bundle: Any, component: str, directory: Path, check: bool = True) -> dict[str, Any]:
    """Export every graph of a component with dynamic axes into `directory` (emptied first)."""
    require_exporter()
    directory = Path(directory)
    identity = component_identity(bundle, component)
    check_output_folder(directory)
    if directory.exists():
        shutil.rmtree(directory)  # our own earlier export: replaced whole, never mixed
    for spec in graph_specs(bundle, component):
        export_graph(bundle, component, spec, directory, identity, check=check)
    return read_manifest(directory)
