"""The training side of the shipped tiny model: the procedural world, checkpoints, and training examples
laid out exactly as the generator lays out its sections."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from framepack_turbo.pipeline.sections import plan_sections
from framepack_turbo.train import checkpoint, ship, world
from framepack_turbo.train.transformer import TransformerTraining, prompts, section_example


def test_world_is_deterministic_and_keeps_the_object_in_frame():
    for motion in world.MOTIONS:
        for seed in range(5):
            scene = world.random_scene(np.random.default_rng(seed), 109, motion)
            a, b = world.render(scene, 109, 64), world.render(scene, 109, 64)
            assert a.shape == (109, 64, 64, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
            track = world.color_centroid(a, scene.color)
            assert not np.isnan(track).any()  # found in every frame
            assert world.observed_motion(a, scene.color) == motion  # the gate's tracker reads the truth
            assert scene.prompt.startswith(f"the {scene.color} {scene.shape} ")


def test_prompts_cover_the_world():
    all_prompts = prompts()
    assert len(all_prompts) == len(set(all_prompts)) == len(world.COLORS) * len(world.SHAPES) * len(world.MOTIONS)
    assert "the red circle moves right" in all_prompts and "the blue square stays still" in all_prompts


def test_transformer_schedule_is_the_shipped_runs_and_anneals_to_zero():
    """Training from nothing follows the shipped weights' learning rate: a cosine per resumed run, each
    restart higher than where the run before it ended, and the last run decays to zero at `steps`."""
    cfg = TransformerTraining()
    lrs = np.array([cfg.lr_at(s) for s in range(cfg.steps)])
    assert cfg.schedule[-1][0] == cfg.steps and lrs.max() <= cfg.lr and lrs.min() >= 0
    assert lrs[-1] < 1e-3 * cfg.lr  # annealed
    ends = [until for until, _, _ in cfg.schedule[:-1]]
    for end in ends:  # a restart at every resume, and a smooth decay between them
        assert lrs[end] > lrs[end - 1]
    within = np.diff(lrs[200:])  # after the warm-up
    restarts = {end - 201 for end in ends}
    assert all(d <= 1e-12 for i, d in enumerate(within) if i not in restarts)
    # A run inside the schedule (to 42000): the cosine over its own length, as `--steps 42000` ran it.
    assert np.isclose(cfg.lr_at(36000), cfg.lr * 0.5 * (1 + np.cos(np.pi * 36000 / 42000)))


def test_gate_scenes_are_balanced_and_apart_from_the_development_sets():
    """The direction gate's scenes: every motion equally often, and none of them a scene of the sets the
    recipe was chosen on."""
    scenes = ship.held_out_scenes(ship.GATE_CASES)
    assert [s.motion for s in scenes].count("grow") == ship.GATE_CASES // len(world.MOTIONS)
    assert {s.motion for s in scenes} == set(world.MOTIONS)
    assert ship.HELD_OUT_SEED not in ship.DEVELOPMENT_SEEDS
    for seed in ship.DEVELOPMENT_SEEDS:
        assert not set(ship.held_out_scenes(ship.GATE_CASES, seed=seed)) & set(scenes)


def test_checkpoint_resume_continues_exactly(tmp_path):
    def run(steps, first, model, opt):
        for i in range(first, first + steps):
            x = torch.randn(4, 3, generator=torch.Generator().manual_seed(i))
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()

    torch.manual_seed(0)
    straight = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(straight.parameters(), lr=0.1)
    run(4, 0, straight, opt)
    torch.manual_seed(0)
    resumed = torch.nn.Linear(3, 2)
    opt2 = torch.optim.AdamW(resumed.parameters(), lr=0.1)
    run(2, 0, resumed, opt2)
    checkpoint.save(tmp_path / "ckpt", resumed, opt2, {"step": 2})
    fresh = torch.nn.Linear(3, 2)
    opt3 = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    assert checkpoint.load(tmp_path / "ckpt", fresh, opt3) == {"step": 2}
    run(2, 2, fresh, opt3)
    for p, q in zip(straight.parameters(), fresh.parameters()):
        assert torch.allclose(p, q, atol=1e-6)  # the optimizer's moments came back too
    assert checkpoint.load(tmp_path / "missing", fresh, opt3) is None


@pytest.mark.parametrize("variant", ["inverted", "f1"])
@pytest.mark.parametrize("n", [1, 3, 5])
def test_training_sections_match_the_generators_layout(variant, n):
    """Replays the generator's history bookkeeping (generate.py) with true latents: every section's
    context must equal the training example's."""
    window, ctx = 9, 19
    z = torch.randn(2, 16, 1 + n * window, 4, 4)
    start = z[:, :, :1]
    history = torch.zeros(2, 16, ctx, 4, 4)
    if variant == "f1":
        history = torch.cat([history, start], dim=2)
    for k, section in enumerate(plan_sections(variant, n * window * 4 / 30, window)):
        assert section.total == n
        if variant == "inverted":
            post, two_x, four_x = history[:, :, :ctx].split([1, 2, 16], dim=2)
            position = n - 1 - k
        else:
            four_x, two_x, post = history[:, :, -ctx:].split([16, 2, 1], dim=2)
            position = k
        truth = z[:, :, 1 + position * window : 1 + (position + 1) * window]
        x0, clean, ex_2x, ex_4x, idx = section_example(z, variant, n, k, window)
        assert torch.equal(x0, truth)
        assert torch.equal(clean, torch.cat([start, post], dim=2))
        assert torch.equal(ex_2x, two_x) and torch.equal(ex_4x, four_x)
        assert idx.as_lists() == section.indices.as_lists()
        history = torch.cat([truth, history], dim=2) if variant == "inverted" else torch.cat([history, truth], dim=2)


def test_decoder_finetune_keeps_the_encoder_and_its_latent_scale(tmp_path):
    """The transformer trains on the encoder's latents while the decoder goes on training: the decoder
    stage must change the decoder only, and keep `scaling_factor`, resuming where it stopped."""
    from diffusers import AutoencoderKLHunyuanVideo

    from framepack_turbo.train.vae import VAE_CONFIG, VaeTraining, finetune_decoder

    torch.manual_seed(0)
    AutoencoderKLHunyuanVideo(**VAE_CONFIG, scaling_factor=0.75).save_pretrained(tmp_path / "vae")
    before = AutoencoderKLHunyuanVideo.from_pretrained(tmp_path / "vae").state_dict()
    cfg = VaeTraining(steps=2, batch=1, frames=5, save_every=1, eval_clips=1)
    record = finetune_decoder(tmp_path, cfg, progress=False)
    after = AutoencoderKLHunyuanVideo.from_pretrained(tmp_path / "vae")
    assert after.config.scaling_factor == 0.75 and record["steps"] == 2
    changed = {k.split(".")[0] for k, v in after.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"decoder"} or changed == {"decoder", "post_quant_conv"}
    again = finetune_decoder(tmp_path, cfg, progress=False)  # resumes at step 2: nothing left to do
    assert again["steps"] == 2 and torch.equal(
        AutoencoderKLHunyuanVideo.from_pretrained(tmp_path / "vae").decoder.conv_out.conv.weight,
        after.decoder.conv_out.conv.weight,
    )
