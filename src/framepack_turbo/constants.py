"""Facts with one owner each: the video format, the latent space, the limits a user can hit, names.

Torch-free, imported from every layer. A fact used in two places is defined here once.
"""

from __future__ import annotations

# ---- the clip ---------------------------------------------------------------------------------------
FPS = 30  # FramePack writes 30 fps; the section count is defined in frames at this rate
LATENT_FRAMES_TO_PIXELS = 4  # HunyuanVideo VAE temporal compression
VAE_SPATIAL_SCALE = 8  # pixels per latent along each side
LATENT_CHANNELS = 16
TIME_SCALE = 1000.0  # the transformer takes timestep and distilled guidance multiplied by this

# ---- the text encoder -------------------------------------------------------------------------------
LLAMA_HIDDEN_LAYER = -3  # HunyuanVideo conditions on the third-from-last LLaMA hidden state

# ---- limits a user can hit --------------------------------------------------------------------------
# CRF 0 with yuv420p makes x264 write the "High 4:4:4 Predictive" profile, which browsers, QuickTime and
# Windows' player refuse (FramePack issues #63, #488): no command writes it. CRF 1 is visually lossless.
MIN_CRF, MAX_CRF = 1, 51
CRF_ZERO = (
    "0 writes the High 4:4:4 Predictive profile, which browsers, QuickTime and Windows' player refuse; "
    "use 1 (visually lossless) or more"
)
MAX_SECONDS = 120.0
MIN_IMAGE_SIDE, MAX_IMAGE_SIDE = 64, 4096
MIN_RESOLUTION, MAX_RESOLUTION = 64, 2048
# `--seed random` draws a seed below this (any seed up to 2^63-1 can be given); the drawn one is recorded.
RANDOM_SEED, RANDOM_SEED_BELOW = "random", 2**32
MAX_COUNT = 100  # clips in one batch (seeds seed, seed+1, ...)
MAX_LORA_WEIGHT = 4.0  # a LoRA's weight beyond this breaks every model we know of; a typo, not a wish

# ---- settings -----------------------------------------------------------------------------------------
ENV_PREFIX = "FRAMEPACK_"
PRESET_ENV = ENV_PREFIX + "PRESET"

# ---- hardware -----------------------------------------------------------------------------------------
FP8_COMPUTE_CAPABILITY = (8, 9)  # torch._scaled_mm with float8 needs Ada (8.9) or Hopper (9.0)

# ---- ONNX -------------------------------------------------------------------------------------------
# `framepack export onnx --component` / ONNX_COMPONENTS names, in export order
ONNX_COMPONENTS = ("transformer", "text-encoder", "image-encoder", "vae-decoder")
