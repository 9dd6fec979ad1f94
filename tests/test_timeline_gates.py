"""The timeline gates of the shipped `tiny` model (train/gates.py): a prompt change followed, an end frame
reached, a keyframe passed through, on held-out scenes. The manifest records the 20-scene gates; here the
first scenes of each are run again on the shipped files and must give the recorded outcomes: one scene per
gate in the fast tier, four in the `gate` tier.

The shipped weights pass the end-frame gate. They were never trained on prompt changes or keyframes and
do not pass those gates yet (the manifest says so, issue 24 tracks it): for those the record is held to
what the files give, not to the bar."""

from __future__ import annotations

import json

import pytest

from framepack_turbo.models.presets import TINY_WEIGHTS
from framepack_turbo.train import gates

CHECKED = 4  # scenes of each gate run again in the gate tier (of the manifest's 20): about 3.5 minutes on two cores
MIN_ACCURACY = 0.8  # the bar: 80% of held-out scenes


@pytest.fixture(scope="module")
def recorded():
    return json.loads((TINY_WEIGHTS / "manifest.json").read_text())["timeline_gate"]


def _rerun(trained, recorded, count):
    seed = recorded["seed"]
    return {
        "prompt_change": {v: gates.prompt_change(trained, v, seed, count) for v in ("inverted", "f1")},
        "prompt_change_guided": {
            v: gates.prompt_change(trained, v, seed, count, change_cfg=gates.CHANGE_CFG) for v in ("inverted", "f1")
        },
        "end_frame": gates.end_frame(trained, seed, count),
        "keyframe": gates.keyframe(trained, seed, count),
    }


@pytest.fixture(scope="module")
def rerun(trained, recorded):
    return _rerun(trained, recorded, CHECKED)


def _pairs(recorded, rerun):
    yield "prompt_change inverted", recorded["prompt_change"]["inverted"], rerun["prompt_change"]["inverted"]
    yield "prompt_change f1", recorded["prompt_change"]["f1"], rerun["prompt_change"]["f1"]
    yield (
        "prompt_change_guided inverted",
        recorded["prompt_change_guided"]["inverted"],
        rerun["prompt_change_guided"]["inverted"],
    )
    yield "prompt_change_guided f1", recorded["prompt_change_guided"]["f1"], rerun["prompt_change_guided"]["f1"]
    yield "end_frame", recorded["end_frame"], rerun["end_frame"]
    yield "keyframe", recorded["keyframe"], rerun["keyframe"]


PASSING = ("end_frame",)  # the gates the shipped weights meet; the others wait for the fine-tune


def test_the_recorded_gates_are_held_out_and_the_end_frame_passes(recorded):
    assert recorded["seed"] == gates.TIMELINE_SEED
    for name, gate, _ in _pairs(recorded, recorded):
        assert gate["scenes"] == gates.GATE_SCENES, name
        if name in PASSING:
            assert gate["accuracy"] >= MIN_ACCURACY, (name, gate["accuracy"])
    # with the end image the last frame is nearer it than without in all but chance cases, where the
    # run without lands within 2 px of it anyway
    for case in recorded["end_frame"]["cases"]:
        assert case["nearer"] or case["without_px"] <= 2.0, case


def test_the_first_scene_of_each_gate_gives_its_recorded_case(trained, recorded):
    """The quick form (fast tier): the first scene of each gate (a prompt change, in F1 with its guidance; an
    end frame; a keyframe) made again, its outcome exactly the recorded one and its measured pixels within a
    pixel (another CPU's rounding moves a centroid, not a decision). The other series of the prompt-change
    gate (unguided, inverted) are the same gate at other settings: the `gate` tier runs them."""
    seed = recorded["seed"]
    quick = {
        "prompt_change_guided f1": (
            recorded["prompt_change_guided"]["f1"],
            gates.prompt_change(trained, "f1", seed, 1, change_cfg=gates.CHANGE_CFG),
        ),
        "end_frame": (recorded["end_frame"], gates.end_frame(trained, seed, 1)),
        "keyframe": (recorded["keyframe"], gates.keyframe(trained, seed, 1)),
    }
    for name, (gate, again) in quick.items():
        (mine,), theirs = again["cases"], gate["cases"][0]
        assert mine.keys() == theirs.keys(), name
        for key, value in theirs.items():
            if isinstance(value, float) and isinstance(mine[key], float):
                assert abs(mine[key] - value) <= 1.0, (name, key, mine, theirs)
            else:
                assert mine[key] == value, (name, key, mine, theirs)


@pytest.mark.gate
def test_the_shipped_files_give_the_recorded_outcomes(recorded, rerun):
    """Case by case on the first scenes (one either way, for another CPU's rounding), and the prompts and
    the boundary the change landed on are the ones recorded."""
    for name, gate, again in _pairs(recorded, rerun):
        mine, theirs = again["cases"], gate["cases"][:CHECKED]
        assert [c["prompt"] for c in mine] == [c["prompt"] for c in theirs], name
        differ = sum(a["ok"] != b["ok"] for a, b in zip(mine, theirs))
        assert differ <= 1, (name, mine, theirs)
    assert {c["change_s"] for c in rerun["prompt_change"]["f1"]["cases"]} == {2.4}  # 1.8 s snapped half up
