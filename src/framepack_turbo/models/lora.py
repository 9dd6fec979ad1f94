"""LoRA files: read, recognise the format from the keys, and map every pair onto the transformer's modules.

The formats FramePack users have (all safetensors):

- diffusers / PEFT: `transformer.<module>.lora_A.weight` / `lora_B.weight` (the prefix optional), names of
  diffusers' modules;
- musubi-tuner / kohya: `lora_unet_<module with _>.lora_down.weight` / `lora_up.weight` / `alpha`, for
  FramePack (diffusers' names) or HunyuanVideo (the original layout);
- the original HunyuanVideo layout: `double_blocks.N.img_attn_qkv`, `single_blocks.N.linear1` ..., whose fused
  projections are split here into diffusers' q/k/v (+ mlp) modules;
- diffusion-pipe: the same with a `diffusion_model.` prefix (ComfyUI's), lora_A/lora_B, no alpha.

`load_lora(path, transformer)` returns each pair as a `LoraDelta` on one `nn.Linear` of the transformer:
delta W = scale * up @ down, with scale = alpha / rank (1 without an alpha, as PEFT and ComfyUI read it).
Nothing is dropped silently: keys this module does not understand and modules the model does not have are
listed, and are an error unless partial loads are allowed; a shape that does not fit is always an error.

Why not diffusers' `_convert_hunyuan_video_lora_to_diffusers` for the original layout: it splits the
single blocks' `linear1` at a hard-coded hidden size of 3072 (wrong for every model but the 13B one: our
tiny and small presets), and it chunks `lora_A` (the rank dimension) of the token refiner's fused qkv and
of the final adaLN instead of sharing it, so those modules get wrong deltas. The mapping below is the same
renaming, with the split sizes read from the model's own modules and `lora_A` shared where a
projection is split. Loading into modules (unmerged adapters) is diffusers' `load_lora_adapter`
(optim/lora.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from framepack_turbo.errors import InputError
from framepack_turbo.files import sha256_file

FORMATS = ("diffusers", "kohya", "hunyuan", "diffusion-pipe")
SHOWN_KEYS = 3  # how many keys an error names

_PAIR_SUFFIXES = {
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".lora_down.weight": "down",
    ".lora_up.weight": "up",
    ".alpha": "alpha",
}
# The text encoders' keys (kohya's lora_te*, diffusers' text_encoder*): understood, not applied (below).
_TEXT_ENCODER_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "text_encoder.", "text_encoder_2.", "te.")
_ORIGINAL_MARKERS = ("double_blocks.", "single_blocks.", "txt_in.", "img_in.", "final_layer.", "vector_in.")


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
    path: Path
    sha256: str
    format: str
    deltas: list[LoraDelta]
    text_encoder_keys: list[str] = field(default_factory=list)
    not_understood: list[str] = field(default_factory=list)  # keys of no LoRA pair this module reads
    not_in_model: list[str] = field(default_factory=list)  # pairs naming modules this model does not have

    @property
    def ranks(self) -> list[int]:
        return sorted({d.down.shape[0] for d in self.deltas})

    def summary(self) -> str:
        rank = "/".join(map(str, self.ranks))
        parts = [f"{self.path.name} ({self.format}, rank {rank}): {len(self.deltas)} modules"]
        if self.text_encoder_keys:
            parts.append(f"{len(self.text_encoder_keys)} text-encoder keys ignored")
        if self.not_understood or self.not_in_model:
            parts.append(f"{len(self.not_understood) + len(self.not_in_model)} keys skipped (partial load allowed)")
        return "; ".join(parts)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The file's tensors; anything but a readable safetensors file is one line."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise InputError(f"LoRA {path}: only .safetensors files are read (no pickle)")
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise InputError(f"LoRA {path}: no such file") from None
    except Exception as exc:  # safetensors raises its own error types for a torn or foreign file
        raise InputError(f"LoRA {path}: not a readable safetensors file ({type(exc).__name__})") from None


def detect_format(keys: list[str]) -> str:
    """The format the keys are in (their prefixes and names); an error when they are in none."""
    model_keys = [k for k in keys if not k.startswith(_TEXT_ENCODER_PREFIXES)]
    if any(k.startswith("lora_unet_") for k in model_keys):
        return "kohya"
    if any(k.startswith("diffusion_model.") for k in model_keys):
        return "diffusion-pipe"
    stripped = [k.removeprefix("transformer.") for k in model_keys]
    if any(k.startswith(_ORIGINAL_MARKERS) for k in stripped):
        return "hunyuan"
    if any(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in model_keys):
        return "diffusers"
    shown = ", ".join(keys[:SHOWN_KEYS]) or "no tensors"
    raise InputError(f"not a LoRA in a format this tool reads ({', '.join(FORMATS)}): its first keys are {shown}")


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


def _pairs(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], list[str], list[str]]:
    """module name (as the file has it) -> {down, up, alpha}; the text-encoder keys; the keys not understood."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    text_encoder, unknown = [], []
    for key, tensor in tensors.items():
        if key.startswith(_TEXT_ENCODER_PREFIXES):
            text_encoder.append(key)
            continue
        suffix = next((s for s in _PAIR_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            unknown.append(key)  # DoRA scales, full diffs, LoHa/LoKr factors, ...
            continue
        pairs.setdefault(key[: -len(suffix)], {})[_PAIR_SUFFIXES[suffix]] = tensor
    for name, parts in list(pairs.items()):
        if "down" not in parts or "up" not in parts:  # half a pair (or an alpha alone) means nothing
            unknown += [f"{name}{next(s for s, p in _PAIR_SUFFIXES.items() if p == part)}" for part in parts]
            del pairs[name]
    return pairs, text_encoder, unknown


def _resolver(transformer: torch.nn.Module, fmt: str):
    """name in the file -> (original-layout name or None, diffusers targets) for this model, or None."""
    linear = {n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    modules = {n for n, _ in transformer.named_modules()}
    underscored = {n.replace(".", "_"): n for n in modules}
    underscored_original = {n.replace(".", "_"): n for n in _original_names(transformer)}

    def resolve(name: str) -> tuple[str | None, tuple[str, ...]] | None:
        if fmt == "kohya":
            bare = name.removeprefix("lora_unet_")
            if bare in underscored:
                return None, (underscored[bare],)
            name = underscored_original.get(bare, bare)
        name = name.removeprefix("diffusion_model.").removeprefix("transformer.")
        targets = _original_targets(name)
        if targets is not None:
            return name, targets
        return (None, (name,)) if name in modules else None

    return resolve, linear


def load_lora(path: Path, transformer: torch.nn.Module, allow_partial: bool = False) -> LoadedLora:
    """The file's pairs as deltas on the transformer's Linear modules, checked against their shapes."""
    path = Path(path)
    tensors = read_tensors(path)
    fmt = detect_format(list(tensors))
    pairs, text_encoder, unknown = _pairs(tensors)
    resolve, linear = _resolver(transformer, fmt)
    deltas: list[LoraDelta] = []
    missing: list[str] = []
    for name, parts in pairs.items():
        down, up = parts["down"], parts["up"]
        if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1]:
            raise InputError(
                f"LoRA {path.name}: {name} is not a low-rank pair (down {tuple(down.shape)}, up {tuple(up.shape)})"
            )
        rank = down.shape[0]
        scale = float(parts["alpha"]) / rank if "alpha" in parts else 1.0
        resolved = resolve(name)
        if resolved is None or any(t not in linear for t in resolved[1]):
            missing.append(name)
            continue
        original, targets = resolved
        modules = [transformer.get_submodule(t) for t in targets]
        rows = [m.out_features for m in modules]
        if up.shape[0] != sum(rows) or any(down.shape[1] != m.in_features for m in modules):
            shape = f"{sum(rows)} x {modules[0].in_features}"
            raise InputError(
                f"LoRA {path.name}: {name} makes a {up.shape[0]} x {down.shape[1]} update, but the model's "
                f"{'+'.join(targets)} is {shape}: a LoRA for another model size?"
            )
        if original in _SWAPPED_HALVES:
            up = torch.cat(up.chunk(2, dim=0)[::-1])
        for target, part in zip(targets, up.split(rows, dim=0)):
            deltas.append(LoraDelta(target, down, part, scale))
    loaded = LoadedLora(path, sha256_file(path), fmt, deltas, text_encoder, unknown, missing)
    if not deltas:
        raise InputError(
            f"LoRA {path.name} ({fmt}): none of its {len(pairs)} pairs names a module of this model "
            f"(first: {', '.join(list(pairs)[:SHOWN_KEYS]) or 'none'}): a LoRA for another model?"
        )
    skipped = unknown + missing
    if skipped and not allow_partial:
        what = []
        if unknown:
            what.append(f"{len(unknown)} keys not understood ({', '.join(unknown[:SHOWN_KEYS])})")
        if missing:
            what.append(
                f"{len(missing)} modules that are no linear layer of this model ({', '.join(missing[:SHOWN_KEYS])})"
            )
        raise InputError(
            f"LoRA {path.name} ({fmt}) would load in part: {'; '.join(what)}. "
            "--lora-allow-partial loads the rest anyway"
        )
    return loaded


def merge_into(transformer: torch.nn.Module, loras: list[tuple[LoadedLora, float]]) -> int:
    """W += weight * scale * up @ down for every delta, formed in float32 and rounded once to W's dtype;
    returns the number of modules changed.

    Written here rather than PEFT's `merge_and_unload`: PEFT forms the delta in the adapter's dtype (bf16
    LoRA files on a GPU give a bf16 delta) and first wraps every target module; this is one matmul per
    module, in float32, straight into the weight."""
    touched = set()
    with torch.no_grad():
        for lora, weight in loras:
            for d in lora.deltas:
                w = transformer.get_submodule(d.module).weight
                w.copy_((w.float() + weight * d.delta(w.device)).to(w.dtype))
                touched.add(d.module)
    return len(touched)


def peft_config(lora: LoadedLora) -> dict[str, object]:
    """PEFT LoraConfig arguments naming exactly the modules of the deltas (anchored patterns), each at scale 1
    (alpha = its rank; the real scale is folded into lora_B). Without them, diffusers derives the targets from
    the keys and PEFT matches them by suffix: a top-level `proj_out` would also wrap every single block's
    `proj_out` with an empty adapter."""
    ranks = {d.module: int(d.down.shape[0]) for d in lora.deltas}
    common = max(set(ranks.values()), key=list(ranks.values()).count)
    pattern = {f"^{re.escape(m)}$": r for m, r in ranks.items() if r != common}
    return {
        "r": common,
        "lora_alpha": common,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": "^(?:" + "|".join(re.escape(m) for m in ranks) + ")$",
        "lora_dropout": 0.0,
        "bias": "none",
    }


def peft_state_dict(lora: LoadedLora) -> dict[str, torch.Tensor]:
    """The deltas as a PEFT state dict for diffusers' `load_lora_adapter` (the scale folded into lora_B,
    so the adapter's own alpha/rank scaling is 1)."""
    out: dict[str, torch.Tensor] = {}
    for d in lora.deltas:
        out[f"{d.module}.lora_A.weight"] = d.down.contiguous()
        out[f"{d.module}.lora_B.weight"] = (d.up.float() * d.scale).to(d.up.dtype).contiguous()
    return out
