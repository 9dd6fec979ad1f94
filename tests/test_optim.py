"""Weight passes: each changes the modules it should and no others, stays within a stated tolerance of the
baseline on the tiny preset, and the optimized-model cache round-trips exactly and refuses what does not fit."""

import json

import numpy as np
import pytest
import torch

from framepack_turbo.api import FramePack
from framepack_turbo.hardware import Hardware
from framepack_turbo.models.loading import load_bundle
from framepack_turbo.optim import artifact, bnb
from framepack_turbo.optim.base import PassContext
from framepack_turbo.optim.compile import guarded_compile
from framepack_turbo.optim.fp8 import Fp8Config, Fp8Pass
from framepack_turbo.optim.precision import LowPrecisionConfig, LowPrecisionPass
from framepack_turbo.optim.prune import PruneConfig, PrunePass, kept_indices
from framepack_turbo.optim.quant import QuantConfig, QuantPass
from framepack_turbo.optim.select import LinearFilter, block_stacks, selected

CPU = Hardware(bf16=True)


def _inputs(t, h=6, w=8):
    g = torch.Generator().manual_seed(1)
    cfg = t.config

    def r(*shape):
        return torch.randn(*shape, generator=g)

    return dict(
        hidden_states=r(1, 16, 9, h, w),
        timestep=torch.tensor([900.0]),
        encoder_hidden_states=r(1, 7, cfg.text_embed_dim),
        encoder_attention_mask=torch.ones(1, 7),
        pooled_projections=r(1, cfg.pooled_projection_dim),
        image_embeds=r(1, 16, cfg.image_proj_dim),
        indices_latents=torch.arange(1, 10),
        guidance=torch.tensor([10000.0]),
        latents_clean=r(1, 16, 2, h, w),
        indices_latents_clean=torch.tensor([0, 10]),
        latents_history_2x=r(1, 16, 2, h, w),
        indices_latents_history_2x=torch.tensor([11, 12]),
        latents_history_4x=r(1, 16, 16, h, w),
        indices_latents_history_4x=torch.arange(13, 29),
        return_dict=False,
    )


def _forward(t):
    with torch.no_grad():
        inputs = _inputs(t)
        dtype = t.dtype
        inputs = {
            k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() and k != "timestep" else v)
            for k, v in inputs.items()
        }
        return t(**inputs)[0].float()


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _weights(module):
    """name -> (type, dtype) of every parameter: what a pass may change."""
    return {n: (type(p.data).__name__, p.dtype) for n, p in module.named_parameters()}


@pytest.fixture
def fresh():
    return load_bundle("tiny-random", device="cpu")


def _changed(before, after):
    return {n for n in before if before[n] != after.get(n)}


def test_filter_selects_block_linears_only(fresh):
    t = fresh.transformer
    names = selected(t, LinearFilter(block_stacks(t)))
    assert names and all(n.startswith(("transformer_blocks.", "single_transformer_blocks.")) for n in names)
    assert not any("norm" in n for n in names)
    assert "single_transformer_blocks.0.proj_out" in names  # a block's output projection is a normal linear
    assert "proj_out" not in names  # the final projection is not


def test_low_precision_changes_what_it_says(fresh):
    before = _weights(fresh.transformer)
    ref = _forward(fresh.transformer)
    vae_before = {n: p.dtype for n, p in fresh.vae.named_parameters()}
    report = LowPrecisionPass().apply(fresh, LowPrecisionConfig(), PassContext(CPU))
    after = _weights(fresh.transformer)
    kept = {n for n in after if n.startswith("proj_out.")}  # FramePack's float32 output: the projection alone
    assert all(after[n][1] == torch.float32 for n in kept)
    assert all(after[n][1] == torch.bfloat16 for n in after if n not in kept)
    assert _changed(before, after) == set(before) - kept
    assert fresh.text_encoder.dtype == torch.bfloat16 and fresh.image_encoder.dtype == torch.bfloat16
    assert {n: p.dtype for n, p in fresh.vae.named_parameters()} == vae_before
    assert "transformer.proj_out" in report.detail and "norm_out" not in report.detail
    out = _forward(fresh.transformer)
    assert out.dtype == torch.float32
    assert _rel(out, ref) < 0.05  # bf16: measured ~0.01 on tiny


@pytest.mark.parametrize(
    "config, tensor_type, tolerance",
    [
        (QuantConfig(8, "dynamic"), "Int8Tensor", 0.05),  # measured ~0.005
        (QuantConfig(8, "weight-only"), "Int8Tensor", 0.05),
        (QuantConfig(4, group_size=32), "IntxUnpackedToInt8Tensor", 0.3),  # measured ~0.08
    ],
)
def test_quant_touches_block_linears_only(fresh, config, tensor_type, tolerance):
    t = fresh.transformer
    expected = {f"{n}.weight" for n in selected(t, LinearFilter(block_stacks(t)))}
    before, ref = _weights(t), _forward(t)
    report = QuantPass().apply(fresh, config, PassContext(CPU))
    after = _weights(t)
    assert _changed(before, after) == expected
    assert all(after[n][0] == tensor_type for n in expected)
    assert report.counters["weight_bytes_after"] < report.counters["weight_bytes_before"]
    assert _rel(_forward(t), ref) < tolerance


def test_int4_leaves_out_linears_the_group_does_not_divide(fresh):
    report = QuantPass().apply(
        fresh, QuantConfig(4, group_size=128), PassContext(CPU)
    )  # tiny widths are 32, 64 and 128
    assert report.counters["left_out"] > 0 and "left out" in report.detail
    for name, module in fresh.transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and type(module.weight.data).__name__ == "IntxUnpackedToInt8Tensor":
            assert module.in_features % 128 == 0, name


def test_fp8_storage_with_target_and_exclude_keys(fresh):
    t = fresh.transformer
    before, ref = _weights(t), _forward(t)
    report = Fp8Pass().apply(fresh, Fp8Config(target_keys=("attn",), exclude_keys=("to_out",)), PassContext(CPU))
    after = _weights(t)
    changed = _changed(before, after)
    assert changed and all(".attn." in n and "to_out" not in n for n in changed)
    assert all(after[n][1] == torch.float8_e4m3fn for n in changed)
    assert not report.counters["compute"] and "storage" in report.detail
    assert _rel(_forward(t), ref) < 0.15  # fp8 e4m3 weights: measured ~0.03


def test_fp8_target_can_reach_norms_when_asked(fresh):
    t = fresh.transformer
    default = set(selected(t, LinearFilter(block_stacks(t), exclude=Fp8Config().exclusions())))
    with_norms = set(
        selected(t, LinearFilter(block_stacks(t), include=("norm",), exclude=Fp8Config(("norm",)).exclusions()))
    )
    assert not any("norm" in n for n in default)
    assert with_norms and all("norm" in n for n in with_norms)


@pytest.mark.parametrize("n, ratio, kept", [(20, 0.25, 15), (40, 0.25, 30), (5, 0.25, 4), (1, 0.5, 1), (10, 0.0, 10)])
def test_kept_indices(n, ratio, kept):
    idx = kept_indices(n, ratio)
    assert len(idx) == kept and idx[0] == 0 and idx[-1] == n - 1 and idx == sorted(set(idx))
    if len(idx) > 1:
        gaps = np.diff(idx)
        assert gaps.max() - gaps.min() <= 1  # evenly spaced


def test_prune_removes_blocks_and_updates_config():
    bundle = load_bundle("small", device="cpu")
    t = bundle.transformer
    ref = _forward(t)
    report = PrunePass().apply(bundle, PruneConfig(0.4, 0.5), PassContext(CPU))
    assert len(t.transformer_blocks) == 3 and len(t.single_transformer_blocks) == 7  # from 5 and 14
    assert t.config.num_layers == 3 and t.config.num_single_layers == 7
    assert report.counters["removed"]["transformer_blocks"] == [1, 3]
    out = _forward(t)
    assert out.shape == ref.shape and _rel(out, ref) > 1e-3  # lossy by design


def test_compile_falls_back_to_eager_on_a_compiler_failure(monkeypatch):
    import torch._dynamo.exc as dynamo_exc

    def broken_compile(fn, **kwargs):
        def run(*a, **k):
            raise dynamo_exc.BackendCompilerFailed("inductor", RuntimeError("duplicate template name"), None)

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    block = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    expected = block(x)
    state = guarded_compile(block, "default", "block")
    torch.testing.assert_close(block(x), expected)
    torch.testing.assert_close(block(x), expected)
    assert state.failed and "BackendCompilerFailed" in state.reason and state.calls["eager"] == 2


def test_compile_does_not_hide_real_errors(monkeypatch):
    monkeypatch.setattr(
        torch, "compile", lambda fn, **kw: lambda *a, **k: (_ for _ in ()).throw(ValueError("bad input"))
    )
    block = torch.nn.Linear(4, 4)
    guarded_compile(block, "default", "block")
    with pytest.raises(ValueError, match="bad input"):
        block(torch.randn(1, 4))


class _Recorder:
    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


def test_bnb_settings_map_to_library_configs(monkeypatch):
    import diffusers
    import transformers

    monkeypatch.setattr(diffusers, "BitsAndBytesConfig", type("DiffusersBnb", (_Recorder,), {}))
    monkeypatch.setattr(transformers, "BitsAndBytesConfig", type("TransformersBnb", (_Recorder,), {}))
    cfg = bnb.BnbConfig(load_in_4bit=True, double_quant=True, device_map="balanced", cpu_offload=True)
    tk = bnb.component_kwargs(cfg, "transformer")
    q = tk["quantization_config"]
    assert type(q).__name__ == "DiffusersBnb" and q.load_in_4bit and q.bnb_4bit_use_double_quant
    assert q.bnb_4bit_quant_type == "nf4" and "proj_out" in q.llm_int8_skip_modules
    ek = bnb.component_kwargs(cfg, "text_encoder")
    assert type(ek["quantization_config"]).__name__ == "TransformersBnb" and ek["device_map"] == "balanced"
    assert bnb.component_kwargs(cfg, "vae") == {} and bnb.component_kwargs(cfg, "image_encoder") == {}
    eight = bnb.component_kwargs(bnb.BnbConfig(cpu_offload=True), "text_encoder_2")
    assert eight["quantization_config"].load_in_8bit and eight["quantization_config"].llm_int8_enable_fp32_cpu_offload
    assert eight["device_map"] == "auto"
    assert "device_map" not in bnb.component_kwargs(bnb.BnbConfig(), "text_encoder")


def test_bnb_configs_build_with_the_real_libraries():
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed here (it needs CUDA to run anyway)")
    q = bnb.component_kwargs(bnb.BnbConfig(load_in_4bit=True), "transformer")["quantization_config"]
    assert type(q).__module__.startswith("diffusers") and q.load_in_4bit


# ---- the optimized-model cache ---------------------------------------------------------------------------


def _load(tmp_path, **extra):
    settings = dict(
        model="tiny-random",
        enable_quant=True,
        enforce_low_precision=True,
        enable_opt_cache=True,
        optimized_transformer=str(tmp_path / "art" / "t.safetensors"),
    )
    return FramePack.load(**{**settings, **extra})


def _video(fp, tmp_path, name):
    return fp.generate(str(_image()), "a cat", out=tmp_path / f"{name}.mp4", seconds=1, steps=2, resolution=64).frames


def _image():
    from tests.conftest import EXAMPLE_IMAGE

    return EXAMPLE_IMAGE


@pytest.mark.parametrize("extra", [{}, {"enable_quant": False, "enable_fp8": True}])
def test_artifact_round_trip_is_identical(tmp_path, caplog, extra):
    built = _load(tmp_path, **extra)
    path = tmp_path / "art" / "t.safetensors"
    manifest = json.loads(path.with_suffix(".json").read_text())
    assert manifest["format"] == artifact.FORMAT and manifest["identity"]["preset"] == "tiny-random"
    assert manifest["settings"]["enforce_low_precision"] is True and manifest["file_sha256"]
    with caplog.at_level("INFO"):
        loaded = _load(tmp_path, **extra)
    assert "Loaded optimized transformer weights from" in caplog.text
    assert getattr(loaded.bundle.transformer, artifact.FROM_ARTIFACT_ATTR, False)
    np.testing.assert_array_equal(_video(built, tmp_path, "a"), _video(loaded, tmp_path, "b"))


def _refusal(tmp_path, caplog, **extra) -> str:
    caplog.clear()
    with caplog.at_level("INFO"):
        fp = _load(tmp_path, **extra)
    assert not getattr(fp.bundle.transformer, artifact.FROM_ARTIFACT_ATTR, False)
    return caplog.text


def test_mismatched_settings_are_refused_and_rebuilt(tmp_path, caplog):
    _load(tmp_path)
    text = _refusal(tmp_path, caplog, quant_int8_mode="weight-only")
    assert "built for other settings: quant_int8_mode dynamic -> weight-only" in text
    assert "Saved optimized transformer weights" in text  # rebuilt for the new settings
    manifest = json.loads((tmp_path / "art" / "t.json").read_text())
    assert manifest["settings"]["quant_int8_mode"] == "weight-only"


def test_truncated_and_tampered_files_are_refused(tmp_path, caplog):
    _load(tmp_path)
    path = tmp_path / "art" / "t.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert "truncated or modified" in _refusal(tmp_path, caplog)
    data = bytearray(path.read_bytes())  # rebuilt above; now flip one byte in the middle
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert "truncated or modified" in _refusal(tmp_path, caplog)


def test_manifest_problems_are_refused(tmp_path, caplog):
    _load(tmp_path)
    manifest_file = tmp_path / "art" / "t.json"
    m = json.loads(manifest_file.read_text())
    manifest_file.write_text(json.dumps({**m, "versions": {**m["versions"], "torchao": "0.0.1"}}))
    assert "built with" in _refusal(tmp_path, caplog)
    manifest_file.write_text("{not json")
    assert "manifest unreadable" in _refusal(tmp_path, caplog)
    m = json.loads(manifest_file.read_text())  # rebuilt, valid again
    manifest_file.write_text(json.dumps({**m, "identity": {**m["identity"], "revision": "other"}}))
    assert "made from other weights" in _refusal(tmp_path, caplog)


def test_optimize_command(tmp_path):
    from typer.testing import CliRunner

    from framepack_turbo.cli import app

    out = tmp_path / "opt"
    result = CliRunner().invoke(app, ["optimize", "--out", str(out), "--model", "tiny-random", "--enable-quant"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "transformer.json").read_text())
    assert manifest["settings"]["enable_quant"] is True
    assert any(p["name"] == "quant" and p["outcome"] == "applied" for p in manifest["passes"])
    fp = FramePack.load(
        "tiny-random",
        enable_quant=True,
        enable_opt_cache=True,
        optimized_transformer=str(out / "transformer.safetensors"),
    )
    assert getattr(fp.bundle.transformer, artifact.FROM_ARTIFACT_ATTR, False)


def test_a_half_precision_load_keeps_framepacks_float32_output():
    """FramePack's bf16 transformer: the final norm in bf16, the final projection (and its input) in float32."""
    half = dict.fromkeys(["transformer", "vae", "text_encoder", "text_encoder_2", "image_encoder"], torch.bfloat16)
    bundle = load_bundle("tiny-random", device="cpu", dtypes=half)
    t = bundle.transformer
    assert t.proj_out.weight.dtype == torch.float32 and t.norm_out.linear.weight.dtype == torch.bfloat16
    assert t.transformer_blocks[0].attn.to_q.weight.dtype == torch.bfloat16
    with torch.no_grad():
        inputs = {
            k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v
            for k, v in _inputs(t).items()
        }
        seen = []
        hook = t.norm_out.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
        out = t(**inputs)[0]
        hook.remove()
    assert seen == [torch.bfloat16] and out.dtype == torch.float32
