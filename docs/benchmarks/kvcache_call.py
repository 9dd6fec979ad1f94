"""One transformer call with the context KV cache: full (recording) against reuse, same inputs.

The bench's random presets have few SigLIP tokens (their image encoder is tiny), so their context is
short and the KV cache has little to skip there. This call uses the real model's token counts for
the context: 729 SigLIP tokens, a 20-token prompt, the 1x/2x/4x clean latents, with a 9-frame
window at the given latent size.

    python docs/benchmarks/kvcache_call.py --model small --height 14 --width 18 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from framepack_turbo import FramePack

SIGLIP_TOKENS = 729  # SigLIP so400m at 384 px: 27 x 27 patches


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="small")
    parser.add_argument("--height", type=int, default=14, help="latent height (pixels / 8)")
    parser.add_argument("--width", type=int, default=18, help="latent width (pixels / 8)")
    parser.add_argument("--text-tokens", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    fp = FramePack.load(args.model, device=args.device, enable_kv_cache=True, kv_cache_refresh=1000)
    transformer, device = fp.bundle.transformer, fp.bundle.device
    dtype = transformer.dtype
    c = transformer.config
    g = torch.Generator().manual_seed(0)
    h, w = args.height, args.width

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    inputs = dict(
        hidden_states=rand(1, 16, 9, h, w),
        timestep=torch.tensor([500.0], device=device, dtype=dtype),
        encoder_hidden_states=rand(1, args.text_tokens, c.text_embed_dim),
        encoder_attention_mask=torch.ones(1, args.text_tokens, dtype=torch.long, device=device),
        pooled_projections=rand(1, c.pooled_projection_dim),
        image_embeds=rand(1, SIGLIP_TOKENS, c.image_proj_dim),
        indices_latents=torch.arange(1, 10, device=device),
        guidance=torch.tensor([10000.0], device=device, dtype=dtype),
        latents_clean=rand(1, 16, 2, h, w),
        indices_latents_clean=torch.tensor([0, 10], device=device),
        latents_history_2x=rand(1, 16, 2, h, w),
        indices_latents_history_2x=torch.tensor([11, 12], device=device),
        latents_history_4x=rand(1, 16, 16, h, w),
        indices_latents_history_4x=torch.arange(13, 29, device=device),
        return_dict=False,
    )

    def call(step: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad(), transformer.cache_context("cond", step_index=step, num_inference_steps=1 << 20):
            transformer(**inputs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    call(0), call(1)  # warm-up of both paths
    full, reuse = [], []
    for _ in range(args.repeats):
        full.append(call(0))  # step 0 always recomputes (and records) the context K/V
        reuse.append(call(1))
    stats = fp.bundle.step_caches[0].section_stats()
    noisy = 9 * (h // 2) * (w // 2)
    print(
        f"model {args.model}, latent {h}x{w}: {noisy} noisy tokens, {stats['context_tokens']} context tokens, "
        f"{stats['cached_mb']} MB of cached K/V"
    )
    print(f"full call  median {statistics.median(full):.4f} s (min {min(full):.4f}, max {max(full):.4f})")
    print(f"reuse call median {statistics.median(reuse):.4f} s (min {min(reuse):.4f}, max {max(reuse):.4f})")
    print(f"ratio {statistics.median(full) / statistics.median(reuse):.2f}x")


if __name__ == "__main__":
    main()
