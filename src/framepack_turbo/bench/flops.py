"""The floating-point operations of one FramePack transformer call, counted from its shapes.

For the model FLOP utilisation (MFU) the GPU check reports: FLOPs per step / seconds per step / the
chip's dense bf16 rate. Multiply-adds count 2. With D = heads x head_dim, the joint sequence
S = N + T (N image tokens: the noisy window and the clean 1x/2x/4x history after their patch
embedders; T text tokens: LLaMA tokens after the refiner plus SigLIP tokens after the image
projection):

- each dual-stream block: 24 S D^2 (QKV, output and a 4D feed-forward per token, both streams) +
  4 S^2 D (QK^T and PV over the joint sequence) + 2 x 12 D^2 (the two 6D modulations)
- each single-stream block: 24 S D^2 (QKV 3D^2, MLP in 4D^2, output 5D^2) + 4 S^2 D + 6 D^2
- the token refiner over the L LaMA tokens: 2 L C D (proj_in, C = text width) + per layer
  24 L D^2 + 4 L^2 D
- the image projection (SigLIP width E -> 3D -> D): 2 I (3 E D + 3 D^2); the patch embedders
  2 x tokens x (16 x kernel volume) x D each (p^2 p_t, and 8 and 64 times that for the 2x and 4x
  history); the output projection 2 N_noisy D (16 p^2 p_t)

Element-wise work (norms, RoPE, activations, softmax) is left out: it is memory-bound and a few
percent of the total. The count matches torch's FlopCounterMode (attention in its math form) to 0.01%
(tests/test_bench.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class CallShape:
    """The token counts of one transformer call."""

    noisy: int  # image tokens of the window being denoised
    clean: tuple[int, int, int]  # history tokens after the 1x, 2x and 4x embedders
    llama: int  # LLaMA tokens (through the refiner)
    siglip: int  # image-embedding tokens
    batch: int = 1

    @property
    def image(self) -> int:
        return self.noisy + sum(self.clean)

    @property
    def text(self) -> int:
        return self.llama + self.siglip

    @property
    def joint(self) -> int:
        return self.image + self.text


def _tokens(shape, kernel: tuple[int, int, int]) -> int:
    """Tokens a (B, C, T, H, W) latent makes under a patch embedder of this (t, h, w) kernel; the
    history latents are padded up to a multiple of the kernel first, as FramePack does."""
    _, _, t, h, w = shape
    kt, kh, kw = kernel
    return math.ceil(t / kt) * math.ceil(h / kh) * math.ceil(w / kw)


def call_shape(config: Mapping[str, Any], kwargs: Mapping[str, Any]) -> CallShape:
    """The token counts of a call from its keyword arguments (tensors or anything with .shape)."""
    p, pt = config.get("patch_size", 2), config.get("patch_size_t", 1)
    hidden = kwargs["hidden_states"].shape
    clean = tuple(
        _tokens(kwargs[name].shape, (k * pt, k * p, k * p)) if kwargs.get(name) is not None else 0
        for name, k in (("latents_clean", 1), ("latents_history_2x", 2), ("latents_history_4x", 4))
    )
    image_embeds = kwargs.get("image_embeds")
    return CallShape(
        noisy=_tokens(hidden, (pt, p, p)),
        clean=clean,
        llama=kwargs["encoder_hidden_states"].shape[1],
        siglip=image_embeds.shape[1] if image_embeds is not None else 0,
        batch=hidden[0],
    )


def transformer_flops(config: Mapping[str, Any], shape: CallShape) -> float:
    """FLOPs of one forward call (the formula in this module's docstring)."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    s, n, llama, siglip = shape.joint, shape.noisy, shape.llama, shape.siglip
    p, pt = config.get("patch_size", 2), config.get("patch_size_t", 1)
    channels = config.get("in_channels", 16)
    attention = 4 * s * s * d
    dual = config["num_layers"] * (24 * s * d * d + attention + 24 * d * d)
    single = config["num_single_layers"] * (24 * s * d * d + attention + 6 * d * d)
    refiner = 2 * llama * config["text_embed_dim"] * d + config.get("num_refiner_layers", 2) * (
        24 * llama * d * d + 4 * llama * llama * d
    )
    projection = 2 * siglip * (3 * config.get("image_proj_dim", 1152) * d + 3 * d * d) if siglip else 0
    volume = channels * p * p * pt
    one, two, four = shape.clean
    embedders = 2 * volume * d * (n + one + 8 * two + 64 * four)  # the 2x and 4x kernels are 2^3 and 4^3 larger
    output = 2 * n * d * volume
    return float(shape.batch * (dual + single + refiner + projection + embedders + output))
