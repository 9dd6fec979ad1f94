"""The section schedule and packing layout, against hand-computed cases."""

import pytest

from framepack_turbo.pipeline.sections import (
    f1_indices,
    inverted_indices,
    inverted_paddings,
    plan_sections,
    section_count,
    total_latent_frames,
    total_pixel_frames,
)


@pytest.mark.parametrize(
    "seconds, window, expected",
    [
        (2, 9, 2),  # 60 / 36 = 1.67 -> 2
        (1, 9, 1),  # 0.83 -> 1
        (0.1, 9, 1),  # rounds to 0, floored at 1
        (5, 9, 4),  # 4.17 -> 4
        (10, 9, 8),  # 8.33 -> 8
        (60, 9, 50),  # 1800 / 36 = 50
        (5, 16, 2),  # 150 / 64 = 2.34 -> 2
        (3, 9, 2),  # 2.5 -> 2 (Python rounds half to even, as FramePack)
    ],
)
def test_section_count(seconds, window, expected):
    assert section_count(seconds, window) == expected


@pytest.mark.parametrize(
    "n, expected",
    [
        (1, [0]),
        (2, [1, 0]),
        (3, [2, 1, 0]),
        (4, [3, 2, 1, 0]),
        (5, [3, 2, 2, 1, 0]),
        (8, [3, 2, 2, 2, 2, 2, 1, 0]),
    ],
)
def test_inverted_paddings(n, expected):
    assert inverted_paddings(n) == expected


def test_inverted_layout_with_padding():
    # [1 pre | 1*9 blank | 9 noisy | 1 post | 2 2x | 16 4x] = 38 positions
    idx = inverted_indices(padding=1, window=9).as_lists()
    assert idx["clean"] == [0, 19]
    assert idx["latents"] == list(range(10, 19))
    assert idx["clean_2x"] == [20, 21]
    assert idx["clean_4x"] == list(range(22, 38))


def test_inverted_layout_last_section_has_no_blank():
    idx = inverted_indices(padding=0, window=9).as_lists()
    assert idx["clean"] == [0, 10]
    assert idx["latents"] == list(range(1, 10))
    assert idx["clean_2x"] == [11, 12]
    assert idx["clean_4x"] == list(range(13, 29))


def test_inverted_layout_other_window():
    idx = inverted_indices(padding=2, window=4).as_lists()
    assert idx["latents"] == [9, 10, 11, 12]
    assert idx["clean"] == [0, 13]
    assert idx["clean_2x"] == [14, 15]
    assert idx["clean_4x"] == list(range(16, 32))


def test_f1_layout():
    # [1 start | 16 4x | 2 2x | 1 1x | 9 noisy]
    idx = f1_indices(window=9).as_lists()
    assert idx["clean"] == [0, 19]
    assert idx["clean_4x"] == list(range(1, 17))
    assert idx["clean_2x"] == [17, 18]
    assert idx["latents"] == list(range(20, 29))


@pytest.mark.parametrize("n, window, latents, pixels", [(1, 9, 10, 37), (2, 9, 19, 73), (5, 9, 46, 181), (2, 4, 9, 33)])
def test_total_frames(n, window, latents, pixels):
    assert total_latent_frames(n, window) == latents
    assert total_pixel_frames(n, window) == pixels


def test_plan_inverted_two_seconds():
    plan = plan_sections("inverted", 2, 9)
    assert [s.padding for s in plan] == [1, 0]
    assert [s.is_last for s in plan] == [False, True]
    assert [s.number for s in plan] == [0, 1]
    assert plan[0].indices.as_lists() == inverted_indices(1, 9).as_lists()


def test_plan_f1():
    plan = plan_sections("f1", 5, 9)
    assert len(plan) == 4
    assert [s.is_last for s in plan] == [False, False, False, True]
    assert all(s.indices.as_lists() == f1_indices(9).as_lists() for s in plan)


def test_plan_unknown_variant():
    with pytest.raises(ValueError, match="unknown variant"):
        plan_sections("backwards", 2, 9)
