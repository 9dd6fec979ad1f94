"""One rank of the context-parallel tests (tests/test_parallel.py starts two, as `--gpus 2` would).

    python tests/parallel_worker.py JOBS.json OUT_DIR
    python tests/parallel_worker.py lengths OUT_DIR

Runs every job of JOBS.json on this rank (one FramePack per model, `reconfigure` between step caches, as the
web app's worker does) and writes, per job, the clip's latents (safetensors), the step caches' decisions and
what was written, into OUT_DIR/rank{RANK}/. Ring jobs on a CPU need a stand-in for torch's CUDA flash kernel
(the one that returns the log-sum-exp ring merges by): torch's CPU flash op returns the same two tensors.

`lengths`: the transformer alone (`tiny-random`), one call per text length 1..40 and per latent shape (shares even
and odd), first in this process without the split (the one-process reference), then split over the ranks with
Ulysses and with ring; writes every call's output into OUT_DIR/rank{RANK}/lengths.safetensors.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "red-circle.png"


def cpu_flash_stand_in() -> None:
    from diffusers.models import attention_dispatch

    def forward_op(ctx, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse, **_):
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, dropout_p, is_causal, scale=scale
        )[:2]
        out, lse = out.transpose(1, 2).contiguous(), lse.transpose(1, 2).contiguous()
        return (out, lse) if return_lse else out

    attention_dispatch._native_flash_attention_forward_op = forward_op


TEXT_LENGTHS = range(1, 41)
LATENT_SIZES = ((8, 8), (6, 6))  # 64 px: 4 tokens a frame side (even shares); 48 px: 3 (odd)
IMAGE_TOKENS = 17
MODES = ("ulysses", "ring")


def transformer_inputs(transformer, text: int, height: int, width: int) -> dict:
    """One section's call as the generator makes it (inverted, window 3, the history's three groups)."""
    from framepack_turbo.pipeline.sections import inverted_indices

    c = transformer.config
    g = torch.Generator().manual_seed(1000 * text + height)
    idx = inverted_indices(1, 3)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    return dict(
        hidden_states=randn(1, 16, 3, height, width),
        timestep=torch.tensor([500.0]),
        encoder_hidden_states=randn(1, text, c.text_embed_dim),
        encoder_attention_mask=torch.ones(1, text, dtype=torch.int64),
        pooled_projections=randn(1, c.pooled_projection_dim),
        image_embeds=randn(1, IMAGE_TOKENS, c.image_proj_dim),
        indices_latents=idx.latents,
        guidance=torch.tensor([10_000.0]),
        latents_clean=randn(1, 16, 2, height, width),
        indices_latents_clean=idx.clean,
        latents_history_2x=randn(1, 16, 2, height, width),
        indices_latents_history_2x=idx.clean_2x,
        latents_history_4x=randn(1, 16, 16, height, width),
        indices_latents_history_4x=idx.clean_4x,
        return_dict=False,
    )


def lengths(out: Path) -> None:
    from framepack_turbo import distributed
    from framepack_turbo.models.loading import load_bundle
    from framepack_turbo.optim.base import PassContext
    from framepack_turbo.optim.parallel import ContextParallelPass, ParallelConfig

    distributed.start("cpu", 2)
    bundle = load_bundle("tiny-random", device="cpu")
    transformer = bundle.transformer
    cases = [(text, h, w) for h, w in LATENT_SIZES for text in TEXT_LENGTHS]
    results = {}
    with torch.no_grad():
        for text, h, w in cases:
            results[f"one-{text}-{h}x{w}"] = transformer(**transformer_inputs(transformer, text, h, w))[0]
        for mode in MODES:
            if mode == "ring":
                cpu_flash_stand_in()
            applied = ContextParallelPass().apply(bundle, ParallelConfig(mode, 2), PassContext())
            for text, h, w in cases:
                results[f"{mode}-{text}-{h}x{w}"] = transformer(**transformer_inputs(transformer, text, h, w))[0]
            applied.extension.remove()
    save_file({k: v.contiguous() for k, v in results.items()}, out / "lengths.safetensors")
    distributed.stop()


def main() -> None:
    if sys.argv[1] == "lengths":
        out = Path(sys.argv[2]) / f"rank{os.environ['RANK']}"
        out.mkdir(parents=True, exist_ok=True)
        torch.set_num_threads(1)
        return lengths(out)
    jobs = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2]) / f"rank{os.environ['RANK']}"
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)

    from framepack_turbo import api
    from framepack_turbo.errors import Cancelled
    from framepack_turbo.optim.stepcache import HookedCache
    from framepack_turbo.pipeline.events import CancelToken, StepProgress
    from framepack_turbo.settings import Settings

    seen: list = []
    original = HookedCache.record

    def spy(self, kind, context, detail=""):
        seen.append([self.name, context.name, context.step_index, kind])
        original(self, kind, context, detail)

    HookedCache.record = spy
    api.INCOMPATIBLE_PAUSE_S = 0.0  # ring on a CPU is refused for users; here it runs on the stand-in
    loaded: dict[str, api.FramePack] = {}
    for job in jobs:
        values = {"model": job["model"], "device": "cpu", "parallel_degree": 2, **job.get("settings", {})}
        if values.get("parallel_mode") == "ring":
            cpu_flash_stand_in()
        settings = Settings.load(values, source="api")
        fp = loaded.get(job["model"])
        if fp is None or not fp.reconfigure(settings, ignore_incompatible=True):
            fp = loaded[job["model"]] = api.FramePack.load(settings=settings, ignore_incompatible=True)
        seen.clear()
        video = out / f"{job['name']}.mp4"
        token, on_event = CancelToken(), None
        if job.get("cancel_in_section") and os.environ["RANK"] == "0":  # the user's cancel reaches rank 0 alone

            def on_event(event, at=job["cancel_in_section"], token=token):
                if isinstance(event, StepProgress) and event.section == at:
                    token.cancel()

        try:
            result = fp.generate(EXAMPLE, job["prompt"], video, on_event=on_event, cancel=token, **job["options"])
        except Cancelled as stopped:
            result = stopped.result
        if result.latents is not None:
            save_file({"latents": result.latents.contiguous()}, out / f"{job['name']}.safetensors")
        facts = {
            "decisions": seen,
            "video": video.exists(),
            "parallel": result.sidecar.get("parallel"),
            "sections_done": result.sidecar.get("sections_done"),
            "latent_frames": 0 if result.latents is None else result.latents.shape[2],
        }
        (out / f"{job['name']}.json").write_text(json.dumps(facts))


if __name__ == "__main__":
    main()
