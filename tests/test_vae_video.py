"""Soft append, VAE shapes, mp4 writing and reading back, the sidecar."""

import json

import numpy as np
import pytest
import torch

from framepack_turbo import files
from framepack_turbo.pipeline import vae, video


def test_soft_append_hand_computed():
    earlier = torch.ones(1, 1, 4, 1, 1)
    later = torch.zeros(1, 1, 3, 1, 1)
    out = vae.soft_append(earlier, later, overlap=3)
    # earlier[:1] + blend of 3 with weights [1, .5, 0] + later[3:] (empty)
    assert out.flatten().tolist() == [1.0, 1.0, 0.5, 0.0]


def test_soft_append_lengths():
    a, b = torch.randn(1, 3, 33, 4, 4), torch.randn(1, 3, 73, 4, 4)
    assert vae.soft_append(b, a, 33).shape[2] == 73  # inverted: new 73 in front of 33 old
    assert vae.soft_append(a, b, 33).shape[2] == 73
    assert vae.soft_append(a, b, 0).shape[2] == 106
    with pytest.raises(ValueError):
        vae.soft_append(a, b[:, :, :10], 33)


def test_vae_frame_arithmetic(tiny_bundle):
    z = torch.randn(1, 16, 5, 4, 6)
    px = vae.decode(z, tiny_bundle.vae)
    assert px.shape == (1, 3, 17, 32, 48)  # 4*(5-1)+1 frames, 8x spatial
    lat = vae.encode(torch.zeros(1, 3, 1, 32, 48), tiny_bundle.vae)
    assert lat.shape == (1, 16, 1, 4, 6)


def test_preview_is_rgb_in_unit_range():
    out = vae.preview(torch.randn(1, 16, 3, 4, 4) * 5)
    assert out.shape == (1, 3, 3, 4, 4) and out.min() >= 0 and out.max() <= 1


def test_mp4_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    frames = np.repeat(rng.integers(0, 255, (1, 64, 96, 3), dtype=np.uint8), 12, axis=0)
    path = video.write_mp4(frames, tmp_path / "a" / "clip.mp4", crf=1)
    info = video.probe(path)
    assert (info.frames, info.width, info.height) == (12, 96, 64)
    assert (info.codec, info.pix_fmt, info.fps) == ("h264", "yuv420p", 30.0)
    assert info.profile == "High"  # what every player opens (CRF 0 would make it High 4:4:4 Predictive)
    back = video.read_frames(path)
    assert back.shape == frames.shape
    # yuv420p subsamples chroma: noise images lose detail, but the mean colour survives
    assert abs(float(back.mean()) - float(frames.mean())) < 3
    assert not list(path.parent.glob(".clip.*")), "temporary files must not be left behind"


def test_mp4_rejects_odd_sides(tmp_path):
    with pytest.raises(ValueError, match="even"):
        video.write_mp4(np.zeros((2, 65, 64, 3), np.uint8), tmp_path / "x.mp4")


def test_to_uint8_frames_range():
    px = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0]).view(1, 1, 5, 1, 1).expand(1, 3, 5, 2, 2)
    out = video.to_uint8_frames(px)
    assert out.shape == (5, 2, 2, 3)
    assert out[:, 0, 0, 0].tolist() == [0, 0, 128, 255, 255]


def test_json_is_atomic_and_readable(tmp_path):
    p = files.write_json({"a": 1, "path": tmp_path}, tmp_path / "x.json")
    assert json.loads(p.read_text())["a"] == 1
    assert [f.name for f in tmp_path.iterdir()] == ["x.json"]


def test_crf_zero_is_never_written(tmp_path):
    """CRF 0 with yuv420p is the High 4:4:4 Predictive profile browsers and QuickTime refuse: refused at every door."""
    from framepack_turbo.errors import InputError
    from framepack_turbo.pipeline.options import GenerateOptions
    from framepack_turbo.settings import Settings, SettingsError

    frames = np.zeros((3, 64, 64, 3), np.uint8)
    with pytest.raises(ValueError, match="High 4:4:4 Predictive"):
        video.write_mp4(frames, tmp_path / "x.mp4", crf=0)
    assert not (tmp_path / "x.mp4").exists()
    with pytest.raises(InputError, match="High 4:4:4 Predictive"):
        GenerateOptions(prompt="a", crf=0)
    with pytest.raises(SettingsError, match="--crf 0: 0 writes the High 4:4:4 Predictive profile"):
        Settings.load({"crf": 0}, environ={})
