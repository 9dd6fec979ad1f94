"""LoRA files: read, recognise the format from the keys, and map every pair onto the transformer's modules.

The formats FramePack users have (all safetensors):

- diffusers: `transformer.<module>.lora_A.weight` / `lora_B.weight` (the prefix optional), names of diffusers'
  modules; `lora_down` / `lora_up` + `.alpha` are read the same way. diffusers' training scripts write the
  adapter's config into the header (`__metadata__["lora_adapter_metadata"]`, JSON): its `lora_alpha / r`
  (and `alpha_pattern` / `rank_pattern` per module, `use_rslora`) is the scale, as diffusers applies it;
- PEFT's own `save_pretrained` folder: `adapter_model.safetensors` (`base_model.model.` before each module)
  and `adapter_config.json` beside it (the same config);
- musubi-tuner / kohya: `lora_unet_<module with _>.lora_down.weight` / `lora_up.weight` / `alpha`, for
  FramePack (diffusers' names) or HunyuanVideo (the original layout);
- the original HunyuanVideo layout: `double_blocks.N.img_attn_qkv`, `single_blocks.N.linear1` ..., whose fused
  projections are split here into diffusers' q/k/v (+ mlp) modules;
- diffusion-pipe: the same with a `transformer.` prefix (today's) or `diffusion_model.` (older), lora_A/lora_B;
- ComfyUI's own names of the HunyuanVideo modules (`diffusion_model.double_blocks.N.img_attn.qkv`,
  `img_mod.lin`, `img_mlp.0`, `single_blocks.N.modulation.lin`, `time_in.in_layer` ...), renamed to the
  original layout first.

`load_lora(path, transformer)` returns each pair as a `LoraDelta` on one `nn.Linear` of the transformer (through
PEFT's wrapper where adapters are already on: its base layer): delta W = scale * up @ down, with scale =
alpha / rank (1 without an alpha or a config, as PEFT and ComfyUI read it). Nothing is dropped silently: keys
this module does not understand and modules the model does not have are listed, and are an error unless
partial loads are allowed; a shape that does not fit, a NaN or infinite value, a rank-0 pair, an alpha that is
not one number and LoHa/LoKr files are always an error.

Why not diffusers' `_convert_hunyuan_video_lora_to_diffusers` for the original layout: it splits the
single blocks' `linear1` at a hard-coded hidden size of 3072 (wrong for every model but the 13B one: our
tiny and small presets), and it chunks `lora_A` (the rank dimension) of the token refiner's fused qkv and
of the final adaLN instead of sharing it, so those modules get wrong deltas. The mapping below is the same
renaming, with the split sizes read from the model's own modules and `lora_A` shared where a
projection is split. Loading into modules (unmerged adapters) is diffusers' `load_lora_adapter`
(optim/lora.py).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from framepack_turbo.constants import MAX_LORA_WEIGHT
from framepack_turbo.errors import InputError
from framepack_turbo.files import sha256_file
from framepack_turbo.text import shown

FORMATS = ("diffusers", "peft", "kohya", "hunyuan", "diffusion-pipe", "comfyui")
SHOWN_KEYS = 3  # how many keys an error names
PEFT_WEIGHTS = "adapter_model.safetensors"  # PEFT's save_pretrained: the weights ...
PEFT_CONFIG = "adapter_config.json"  # ... and the config beside them
HEADER_CONFIG = "lora_adapter_metadata"  # diffusers: the adapter's config (JSON) in the safetensors header
MAX_CONFIG_BYTES = 1 << 20  # an adapter config is a few KB
MAX_PATTERN_CHARS = 500  # alpha_pattern / rank_pattern keys are regular expressions (PEFT's): kept short

_PAIR_SUFFIXES = {
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".lora_down.weight": "down",
    ".lora_up.weight": "up",
    ".alpha": "alpha",
}
_OTHER_HALF = {
    ".lora_A.weight": ".lora_B.weight",
    ".lora_B.weight": ".lora_A.weight",
    ".lora_down.weight": ".lora_up.weight",
    ".lora_up.weight": ".lora_down.weight",
}
# The text encoders' keys (kohya's lora_te*, diffusers' text_encoder*): understood, not applied (below).
_TEXT_ENCODER_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "text_encoder.", "text_encoder_2.", "te.")
_ORIGINAL_MARKERS = (
    "double_blocks.",
    "single_blocks.",
    "txt_in.",
    "img_in.",
    "final_layer.",
    "vector_in.",
    "time_in.",
    "guidance_in.",
)
# LyCORIS' other factorisations (LoHa: hada_w1_a ..., LoKr: lokr_w1 ...): named, not applied
_LYCORIS = (".hada_", ".lokr_")
_PEFT_PREFIX = "base_model.model."
_PREFIXES = (_PEFT_PREFIX, "diffusion_model.", "transformer.")


def _bare(name: str) -> str:
    """A module name without the prefix its tool puts before it (PEFT's, ComfyUI's, diffusers')."""
    for prefix in _PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


@dataclass(frozen=True)
class AdapterScaling:
    """The scale PEFT gives each module of an adapter config: lora_alpha / r (/ sqrt(r) with rsLoRA), or the
    values of the first `alpha_pattern` / `rank_pattern` key matching the module (PEFT's `get_pattern_key`)."""

    source: str  # where it was read, for messages
    r: int
    alpha: float
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    rslora: bool = False

    def scale(self, lora: str, name: str, rank: int) -> float:
        r = _pattern_value(self.rank_pattern, name, self.r, lora, self.source)
        alpha = _pattern_value(self.alpha_pattern, name, self.alpha, lora, self.source)
        if r != rank:
            raise InputError(
                f"LoRA {lora}: {self.source} gives {shown(name)} rank {r}, but its tensors are rank {rank}: "
                "the config is not this file's"
            )
        return alpha / (math.sqrt(r) if self.rslora else r)


def _pattern_value(patterns: dict, name: str, default, lora: str, source: str):
    for key, value in patterns.items():
        try:
            if re.match(rf"(.*\.)?({key})$", name):
                return value
        except re.error:
            raise InputError(
                f"LoRA {lora}: {source} has a pattern that is no regular expression: {shown(key)}"
            ) from None
    return default


@dataclass
class LoraFile:
    """A LoRA as read: the safetensors file's tensors, its header, and the adapter config that came with it."""

    path: Path  # the safetensors file (inside the folder where a PEFT folder was named)
    tensors: dict[str, torch.Tensor]
    header: dict[str, str]
    scaling: AdapterScaling | None = None
    config_sha256: str | None = None  # PEFT's adapter_config.json beside the file: its contents key it too


@dataclass
class LoraDelta:
    """One low-rank update of `module`'s weight: scale * up @ down (up: out x rank, down: rank x in)."""

    module: str
    down: torch.Tensor
    up: torch.Tensor
    scale: float

    def delta(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The float32 update of the module's weight, formed on `device` (the weight's: a GPU forms a 13B
        model's updates in seconds)."""
        return self.scale * (self.up.to(device, torch.float32) @ self.down.to(device, torch.float32))


@dataclass
class LoadedLora:
    path: Path  # as named (a file, or PEFT's folder)
    sha256: str  # of the safetensors file
    format: str
    deltas: list[LoraDelta]
    text_encoder_keys: list[str] = field(default_factory=list)
    not_understood: list[str] = field(default_factory=list)  # keys of no LoRA pair this module reads
    not_in_model: list[str] = field(default_factory=list)  # pairs naming modules this model does not have
    config_sha256: str | None = None  # PEFT's adapter_config.json beside the file, where one was read

    @property
    def ranks(self) -> list[int]:
        return sorted({d.down.shape[0] for d in self.deltas})

    @property
    def identity(self) -> tuple[str, str | None]:
        """What makes two LoRAs the same: the weights' SHA-256 and the config's, where one came with them."""
        return self.sha256, self.config_sha256

    def summary(self) -> str:
        rank = "/".join(map(str, self.ranks))
        parts = [f"{self.path.name} ({self.format}, rank {rank}): {len(self.deltas)} modules"]
        if self.text_encoder_keys:
            parts.append(f"{len(self.text_encoder_keys)} text-encoder keys ignored")
        if self.not_understood or self.not_in_model:
            parts.append(f"{len(self.not_understood) + len(self.not_in_model)} keys skipped (partial load allowed)")
        return "; ".join(parts)


def lora_file(path: Path) -> Path:
    """The safetensors file a LoRA path names: the file itself, or PEFT's `adapter_model.safetensors` in a
    folder; one line for anything else."""
    path = Path(path)
    if path.is_dir():
        inner = path / PEFT_WEIGHTS
        if inner.is_file():
            return inner
        raise InputError(
            f"LoRA {path}: is a folder, not a LoRA file (a folder is read only where it holds PEFT's {PEFT_WEIGHTS})"
        )
    if path.suffix != ".safetensors":
        raise InputError(f"LoRA {path}: only .safetensors files are read (no pickle)")
    if not path.is_file():
        raise InputError(f"LoRA {path}: no such file")
    return path


def _finite(tensor: torch.Tensor) -> torch.Tensor:
    standard = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    return torch.isfinite(tensor if tensor.dtype in standard else tensor.float())


def read_lora(path: Path) -> LoraFile:
    """The file's tensors (every one finite), its header and its adapter config; anything but a readable
    safetensors LoRA file is one line."""
    from safetensors import safe_open

    file = lora_file(path)
    try:
        with safe_open(str(file), "pt") as f:
            header = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for a torn or foreign file
        raise InputError(f"LoRA {path}: not a readable safetensors file ({type(exc).__name__})") from None
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and tensor.numel() and not bool(_finite(tensor).all()):
            bad = int((~_finite(tensor)).sum())
            raise InputError(
                f"LoRA {file.name}: {shown(key)} holds {bad} NaN or infinite values (of {tensor.numel()}): "
                "a broken file (a training that diverged?), refused"
            )
    scaling, config_sha256 = _adapter_scaling(file, header)
    return LoraFile(file, tensors, header, scaling, config_sha256)


def _adapter_scaling(file: Path, header: dict[str, str]) -> tuple[AdapterScaling | None, str | None]:
    """PEFT's adapter_config.json beside adapter_model.safetensors, else diffusers' header config."""
    beside = file.with_name(PEFT_CONFIG)
    config_sha256 = None
    if file.name == PEFT_WEIGHTS and beside.is_file():
        source = f"its {PEFT_CONFIG}"
        if beside.stat().st_size > MAX_CONFIG_BYTES:
            raise InputError(
                f"LoRA {file.parent.name}: {PEFT_CONFIG} is over {MAX_CONFIG_BYTES >> 20} MB: not a config"
            )
        raw = beside.read_bytes()
        config_sha256 = sha256_file(beside)
    elif HEADER_CONFIG in header:
        source, raw = f"its header's {HEADER_CONFIG}", header[HEADER_CONFIG]
    else:
        return None, None
    name = file.parent.name if file.name == PEFT_WEIGHTS else file.name
    try:
        config = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise InputError(f"LoRA {name}: {source} is not JSON") from None
    if not isinstance(config, dict):
        raise InputError(f"LoRA {name}: {source} is not a JSON object")
    if any(isinstance(k, str) and k.startswith("transformer.") for k in config):
        # diffusers' save_lora_weights: each component's config under its name (transformer.r, ...)
        config = {k.removeprefix("transformer."): v for k, v in config.items() if k.startswith("transformer.")}
    if "r" not in config and "lora_alpha" not in config:
        return None, config_sha256  # a config of the text encoders alone, or none that scales
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise InputError(
            f"LoRA {name}: {source} says peft_type {shown(peft_type)}: only LoRA (low-rank pairs) is applied here, "
            "not LoHa, LoKr or other adapter types"
        )
    if config.get("use_dora"):
        raise InputError(f"LoRA {name}: {source} says use_dora: DoRA is not supported, only plain LoRA pairs")

    def rank(value, what: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise InputError(f"LoRA {name}: {source}'s {what} is {shown(value)}, not a positive whole number")
        return value

    def number(value, what: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InputError(f"LoRA {name}: {source}'s {what} is {shown(value)}, not a finite number")
        return float(value)

    def patterns(key: str, read) -> dict:
        value = config.get(key) or {}
        if not isinstance(value, dict):
            raise InputError(f"LoRA {name}: {source}'s {key} is not an object of module patterns")
        for pattern in value:
            if len(pattern) > MAX_PATTERN_CHARS:
                raise InputError(f"LoRA {name}: {source}'s {key} has a pattern over {MAX_PATTERN_CHARS} characters")
        return {pattern: read(v, f"{key}[{shown(pattern)}]") for pattern, v in value.items()}

    r = rank(config.get("r", 8), "r")
    scaling = AdapterScaling(
        source,
        r,
        number(config.get("lora_alpha", r), "lora_alpha"),
        patterns("rank_pattern", rank),
        patterns("alpha_pattern", number),
        bool(config.get("use_rslora", False)),
    )
    return scaling, config_sha256


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The file's tensors (see `read_lora`)."""
    return read_lora(path).tensors


def lora_identity(path: Path) -> dict[str, str]:
    """What keys an artifact built with this LoRA merged: the weights' SHA-256 (and its config's, beside it)."""
    file = lora_file(path)
    out = {"sha256": sha256_file(file)}
    beside = file.with_name(PEFT_CONFIG)
    if file.name == PEFT_WEIGHTS and beside.is_file():
        out["config_sha256"] = sha256_file(beside)
    return out


def _lycoris(key: str) -> bool:
    return any(marker in key for marker in _LYCORIS)


def detect_format(keys: list[str], name: str = "") -> str:
    """The format the keys are in (their prefixes and names); an error when they are in none."""
    lora = f"LoRA {name}: " if name else ""
    model_keys = [k for k in keys if not k.startswith(_TEXT_ENCODER_PREFIXES)]
    pair_keys = [k for k in model_keys if k.endswith(tuple(_OTHER_HALF))]
    if not pair_keys and any(_lycoris(k) for k in model_keys):
        kind = "LoHa" if any(".hada_" in k for k in model_keys) else "LoKr"
        first = next(k for k in model_keys if _lycoris(k))
        raise InputError(
            f"{lora}a {kind} file (LyCORIS' {shown(first)} ...): LoHa and LoKr are not supported, only LoRA's "
            "low-rank pairs (lora_A/lora_B, lora_down/lora_up)"
        )
    if any(k.startswith("lora_unet_") for k in model_keys):
        return "kohya"
    if any(k.startswith(_PEFT_PREFIX) for k in model_keys):
        return "peft"
    names = [_bare(k[: -len(s)]) for k in model_keys for s in _PAIR_SUFFIXES if k.endswith(s)]
    if any(_from_comfy(n) != n and _original_targets(_from_comfy(n)) and not _original_targets(n) for n in names):
        return "comfyui"
    if any(n.startswith(_ORIGINAL_MARKERS) for n in names):
        prefixed = any(k.startswith(("transformer.", "diffusion_model.")) for k in model_keys)
        return "diffusion-pipe" if prefixed else "hunyuan"
    if pair_keys:
        return "diffusers"
    shown_keys = ", ".join(shown(k) for k in keys[:SHOWN_KEYS]) or "no tensors"
    raise InputError(
        f"{lora}not a LoRA in a format this tool reads ({', '.join(FORMATS)}): its first keys are {shown_keys}"
    )


# ---- the original HunyuanVideo layout -> diffusers' modules ---------------------------------------
# original name -> (diffusers modules its output rows split into, in order); "{i}" is the block index
_DOUBLE = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn_proj": ("attn.to_out.0",),
    "img_mlp.fc1": ("ff.net.0.proj",),
    "img_mlp.fc2": ("ff.net.2",),
    "img_mod.linear": ("norm1.linear",),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn_proj": ("attn.to_add_out",),
    "txt_mlp.fc1": ("ff_context.net.0.proj",),
    "txt_mlp.fc2": ("ff_context.net.2",),
    "txt_mod.linear": ("norm1_context.linear",),
}
_SINGLE = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation.linear": ("norm.linear",),
}
_REFINER = {
    "self_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "self_attn_proj": ("attn.to_out.0",),
    "mlp.fc1": ("ff.net.0.proj",),
    "mlp.fc2": ("ff.net.2",),
    "adaLN_modulation.1": ("norm_out.linear",),
}
_TOP = {
    "img_in.proj": ("x_embedder.proj",),
    "txt_in.input_embedder": ("context_embedder.proj_in",),
    "txt_in.t_embedder.mlp.0": ("context_embedder.time_text_embed.timestep_embedder.linear_1",),
    "txt_in.t_embedder.mlp.2": ("context_embedder.time_text_embed.timestep_embedder.linear_2",),
    "txt_in.c_embedder.linear_1": ("context_embedder.time_text_embed.text_embedder.linear_1",),
    "txt_in.c_embedder.linear_2": ("context_embedder.time_text_embed.text_embedder.linear_2",),
    "time_in.mlp.0": ("time_text_embed.timestep_embedder.linear_1",),
    "time_in.mlp.2": ("time_text_embed.timestep_embedder.linear_2",),
    "vector_in.in_layer": ("time_text_embed.text_embedder.linear_1",),
    "vector_in.out_layer": ("time_text_embed.text_embedder.linear_2",),
    "guidance_in.mlp.0": ("time_text_embed.guidance_embedder.linear_1",),
    "guidance_in.mlp.2": ("time_text_embed.guidance_embedder.linear_2",),
    "final_layer.linear": ("proj_out",),
    "final_layer.adaLN_modulation.1": ("norm_out.linear",),
}
# HunyuanVideo's final adaLN gives (shift, scale); diffusers' AdaLayerNormContinuous reads (scale, shift)
_SWAPPED_HALVES = {"final_layer.adaLN_modulation.1"}


# ComfyUI's own names of HunyuanVideo's modules (its Flux-style blocks) -> the original layout's
_COMFY_TOP = {
    "time_in.in_layer": "time_in.mlp.0",
    "time_in.out_layer": "time_in.mlp.2",
    "guidance_in.in_layer": "guidance_in.mlp.0",
    "guidance_in.out_layer": "guidance_in.mlp.2",
    "txt_in.t_embedder.in_layer": "txt_in.t_embedder.mlp.0",
    "txt_in.t_embedder.out_layer": "txt_in.t_embedder.mlp.2",
    "txt_in.c_embedder.in_layer": "txt_in.c_embedder.linear_1",
    "txt_in.c_embedder.out_layer": "txt_in.c_embedder.linear_2",
}
_COMFY_RENAMES = (
    (r"_attn\.(qkv|proj)$", r"_attn_\1"),  # img_attn.qkv, txt_attn.proj, the refiner's self_attn.qkv
    (r"_mod\.lin$", "_mod.linear"),  # img_mod.lin, txt_mod.lin
    (r"\.modulation\.lin$", ".modulation.linear"),  # the single blocks'
    (r"mlp\.0$", "mlp.fc1"),  # img_mlp.0, txt_mlp.0, the refiner's mlp.0
    (r"mlp\.2$", "mlp.fc2"),
)


def _from_comfy(name: str) -> str:
    """ComfyUI's name of a HunyuanVideo module in the original layout's (unchanged where it is no ComfyUI name)."""
    if name in _COMFY_TOP:
        return _COMFY_TOP[name]
    for pattern, replacement in _COMFY_RENAMES:
        name = re.sub(pattern, replacement, name)
    return name


def _original_targets(name: str) -> tuple[str, ...] | None:
    """diffusers' modules an original-layout module's rows go to, in order (None: not an original name)."""
    if name in _TOP:
        return _TOP[name]
    patterns = (
        (r"double_blocks\.(\d+)\.(.+)", "transformer_blocks", _DOUBLE),
        (r"single_blocks\.(\d+)\.(.+)", "single_transformer_blocks", _SINGLE),
        (
            r"txt_in\.individual_token_refiner\.blocks\.(\d+)\.(.+)",
            "context_embedder.token_refiner.refiner_blocks",
            _REFINER,
        ),
    )
    for pattern, prefix, table in patterns:
        m = re.fullmatch(pattern, name)
        if m and m.group(2) in table:
            return tuple(f"{prefix}.{m.group(1)}.{t}" for t in table[m.group(2)])
    return None


def _original_names(transformer: torch.nn.Module) -> list[str]:
    """Every original-layout module name this model's depth has (for kohya's underscored keys)."""
    cfg = transformer.config
    names = list(_TOP)
    names += [f"double_blocks.{i}.{n}" for i in range(cfg.num_layers) for n in _DOUBLE]
    names += [f"single_blocks.{i}.{n}" for i in range(cfg.num_single_layers) for n in _SINGLE]
    refiners = getattr(cfg, "num_refiner_layers", 2)
    names += [f"txt_in.individual_token_refiner.blocks.{i}.{n}" for i in range(refiners) for n in _REFINER]
    return names


# ---- reading a file onto a model ----------------------------------------------------------------------


@dataclass
class _Pairs:
    pairs: dict[str, dict[str, torch.Tensor]]  # module name as the file has it -> {down, up, alpha}
    text_encoder: list[str]
    unknown: list[str]  # keys of no pair this module reads (DoRA scales, full diffs, ...)
    lycoris: list[str]  # LoHa/LoKr factors
    halves: list[tuple[str, str]]  # (the key there, the key missing)


def _pairs(tensors: dict[str, torch.Tensor]) -> _Pairs:
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    keys: dict[str, dict[str, str]] = {}
    out = _Pairs(pairs, [], [], [], [])
    for key, tensor in tensors.items():
        if key.startswith(_TEXT_ENCODER_PREFIXES):
            out.text_encoder.append(key)
            continue
        suffix = next((s for s in _PAIR_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            (out.lycoris if _lycoris(key) else out.unknown).append(key)
            continue
        name = key[: -len(suffix)]
        pairs.setdefault(name, {})[_PAIR_SUFFIXES[suffix]] = tensor
        keys.setdefault(name, {})[_PAIR_SUFFIXES[suffix]] = key
    for name, parts in list(pairs.items()):
        if "down" not in parts or "up" not in parts:  # half a pair (or an alpha alone) means nothing
            for key in keys[name].values():
                suffix = key[len(name) :]
                missing = name + _OTHER_HALF[suffix] if suffix in _OTHER_HALF else f"{name}.lora_down/up.weight"
                out.halves.append((key, missing))
            del pairs[name]
    return out


def _linear_layers(transformer: torch.nn.Module) -> tuple[dict[str, torch.nn.Linear], set[str]]:
    """The model's linear layers by name, and every module's name. Where PEFT adapters are on, a layer is a
    PEFT wrapper: its name stands for its base layer, and the adapters' own modules inside are not the model's."""
    linear: dict[str, torch.nn.Linear] = {}
    names: set[str] = set()
    wrappers: set[str] = set()
    for name, module in transformer.named_modules():
        parts = name.split(".")
        if any(".".join(parts[:i]) in wrappers for i in range(1, len(parts))):
            continue  # inside a PEFT wrapper: its base layer and the adapters' lora_A/lora_B
        names.add(name)
        base = module
        while isinstance(getattr(base, "base_layer", None), torch.nn.Module):
            base = base.base_layer
        if base is not module:
            wrappers.add(name)
        if isinstance(base, torch.nn.Linear):
            linear[name] = base
    return linear, names


def linear_layer(transformer: torch.nn.Module, name: str) -> torch.nn.Linear:
    """The linear layer a module name stands for (the base layer of a PEFT wrapper)."""
    module = transformer.get_submodule(name)
    while isinstance(getattr(module, "base_layer", None), torch.nn.Module):
        module = module.base_layer
    return module


def _resolver(transformer: torch.nn.Module, fmt: str):
    """name in the file -> (original-layout name or None, diffusers targets) for this model, or None."""
    linear, modules = _linear_layers(transformer)
    underscored = {n.replace(".", "_"): n for n in modules}
    underscored_original = {n.replace(".", "_"): n for n in _original_names(transformer)}

    def resolve(name: str) -> tuple[str | None, tuple[str, ...]] | None:
        if fmt == "kohya":
            bare = name.removeprefix("lora_unet_")
            if bare in underscored:
                return None, (underscored[bare],)
            name = underscored_original.get(bare, bare)
        name = _bare(name)
        for candidate in (name, _from_comfy(name)):
            targets = _original_targets(candidate)
            if targets is not None:
                return candidate, targets
        return (None, (name,)) if name in modules else None

    return resolve, linear


def _scale(lora: LoraFile, name: str, parts: dict[str, torch.Tensor], rank: int) -> float:
    """alpha / rank from the pair's `.alpha`, else from the adapter config (PEFT's or diffusers'), else 1."""
    if "alpha" in parts:
        alpha = parts["alpha"]
        if alpha.numel() != 1:
            raise InputError(
                f"LoRA {lora.path.name}: {shown(name)}.alpha holds {alpha.numel()} values "
                f"(shape {tuple(alpha.shape)}): an alpha is one number"
            )
        return float(alpha.reshape(()).float()) / rank
    if lora.scaling is not None:
        return lora.scaling.scale(lora.path.name, _bare(name.removeprefix("lora_unet_")), rank)
    return 1.0


def load_lora(path: Path, transformer: torch.nn.Module, allow_partial: bool = False) -> LoadedLora:
    """The file's pairs as deltas on the transformer's Linear modules, checked against their shapes."""
    path = Path(path)
    file = read_lora(path)
    name_shown = path.name
    fmt = detect_format(list(file.tensors), name_shown)
    found = _pairs(file.tensors)
    resolve, linear = _resolver(transformer, fmt)
    deltas: list[LoraDelta] = []
    missing: list[str] = []
    changed_by: dict[str, str] = {}
    for name, parts in found.pairs.items():
        down, up = parts["down"], parts["up"]
        if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1]:
            raise InputError(
                f"LoRA {name_shown}: {shown(name)} is not a low-rank pair "
                f"(down {tuple(down.shape)}, up {tuple(up.shape)})"
            )
        rank = down.shape[0]
        if rank == 0:
            raise InputError(
                f"LoRA {name_shown}: {shown(name)} is a rank-0 pair (down {tuple(down.shape)}, up {tuple(up.shape)}): "
                "it changes nothing and has no alpha / rank scale; a broken file"
            )
        scale = _scale(file, name, parts, rank)
        resolved = resolve(name)
        if resolved is None or any(t not in linear for t in resolved[1]):
            missing.append(name)
            continue
        original, targets = resolved
        modules = [linear[t] for t in targets]
        rows = [m.out_features for m in modules]
        if up.shape[0] != sum(rows) or any(down.shape[1] != m.in_features for m in modules):
            shape = f"{sum(rows)} x {modules[0].in_features}"
            raise InputError(
                f"LoRA {name_shown}: {shown(name)} makes a {up.shape[0]} x {down.shape[1]} update, but the model's "
                f"{'+'.join(targets)} is {shape}: a LoRA for another model size?"
            )
        for target in targets:
            if target in changed_by:
                raise InputError(
                    f"LoRA {name_shown}: {shown(changed_by[target])} and {shown(name)} both change the model's "
                    f"{target}: the file holds two LoRAs for one module"
                )
            changed_by[target] = name
        if original in _SWAPPED_HALVES:
            up = torch.cat(up.chunk(2, dim=0)[::-1])
        for target, part in zip(targets, up.split(rows, dim=0)):
            deltas.append(LoraDelta(target, down, part, scale))
    halves = [have for have, _ in found.halves]
    loaded = LoadedLora(
        path,
        sha256_file(file.path),
        fmt,
        deltas,
        found.text_encoder,
        found.unknown + found.lycoris + halves,
        missing,
        file.config_sha256,
    )
    if not deltas:
        what = f"none of its {len(found.pairs)} pairs names a module of this model"
        if found.halves and not found.pairs:
            have, lacking = found.halves[0]
            what = f"none of its keys is a whole pair ({shown(have)} without {shown(lacking)})"
        raise InputError(
            f"LoRA {name_shown} ({fmt}): {what} "
            f"(first: {', '.join(shown(n) for n in list(found.pairs)[:SHOWN_KEYS]) or 'none'}): a LoRA for another model?"
        )
    if (found.unknown or found.lycoris or found.halves or missing) and not allow_partial:
        what = []
        if found.unknown:
            what.append(f"{len(found.unknown)} keys not understood ({_first(found.unknown)})")
        if found.lycoris:
            what.append(f"{len(found.lycoris)} LoHa/LoKr factors, which are not supported ({_first(found.lycoris)})")
        if found.halves:
            shown_halves = ", ".join(f"{shown(h)} without {shown(m)}" for h, m in found.halves[:SHOWN_KEYS])
            what.append(f"{len(found.halves)} halves of a pair ({shown_halves})")
        if missing:
            what.append(f"{len(missing)} modules that are no linear layer of this model ({_first(missing)})")
        raise InputError(
            f"LoRA {name_shown} ({fmt}) would load in part: {'; '.join(what)}. "
            "--lora-allow-partial loads the rest anyway"
        )
    return loaded


def _first(keys: list[str]) -> str:
    return ", ".join(shown(k) for k in keys[:SHOWN_KEYS])


def per_file(loras: list[tuple[LoadedLora, float]]) -> list[tuple[LoadedLora, float]]:
    """One entry per file (the same SHA-256, under any path): the weights of a file named twice add up, and
    their sum is held to the cap on one weight (constants.MAX_LORA_WEIGHT): 8 x `:4` would be a weight of 32."""
    groups: dict[tuple, list[tuple[LoadedLora, float]]] = {}
    for lora, weight in loras:
        groups.setdefault(lora.identity, []).append((lora, weight))
    out = []
    for group in groups.values():
        check_weight_sum(group[0][0].path.name, [w for _, w in group])
        out.append((group[0][0], sum(w for _, w in group)))
    return out


def check_weight_sum(name: str, weights: list[float]) -> None:
    total = sum(weights)
    if abs(total) > MAX_LORA_WEIGHT + 1e-9:
        raise InputError(
            f"LoRA {name} is named {len(weights)} times (the same file by SHA-256), weights "
            f"{' + '.join(f'{w:g}' for w in weights)} = {total:g}: one file's weights add up, and their sum must be "
            f"from -{MAX_LORA_WEIGHT:g} to {MAX_LORA_WEIGHT:g}"
        )


def merged_weights(transformer: torch.nn.Module, loras: list[tuple[LoadedLora, float]], write: bool = True) -> int:
    """W + sum of weight * scale * up @ down per module, formed in float32 and rounded once to W's dtype, checked
    finite (a LoRA whose values overflow W's dtype, or the float32 product, is refused naming the module);
    written into W where `write`. Returns the number of modules."""
    by_module: dict[str, list[tuple[LoadedLora, float, LoraDelta]]] = {}
    for lora, weight in loras:
        for d in lora.deltas:
            by_module.setdefault(d.module, []).append((lora, weight, d))
    with torch.no_grad():
        for module, parts in by_module.items():
            w = linear_layer(transformer, module).weight
            new = w.float()
            for _, weight, d in parts:
                new = new + weight * d.delta(w.device)
            new = new.to(w.dtype)
            if not bool(_finite(new).all()):
                names = ", ".join(f"{lora.path.name} x{weight:g}" for lora, weight, _ in parts)
                raise InputError(
                    f"LoRA {names}: {module}'s weights are not finite with it merged (they overflow {w.dtype}): "
                    "a broken file or too high a weight, refused"
                )
            if write:
                w.copy_(new)
    return len(by_module)


def merge_into(transformer: torch.nn.Module, loras: list[tuple[LoadedLora, float]]) -> int:
    """W += weight * scale * up @ down for every delta, formed in float32 and rounded once to W's dtype;
    returns the number of modules changed. Each module's merged weight is checked finite before it is written;
    a refused merge fails the load, whose half-merged transformer is dropped (a merged model is never switched
    in place: another LoRA loads it again).

    Written here rather than PEFT's `merge_and_unload`: PEFT forms the delta in the adapter's dtype (bf16
    LoRA files on a GPU give a bf16 delta) and first wraps every target module; this is one matmul per
    module, in float32, straight into the weight."""
    return merged_weights(transformer, loras)


def peft_config(lora: LoadedLora) -> dict[str, object]:
    """PEFT LoraConfig arguments naming exactly the modules of the deltas (anchored patterns), each module's
    scale kept out of the weights as PEFT's own: lora_alpha = scale * rank (`alpha_pattern` / `rank_pattern`
    where a module differs from the most common), so bf16 factors are not rounded a second time. Without
    them, diffusers derives the targets from the keys and PEFT matches them by suffix: a top-level `proj_out`
    would also wrap every single block's `proj_out` with an empty adapter."""
    values = {d.module: (int(d.down.shape[0]), d.scale * int(d.down.shape[0])) for d in lora.deltas}
    common_rank, common_alpha = Counter(values.values()).most_common(1)[0][0]
    ranks = {f"^{re.escape(m)}$": r for m, (r, _) in values.items() if r != common_rank}
    alphas = {f"^{re.escape(m)}$": a for m, (_, a) in values.items() if a != common_alpha}
    return {
        "r": common_rank,
        "lora_alpha": common_alpha,
        "rank_pattern": ranks,
        "alpha_pattern": alphas,
        "target_modules": "^(?:" + "|".join(re.escape(m) for m in values) + ")$",
        "lora_dropout": 0.0,
        "bias": "none",
    }


def peft_state_dict(lora: LoadedLora) -> dict[str, torch.Tensor]:
    """The deltas as a PEFT state dict for diffusers' `load_lora_adapter`: the factors as the file has them
    (their scale is the adapter's lora_alpha / r, `peft_config`)."""
    out: dict[str, torch.Tensor] = {}
    for d in lora.deltas:
        out[f"{d.module}.lora_A.weight"] = d.down.contiguous()
        out[f"{d.module}.lora_B.weight"] = d.up.contiguous()
    return out
