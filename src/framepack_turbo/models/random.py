"""Random-weight models built from configs in code: the `tiny`, `small` and `full` presets.

Same classes and the same dimension contracts as the real models, so every code path (loading,
saving, generation, passes) runs with no download:
transformer `text_embed_dim` = LLaMA hidden size, `pooled_projection_dim` = CLIP hidden size,
`image_proj_dim` = SigLIP hidden size, `sum(rope_axes_dim) == attention_head_dim`.
Tokenizers are character-level vocabularies built in memory.

`full` is the real-size FramePack transformer (about 13B parameters) and the real-size VAE, with
shallow encoders of the real widths: for measuring full-size speed and memory on a GPU without the
weights. It is built directly on the device in the target dtype (26 GB in bf16; an fp32 build
first would need twice that).
"""

from __future__ import annotations

import contextlib
import string
from dataclasses import dataclass, field

import torch

SEED = 0  # random presets are deterministic: same weights in every process
MODULE_SEEDS = {"transformer": 0, "vae": 1, "text_encoder": 2, "text_encoder_2": 3, "image_encoder": 4}


@dataclass(frozen=True)
class RandomSize:
    heads: int
    head_dim: int
    rope_axes: tuple[int, int, int]
    dual_layers: int
    single_layers: int
    refiner_layers: int
    text_dim: int  # LLaMA hidden size
    text_layers: int
    clip_dim: int
    image_dim: int  # SigLIP hidden size
    siglip_image_size: int
    vae: dict = field(default_factory=dict)  # AutoencoderKLHunyuanVideo arguments
    text_ffn: int = 0  # LLaMA intermediate size (0: 2x hidden)
    image_ffn: int = 0
    image_heads: int = 2
    needs_cuda: bool = False


# 16 channels per VAE block is the fastest conv3d width on CPU; one layer per block keeps decode short.
_SMALL_VAE = dict(
    block_out_channels=(16, 16, 16, 16), layers_per_block=1, norm_num_groups=4, mid_block_add_attention=False
)

SIZES: dict[str, RandomSize] = {
    "tiny": RandomSize(2, 16, (4, 6, 6), 1, 1, 1, 32, 3, 32, 32, 32, _SMALL_VAE),
    # ~29M transformer parameters: big enough that the transformer dominates a CPU step
    "small": RandomSize(4, 64, (16, 24, 24), 5, 14, 1, 128, 3, 64, 64, 32, _SMALL_VAE),
    # FramePackI2V_HY's transformer config and HunyuanVideo's VAE; encoders at real width, 2 layers deep
    "full": RandomSize(
        24,
        128,
        (16, 56, 56),
        20,
        40,
        2,
        4096,
        3,
        768,
        1152,
        384,
        {},
        text_ffn=14336,
        image_ffn=4304,
        image_heads=16,
        needs_cuda=True,
    ),
}


def _char_vocab(specials: list[str], with_word_end: bool) -> dict[str, int]:
    vocab: dict[str, int] = {tok: i for i, tok in enumerate(specials)}
    for ch in string.ascii_letters + string.digits + string.punctuation + " \n\u2581":
        vocab.setdefault(ch, len(vocab))
        if with_word_end:
            vocab.setdefault(ch + "</w>", len(vocab))
    return vocab


def build_tokenizers():
    """(LLaMA tokenizer, CLIP tokenizer) with character-level vocabularies and no merges."""
    from transformers import CLIPTokenizer, LlamaTokenizer

    llama = LlamaTokenizer(vocab=_char_vocab(["<unk>", "<s>", "</s>"], False), merges=[])
    llama.pad_token = llama.eos_token
    clip = CLIPTokenizer(vocab=_char_vocab(["<|startoftext|>", "<|endoftext|>"], True), merges=[])
    return llama, clip


@contextlib.contextmanager
def _built_as(device: torch.device, dtype: torch.dtype):
    """Create parameters directly on `device` in `dtype` (no float32 copy first)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def transformer_config(size: RandomSize) -> dict:
    return dict(
        in_channels=16,
        out_channels=16,
        num_attention_heads=size.heads,
        attention_head_dim=size.head_dim,
        num_layers=size.dual_layers,
        num_single_layers=size.single_layers,
        num_refiner_layers=size.refiner_layers,
        text_embed_dim=size.text_dim,
        pooled_projection_dim=size.clip_dim,
        rope_axes_dim=size.rope_axes,
        has_image_proj=True,
        image_proj_dim=size.image_dim,
        has_clean_x_embedder=True,
    )


def build_models(
    size_name: str,
    device: torch.device | str = "cpu",
    dtypes: dict[str, torch.dtype] | None = None,
    skip: frozenset[str] = frozenset(),
) -> dict:
    """Every component of a random preset, built on `device` in `dtypes` (default float32), in eval mode.

    Components in `skip` are None (the caller supplies them); the others are the same as without it.
    """
    from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoFramepackTransformer3DModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        LlamaConfig,
        LlamaModel,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    from framepack_turbo.pipeline.encode import make_image_processor

    size = SIZES[size_name]
    device = torch.device(device)
    dtypes = dtypes or {}
    tokenizer, tokenizer_2 = build_tokenizers()

    @contextlib.contextmanager
    def as_(name: str):
        # Each component from its own seed: skipping or changing one leaves the others' weights alone.
        torch.manual_seed(SEED + MODULE_SEEDS[name])
        with _built_as(device, dtypes.get(name, torch.float32)):
            yield

    # Seeded on the CPU generator and, for a CUDA build, the device's: same weights every time.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        with as_("transformer"):
            with torch.device("meta") if "transformer" in skip else contextlib.nullcontext():
                transformer = HunyuanVideoFramepackTransformer3DModel(**transformer_config(size))
        with as_("vae"):
            vae = AutoencoderKLHunyuanVideo(latent_channels=16, **size.vae)
        with as_("text_encoder"):
            text_encoder = LlamaModel(
                LlamaConfig(
                    vocab_size=len(tokenizer),
                    hidden_size=size.text_dim,
                    intermediate_size=size.text_ffn or size.text_dim * 2,
                    num_hidden_layers=size.text_layers,
                    num_attention_heads=max(2, size.text_dim // 128),
                    num_key_value_heads=max(2, size.text_dim // 512),
                    max_position_embeddings=1024,
                    pad_token_id=tokenizer.pad_token_id,
                    bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
            )
        with as_("text_encoder_2"):
            text_encoder_2 = CLIPTextModel(
                CLIPTextConfig(
                    vocab_size=len(tokenizer_2),
                    hidden_size=size.clip_dim,
                    intermediate_size=size.clip_dim * 2,
                    num_hidden_layers=1,
                    num_attention_heads=2,
                    max_position_embeddings=77,
                    projection_dim=size.clip_dim,
                    bos_token_id=tokenizer_2.bos_token_id,
                    eos_token_id=tokenizer_2.eos_token_id,
                    pad_token_id=tokenizer_2.pad_token_id,
                )
            )
        with as_("image_encoder"):
            image_encoder = SiglipVisionModel(
                SiglipVisionConfig(
                    hidden_size=size.image_dim,
                    intermediate_size=size.image_ffn or size.image_dim * 2,
                    num_hidden_layers=1,
                    num_attention_heads=size.image_heads,
                    image_size=size.siglip_image_size,
                    patch_size=8 if size.siglip_image_size <= 64 else 14,
                )
            )
    feature_extractor = make_image_processor(size.siglip_image_size)
    models = {
        "transformer": transformer,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "text_encoder_2": text_encoder_2,
        "tokenizer_2": tokenizer_2,
        "image_encoder": image_encoder,
        "feature_extractor": feature_extractor,
    }
    for name in skip:
        models[name] = None
    for m in models.values():
        if isinstance(m, torch.nn.Module):
            m.eval().requires_grad_(False)
    return models


def parameter_count(size_name: str) -> int:
    """Transformer parameters of a random preset, counted on the meta device (no memory)."""
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    with torch.device("meta"):
        model = HunyuanVideoFramepackTransformer3DModel(**transformer_config(SIZES[size_name]))
    return sum(p.numel() for p in model.parameters())
