"""VAE encode/decode (in temporal chunks sized to free memory), the cheap latent preview, and the soft
append that joins sections."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from framepack_turbo.settings import Settings

log = logging.getLogger(__name__)

# Linear map from the 16 latent channels to RGB (the ComfyUI factors FramePack uses for previews).
# Kept as a 16 x 3 table, three rows a line, for reading against the source (hence fmt: skip).
_PREVIEW_RGB = (
    (-0.0395, -0.0331, 0.0445), (0.0696, 0.0795, 0.0518), (0.0135, -0.0945, -0.0282),
    (0.0108, -0.0250, -0.0765), (-0.0209, 0.0032, 0.0224), (-0.0804, -0.0254, -0.0639),
    (-0.0991, 0.0271, -0.0669), (-0.0646, -0.0422, -0.0400), (-0.0696, -0.0595, -0.0894),
    (-0.0799, -0.0208, -0.0375), (0.1166, 0.1627, 0.0962), (0.1165, 0.0432, 0.0407),
    (-0.2315, -0.1920, -0.1355), (-0.0270, 0.0401, -0.0821), (-0.0616, -0.0997, -0.0727),
    (0.0249, -0.0469, -0.1703),
)  # fmt: skip
_PREVIEW_BIAS = (0.0259, -0.0192, -0.0761)
HUNYUAN_LATENT_PREVIEW = (_PREVIEW_RGB, _PREVIEW_BIAS)  # (16 x 3 weights, 3 biases): a preset's default


@torch.no_grad()
def encode(pixels: torch.Tensor, vae, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, 3, T, H, W) in [-1, 1] -> scaled latents (B, 16, T', H/8, W/8), float32.

    Samples the posterior as FramePack does; pass a seeded `generator` so the same seed gives the
    same start latent (FramePack draws from the global RNG, which makes reruns differ).
    """
    dist = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
    return (dist.sample(generator=generator) * vae.config.scaling_factor).float()


MIN_CHUNK = 2  # latent frames: a chunk overlaps the next by one, so two is the least that advances


@torch.no_grad()
def decode(latents: torch.Tensor, vae, chunk: int | None = None) -> torch.Tensor:
    """Scaled latents (B, 16, T, h, w) -> pixels (B, 3, 4(T-1)+1, 8h, 8w) in [-1, 1], on CPU.

    `chunk`: latent frames per temporal chunk (VAE_CHUNK_SIZE), decoded by diffusers' temporal tiling:
    each chunk overlaps the next by one latent frame (4 pixel frames, cross-faded), and the result
    has exactly the single-pass frame count. None keeps the VAE's own setting (diffusers decodes in
    4-latent-frame tiles by default); 0 decodes in one pass.

    Pixels stay in the VAE's dtype (fp16 on CUDA, as FramePack keeps its pixel history): a minute of
    video at 640 is 8 GB in float32.
    """
    z = (latents / vae.config.scaling_factor).to(device=vae.device, dtype=vae.dtype)
    with temporal_chunks(vae, chunk):
        return vae.decode(z).sample.cpu()


@contextlib.contextmanager
def temporal_chunks(vae, chunk: int | None):
    """Set the VAE's temporal tiling to `chunk` latent frames (overlap one) for the duration."""
    if chunk is None:
        yield
        return
    if chunk != 0 and chunk < MIN_CHUNK:
        raise ValueError(f"VAE chunk must be 0 (one pass) or >= {MIN_CHUNK} latent frames, got {chunk}")
    saved = (vae.use_framewise_decoding, vae.tile_sample_min_num_frames, vae.tile_sample_stride_num_frames)
    ratio = vae.config.temporal_compression_ratio
    vae.use_framewise_decoding = chunk != 0
    if chunk:
        vae.tile_sample_min_num_frames = chunk * ratio
        vae.tile_sample_stride_num_frames = (chunk - 1) * ratio
    try:
        yield
    finally:
        vae.use_framewise_decoding, vae.tile_sample_min_num_frames, vae.tile_sample_stride_num_frames = saved


def chunk_frames(
    free_gb: float,
    height: int,
    width: int,
    channels: int,
    dtype_bytes: int,
    reserve_gb: float,
    safety: float,
    upscale: int,
    temporal: int = 4,
) -> int:
    """Latent frames per decode chunk that fit in `free_gb` minus `reserve_gb`.

    The estimate: one latent frame decodes into `temporal` pixel frames at `upscale` x the latent
    size, and the decoder's widest full-resolution activation has `channels` channels; times the
    `safety` factor. At least `MIN_CHUNK`.
    """
    per_frame = temporal * (height * upscale) * (width * upscale) * channels * dtype_bytes * safety
    usable = max(free_gb - reserve_gb, 0.0) * 2**30
    return max(MIN_CHUNK, int(usable // per_frame))


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


@dataclass(frozen=True)
class ChunkedDecode:
    """How the VAE decodes (VAE_CHUNK_SIZE, VAE_CHUNK_RESERVE_GB, VAE_CHUNK_SAFETY, VAE_UPSCALE_FACTOR).

    `chunk`: latent frames per temporal chunk; None: sized from free GPU memory on CUDA, the VAE's own
    temporal tiles elsewhere (what FramePack decodes with); 0: one pass.
    """

    chunk: int | None = None
    reserve_gb: float = 2.0
    safety: float = 1.2
    upscale: int = 8

    @classmethod
    def from_settings(cls, settings: Settings) -> ChunkedDecode:
        return cls(
            settings.vae_chunk_size,
            settings.vae_chunk_reserve_gb,
            settings.vae_chunk_safety,
            settings.vae_upscale_factor,
        )

    def chunk_for(self, latents: torch.Tensor, vae) -> int | None:
        if self.chunk is not None:
            return self.chunk
        if vae.device.type != "cuda":
            return None
        from framepack_turbo.hardware import cuda_free_bytes

        free_gb = cuda_free_bytes(vae.device) / 2**30
        _, _, frames, height, width = latents.shape
        chunk = chunk_frames(
            free_gb,
            height,
            width,
            vae.config.block_out_channels[0],
            vae.dtype.itemsize,
            self.reserve_gb,
            self.safety,
            self.upscale,
            vae.config.temporal_compression_ratio,
        )
        return min(chunk, frames)


def decode_chunked(latents: torch.Tensor, vae, config: ChunkedDecode | None = None) -> torch.Tensor:
    """`decode` in the chunks `config` says; out of memory halves the chunk and retries, down to the minimum."""
    chunk = (config or ChunkedDecode()).chunk_for(latents, vae)
    while True:
        try:
            return decode(latents, vae, chunk)
        except Exception as exc:
            current = chunk or latents.shape[2]
            if not is_out_of_memory(exc) or current <= MIN_CHUNK:
                raise
            chunk = max(MIN_CHUNK, current // 2)
            if vae.device.type == "cuda":
                torch.cuda.empty_cache()
            log.warning("Out of memory in VAE decode with %d-frame chunks: retrying with %d", current, chunk)


@torch.no_grad()
def preview(latents: torch.Tensor, factors=None) -> torch.Tensor:
    """A rough RGB look at latents without the VAE: (B, 3, T, h, w) in [0, 1]. Cheap enough per step.

    `factors`: (16 x 3 weights, 3 biases) of the VAE's latent space (ModelPreset.latent_preview);
    HunyuanVideo's by default."""
    rgb, offset = factors or HUNYUAN_LATENT_PREVIEW
    weight = torch.tensor(rgb, device=latents.device, dtype=latents.dtype).T[:, :, None, None, None]
    bias = torch.tensor(offset, device=latents.device, dtype=latents.dtype)
    return torch.nn.functional.conv3d(latents, weight, bias=bias).clamp(0.0, 1.0)


def soft_append(earlier: torch.Tensor, later: torch.Tensor, overlap: int) -> torch.Tensor:
    """Join two pixel clips along time, cross-fading the `overlap` frames they share linearly.

    The last `overlap` frames of `earlier` and the first `overlap` of `later` show the same moment;
    weights go from all-`earlier` to all-`later` across them.
    """
    if overlap <= 0:
        return torch.cat([earlier, later], dim=2)
    if earlier.shape[2] < overlap or later.shape[2] < overlap:
        raise ValueError(f"overlap {overlap} is longer than a clip ({earlier.shape[2]} and {later.shape[2]} frames)")
    w = torch.linspace(1, 0, overlap, dtype=earlier.dtype, device=earlier.device).view(1, 1, -1, 1, 1)
    blended = w * earlier[:, :, -overlap:] + (1 - w) * later[:, :, :overlap]
    return torch.cat([earlier[:, :, :-overlap], blended, later[:, :, overlap:]], dim=2)
