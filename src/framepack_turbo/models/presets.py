"""Model presets: where each component comes from.

Real presets name Hugging Face repos; `tiny` is the small model trained on the procedural world
(train/), shipped inside the package in the `--model-dir` layout; random presets (`tiny-random`,
`small`, `full`) are built from configs in code (models/random.py) and need no files. `--model-dir`
replaces every repo by one local folder laid out like the repos (see `local_dir_sources`).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

from framepack_turbo.errors import InputError

# Component names double as the sub-folders of a local model dir.
COMPONENTS: tuple[str, ...] = (
    "transformer",
    "vae",
    "text_encoder",
    "tokenizer",
    "text_encoder_2",
    "tokenizer_2",
    "image_encoder",
    "feature_extractor",
)

HUNYUAN_REPO = "hunyuanvideo-community/HunyuanVideo"  # LLaMA + CLIP text encoders, tokenizers, VAE
REDUX_REPO = "lllyasviel/flux_redux_bfl"  # SigLIP image encoder + processor
INVERTED_REPO = "lllyasviel/FramePackI2V_HY"
F1_REPO = "lllyasviel/FramePack_F1_I2V_HY_20250503"
TINY_WEIGHTS = Path(__file__).resolve().parent / "weights" / "tiny"  # written by scripts/train_tiny.py ship


@dataclass(frozen=True)
class Source:
    """One component's location: a repo id or a local path, and the sub-folder inside it."""

    repo: str
    subfolder: str | None = None

    def describe(self) -> str:
        return f"{self.repo}/{self.subfolder}" if self.subfolder else self.repo


@dataclass(frozen=True)
class ModelPreset:
    name: str
    default_variant: str  # "inverted" or "f1": the variant the transformer weights were trained for
    sources: dict[str, Source] = field(default_factory=dict)  # empty for random presets
    random_size: str | None = None  # a models/random.py size: built from configs, no files
    bundled_dir: Path | None = None  # weights shipped in the package, in the --model-dir layout
    native_resolution: int | None = None  # the one frame size the weights were trained at, if only one
    # (16 x 3 weights, 3 biases): latent channels -> RGB for the per-step preview; None: HunyuanVideo's
    latent_preview: tuple[tuple[tuple[float, ...], ...], tuple[float, ...]] | None = None

    @property
    def is_random(self) -> bool:
        return self.random_size is not None

    def bundled_loras(self) -> list[Path]:
        """LoRAs shipped with the weights (`loras/*.safetensors` beside them: tiny's diagonal motion)."""
        return sorted((self.bundled_dir / "loras").glob("*.safetensors")) if self.bundled_dir else []


def _encoder_sources() -> dict[str, Source]:
    return {
        "vae": Source(HUNYUAN_REPO, "vae"),
        "text_encoder": Source(HUNYUAN_REPO, "text_encoder"),
        "tokenizer": Source(HUNYUAN_REPO, "tokenizer"),
        "text_encoder_2": Source(HUNYUAN_REPO, "text_encoder_2"),
        "tokenizer_2": Source(HUNYUAN_REPO, "tokenizer_2"),
        "image_encoder": Source(REDUX_REPO, "image_encoder"),
        "feature_extractor": Source(REDUX_REPO, "feature_extractor"),
    }


# The tiny VAE's latents are not HunyuanVideo's: its preview map, fitted by scripts/fit_latent_preview.py
# (held-out PSNR of the preview against the pixels' mean colours: 19.2 dB, HunyuanVideo's map 7.6 dB).
TINY_LATENT_PREVIEW = (
    (
        (0.0097, -0.0100, 0.0091),
        (0.0033, -0.0147, 0.0088),
        (0.0775, 0.0637, 0.0751),
        (0.0122, 0.0016, 0.0226),
        (0.0056, 0.0145, -0.0248),
        (0.0186, 0.0256, 0.0041),
        (0.0184, 0.0134, 0.0251),
        (0.0478, 0.0011, 0.0532),
        (-0.0423, -0.0603, -0.0828),
        (-0.0394, -0.0235, -0.0300),
        (-0.0257, -0.0061, 0.0015),
        (-0.0086, 0.0087, 0.0247),
        (0.0109, 0.0141, 0.0059),
        (-0.0004, -0.0036, -0.0053),
        (-0.0260, -0.0242, -0.0202),
        (0.0304, 0.0490, 0.0281),
    ),
    (0.4905, 0.4934, 0.4913),
)

PRESETS: dict[str, ModelPreset] = {
    "framepack": ModelPreset("framepack", "inverted", {"transformer": Source(INVERTED_REPO), **_encoder_sources()}),
    "framepack-f1": ModelPreset("framepack-f1", "f1", {"transformer": Source(F1_REPO), **_encoder_sources()}),
    "tiny": ModelPreset(  # both variants trained
        "tiny", "inverted", bundled_dir=TINY_WEIGHTS, native_resolution=64, latent_preview=TINY_LATENT_PREVIEW
    ),
    "tiny-random": ModelPreset("tiny-random", "inverted", random_size="tiny"),
    "small": ModelPreset("small", "inverted", random_size="small"),
    "full": ModelPreset("full", "inverted", random_size="full"),  # real size, random weights, CUDA only
}


# ---- sizes: parameters (and buffers) per component, read without loading anything --------------------
# The host-memory estimate (placement.host_memory) reads these. HunyuanVideo FramePack: the transformer and
# the VAE counted from their configs (the `full` random preset builds FramePackI2V_HY's transformer config
# and HunyuanVideo's VAE: the same numbers); the encoders from their published sizes: HunyuanVideo's
# text_encoder (llava-llama-3-8b's LlamaModel, no lm_head, ~15 GB in fp16), CLIP-L's text model, and
# flux_redux_bfl's SigLIP so400m vision tower. Random presets: counted on the meta device
# (tests/test_host_memory.py counts them again).
WEIGHT_COMPONENTS: tuple[str, ...] = ("transformer", "text_encoder", "text_encoder_2", "image_encoder", "vae")
HUNYUAN_PARAMS: dict[str, int] = {
    "transformer": 12_874_314_816,
    "text_encoder": 7_504_924_672,
    "text_encoder_2": 123_060_480,
    "image_encoder": 428_225_600,
    "vae": 246_478_803,
}
RANDOM_PARAMS: dict[str, dict[str, int]] = {
    "tiny": {
        "transformer": 263_744,
        "text_encoder": 34_160,
        "text_encoder_2": 17_421,
        "image_encoder": 23_824,
        "vae": 289_075,
    },
    "small": {
        "transformer": 28_778_560,
        "text_encoder": 505_280,
        "text_encoder_2": 51_149,
        "image_encoder": 80_400,
        "vae": 289_075,
    },
    "full": {
        "transformer": 12_874_314_816,  # real size
        "text_encoder": 654_749_824,  # encoders at real width, a few layers deep
        "text_encoder_2": 4_938_317,
        "image_encoder": 31_999_225,
        "vae": 246_478_803,
    },
}


def safetensors_params(path: Path) -> int:
    """Elements stored in one .safetensors file, from its header (8-byte length, then JSON): no tensor is read."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return sum(math.prod(entry["shape"]) for entry in header.values())


def component_params(preset: str, model_dir: str | Path | None = None) -> dict[str, int]:
    """Parameters per weight component (WEIGHT_COMPONENTS) of a run's models, without loading them: the
    safetensors headers of a local folder (`--model-dir`, or the weights shipped with `tiny`), the counts
    above for the hub and random presets. A local component without .safetensors files counts as
    HunyuanVideo FramePack's (the layout those folders copy)."""
    spec = get_preset(preset)
    folder = Path(model_dir) if model_dir is not None else spec.bundled_dir
    if folder is None:
        return dict(RANDOM_PARAMS[spec.random_size] if spec.is_random else HUNYUAN_PARAMS)
    out = {}
    for name in WEIGHT_COMPONENTS:
        files = sorted((folder / name).glob("*.safetensors")) if (folder / name).is_dir() else []
        try:
            out[name] = sum(safetensors_params(f) for f in files) if files else HUNYUAN_PARAMS[name]
        except (OSError, ValueError, KeyError, struct.error):  # unreadable header: assume the real size
            out[name] = HUNYUAN_PARAMS[name]
    return out


def get_preset(name: str) -> ModelPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise InputError(
            f"unknown model preset {name!r}: choose one of {', '.join(PRESETS)} or pass --model-dir DIR"
        ) from None


def local_dir_sources(model_dir: str) -> dict[str, Source]:
    """A local folder with one sub-folder per component (the union of the three repos' layouts):

    transformer/ (the FramePack repo's root), vae/, text_encoder/, tokenizer/, text_encoder_2/,
    tokenizer_2/ (from HunyuanVideo), image_encoder/, feature_extractor/ (from flux_redux_bfl).
    """
    return {name: Source(model_dir, name) for name in COMPONENTS}


# Attention heads of the random presets' transformers (models/random.py builds them; a test keeps the two equal)
# and of FramePack's released transformers (both variants: HunyuanVideo's 24 heads of 128).
RANDOM_HEADS = {"tiny": 2, "small": 4, "full": 24}
RELEASED_HEADS = 24


def transformer_heads(model: str, model_dir: str | Path | None = None) -> int | None:
    """The transformer's attention heads, without loading it (None where its config cannot be read)."""
    if model_dir is not None:
        config = Path(model_dir) / "transformer" / "config.json"
    else:
        preset = get_preset(model)
        if preset.random_size is not None:
            return RANDOM_HEADS.get(preset.random_size)
        if preset.name != "tiny":
            return RELEASED_HEADS
        config = TINY_WEIGHTS / "transformer" / "config.json"
    try:
        return int(json.loads(config.read_text())["num_attention_heads"])
    except (OSError, ValueError, KeyError):
        return None
