"""TorchScript: trace equals eager on the tiny preset, strict refuses new shapes, non-strict re-traces,
save/load round trip, script falls back to trace."""

import numpy as np
import pytest
import torch

from framepack_turbo.api import FramePack
from framepack_turbo.hardware import Hardware
from framepack_turbo.models.loading import load_bundle
from framepack_turbo.optim.base import PassContext
from framepack_turbo.optim.jit import JitConfig, JitPass, JitShapeError, TracedTransformer

from .conftest import EXAMPLE_IMAGE
from .test_optim import _inputs


def _call(t, **shape):
    kwargs = _inputs(t.original if isinstance(t, TracedTransformer) else t, **shape)
    with torch.no_grad():
        return t(**kwargs)[0]


def test_trace_equals_eager_and_retraces_new_shapes():
    bundle = load_bundle("tiny-random", device="cpu")
    eager = bundle.transformer
    ref, ref2 = _call(eager), _call(eager, h=8, w=10)
    report = JitPass().apply(bundle, JitConfig(), PassContext(Hardware()))
    traced = bundle.transformer
    assert isinstance(traced, TracedTransformer) and "re-traces" in report.detail
    assert traced.dtype == eager.dtype and traced.config is eager.config  # stands in for the model
    torch.testing.assert_close(_call(traced), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_call(traced, h=8, w=10), ref2, rtol=1e-5, atol=1e-6)
    assert traced.traced_count == 2
    _call(traced)
    assert traced.traced_count == 2  # a known shape reuses its trace


def test_strict_refuses_other_shapes():
    bundle = load_bundle("tiny-random", device="cpu")
    JitPass().apply(bundle, JitConfig(strict=True), PassContext(Hardware()))
    _call(bundle.transformer)
    with pytest.raises(JitShapeError, match="JIT_STRICT.*traced for.*FRAMEPACK_JIT_STRICT=0"):
        _call(bundle.transformer, h=8, w=10)


def test_save_and_load_round_trip(tmp_path):
    path = tmp_path / "t.pt"
    bundle = load_bundle("tiny-random", device="cpu")
    ref = _call(bundle.transformer)
    JitPass().apply(bundle, JitConfig(save=path), PassContext(Hardware()))
    _call(bundle.transformer)
    assert path.exists() and path.with_suffix(".signature.json").exists()
    fresh = load_bundle("tiny-random", device="cpu")
    JitPass().apply(fresh, JitConfig(load=path, strict=True), PassContext(Hardware()))
    assert fresh.transformer.traced_count == 0  # nothing traced: the loaded trace serves
    torch.testing.assert_close(_call(fresh.transformer), ref, rtol=1e-5, atol=1e-6)


def test_script_falls_back_to_trace():
    bundle = load_bundle("tiny-random", device="cpu")
    report = JitPass().apply(bundle, JitConfig(mode="script"), PassContext(Hardware()))
    assert "tracing instead" in report.detail and isinstance(bundle.transformer, TracedTransformer)


def test_generation_with_jit_matches_eager(tiny, tmp_path):
    fp = FramePack.load("tiny-random", jit_mode="trace", jit_save=str(tmp_path / "j.pt"))
    got = fp.generate(EXAMPLE_IMAGE, "a cat", out=tmp_path / "j.mp4", seconds=2, steps=2, resolution=64)
    ref = tiny.generate(EXAMPLE_IMAGE, "a cat", out=tmp_path / "e.mp4", seconds=2, steps=2, resolution=64)
    assert got.frames.shape == ref.frames.shape
    assert np.abs(got.frames.astype(int) - ref.frames).max() <= 1  # same within rounding of the last bit
    assert fp.bundle.transformer.traced_count == 1  # both sections share one trace
