"""FramePack's own worker loop beside ours: the same computation, bit for bit?

Runs the `worker` function of FramePack's demo_gradio.py (inverted) and demo_gradio_f1.py (F1), read from
a checkout of its published source at run time (nothing of it is copied here), and `Generator.run`, over
one deterministic stand-in transformer in bf16 (it crops the text by its mask, as the real model does at
batch 1, and depends on every input) and stand-in encoders and VAE. Compares every transformer call's
inputs, every VAE decode (the latents) and the clip's float pixels, at 25 and 8 steps, with and without
real CFG and rescale, and over five sections. Needs `einops` and FramePack's source:

    git clone https://github.com/lllyasviel/FramePack /tmp/fp && pip install einops
    python scripts/compare_with_framepack.py /tmp/fp        # exit 1 unless every case is bit-identical
"""

from __future__ import annotations

import ast
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch

FP = Path(sys.argv[1])
sys.path.insert(0, str(FP))
for name in ("cv2", "torchvision"):  # imported by FramePack's utils, unused on this path
    sys.modules.setdefault(name, types.ModuleType(name))

from diffusers_helper import bucket_tools  # noqa: E402
from diffusers_helper import utils as fp_utils  # noqa: E402
from diffusers_helper.pipelines.k_diffusion_hunyuan import sample_hunyuan  # noqa: E402

BF16 = torch.bfloat16
OUT = Path(tempfile.mkdtemp(prefix="framepack-compare-"))
CANON = {  # FramePack's argument names -> diffusers' (what our generator passes)
    "latent_indices": "indices_latents",
    "clean_latents": "latents_clean",
    "clean_latent_indices": "indices_latents_clean",
    "clean_latents_2x": "latents_history_2x",
    "clean_latent_2x_indices": "indices_latents_history_2x",
    "clean_latents_4x": "latents_history_4x",
    "clean_latent_4x_indices": "indices_latents_history_4x",
    "image_embeddings": "image_embeds",
}


class StandInTransformer(torch.nn.Module):
    """Deterministic, depends on every input, crops the text by its mask as the real model does at batch 1."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1, dtype=BF16))
        self.calls: list[dict[str, torch.Tensor]] = []

    @property
    def dtype(self):
        return BF16

    @property
    def device(self):
        return torch.device("cpu")

    def forward(self, return_dict=False, attention_kwargs=None, **kw):
        # as both real models take them: latents in the model's dtype (FramePack's casts its float32 clean
        # latents inside), index sets whatever their batch dimension
        kw = {CANON.get(k, k): v for k, v in kw.items()}
        kw = {
            k: (v.flatten() if k.startswith("indices") else v.to(BF16) if k.startswith("latents") else v)
            for k, v in kw.items()
        }
        mask = kw.pop("encoder_attention_mask")
        text = kw["encoder_hidden_states"][:, mask[0].bool()]
        record = {k: v.detach().clone() for k, v in kw.items() if torch.is_tensor(v)}
        record["encoder_hidden_states"] = text.clone()  # what the model sees of the text
        self.calls.append(record)
        x = kw["hidden_states"].float()
        t = kw["timestep"].float().view(-1, 1, 1, 1, 1) / 1000
        g = kw["guidance"].float().view(-1, 1, 1, 1, 1) / 10000
        ctx = text.float().mean() + kw["pooled_projections"].float().mean() + kw["image_embeds"].float().mean()
        idx = (
            kw["indices_latents"].float().mean()
            + kw["indices_latents_clean"].float().mean()
            + kw["indices_latents_history_2x"].float().mean()
            + kw["indices_latents_history_4x"].float().mean()
        )
        clean = (
            kw["latents_clean"].float().mean(2, keepdim=True)
            + 0.5 * kw["latents_history_2x"].float().mean(2, keepdim=True)
            + 0.25 * kw["latents_history_4x"].float().mean(2, keepdim=True)
        )
        frames = torch.linspace(-1, 1, x.shape[2]).view(1, 1, -1, 1, 1)
        v = x * (0.9 + 0.1 * t) - clean * (1 - t) + 0.05 * torch.sin(x * 3 + ctx + 0.01 * idx) + 0.02 * g * frames
        return (v.to(BF16),)


class StandInVae:
    """Latents <-> pixels by fixed linear maps (decode: x8 nearest, 4(T-1)+1 frames)."""

    class config:
        scaling_factor = 0.476986
        temporal_compression_ratio = 4

    dtype = torch.float32
    device = torch.device("cpu")
    use_framewise_decoding = False
    tile_sample_min_num_frames = 16
    tile_sample_stride_num_frames = 12
    decoded: list[torch.Tensor] = []

    class _Out:
        def __init__(self, sample):
            self.sample = sample

    def decode(self, z):
        rgb = z[:, :3] * 0.7 + z[:, 3:6] * 0.2
        first, rest = rgb[:, :, :1], rgb[:, :, 1:].repeat_interleave(4, dim=2)
        out = torch.cat([first, rest], dim=2).repeat_interleave(8, dim=3).repeat_interleave(8, dim=4).tanh()
        StandInVae.decoded.append(out.clone())
        return self._Out(out)


def start_latent_of(pixels: torch.Tensor) -> torch.Tensor:
    """(1,3,1,H,W) in [-1,1] -> (1,16,1,H/8,W/8): the stand-in VAE encode (depends on the exact pixels)."""
    pooled = torch.nn.functional.avg_pool3d(pixels.float(), (1, 8, 8))
    return (
        torch.cat([pooled * (i + 1) / 16 for i in range(16 // 3 + 1)], dim=1)[:, :16] * StandInVae.config.scaling_factor
    )


LLAMA = torch.randn(1, 37, 32, generator=torch.Generator().manual_seed(1))
LLAMA_NEG = torch.randn(1, 21, 32, generator=torch.Generator().manual_seed(2))
CLIP = torch.randn(1, 24, generator=torch.Generator().manual_seed(3))
CLIP_NEG = torch.randn(1, 24, generator=torch.Generator().manual_seed(4))


def image_embeds_of(picture: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(picture)).float()
    return t.mean(dim=(0, 1)).view(1, 1, 3).repeat(1, 9, 8) / 255


# ---- FramePack's worker, from its source --------------------------------------------------------------


def framepack_run(variant, image: np.ndarray, prompt, n_prompt, seed, seconds, window, steps, cfg, gs, rs):
    source = (FP / ("demo_gradio.py" if variant == "inverted" else "demo_gradio_f1.py")).read_text()
    tree = ast.parse(source)
    worker = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "worker")
    model = StandInTransformer()
    vae = StandInVae()
    pixels_out = {}

    class Queue:
        def push(self, item):
            pass

        def top(self):
            return None

    stream = types.SimpleNamespace(output_queue=Queue(), input_queue=Queue())

    def encode_prompt_conds(p, *a):
        return (LLAMA.clone(), CLIP.clone()) if p == prompt else (LLAMA_NEG.clone(), CLIP_NEG.clone())

    def save(x, name, fps, crf):
        pixels_out["pixels"] = x.clone()

    def fail(*a, **k):
        raise AssertionError("not on this path")

    namespace = {
        "torch": torch,
        "np": np,
        "os": __import__("os"),
        "traceback": __import__("traceback"),
        "Image": __import__("PIL.Image", fromlist=["Image"]),
        "einops": sys.modules["einops"],
        "generate_timestamp": lambda: "job",
        "stream": stream,
        "high_vram": True,
        "gpu": torch.device("cpu"),
        "make_progress_bar_html": lambda *a: "",
        "unload_complete_models": fail,
        "load_model_as_complete": fail,
        "fake_diffusers_current_device": fail,
        "move_model_to_device_with_memory_preservation": fail,
        "offload_model_from_device_for_memory_preservation": fail,
        "text_encoder": None,
        "text_encoder_2": None,
        "tokenizer": None,
        "tokenizer_2": None,
        "image_encoder": None,
        "feature_extractor": None,
        "vae": vae,
        "transformer": model,
        "encode_prompt_conds": encode_prompt_conds,
        "crop_or_pad_yield_mask": fp_utils.crop_or_pad_yield_mask,
        "find_nearest_bucket": bucket_tools.find_nearest_bucket,
        "resize_and_center_crop": fp_utils.resize_and_center_crop,
        "outputs_folder": str(OUT / "framepack"),
        "vae_encode": lambda img, v: start_latent_of(img),
        "hf_clip_vision_encode": lambda img, fe, ie: types.SimpleNamespace(last_hidden_state=image_embeds_of(img)),
        "sample_hunyuan": sample_hunyuan,
        "vae_decode": lambda lat, v: v.decode(lat / v.config.scaling_factor).sample,
        "vae_decode_fake": lambda x: x,
        "soft_append_bcthw": fp_utils.soft_append_bcthw,
        "save_bcthw_as_mp4": save,
    }
    Path(str(OUT / "framepack")).mkdir(parents=True, exist_ok=True)
    model.initialize_teacache = lambda enable_teacache=False, num_steps=0: None
    exec(compile(ast.Module([worker], []), "demo_gradio.py", "exec"), namespace)
    namespace["worker"](image, prompt, n_prompt, seed, seconds, window, steps, cfg, gs, rs, 6, False, 16)
    return model.calls, pixels_out.get("pixels")


# ---- ours --------------------------------------------------------------------------------------------


def ours_run(variant, image: np.ndarray, prompt, n_prompt, seed, seconds, window, steps, cfg, gs, rs, tmp: Path):
    from framepack_turbo.models.loading import ModelBundle
    from framepack_turbo.models.presets import get_preset
    from framepack_turbo.pipeline import encode
    from framepack_turbo.pipeline import vae as vae_module
    from framepack_turbo.pipeline.generate import Generator
    from framepack_turbo.pipeline.options import GenerateOptions

    model, vae = StandInTransformer(), StandInVae()

    def prompt_embeddings(p, *a):
        llama, clip = (LLAMA, CLIP) if p == prompt else (LLAMA_NEG, CLIP_NEG)
        return encode.PromptEmbeddings(llama.clone(), torch.ones(1, llama.shape[1], dtype=torch.long), clip.clone(), ())

    encode.encode_prompt = prompt_embeddings
    encode.encode_image = lambda picture, fe, ie: image_embeds_of(picture)
    vae_module.encode = lambda pixels, v, generator=None: start_latent_of(pixels)
    bundle = ModelBundle(model, vae, None, None, None, None, None, None, get_preset("tiny-random"), "stand-in")
    bundle.modules = lambda: {"transformer": model}
    options = GenerateOptions(
        prompt=prompt,
        negative_prompt=n_prompt,
        seconds=seconds,
        variant=variant,
        seed=seed,
        steps=steps,
        window=window,
        distilled_guidance=gs,
        cfg=cfg,
        guidance_rescale=rs,
        resolution=640,
    )
    StandInVae.decoded = []
    from framepack_turbo.pipeline import generate as generate_module

    captured = {}
    to_uint8 = generate_module.video.to_uint8_frames

    def capture(pixels):
        captured["pixels"] = pixels.clone()
        return to_uint8(pixels)

    generate_module.video.to_uint8_frames = capture
    try:
        result = Generator(bundle).run(image, options, tmp / "ours.mp4")
    finally:
        generate_module.video.to_uint8_frames = to_uint8
    return model.calls, result, captured["pixels"]


def main():
    rng = np.random.default_rng(0)
    image = (rng.random((300, 500, 3)) * 255).astype(np.uint8)
    tmp = OUT / "ours"
    tmp.mkdir(parents=True, exist_ok=True)
    rows = []
    cases = [
        (v, steps, *g)
        for v in ("inverted", "f1")
        for steps in (25, 8)
        for g in ((1.0, "", 0.0, 2.4), (3.0, "blurry", 0.0, 2.4), (3.0, "blurry", 0.7, 2.4))
    ]
    cases += [
        ("inverted", 8, 1.0, "", 0.0, 6.0),
        ("f1", 8, 1.0, "", 0.0, 6.0),
    ]  # 5 sections: the [3, 2, 2, 1, 0] paddings
    for variant, steps, cfg, n_prompt, rs, seconds in cases:
        args = (variant, image, "a cat walks", n_prompt, 31337, seconds, 9, steps, cfg, 10.0, rs)
        StandInVae.decoded = []
        fp_calls, fp_pixels = framepack_run(*args)
        fp_decoded = list(StandInVae.decoded)
        StandInVae.decoded = []
        ours_calls, result, ours_pixels = ours_run(*args, tmp)
        ours_decoded = list(StandInVae.decoded)
        same_calls = len(fp_calls) == len(ours_calls) and all(
            a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
            for a, b in zip(fp_calls, ours_calls)
        )
        first_diff = next(
            (
                i
                for i, (a, b) in enumerate(zip(fp_calls, ours_calls))
                if a.keys() != b.keys() or not all(torch.equal(a[k], b[k]) for k in a)
            ),
            None,
        )
        same_decodes = len(fp_decoded) == len(ours_decoded) and all(
            torch.equal(a, b) for a, b in zip(fp_decoded, ours_decoded)
        )
        same_pixels = (
            fp_pixels is not None and fp_pixels.shape == ours_pixels.shape and torch.equal(fp_pixels, ours_pixels)
        )
        if not same_pixels and fp_pixels is not None and fp_pixels.shape == ours_pixels.shape:
            fp8 = (fp_pixels.float().clamp(-1, 1) * 127.5 + 127.5).round().to(torch.uint8)
            us8 = (ours_pixels.float().clamp(-1, 1) * 127.5 + 127.5).round().to(torch.uint8)
            diff = (fp8.int() - us8.int()).abs()
            print(
                f"   pixels differ: max {int(diff.max())} levels, {float((diff > 0).float().mean()) * 100:.2f}% of values"
            )
        if first_diff is not None:
            a, b = fp_calls[first_diff], ours_calls[first_diff]
            changed = [k for k in a if k in b and not torch.equal(a[k], b[k])]
            print("   first differing call", first_diff, changed, sorted(set(a) ^ set(b)))
        rows.append((steps, cfg, rs, len(fp_calls), same_calls, same_decodes, same_pixels))
        print(
            f"{variant} {seconds} s, steps {steps} cfg {cfg} rs {rs}: {len(fp_calls)} model calls; inputs "
            f"{'bit-identical' if same_calls else f'DIFFER from call {first_diff}'}; latents decoded "
            f"{'bit-identical' if same_decodes else 'DIFFER'} ({len(fp_decoded)} decodes); pixels "
            f"{'bit-identical' if same_pixels else 'DIFFER'} {tuple(ours_pixels.shape)}",
            flush=True,
        )
    return rows


if __name__ == "__main__":
    sys.exit(0 if all(all(row[-3:]) for row in main()) else 1)
