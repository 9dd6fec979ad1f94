"""Conditioning over time (pipeline/timeline.py and the generator's use of it): timestamped prompts snapped to
section boundaries and blended, keyframes as anchors, the end frame in the history, text-to-video."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from framepack_turbo.errors import InputError
from framepack_turbo.pipeline import encode
from framepack_turbo.pipeline.timeline import (
    keyframe_for,
    parse_keyframe,
    parse_prompt,
    parse_prompt_at,
    place_keyframes,
    plan_timeline,
    prompt_changes,
    prompt_weights,
    section_seconds,
    time_position,
)

from .conftest import EXAMPLE_IMAGE, ROOT

RED_CIRCLE = str(ROOT / "examples" / "red-circle.png")


def test_tags_and_the_default_prompt():
    default, timed = parse_prompt("a cat [1.8s: it jumps] sits [0s: it sits]  ")
    assert default == "a cat sits" and [(t.seconds, t.text) for t in timed] == [(0.0, "it sits"), (1.8, "it jumps")]
    assert parse_prompt("no tags,  kept  exactly\n") == ("no tags,  kept  exactly\n", [])  # FramePack's text
    with pytest.raises(InputError, match="has no text"):
        parse_prompt("[2s: ]")
    assert parse_prompt_at("1.8s:the red circle moves left").text == "the red circle moves left"
    for bad in ("abc", "x:y", "1.8:", "inf:x"):
        with pytest.raises(InputError, match="write TIME:TEXT"):
            parse_prompt_at(bad)


PLAN = dict(prompt_at=(), keyframes=(), end_image=None, variant="inverted", sections=3, window=9, seconds=3.6)


@pytest.mark.parametrize(
    "time, message",
    [(" -1s", "outside the clip"), ("1e308s", "outside the clip"), ("nan s", "write"), ("inf s", "write")],
)
def test_a_tag_at_a_time_prompt_at_refuses_is_refused_beside_a_valid_one(time, message):
    """Once left in the default prompt's text (the tag silently gone); now refused as --prompt-at refuses it."""
    with pytest.raises(InputError, match=message):
        plan_timeline(prompt=f"[0s: a red circle] [{time}: a blue square]", **PLAN)
    with pytest.raises(InputError, match=message):  # the same time through --prompt-at: the same rule
        at = parse_prompt_at(f"{time}:a blue square")
        plan_timeline(**{**PLAN, "prompt": "[0s: a red circle]", "prompt_at": ((at.seconds, at.text),)})


@pytest.mark.parametrize("prompt", ["[0s: right [1.2s: left]", "[0s: right", "calm [1.2s: a [red] ball]"])
def test_an_unclosed_tag_is_refused_not_absorbed_into_the_text(prompt):
    with pytest.raises(InputError, match="is not closed"):
        parse_prompt(prompt)


def test_brackets_that_look_like_tags_are_tags_or_refused_and_other_brackets_are_text():
    assert [(t.seconds, t.text) for t in parse_prompt("[ 1.2 s : x ] [.5S: y]")[1]] == [(0.5, "y"), (1.2, "x")]
    for bad in ("[0s: a] [1,2s: b]", "[1.2sec: b]", "[1_0s: b]", "[1.2.3s: b]"):
        with pytest.raises(InputError, match=r"write \[TIMEs: TEXT\]"):
            parse_prompt(bad)
    with pytest.raises(InputError, match="has no ':' before its text"):
        parse_prompt("[0s: a] [1.2s] b")
    for plain in ("a [red] ball", "[2 cats: playing]", "[nancy: hi]", "a [2] and [4k]", "half [ open", "x ] y"):
        assert parse_prompt(plain) == (plain, [])  # not tags: the prompt as typed
    assert parse_prompt("a [red] ball [0s: it rolls]") == ("a [red] ball", [parse_prompt("[0s: it rolls]")[1][0]])
    assert parse_prompt_at("1.8 S:x").seconds == 1.8  # the one time rule: the tag's and --prompt-at's
    with pytest.raises(InputError, match="write TIME:TEXT"):
        parse_prompt_at("1_0:x")


def test_a_bad_tag_on_the_command_line_is_one_line_exit_2(tmp_path):
    from typer.testing import CliRunner

    from framepack_turbo.cli import app

    args = ["generate", "--model", "tiny-random", "--out", str(tmp_path / "o.mp4"), "--seconds", "3.6", "--steps", "1"]
    args += ["--resolution", "64"]  # on a main that took the prompt, a quick clip: the test fails, not hangs
    for prompt, message in (("[0s: a] [-1s: b]", "outside the clip"), ("[0s: right [1.2s: left]", "not closed")):
        result = CliRunner().invoke(app, [*args, "--prompt", prompt])
        lines = [line for line in result.output.strip().splitlines() if line]
        assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], result.output


def test_times_snap_to_section_boundaries_and_map_to_generation_order():
    assert section_seconds(9) == pytest.approx(1.2)
    _, timed = parse_prompt("[0s: right] [1.8s: left]")
    changes = prompt_changes("", timed, 3, 9, 3.6)
    assert [(c.text, c.section, c.starts_s) for c in changes] == [("right", 0, 0.0), ("left", 2, 2.4)]  # half up
    assert [(c.section) for c in prompt_changes("", parse_prompt("[0s: a] [1.7s: b]")[1], 3, 9, 3.6)] == [0, 1]
    # the inverted variant generates the last section in time first
    assert [time_position("inverted", n, 3) for n in range(3)] == [2, 1, 0]
    assert [time_position("f1", n, 3) for n in range(3)] == [0, 1, 2]
    with pytest.raises(InputError, match="both land on the section starting at 0s"):
        prompt_changes("", parse_prompt("[0s: a] [0.2s: b]")[1], 3, 9, 3.6)
    with pytest.raises(InputError, match="outside the clip"):
        prompt_changes("", parse_prompt("[4s: a]")[1], 3, 9, 3.6)
    # an untagged default runs until the first tag
    default_first = prompt_changes("calm", parse_prompt("[2.4s: storm]")[1], 3, 9, 3.6)
    assert [(c.text, c.section) for c in default_first] == [("calm", 0), ("storm", 2)]


def test_blend_weights_ramp_over_the_sections_after_a_change():
    changes = prompt_changes("", parse_prompt("[0s: a] [1.2s: b]")[1], 5, 9, 6.0)
    assert prompt_weights(changes, 5, 0) == [{0: 1.0}, {1: 1.0}, {1: 1.0}, {1: 1.0}, {1: 1.0}]
    ramp = prompt_weights(changes, 5, 2)
    assert ramp[0] == {0: 1.0} and ramp[3:] == [{1: 1.0}, {1: 1.0}]
    assert ramp[1] == pytest.approx({0: 2 / 3, 1: 1 / 3}) and ramp[2] == pytest.approx({0: 1 / 3, 1: 2 / 3})
    assert all(sum(w.values()) == pytest.approx(1.0) for w in ramp)


def test_prompt_blend_pads_and_masks_the_shorter_sequence():
    a = encode.PromptEmbeddings(torch.ones(1, 3, 4), torch.ones(1, 3, dtype=torch.long), torch.ones(1, 2))
    b = encode.PromptEmbeddings(torch.full((1, 5, 4), 3.0), torch.ones(1, 5, dtype=torch.long), torch.zeros(1, 2))
    mixed = encode.blend_prompts([(a, 0.5), (b, 0.5)])
    assert mixed.llama.shape == (1, 5, 4) and mixed.mask.tolist() == [[1, 1, 1, 1, 1]]
    assert mixed.llama[0, 0, 0] == 2.0 and mixed.llama[0, 4, 0] == 1.5 and mixed.clip_pooled.tolist() == [[0.5, 0.5]]
    assert encode.blend_prompts([(a, 1.0)]) is a  # one prompt: the same tensors, bit for bit


def test_keyframes_snap_to_boundaries_and_anchor_the_sections_from_theirs_on():
    # 1.2 s sections: 1.5 s snaps to 1.2 s (boundary 1), 3.0 s half up to 3.6 s (boundary 3)
    placed = place_keyframes([(3.0, "late.png"), (1.5, "mid.png")], 5, 9, 6.0)
    assert [(k.path, k.section, k.starts_s) for k in placed] == [("mid.png", 1, 1.2), ("late.png", 3, 3.6)]
    assert [keyframe_for(placed, k) for k in range(5)] == [None, 0, 0, 1, 1]
    assert place_keyframes([(0.2, "early.png")], 5, 9, 6.0)[0].section == 1  # never onto the start image
    with pytest.raises(InputError, match=r"in \(0, 6\]"):
        place_keyframes([(0.0, "a.png")], 5, 9, 6.0)
    with pytest.raises(InputError, match="one keyframe per section"):
        place_keyframes([(1.3, "a.png"), (1.6, "b.png")], 5, 9, 6.0)


def test_a_keyframe_on_the_end_is_the_end_frame():
    args = dict(prompt="x", prompt_at=(), variant="inverted", sections=3, window=9, seconds=3.6)
    plan = plan_timeline(keyframes=((3.5, "last.png"),), end_image=None, **args)
    assert plan.end_image == "last.png" and plan.keyframes[0].section == 3
    assert any("it is the end frame" in note for note in plan.notes())
    with pytest.raises(InputError, match="lands on the clip's end, where --end-image already is"):
        plan_timeline(keyframes=((3.6, "last.png"),), end_image="end.png", **args)
    assert parse_keyframe("1.8:mid.png") == (1.8, "mid.png")
    with pytest.raises(InputError, match="write TIME:PATH"):
        parse_keyframe("mid.png")


@pytest.mark.parametrize("what", ["end", "keyframes"])
def test_f1_has_no_end_frame_or_keyframes(what):
    kwargs = {"end_image": "e.png"} if what == "end" else {"keyframes": ((1.0, "k.png"),)}
    args = dict(prompt="x", prompt_at=(), keyframes=(), end_image=None, sections=3, window=9, seconds=3.6)
    with pytest.raises(InputError, match="--variant inverted"):
        plan_timeline(**{**args, **kwargs}, variant="f1")
    assert plan_timeline(**{**args, **kwargs}, variant="inverted").sections == 3


def _calls(fp, **kwargs):
    """Every transformer call's keyword arguments of one clip."""
    calls = []
    hook = fp.bundle.transformer.register_forward_pre_hook(lambda m, a, kw: calls.append(dict(kw)), with_kwargs=True)
    try:
        result = fp.generate(kwargs.pop("image", EXAMPLE_IMAGE), kwargs.pop("prompt", "a cat"), **kwargs)
    finally:
        hook.remove()
    return result, calls


def test_each_section_sees_its_own_prompt_in_time_order(tiny, tmp_path):
    """Inverted: the first section generated is the last in time, so it gets the last prompt."""
    plain_a, a_calls = _calls(tiny, prompt="a cat walks", out=tmp_path / "a.mp4", seconds=3.6, steps=1, resolution=64)
    _, b_calls = _calls(tiny, prompt="a dog runs", out=tmp_path / "b.mp4", seconds=3.6, steps=1, resolution=64)
    timed, calls = _calls(
        tiny, prompt="[0s: a cat walks] [2.4s: a dog runs]", out=tmp_path / "t.mp4", seconds=3.6, steps=1, resolution=64
    )
    text = [c["encoder_hidden_states"] for c in calls]  # generation order: time sections 2, 1, 0
    assert torch.equal(text[0], b_calls[0]["encoder_hidden_states"])
    assert torch.equal(text[1], a_calls[1]["encoder_hidden_states"]) and torch.equal(
        text[2], a_calls[2]["encoder_hidden_states"]
    )
    record = json.loads(timed.sidecar_path.read_text())["timeline"]
    assert [(p["text"], p["starts_s"]) for p in record["prompts"]] == [("a cat walks", 0.0), ("a dog runs", 2.4)]


def test_the_end_frame_is_the_first_sections_post_latent_and_stays_as_context(tiny, tmp_path):
    _, plain = _calls(tiny, out=tmp_path / "p.mp4", seconds=2.4, steps=1, resolution=64)
    result, calls = _calls(
        tiny, out=tmp_path / "e.mp4", seconds=2.4, steps=1, resolution=64, end_image=RED_CIRCLE, end_strength=0.5
    )
    first_post = calls[0]["latents_clean"][:, :, 1:]
    assert torch.count_nonzero(plain[0]["latents_clean"][:, :, 1:]) == 0  # FramePack's zeros without an end frame
    assert torch.count_nonzero(first_post) > 0
    # the next section sees it in its 4x context (9 generated frames pushed it past 1x and 2x)
    end_in_4x = calls[1]["latents_history_4x"][:, :, 9 - 3]
    assert torch.allclose(end_in_4x.float(), first_post[:, :, 0].float(), atol=1e-2)
    assert result.sidecar["timeline"]["end_image"] == RED_CIRCLE


def test_keyframes_replace_the_start_anchor_from_their_section_on(tiny, tmp_path):
    _, calls = _calls(tiny, out=tmp_path / "k.mp4", seconds=3.6, steps=1, resolution=64, keyframes=((1.5, RED_CIRCLE),))
    anchors = [c["latents_clean"][:, :, :1] for c in calls]  # generation order: time sections 2, 1, 0
    assert torch.equal(anchors[0], anchors[1]) and not torch.equal(anchors[1], anchors[2])


def test_text_to_video_starts_from_a_blank_frame_with_no_image_embedding(tiny, tmp_path):
    result, calls = _calls(
        tiny, image=None, out=tmp_path / "t.mp4", seconds=1, steps=1, resolution=64, start_color="#336699"
    )
    assert torch.count_nonzero(calls[0]["image_embeds"]) == 0
    assert result.frames.shape == (37, 64, 64, 3) and result.sidecar["image"]["text_to_video"] == "#336699"
    with pytest.raises(InputError, match="start color 'plaid'"):
        tiny.generate(None, "a cat", out=tmp_path / "x.mp4", seconds=1, steps=1, resolution=64, start_color="plaid")


def test_a_prompt_change_in_the_inverted_variant_says_f1_follows_it_better():
    args = dict(prompt="[0s: a] [1.2s: b]", prompt_at=(), keyframes=(), end_image=None, sections=3, window=9)
    inverted = plan_timeline(variant="inverted", seconds=3.6, **args).notes()
    assert any("F1 follows prompt changes better" in note for note in inverted)
    assert not any("F1" in note for note in plan_timeline(variant="f1", seconds=3.6, **args).notes())
    one_prompt = plan_timeline(**{**args, "prompt": "a"}, variant="inverted", seconds=3.6).notes()
    assert not any("F1" in note for note in one_prompt)


@pytest.mark.slow
def test_prompt_change_guidance_pushes_only_the_changed_section_away_from_the_previous_prompt(tiny, tmp_path):
    """F1, 3 sections, the change at 1.2 s (section 2 of 3), 2 steps: the guided clip calls the model twice
    more, in section 2 only and with the first prompt; the section before the change is the same clip."""
    args = dict(prompt="[0s: a cat walks] [1.2s: a dog runs]", seconds=3.6, steps=2, resolution=64, variant="f1")
    plain, plain_calls = _calls(tiny, out=tmp_path / "p.mp4", **args)
    guided, calls = _calls(tiny, out=tmp_path / "g.mp4", prompt_change_cfg=4.0, **args)
    assert len(plain_calls) == 6 and len(calls) == 8
    text = [c["encoder_hidden_states"] for c in calls]  # section 1: 2 calls; section 2: (new, previous) x 2
    assert torch.equal(text[3], plain_calls[0]["encoder_hidden_states"])  # the previous prompt: the cat
    assert torch.equal(text[2], plain_calls[2]["encoder_hidden_states"])  # the section's own: the dog
    assert np.array_equal(guided.frames[:10], plain.frames[:10]) and not np.array_equal(guided.frames, plain.frames)
    assert guided.sidecar["options"]["prompt_change_cfg"] == 4.0
    # without a change it calls nothing more and changes nothing
    one = dict(args, prompt="a cat walks")
    same, same_calls = _calls(tiny, out=tmp_path / "s.mp4", prompt_change_cfg=4.0, **one)
    base, _ = _calls(tiny, out=tmp_path / "b.mp4", **one)
    assert len(same_calls) == 6 and np.array_equal(same.frames, base.frames)
    with pytest.raises(InputError, match="prompt change cfg=0.5"):
        tiny.generate(EXAMPLE_IMAGE, "a cat", out=tmp_path / "x.mp4", prompt_change_cfg=0.5)
