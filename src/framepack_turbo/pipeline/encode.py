"""Conditioning: prompt embeddings (LLaMA + CLIP-L), image embeddings (SigLIP), resolution buckets."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from framepack_turbo.constants import LLAMA_HIDDEN_LAYER

log = logging.getLogger(__name__)

# FramePack's 640 buckets as (height, width); every other base resolution scales these.
BUCKETS_640: tuple[tuple[int, int], ...] = (
    (416, 960),
    (448, 864),
    (480, 832),
    (512, 768),
    (544, 704),
    (576, 672),
    (608, 640),
    (640, 608),
    (672, 576),
    (704, 544),
    (768, 512),
    (832, 480),
    (864, 448),
    (960, 416),
)
SIZE_MULTIPLE = 16  # VAE 8x times transformer patch 2: a side must divide by 16

# HunyuanVideo's LLaMA prompt template (the one diffusers and FramePack use).
PROMPT_TEMPLATE = (
    "<|start_header_id|>system<|end_header_id|>\n\nDescribe the video by detailing the following aspects: "
    "1. The main content and theme of the video."
    "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
    "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects."
    "4. background environment, light, style and atmosphere."
    "5. camera angles, movements, and transitions used in the video:<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
)
MAX_PROMPT_TOKENS = 256
CLIP_MAX_TOKENS = 77


def buckets(resolution: int) -> list[tuple[int, int]]:
    """Buckets for a base resolution: FramePack's exact list at 640, the same aspect set scaled otherwise."""
    if resolution == 640:
        return list(BUCKETS_640)
    scale = resolution / 640
    out = []
    for h, w in BUCKETS_640:
        hs = max(SIZE_MULTIPLE, int(round(h * scale / SIZE_MULTIPLE)) * SIZE_MULTIPLE)
        ws = max(SIZE_MULTIPLE, int(round(w * scale / SIZE_MULTIPLE)) * SIZE_MULTIPLE)
        if (hs, ws) not in out:
            out.append((hs, ws))
    return out


def nearest_bucket(height: int, width: int, resolution: int = 640) -> tuple[int, int]:
    """The bucket whose aspect is closest to the image's; on a tie the later bucket wins (as FramePack)."""
    best, best_metric = None, float("inf")
    for bh, bw in buckets(resolution):
        metric = abs(height * bw - width * bh)
        if metric <= best_metric:
            best, best_metric = (bh, bw), metric
    return best


def resize_and_center_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Scale to cover (height, width) with Lanczos, then crop the centre."""
    if image.shape[0] == height and image.shape[1] == width:
        return image
    pil = Image.fromarray(image)
    scale = max(width / pil.width, height / pil.height)
    rw, rh = int(round(pil.width * scale)), int(round(pil.height * scale))
    pil = pil.resize((rw, rh), Image.LANCZOS)
    left, top = (rw - width) / 2, (rh - height) / 2
    return np.array(pil.crop((left, top, left + width, top + height)))


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 HWC -> float (1, 3, 1, H, W) in [-1, 1], the VAE's input."""
    t = torch.tensor(image, dtype=torch.float32) / 127.5 - 1  # a copy: callers may pass read-only arrays
    return t.permute(2, 0, 1)[None, :, None]


def image_processor_class():
    """`SiglipImageProcessor`, or its PIL implementation when torchvision is absent (it has no CPU build
    for our torch); transformers would fall back to the same class with a warning."""
    try:
        import torchvision  # noqa: F401
        from transformers import SiglipImageProcessor as Processor
    except ImportError:
        from transformers import SiglipImageProcessorPil as Processor
    return Processor


def make_image_processor(size: int):
    """A SigLIP processor at `size` (the real one is 384; random presets use their own size)."""
    return image_processor_class()(size={"height": size, "width": size})


@dataclass
class PromptEmbeddings:
    llama: torch.Tensor  # (1, L, text_dim), padding cropped: L <= 256
    mask: torch.Tensor  # (1, L) all ones at batch 1
    clip_pooled: torch.Tensor  # (1, clip_dim)
    truncations: tuple[str, ...] = ()  # one line per encoder that cut the prompt, for the user

    @staticmethod
    def zeros_like(other: PromptEmbeddings) -> PromptEmbeddings:
        """FramePack's negative conditioning when real CFG is off: zeros, never encoded."""
        return PromptEmbeddings(torch.zeros_like(other.llama), other.mask.clone(), torch.zeros_like(other.clip_pooled))


def blend_prompts(parts: list[tuple[PromptEmbeddings, float]]) -> PromptEmbeddings:
    """A weighted sum of prompt embeddings (weights summing to 1). LLaMA sequences of other lengths are
    padded with zeros and masked out; the pooled CLIP vectors mix directly. One part is returned as is."""
    if len(parts) == 1:
        return parts[0][0]
    length = max(p.llama.shape[1] for p, _ in parts)
    llama = torch.zeros_like(parts[0][0].llama[:, :1]).expand(-1, length, -1).clone()
    mask = torch.zeros((1, length), dtype=parts[0][0].mask.dtype, device=parts[0][0].mask.device)
    pooled = torch.zeros_like(parts[0][0].clip_pooled)
    for p, weight in parts:
        n = p.llama.shape[1]
        llama[:, :n] += weight * p.llama
        mask[:, :n] = torch.maximum(mask[:, :n], p.mask)
        pooled += weight * p.clip_pooled
    return PromptEmbeddings(llama, mask, pooled)


def template_crop_start(tokenizer) -> int:
    """Tokens of the template before the user prompt (95 for HunyuanVideo's LLaMA-3 tokenizer).

    Computed rather than hard-coded so a tokenizer of another vocabulary (the random presets) crops
    exactly the template too.
    """
    prefix = PROMPT_TEMPLATE.split("{}")[0]
    return len(tokenizer(prefix).input_ids)


@torch.no_grad()
def encode_prompt(prompt: str, tokenizer, text_encoder, tokenizer_2, text_encoder_2) -> PromptEmbeddings:
    """LLaMA hidden_states[-3] of the templated prompt (template cropped) and the CLIP-L pooled output."""
    crop_start = template_crop_start(tokenizer)
    templated = PROMPT_TEMPLATE.format(prompt)
    truncations = []
    llama_tokens = len(tokenizer(templated).input_ids) - crop_start
    if llama_tokens > MAX_PROMPT_TOKENS:
        truncations.append(f"prompt is {llama_tokens} LLaMA tokens; only the first {MAX_PROMPT_TOKENS} are used")
    inputs = tokenizer(
        [templated],
        padding="max_length",
        max_length=MAX_PROMPT_TOKENS + crop_start,
        truncation=True,
        return_tensors="pt",
        return_attention_mask=True,
    )
    device = text_encoder.device
    ids, mask = inputs.input_ids.to(device), inputs.attention_mask.to(device)
    length = int(mask.sum())
    out = text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    llama = out.hidden_states[LLAMA_HIDDEN_LAYER][:, crop_start:length]
    llama_mask = mask[:, crop_start:length]

    clip_ids = tokenizer_2(
        [prompt], padding="max_length", max_length=CLIP_MAX_TOKENS, truncation=True, return_tensors="pt"
    ).input_ids
    clip_tokens = len(tokenizer_2(prompt).input_ids)
    if clip_tokens > CLIP_MAX_TOKENS:
        truncations.append(
            f"prompt is {clip_tokens} CLIP tokens; CLIP-L reads the first {CLIP_MAX_TOKENS} (LLaMA reads more)"
        )
    pooled = text_encoder_2(clip_ids.to(text_encoder_2.device), output_hidden_states=False).pooler_output
    return PromptEmbeddings(llama, llama_mask, pooled, tuple(truncations))


@torch.no_grad()
def encode_image(image: np.ndarray, feature_extractor, image_encoder) -> torch.Tensor:
    """SigLIP last_hidden_state of the (bucket-sized) start image."""
    pixels = feature_extractor(images=image, return_tensors="pt").pixel_values
    pixels = pixels.to(device=image_encoder.device, dtype=image_encoder.dtype)
    return image_encoder(pixel_values=pixels).last_hidden_state
