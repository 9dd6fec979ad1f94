"""Attention backends (transformer) and encoder attention: selection, fallback, the switch, fast start."""

import logging

import pytest
import torch

from framepack_turbo.api import FramePack
from framepack_turbo.hardware import Hardware
from framepack_turbo.models.loading import load_bundle
from framepack_turbo.optim.attention import AttentionConfig, AttentionPass, attention_backends, choose_backend
from framepack_turbo.optim.base import PassContext
from framepack_turbo.optim.encoder_attention import EncoderAttentionConfig, EncoderAttentionPass

from .test_optim import _forward

CPU = Hardware()


def gpu(*modules):
    return Hardware("cuda", "GPU", 8, 80.0, 80.0, (9, 0), True, {m: True for m in modules}, ())


@pytest.mark.parametrize(
    "mode, hardware, backend",
    [
        ("standard", CPU, "native"),
        ("off", CPU, "_native_math"),
        ("aggressive", CPU, "native"),  # nothing faster usable on a CPU: SDPA, never a crash
        ("aggressive", gpu(), "native"),
        ("aggressive", gpu("xformers"), "xformers"),
        ("aggressive", gpu("xformers", "flash_attn"), "flash"),
        ("aggressive", gpu("flash_attn", "flash_attn_interface"), "_flash_3"),
        ("aggressive", gpu("sageattention", "flash_attn_interface"), "sage"),
    ],
)
def test_backend_choice(mode, hardware, backend):
    assert choose_backend(mode, hardware)[0] == backend


def test_math_attention_matches_sdpa():
    bundle = load_bundle("tiny-random", device="cpu")
    ref = _forward(bundle.transformer)
    report = AttentionPass().apply(bundle, AttentionConfig("off"), PassContext(CPU))
    assert report.counters["backend"] == "_native_math"
    assert attention_backends(bundle.transformer) == {"AttentionBackendName._NATIVE_MATH"}
    torch.testing.assert_close(_forward(bundle.transformer), ref, rtol=1e-4, atol=1e-5)


def test_an_installed_kernel_diffusers_refuses_falls_back_to_the_next():
    """SageAttention 1.x (a pure-Triton wheel) is importable, but diffusers' sage backend needs 2.x: the pass
    must not crash the load; it takes the next candidate and says why."""
    bundle = load_bundle("tiny-random", device="cpu")
    refused = []
    original = bundle.transformer.set_attention_backend

    def pick(backend):
        if backend in ("sage", "xformers"):
            refused.append(backend)
            raise RuntimeError(f"Sage Attention backend '{backend}' is not usable because of missing package")
        original(backend)

    bundle.transformer.set_attention_backend = pick
    report = AttentionPass().apply(bundle, AttentionConfig("aggressive"), PassContext(gpu("sageattention", "xformers")))
    assert refused == ["sage", "xformers"] and report.counters["backend"] == "native"
    assert "sage refused (Sage Attention backend" in report.detail and "xformers refused" in report.detail


def test_standard_mode_is_not_a_pass():
    from framepack_turbo.optim import registry
    from framepack_turbo.settings import Settings

    assert not registry.get("attention").wanted(Settings.load({}))
    assert registry.get("attention").wanted(Settings.load({"xformers_mode": "off"}))
    assert AttentionPass().config(Settings.load({"xformers_mode": "off"})) == AttentionConfig("off")


def test_encoder_attention_switch_and_warning(caplog):
    bundle = load_bundle("tiny-random", device="cpu")
    ids = bundle.tokenizer(["a cat walks"], return_tensors="pt").input_ids
    with torch.no_grad():
        ref = bundle.text_encoder(input_ids=ids).last_hidden_state
    with caplog.at_level(logging.INFO):
        report = EncoderAttentionPass().apply(bundle, EncoderAttentionConfig("eager", warn=False), PassContext(CPU))
    assert "BETTERTRANSFORMER" not in caplog.text
    assert all(
        getattr(bundle, n).config._attn_implementation == "eager"
        for n in ("text_encoder", "text_encoder_2", "image_encoder")
    )
    assert "LLaMA sdpa -> eager" in report.detail
    with torch.no_grad():
        torch.testing.assert_close(bundle.text_encoder(input_ids=ids).last_hidden_state, ref, rtol=1e-4, atol=1e-5)
    with caplog.at_level(logging.INFO):
        EncoderAttentionPass().apply(bundle, EncoderAttentionConfig("auto"), PassContext(CPU))
    assert "BETTERTRANSFORMER" in caplog.text and bundle.text_encoder.config._attn_implementation == "sdpa"


def test_bettertransformer_off_by_default_and_flag_turns_it_off():
    from framepack_turbo.optim import registry
    from framepack_turbo.settings import Settings, parse_flags

    assert not registry.get("encoder_attention").wanted(Settings.load({}))
    assert EncoderAttentionPass().config(Settings.load({"enable_bettertransformer": True})).implementation == "auto"
    s = Settings.load(parse_flags(["--enable-bettertransformer", "--disable-bettertransformer"]))
    assert s.enable_bettertransformer is False


def test_fast_start_skips_and_says_so(caplog):
    with caplog.at_level(logging.INFO):
        fp = FramePack.load("tiny-random", fast_start=True, enable_compile=True, enable_bettertransformer=True)
    status = {p.name: p.status for p in fp.plan.passes}
    assert status["compile"] == "skipped" and status["encoder_attention"] == "skipped"
    assert "fast-start-skips" in caplog.text and "skips torch.compile" in caplog.text
    assert fp.extension("compile") is None  # nothing was compiled


@pytest.mark.slow
def test_regional_compile_compiles_each_block_kind_once_and_never_again_across_sections(tmp_path):
    from framepack_turbo.optim.compile import compiled_graph_count
    from framepack_turbo.pipeline.events import SectionDone

    from .conftest import EXAMPLE_IMAGE

    torch._dynamo.reset()
    fp = FramePack.load("tiny-random", enable_compile=True)
    start = compiled_graph_count()
    after_section = []
    fp.generate(
        EXAMPLE_IMAGE,
        "a cat",
        out=tmp_path / "c.mp4",
        seconds=4,
        steps=2,
        resolution=64,
        on_event=lambda e: after_section.append(compiled_graph_count()) if isinstance(e, SectionDone) else None,
    )
    assert len(after_section) == 3
    assert after_section[0] - start == 2  # one graph per block kind (dual, single), reused by every block
    assert after_section[-1] == after_section[0]  # no recompilation in the next sections
    assert all(not s.failed and s.calls["compiled"] > 0 for s in fp.extension("compile").states.values())
