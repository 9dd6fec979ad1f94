"""Random-weight models built from configs in code: the `tiny` and `small` presets.

Same classes and the same dimension contracts as the real models, so every code path (loading,
saving, generation, passes) runs on CPU in seconds with no download:
transformer `text_embed_dim` = LLaMA hidden size, `pooled_projection_dim` = CLIP hidden size,
`image_proj_dim` = SigLIP hidden size, `sum(rope_axes_dim) == attention_head_dim`.
Tokenizers are character-level vocabularies built in memory.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

import torch

SEED = 0  # random presets are deterministic: same weights in every process


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
    vae_channels: int  # per VAE block; 16 is the fastest conv3d width on CPU


SIZES: dict[str, RandomSize] = {
    "tiny": RandomSize(2, 16, (4, 6, 6), 1, 1, 1, 32, 3, 32, 32, 32, 16),
    # ~30M transformer parameters: big enough that the transformer dominates a CPU step
    "small": RandomSize(4, 64, (16, 24, 24), 5, 14, 1, 128, 3, 64, 64, 32, 16),
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


def build_models(size_name: str) -> dict:
    """Every component of a random preset, in float32, in eval mode."""
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
    tokenizer, tokenizer_2 = build_tokenizers()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        transformer = HunyuanVideoFramepackTransformer3DModel(
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
        c = size.vae_channels
        vae = AutoencoderKLHunyuanVideo(
            latent_channels=16,
            block_out_channels=(c, c, c, c),
            layers_per_block=1,
            norm_num_groups=4,
            mid_block_add_attention=False,
        )
        text_encoder = LlamaModel(
            LlamaConfig(
                vocab_size=len(tokenizer),
                hidden_size=size.text_dim,
                intermediate_size=size.text_dim * 2,
                num_hidden_layers=size.text_layers,
                num_attention_heads=2,
                num_key_value_heads=2,
                max_position_embeddings=1024,
                pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        )
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
        image_encoder = SiglipVisionModel(
            SiglipVisionConfig(
                hidden_size=size.image_dim,
                intermediate_size=size.image_dim * 2,
                num_hidden_layers=1,
                num_attention_heads=2,
                image_size=size.siglip_image_size,
                patch_size=8,
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
    for m in models.values():
        if isinstance(m, torch.nn.Module):
            m.eval().requires_grad_(False)
    return models
