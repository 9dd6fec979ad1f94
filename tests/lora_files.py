"""LoRA files in every format the loader reads, written from known low-rank factors (tests only).

Each case is a set of pairs in the file's own layout plus, independently, what every diffusers module of the
tiny transformer must receive: the rows of `up` each module gets and the scale. The original HunyuanVideo
layout's fused projections are written fused here (q, k, v stacked; linear1 with the MLP), so the loader's
split is what is tested.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

RANK = 4
ALPHA = 2.0  # kohya's alpha: scale alpha / rank = 0.5


@dataclass
class Expected:
    module: str
    down: torch.Tensor
    up: torch.Tensor  # the rows this module receives
    scale: float

    def delta(self) -> torch.Tensor:
        return self.scale * (self.up @ self.down)


def _pair(gen: torch.Generator, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(RANK, cols, generator=gen) * 0.1, torch.randn(rows, RANK, generator=gen) * 0.1


def _dims(transformer) -> tuple[int, int]:
    hidden = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    return hidden, int(hidden * transformer.config.mlp_ratio)


def diffusers_names(transformer, gen) -> tuple[dict[str, tuple], list[Expected]]:
    """Pairs on diffusers' module names (FramePack's own layout), scale 1."""
    pairs, expected = {}, []
    for name in (
        "transformer_blocks.0.attn.to_q",
        "single_transformer_blocks.1.proj_mlp",
        "proj_out",
        "image_projection.up",
    ):
        m = transformer.get_submodule(name)
        down, up = _pair(gen, m.out_features, m.in_features)
        pairs[name] = (down, up)
        expected.append(Expected(name, down, up, 1.0))
    return pairs, expected


def original_names(transformer, gen) -> tuple[dict[str, tuple], list[Expected]]:
    """Pairs on the original HunyuanVideo layout, fused where it is fused, scale 1."""
    h, mlp = _dims(transformer)
    pairs, expected = {}, []

    def fused(name: str, targets: list[tuple[str, int]], cols: int) -> None:
        down, up = _pair(gen, sum(r for _, r in targets), cols)
        pairs[name] = (down, up)
        start = 0
        for target, rows in targets:
            expected.append(Expected(target, down, up[start : start + rows], 1.0))
            start += rows

    fused("double_blocks.0.img_attn_qkv", [(f"transformer_blocks.0.attn.to_{x}", h) for x in "qkv"], h)
    fused("double_blocks.1.txt_attn_qkv", [(f"transformer_blocks.1.attn.add_{x}_proj", h) for x in "qkv"], h)
    fused("double_blocks.1.img_mlp.fc2", [("transformer_blocks.1.ff.net.2", h)], mlp)
    fused("double_blocks.0.txt_mod.linear", [("transformer_blocks.0.norm1_context.linear", 6 * h)], h)
    fused(
        "single_blocks.2.linear1",
        [(f"single_transformer_blocks.2.attn.to_{x}", h) for x in "qkv"]
        + [("single_transformer_blocks.2.proj_mlp", mlp)],
        h,
    )
    fused("single_blocks.3.linear2", [("single_transformer_blocks.3.proj_out", h)], h + mlp)
    fused(
        "txt_in.individual_token_refiner.blocks.0.self_attn_qkv",
        [(f"context_embedder.token_refiner.refiner_blocks.0.attn.to_{x}", h) for x in "qkv"],
        h,
    )
    # HunyuanVideo's final adaLN is (shift, scale); diffusers' norm_out.linear is (scale, shift)
    down, up = _pair(gen, 2 * h, h)
    pairs["final_layer.adaLN_modulation.1"] = (down, up)
    expected.append(Expected("norm_out.linear", down, torch.cat([up[h:], up[:h]]), 1.0))
    return pairs, expected


def comfyui_names(transformer, gen) -> tuple[dict[str, tuple], list[Expected]]:
    """Pairs on ComfyUI's own names of every HunyuanVideo module the tiny model has (its Flux-style blocks:
    `img_attn.qkv`, `img_mod.lin`, `img_mlp.0`, `modulation.lin`, `time_in.in_layer` ...), fused where ComfyUI's
    modules are fused, each with the diffusers modules (written out here) its rows go to. Scale 1."""
    cfg = transformer.config
    pairs, expected = {}, []

    def out(name: str) -> int:
        return transformer.get_submodule(name).out_features

    def add(name: str, targets: list[str], swapped: bool = False) -> None:
        cols = transformer.get_submodule(targets[0]).in_features
        rows = [out(t) for t in targets]
        down, up = _pair(gen, sum(rows), cols)
        pairs[name] = (down, up)
        if swapped:  # (shift, scale) in the file, (scale, shift) in diffusers' norm_out
            half = up.shape[0] // 2
            up = torch.cat([up[half:], up[:half]])
        start = 0
        for target, n in zip(targets, rows):
            expected.append(Expected(target, down, up[start : start + n], 1.0))
            start += n

    for i in range(cfg.num_layers):
        d, b = f"double_blocks.{i}", f"transformer_blocks.{i}"
        add(f"{d}.img_attn.qkv", [f"{b}.attn.to_q", f"{b}.attn.to_k", f"{b}.attn.to_v"])
        add(f"{d}.img_attn.proj", [f"{b}.attn.to_out.0"])
        add(f"{d}.img_mlp.0", [f"{b}.ff.net.0.proj"])
        add(f"{d}.img_mlp.2", [f"{b}.ff.net.2"])
        add(f"{d}.img_mod.lin", [f"{b}.norm1.linear"])
        add(f"{d}.txt_attn.qkv", [f"{b}.attn.add_q_proj", f"{b}.attn.add_k_proj", f"{b}.attn.add_v_proj"])
        add(f"{d}.txt_attn.proj", [f"{b}.attn.to_add_out"])
        add(f"{d}.txt_mlp.0", [f"{b}.ff_context.net.0.proj"])
        add(f"{d}.txt_mlp.2", [f"{b}.ff_context.net.2"])
        add(f"{d}.txt_mod.lin", [f"{b}.norm1_context.linear"])
    for i in range(cfg.num_single_layers):
        d, b = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        add(f"{d}.linear1", [f"{b}.attn.to_q", f"{b}.attn.to_k", f"{b}.attn.to_v", f"{b}.proj_mlp"])
        add(f"{d}.linear2", [f"{b}.proj_out"])
        add(f"{d}.modulation.lin", [f"{b}.norm.linear"])
    for i in range(cfg.num_refiner_layers):
        d, b = f"txt_in.individual_token_refiner.blocks.{i}", f"context_embedder.token_refiner.refiner_blocks.{i}"
        add(f"{d}.self_attn.qkv", [f"{b}.attn.to_q", f"{b}.attn.to_k", f"{b}.attn.to_v"])
        add(f"{d}.self_attn.proj", [f"{b}.attn.to_out.0"])
        add(f"{d}.mlp.0", [f"{b}.ff.net.0.proj"])
        add(f"{d}.mlp.2", [f"{b}.ff.net.2"])
        add(f"{d}.adaLN_modulation.1", [f"{b}.norm_out.linear"])
    top = {
        "txt_in.input_embedder": "context_embedder.proj_in",
        "txt_in.t_embedder.in_layer": "context_embedder.time_text_embed.timestep_embedder.linear_1",
        "txt_in.t_embedder.out_layer": "context_embedder.time_text_embed.timestep_embedder.linear_2",
        "txt_in.c_embedder.in_layer": "context_embedder.time_text_embed.text_embedder.linear_1",
        "txt_in.c_embedder.out_layer": "context_embedder.time_text_embed.text_embedder.linear_2",
        "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
        "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
        "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
        "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
        "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
        "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
        "final_layer.linear": "proj_out",
    }
    for name, target in top.items():
        add(name, [target])
    add("final_layer.adaLN_modulation.1", ["norm_out.linear"], swapped=True)
    return pairs, expected


def write(
    path: Path,
    fmt: str,
    transformer,
    seed: int = 0,
    extra: dict[str, torch.Tensor] | None = None,
    dtype: torch.dtype = torch.float32,
    alpha: float = ALPHA,
    drop: tuple[str, ...] = (),
) -> list[Expected]:
    """Write a LoRA in `fmt` for the tiny transformer; returns what each module must receive.

    fmt: diffusers (transformer. + lora_A/B), peft-bare (no prefix), diffusers-down-up (transformer. + diffusers
    names + lora_down/lora_up + alpha), kohya-framepack (lora_unet_ + diffusers names, alpha), kohya-hunyuan
    (lora_unet_ + original names, alpha), hunyuan (original names, lora_A/B), diffusion-pipe (today's:
    transformer. + original names, lora_A/B, as ComfyUI's loader reads it), diffusion-pipe-old (the older
    diffusion_model. prefix), comfyui (diffusion_model. + ComfyUI's own module names, every module).
    `dtype` is the factors' (kohya and musubi save bf16/fp16, the alpha too); `drop` removes keys (half pairs).
    """
    gen = torch.Generator().manual_seed(seed)
    original = fmt in ("kohya-hunyuan", "hunyuan", "diffusion-pipe", "diffusion-pipe-old")
    builder = comfyui_names if fmt == "comfyui" else original_names if original else diffusers_names
    pairs, expected = builder(transformer, gen)
    with_alpha = fmt.startswith("kohya") or fmt == "diffusers-down-up"
    tensors: dict[str, torch.Tensor] = {}
    for name, (down, up) in pairs.items():
        if fmt.startswith("kohya"):
            key = "lora_unet_" + name.replace(".", "_")
        else:
            prefix = {
                "peft-bare": "",
                "hunyuan": "",
                "diffusion-pipe-old": "diffusion_model.",
                "comfyui": "diffusion_model.",
            }
            key = prefix.get(fmt, "transformer.") + name
        a, b = ("lora_down", "lora_up") if with_alpha else ("lora_A", "lora_B")
        tensors[f"{key}.{a}.weight"] = down.to(dtype)
        tensors[f"{key}.{b}.weight"] = up.to(dtype)
        if with_alpha:
            tensors[f"{key}.alpha"] = torch.tensor(alpha, dtype=dtype)
    # what each module receives: the factors as stored (rounded to the file's dtype), in float32
    expected = [
        Expected(
            e.module,
            e.down.to(dtype).float(),
            e.up.to(dtype).float(),
            float(torch.tensor(alpha, dtype=dtype)) / RANK if with_alpha else e.scale,
        )
        for e in expected
    ]
    tensors.update(extra or {})
    for key in drop:
        del tensors[key]
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return expected


def _peft_expected(model) -> list[Expected]:
    """Each PEFT-wrapped module's factors and scaling, as PEFT holds them (the tool's own truth)."""
    out = []
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            out.append(
                Expected(
                    name.removeprefix("base_model.model."),
                    module.lora_A["default"].weight.detach().float().clone(),
                    module.lora_B["default"].weight.detach().float().clone(),
                    float(module.scaling["default"]),
                )
            )
    return out


def peft_folder(directory: Path, transformer, seed: int = 0) -> list[Expected]:
    """PEFT's own `save_pretrained` of a LoRA on the tiny transformer: `directory/adapter_model.safetensors`
    (keys `base_model.model.<module>.lora_A.weight`) and `adapter_config.json` beside it (r 4, lora_alpha 6;
    proj_mlp r 2, alpha 5 by rank_pattern / alpha_pattern). PEFT matches target names by suffix, so
    `proj_out` is every single block's and the top one."""
    import copy

    import peft

    torch.manual_seed(seed)
    config = peft.LoraConfig(
        r=4,
        lora_alpha=6,
        target_modules=["to_q", "proj_mlp", "proj_out"],
        rank_pattern={"proj_mlp": 2},
        alpha_pattern={"proj_mlp": 5},
        init_lora_weights=False,  # PEFT's B starts at zero otherwise: nothing to compare
    )
    model = peft.get_peft_model(copy.deepcopy(transformer), config)
    model.save_pretrained(str(directory))
    return _peft_expected(model)


def diffusers_trained(directory: Path, transformer, seed: int = 0, r: int = 4, alpha: int = 8) -> list[Expected]:
    """What diffusers' LoRA training scripts write: `transformer.add_adapter(LoraConfig(...))`, then the
    pipeline's `save_lora_weights(..., transformer_lora_adapter_metadata=<the adapter's config>)`, which puts
    the config into the header's `lora_adapter_metadata` (JSON, keys `transformer.r`, `transformer.lora_alpha`
    ...). Keys: `transformer.<module>.lora_A.weight`, no `.alpha`; diffusers applies lora_alpha / r."""
    import copy

    import peft
    from diffusers import HunyuanVideoFramepackPipeline
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    model = copy.deepcopy(transformer)
    model.add_adapter(
        peft.LoraConfig(
            r=r, lora_alpha=alpha, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v", "to_out.0"]
        )
    )
    HunyuanVideoFramepackPipeline.save_lora_weights(
        str(directory),
        transformer_lora_layers=get_peft_model_state_dict(model),
        transformer_lora_adapter_metadata=model.peft_config["default"].to_dict(),
    )
    return _peft_expected(model)


def loha(path: Path, transformer) -> None:
    """A LyCORIS LoHa file as kohya-style trainers write it: `lora_unet_<module>.hada_w1_a`, `hada_w1_b`,
    `hada_w2_a`, `hada_w2_b` and `alpha` (no lora_down/lora_up at all)."""
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for name in ("transformer_blocks.0.attn.to_q", "proj_out"):
        m = transformer.get_submodule(name)
        key = "lora_unet_" + name.replace(".", "_")
        for w in ("w1", "w2"):
            tensors[f"{key}.hada_{w}_a"] = torch.randn(m.out_features, RANK, generator=gen)
            tensors[f"{key}.hada_{w}_b"] = torch.randn(RANK, m.in_features, generator=gen)
        tensors[f"{key}.alpha"] = torch.tensor(ALPHA)
    save_file(tensors, str(path))


FORMATS = (
    "diffusers",
    "peft-bare",
    "diffusers-down-up",
    "kohya-framepack",
    "kohya-hunyuan",
    "hunyuan",
    "diffusion-pipe",
    "diffusion-pipe-old",
    "comfyui",
)
DETECTED = {
    "diffusers": "diffusers",
    "peft-bare": "diffusers",
    "diffusers-down-up": "diffusers",
    "kohya-framepack": "kohya",
    "kohya-hunyuan": "kohya",
    "hunyuan": "hunyuan",
    "diffusion-pipe": "diffusion-pipe",
    "diffusion-pipe-old": "diffusion-pipe",
    "comfyui": "comfyui",
}


def stub(directory: Path) -> Path:
    """A valid one-pair LoRA (diffusers layout) for tests that only need a file that exists."""
    path = Path(directory) / "stub-lora.safetensors"
    if not path.is_file():
        save_file(
            {
                "transformer.proj_out.lora_A.weight": torch.zeros(RANK, 128),
                "transformer.proj_out.lora_B.weight": torch.zeros(64, RANK),
            },
            str(path),
        )
    return path
