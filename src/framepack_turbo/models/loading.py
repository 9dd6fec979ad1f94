"""Load a ModelBundle: from a preset's repos, from a local folder laid out like them, or built at random.

Every real load goes through `load_component`, which calls the `from_pretrained` of the class made for
the component. It tries the disk first (local folder or Hugging Face cache) and only then the hub, so
an offline machine with the weights never waits on the network; weights that are nowhere give one
`ModelUnavailableError` naming the repo and how to provide it.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from framepack_turbo.errors import InputError, ModelUnavailableError
from framepack_turbo.models.presets import (
    COMPONENTS,
    ModelPreset,
    Source,
    get_preset,
    local_dir_sources,
)

log = logging.getLogger(__name__)

MODULES = ("transformer", "vae", "text_encoder", "text_encoder_2", "image_encoder")


@dataclass
class ModelBundle:
    """Owns every model of one pipeline, and nothing else: passes modify the models in place, and what they
    keep while jobs run is their extension (optim/base.py), which the API hands to the generator."""

    transformer: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    text_encoder_2: Any
    tokenizer_2: Any
    image_encoder: Any
    feature_extractor: Any
    preset: ModelPreset
    source: str  # human-readable origin, for the sidecar
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    load_seconds: float = 0.0

    def modules(self) -> dict[str, torch.nn.Module]:
        return {name: getattr(self, name) for name in MODULES if getattr(self, name) is not None}

    def to(self, device: torch.device | str, skip: set[str] | frozenset[str] = frozenset()) -> ModelBundle:
        """Move the models; `skip` those a loader already placed (a device_map must not be undone)."""
        self.device = torch.device(device)
        for name, module in self.modules().items():
            if name not in skip:
                module.to(self.device)
        return self

    def save_pretrained(self, model_dir: str | Path) -> Path:
        """Write every component into `model_dir/<component>/`, the layout `--model-dir` reads."""
        root = Path(model_dir)
        for name in COMPONENTS:
            getattr(self, name).save_pretrained(root / name)
        return root


# Model facts: the sub-modules each class keeps in float32 when it runs in half precision. FramePack runs
# its transformer in bf16 with the final projection alone in float32 (`high_quality_fp32_output_for_inference`):
# the velocity it produces is subtracted from the latents every step, so its rounding would compound. The
# final norm stays in bf16 there, and so here.
KEEP_FP32: dict[str, tuple[str, ...]] = {"HunyuanVideoFramepackTransformer3DModel": ("proj_out",)}
FP32_OUTPUT_HOOK_ATTR = "_framepack_fp32_output_hook"


def _upcast_inputs(module: torch.nn.Module, args: tuple) -> tuple:
    return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def keep_fp32_output(module: torch.nn.Module) -> list[str]:
    """Put the class's float32 sub-modules (KEEP_FP32) back in float32, their input upcast by a pre-hook, as
    FramePack computes its output; returns their names. Idempotent."""
    kept = []
    for name in KEEP_FP32.get(type(module).__name__, ()):
        sub = getattr(module, name, None)
        if sub is None:
            continue
        sub.float()
        kept.append(name)
    if kept and not hasattr(module, FP32_OUTPUT_HOOK_ATTR):
        setattr(module, FP32_OUTPUT_HOOK_ATTR, getattr(module, kept[0]).register_forward_pre_hook(_upcast_inputs))
    return kept


def default_dtypes(device: torch.device) -> dict[str, torch.dtype]:
    """FramePack's dtypes on CUDA (bf16 transformer, fp16 encoders and VAE); float32 elsewhere. The
    transformer's final projection stays in float32 in bf16 (`keep_fp32_output`, applied by `load_bundle`)."""
    if device.type == "cuda":
        half = {name: torch.float16 for name in MODULES}
        return {**half, "transformer": torch.bfloat16}
    return {name: torch.float32 for name in MODULES}


def _component_class(name: str):
    from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoFramepackTransformer3DModel
    from transformers import AutoTokenizer, CLIPTextModel, LlamaModel, SiglipVisionModel

    from framepack_turbo.pipeline.encode import image_processor_class

    return {
        "transformer": HunyuanVideoFramepackTransformer3DModel,
        "vae": AutoencoderKLHunyuanVideo,
        "text_encoder": LlamaModel,
        "tokenizer": AutoTokenizer,  # LLaMA-3 tokenizer.json; the file names its class
        "text_encoder_2": CLIPTextModel,
        "tokenizer_2": AutoTokenizer,
        "image_encoder": SiglipVisionModel,
        "feature_extractor": image_processor_class(),
    }[name]


def _is_local(source: Source) -> bool:
    return Path(source.repo).is_dir()


def _unavailable(name: str, source: Source, cause: BaseException | str) -> ModelUnavailableError:
    if _is_local(source):
        where = Path(source.repo) / (source.subfolder or "")
        detail = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
        return ModelUnavailableError(
            f"cannot load {name} from {where}: {detail} "
            f"(a --model-dir needs one sub-folder per component: {', '.join(COMPONENTS)})"
        )
    return ModelUnavailableError(
        f"{name} weights ({source.describe()}) are not on disk and {cause}: "
        f"download them where there is a network (`hf download {source.repo}`) into the Hugging Face cache "
        f"(HF_HOME), or pass --model-dir DIR with the components laid out as in docs/models.md"
    )


def _hub_unreachable_reason(repo: str) -> str | None:
    """None when the hub answers for `repo`; otherwise why not. One quick request, no retries, so an
    offline machine fails in a second instead of after the download client's minute of back-off."""
    import huggingface_hub

    try:
        huggingface_hub.model_info(repo, timeout=10)
    except Exception as exc:  # connection, DNS, auth, missing repo: all mean "cannot download"
        return f"the Hugging Face hub cannot provide it ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
    return None


def load_component(
    name: str,
    source: Source,
    dtype: torch.dtype | None,
    local_files_only: bool = False,
    extra: dict[str, Any] | None = None,
):
    """`from_pretrained` of the component's class: from disk first, then the hub unless `local_files_only`.

    `extra` carries arguments from passes that work while loading (bitsandbytes' quantization_config).
    """
    cls = _component_class(name)
    kwargs: dict[str, Any] = dict(extra or {})
    if source.subfolder:
        kwargs["subfolder"] = source.subfolder
    if dtype is not None and name in MODULES:
        kwargs["torch_dtype"] = dtype
    try:
        obj = cls.from_pretrained(source.repo, local_files_only=True, **kwargs)
    except (OSError, ValueError) as exc:  # missing files are OSError (EnvironmentError) subclasses
        log.debug("%s not on disk at %s: %s", name, source.describe(), exc)
        if _is_local(source):
            raise _unavailable(name, source, exc) from None
        if local_files_only:
            raise _unavailable(name, source, "offline mode forbids downloading") from None
        reason = _hub_unreachable_reason(source.repo)
        if reason:
            raise _unavailable(name, source, reason) from None
        log.info("Downloading %s from %s", name, source.describe())
        try:
            obj = cls.from_pretrained(source.repo, **kwargs)
        except (OSError, ValueError) as exc2:
            raise _unavailable(name, source, f"the download failed ({exc2})") from None
    if isinstance(obj, torch.nn.Module):
        obj.eval().requires_grad_(False)
    return obj


@dataclass(frozen=True)
class ParallelLoading:
    """How components are loaded (PARALLEL_LOADERS, PRELOAD_REPOS, FORCE_PARALLEL_LOADERS).

    `threads` > 1 reads every component's weight files in that many threads (into the page cache),
    then builds the components one after the other from those files: the I/O overlaps, the build
    stays serial. Building in threads is not offered even under FORCE: transformers and diffusers
    switch process-wide state while they build (the default dtype, meta-device initialisation), and
    two builds at once left parameters on the meta device here ("Cannot copy out of meta tensor").
    The reads happen only when the host has room for the files (MemAvailable >= 1.2 x their size);
    `force` skips that check. `preload` fetches every repo snapshot first, in threads.
    """

    threads: int = 1
    preload: bool = False
    force: bool = False


ROOM_FACTOR = 1.2
READ_CHUNK = 16 << 20


def parallel_plan(settings, plan) -> ParallelLoading:
    """The loading the plan allows: serial unless the `loading.parallel` pass is active."""
    if not plan.is_active("loading.parallel"):
        return ParallelLoading()
    return ParallelLoading(settings.parallel_loaders, settings.preload_repos, settings.force_parallel_loaders)


def available_host_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def weight_files(source: Source) -> list[Path]:
    """The component's safetensors files already on disk (a local folder, or the HF cache); [] if none."""
    root = Path(source.repo) if _is_local(source) else None
    if root is None:
        try:
            import huggingface_hub

            pattern = f"{source.subfolder}/*" if source.subfolder else "*"
            root = Path(huggingface_hub.snapshot_download(source.repo, local_files_only=True, allow_patterns=[pattern]))
        except Exception:  # not cached: nothing to read ahead
            return []
    folder = root / source.subfolder if source.subfolder else root
    return sorted(folder.glob("*.safetensors"))


def _read_through(path: Path) -> int:
    with open(path, "rb", buffering=0) as f:
        total = 0
        while chunk := f.read(READ_CHUNK):
            total += len(chunk)
    return total


def preload_snapshots(sources: dict[str, Source], threads: int) -> None:
    """Fetch each hub repo's files for the components (what `from_pretrained` would fetch one by one)."""
    import huggingface_hub

    repos = sorted({s.repo for s in sources.values() if not _is_local(s)})
    with ThreadPoolExecutor(max(1, min(threads, len(repos) or 1))) as pool:
        list(pool.map(lambda repo: huggingface_hub.snapshot_download(repo), repos))
    log.info("Preloaded %d repo snapshot(s)", len(repos))


def _load_components(sources, dtypes, local_files_only, extra, skip, parallel: ParallelLoading) -> dict[str, Any]:
    wanted = {n: s for n, s in sources.items() if n not in skip}
    if parallel.preload and not local_files_only:
        preload_snapshots(wanted, parallel.threads)

    def build(item):
        name, source = item
        return name, load_component(name, source, dtypes.get(name), local_files_only, extra.get(name))

    parts: dict[str, Any] = dict.fromkeys(skip)
    if parallel.threads > 1:
        files = [f for s in wanted.values() for f in weight_files(s)]
        size = sum(f.stat().st_size for f in files)
        available = available_host_bytes()
        if files and (parallel.force or available is None or available >= ROOM_FACTOR * size):
            started = time.perf_counter()
            with ThreadPoolExecutor(parallel.threads) as pool:
                read = sum(pool.map(_read_through, files))
            log.info(
                "Read %d weight files (%.2f GB) in %d threads in %.1f s",
                len(files),
                read / 2**30,
                parallel.threads,
                time.perf_counter() - started,
            )
        elif files:
            log.info(
                "Serial loading: %.1f GB of weights, %.1f GB of host memory available (needs %.1fx; "
                "FORCE_PARALLEL_LOADERS=1 reads in parallel anyway)",
                size / 2**30,
                (available or 0) / 2**30,
                ROOM_FACTOR,
            )
    parts.update(map(build, wanted.items()))
    return parts


def bundled_model_dir(spec: ModelPreset) -> str | None:
    """The folder of a preset whose weights ship in the package; an install without them is an error
    that says how to get them back, not a download attempt."""
    if spec.bundled_dir is None:
        return None
    if not (spec.bundled_dir / "transformer" / "config.json").is_file():
        raise InputError(
            f"--model {spec.name}: its weights are missing from this install ({spec.bundled_dir}); reinstall "
            "framepack-turbo, or train them: python scripts/train_tiny.py vae|transformer|ship"
        )
    return str(spec.bundled_dir)


def load_bundle(
    preset: str = "framepack",
    model_dir: str | None = None,
    device: str | torch.device | None = None,
    local_files_only: bool = False,
    dtypes: dict[str, torch.dtype] | None = None,
    component_kwargs: dict[str, dict[str, Any]] | None = None,
    skip: frozenset[str] = frozenset(),
    parallel: ParallelLoading | None = None,
) -> ModelBundle:
    """All components of a preset (or of `model_dir`), on `device` (CUDA if present, else CPU).

    Components in `skip` are not loaded (None): the caller supplies them (an optimized transformer).
    `parallel` says how many threads read weights (see `ParallelLoading`).
    """
    parallel = parallel or ParallelLoading()
    started = time.perf_counter()
    spec = get_preset(preset)
    dev = torch.device(device) if device is not None else default_device()
    dtypes = dtypes or default_dtypes(dev)

    model_dir = model_dir if model_dir is not None else bundled_model_dir(spec)
    if model_dir is not None:
        if not Path(model_dir).is_dir():
            raise InputError(f"--model-dir {model_dir}: no such directory")
        sources = local_dir_sources(model_dir)
        parts = _load_components(sources, dtypes, True, component_kwargs or {}, skip, parallel)
        origin = str(Path(model_dir).resolve())
    elif spec.is_random:
        from framepack_turbo.models.random import SIZES, build_models

        # The placement's offloading modes build on the host (dev is the CPU) in the GPU's half dtype: allowed.
        offloaded = torch.cuda.is_available() and dtypes.get("transformer", torch.float32) != torch.float32
        if SIZES[spec.random_size].needs_cuda and dev.type != "cuda" and not offloaded:
            raise InputError(
                f"--model {spec.name} builds the full-size transformer (~13B parameters, 26 GB in bf16) on a GPU; "
                f"this run's device is {dev}: use a CUDA machine, or --model small on CPU"
            )
        parts = build_models(spec.random_size, dev, dtypes, skip=skip)
        origin = f"random:{spec.random_size}"
    else:
        parts = _load_components(spec.sources, dtypes, local_files_only, component_kwargs or {}, skip, parallel)
        origin = ", ".join(sorted({s.repo for s in spec.sources.values()}))

    bundle = ModelBundle(**parts, preset=spec, source=origin)
    if bundle.transformer is not None and bundle.transformer.dtype in (torch.bfloat16, torch.float16):
        keep_fp32_output(bundle.transformer)  # FramePack's high-quality output
    placed_by_loader = {n for n, kw in (component_kwargs or {}).items() if "device_map" in kw}
    bundle.to(dev, skip=placed_by_loader | set(skip))
    if dev.type == "cpu" and (model_dir is not None or not spec.is_random):
        for module in bundle.modules().values():
            realign_cpu_tensors(module)
    bundle.load_seconds = time.perf_counter() - started
    log.info("Loaded %s models from %s on %s in %.1f s", spec.name, origin, dev, bundle.load_seconds)
    return bundle


def transformer_identity(preset: str, model_dir: str | None = None) -> dict[str, Any]:
    """Which transformer weights a run uses (preset, source, revision, config hash), read without loading them.

    Revision: the hub snapshot's commit for repos in the HF cache, a hash of the files' names and sizes
    for a local folder, the seed for random presets. Used to key the optimized-model cache.
    """
    import hashlib
    import json

    spec, source, revision, config = _transformer_source(preset, model_dir)
    config_sha = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()
    return {"preset": spec.name, "source": source, "revision": revision, "config_sha256": config_sha}


def transformer_config(preset: str, model_dir: str | None = None) -> dict[str, Any]:
    """The transformer's config as its source has it (public keys; lists for tuples), read without loading."""
    return _transformer_source(preset, model_dir)[3]


def empty_transformer(preset: str, model_dir: str | None = None) -> torch.nn.Module | None:
    """The transformer's modules on the meta device (shapes, no weights: a second even for 13B), from its
    config; None where the config is not on this machine. For checks before the weights load (LoRA keys)."""
    config = transformer_config(preset, model_dir)
    if not config:
        return None
    from accelerate import init_empty_weights

    with init_empty_weights():
        return _component_class("transformer").from_config(config)


def _transformer_source(preset: str, model_dir: str | None):
    import hashlib
    import json

    spec = get_preset(preset)
    model_dir = model_dir if model_dir is not None else bundled_model_dir(spec)
    if model_dir is not None:
        root = Path(model_dir) / "transformer"
        files = sorted((p.name, p.stat().st_size) for p in root.glob("*") if p.is_file())
        revision = "files:" + hashlib.sha256(json.dumps(files).encode()).hexdigest()[:16]
        config = json.loads((root / "config.json").read_text()) if (root / "config.json").is_file() else {}
        source = str(Path(model_dir).resolve())
    elif spec.is_random:
        from framepack_turbo.models.random import SEED, SIZES, transformer_config

        config, revision, source = (
            transformer_config(SIZES[spec.random_size]),
            f"seed:{SEED}",
            f"random:{spec.random_size}",
        )
    else:
        src = spec.sources["transformer"]
        revision, config = None, {}
        try:
            import huggingface_hub

            snapshot = Path(
                huggingface_hub.snapshot_download(src.repo, local_files_only=True, allow_patterns=["config.json"])
            )
            revision = snapshot.name
            config = json.loads((snapshot / "config.json").read_text())
        except Exception:  # not in the cache: identity without a revision never matches a saved one
            pass
        source = src.repo
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items() if not k.startswith("_")}
    return spec, source, revision, config


def weights_fingerprint(module: torch.nn.Module, sample: int = 4096) -> str:
    """A short hash of sampled weights (the first, middle and last parameter): other weights, another
    fingerprint, without reading gigabytes. Keys the encoder output cache and the ONNX exports."""
    import hashlib

    params = list(module.parameters())
    digest = hashlib.sha256()
    for p in (params[0], params[len(params) // 2], params[-1]) if params else ():
        digest.update(p.detach().flatten()[:sample].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def realign_cpu_tensors(module: torch.nn.Module, alignment: int = 64) -> None:
    """Copy weights that safetensors memory-maps at unaligned offsets into fresh, aligned memory.

    CPU kernels pick another code path for unaligned operands and round differently (~1 ulp), so
    the same weights loaded from disk and built in memory would give different videos.
    """
    for tensor in [*module.parameters(), *module.buffers()]:
        if type(tensor.data) is not torch.Tensor:  # quantized tensor subclasses manage their own storage
            continue
        if tensor.device.type == "cpu" and tensor.data_ptr() % alignment:
            tensor.data = tensor.data.clone()


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
